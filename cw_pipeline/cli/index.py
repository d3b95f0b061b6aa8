"""``cw-pipeline index`` and what it shares with ``demo``: the Dagster home (``$DAGSTER_HOME``
or the project's ``.dagster/``), the configured pipeline with its devices checked, the demo
folders generated on first use, and the lines saying what was refreshed and what is left to
automation. Dagster (``cw_pipeline.defs``, ``runs``) is imported when a command runs, not
when the command line is parsed, so the commands that need no instance do not pay for it."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cw_pipeline.cli.common import CLIError
from cw_pipeline.cli.progress import ImageBar, bars_enabled
from cw_pipeline.compute.features import progress_listener
from cw_pipeline.config import load_config, project_root
from cw_pipeline.core.backbones import DeviceUnavailableError, check_device
from cw_pipeline.core.demo import generate_demo
from cw_pipeline.runtime.instance import INSTANCE_YAML, open_instance
from cw_pipeline.store import FeatureStore


def add_parser(sub: Any) -> None:
    """The ``index`` sub-command."""
    ix = sub.add_parser("index", help="index a configured dataset through the Dagster pipeline")
    ix.add_argument("--dataset", required=True, help="a name from the datasets YAML")
    ix.add_argument("--config", type=Path, default=None, help="datasets YAML")
    ix.add_argument("--no-refresh", action="store_true", help="only manifest and features")
    ix.add_argument("--force", action="store_true", help="re-run every shard")
    ix.add_argument("--json", action="store_true")
    ix.add_argument("--quiet", action="store_true", help="no progress bars or run log")
    ix.set_defaults(func=cmd_index)


def dagster_home() -> Path:
    """$DAGSTER_HOME, or the project's ``.dagster/`` seeded with its instance settings
    (``deploy/dagster.yaml``)."""
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    root = project_root()
    path = root / ".dagster"
    path.mkdir(parents=True, exist_ok=True)
    src = root / INSTANCE_YAML
    if src.exists() and not (path / "dagster.yaml").exists():
        shutil.copyfile(src, path / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def load_pipeline(config_path: Path | None) -> tuple[Any, Any]:
    """The configuration (``config_path`` or the default YAML) and its Dagster definitions,
    after checking the devices its runs need."""
    if config_path is not None:
        os.environ["CW_PIPELINE_CONFIG"] = str(Path(config_path).resolve())
    config = load_config(config_path)
    _check_devices(config)
    from cw_pipeline.defs.graph import build_definitions

    return config, build_definitions(config)


def _check_devices(config) -> None:
    """CLIError (one line) when a forward pass of ``index``/``demo`` would need a device this
    machine lacks: ``$CW_PIPELINE_DEVICE``, else every dataset's ``device`` (their runs, and
    the refresh after them, execute in this process)."""
    from cw_pipeline.defs.resources import DEVICE_ENV

    override = os.environ.get(DEVICE_ENV, "").strip()
    if override:
        try:
            check_device(override)
        except DeviceUnavailableError as exc:
            raise CLIError(f"${DEVICE_ENV}: {exc}") from None
        return
    for name, ds in config.datasets.items():
        try:
            check_device(ds.runtime.device)
        except DeviceUnavailableError as exc:
            raise CLIError(
                f"{config.source}: dataset {name!r}: {exc} (or set ${DEVICE_ENV}=cpu for this "
                "process)"
            ) from None


def generate_demos(config, regenerate: bool = False) -> dict[str, str]:
    """Generate the demo folders that do not exist yet (or, with ``regenerate``, rebuild
    those that hold the generator's unchanged files for other parameters); never touches
    anything else. Returns each demo folder's path -> what was done (generated, regenerated,
    kept); CLIError naming each folder's outcome when ``regenerate`` is refused."""
    roots = {ds.generate_root for ds in config.datasets.values() if ds.generate == "demo"}
    done: dict[str, str] = {}
    for root in sorted(r for r in roots if r is not None):
        try:
            info = generate_demo(root, regenerate=regenerate)
        except FileExistsError as exc:
            raise CLIError(str(exc)) from exc
        done.update({str(d.folder): d.status for d in info.datasets.values()})
    return done


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    """Index ``--dataset`` (new or changed shards), then refresh what depends on it."""
    from cw_pipeline.defs.assets import CNN_POOL
    from cw_pipeline.runtime.pending import daemon_running, pending_refreshes
    from cw_pipeline.runtime.runs import console_log_level, index_dataset, refresh

    home = dagster_home()
    config, defs = load_pipeline(args.config)
    ds = config.dataset(args.dataset)
    if ds.generate == "demo":
        generate_demos(config)
    t0 = time.perf_counter()
    bars = bars_enabled(args.quiet)
    # Dagster's run log on the console: warnings only under a bar (or --quiet), else progress
    # lines (INFO), or every event with --verbose.
    level = "WARNING" if bars or args.quiet else "DEBUG" if args.verbose else "INFO"
    with open_instance(home, pools=[CNN_POOL]) as instance, console_log_level(level):
        with ImageBar(f"{ds.name} features", enabled=bars) as bar, progress_listener(bar.listener):
            res = index_dataset(
                defs, instance, config, ds.name, FeatureStore(config.warehouse), force=args.force
            )
        refreshed = [] if args.no_refresh else refresh(defs, instance)
        pending = pending_refreshes(defs, instance)
        daemon = daemon_running(instance)
    out = res.as_dict()
    out["refreshed"] = refreshed  # materialized by this command, in order
    out["pending"] = [p.as_dict() for p in pending]  # stale now: automation refreshes them
    out["daemon"] = "running" if daemon else "not running"
    out["see"] = index_see_also()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if not args.json:
        print(
            f"{ds.name}: {out['shards']} shards, {out['images']} images; "
            f"{out['forward_passes']} forward passes, {out['reused']} reused, "
            f"{out['rejected']} rejected; refreshed {len(refreshed)} assets "
            f"({out['seconds']:.1f} s)"
        )
        print("\n".join(format_refresh(refreshed, pending, daemon)))
        return None  # type: ignore[return-value]
    return out


def index_see_also() -> list[str]:
    """Where a user sees what automation refreshes after ``cw-pipeline index``."""
    return [
        "the Runs page of the Dagster UI (make ui: http://127.0.0.1:3000/runs), and the "
        "ticks of the refresh_downstream sensor under Automation",
        "cw-pipeline datasets: the state of every dataset's index",
    ]


def format_refresh(refreshed: Sequence[str], pending: Sequence[Any], daemon: bool) -> list[str]:
    """The lines ``cw-pipeline index`` prints under its summary: what it refreshed, what is
    still stale and who refreshes it when (:class:`cw_pipeline.runtime.pending.Pending`), where to
    look."""
    lines = []
    if refreshed:
        lines.append(f"  refreshed by this command: {', '.join(refreshed)}")
    if not pending:
        lines.append("  nothing else is stale")
        return lines
    lines.append("  stale on this instance, left to automation:")
    for p in pending:
        parts = f" [{', '.join(p.partitions)}]" if p.partitions else ""
        then = f"; then {', '.join(p.then)}" if p.then else ""
        lines.append(f"    {p.asset}{parts}: {p.when}{then}")
    if not daemon and any(p.reason != "running" for p in pending):
        lines.append(
            "  the Dagster daemon is not running on this instance: `make ui` (or `make demo`) "
            "starts it"
        )
    lines += [f"  see: {s}" for s in index_see_also()]
    return lines
