"""``cw-pipeline``: the command line.

Sub-commands:

* ``evaluate`` — run the retrieval library end to end on an image folder with a known layout.
* ``index`` — index a configured dataset through the Dagster pipeline (new or changed shards).
* ``demo`` — generate the demo dataset, materialize the whole graph, print the mAP report and
  (unless ``--no-ui``) serve the Dagster UI.
* ``report-figures`` — redraw the report and pictures of materialized evaluations.
* ``download`` — fetch a benchmark from its official sources into the configured layout
  (:mod:`cw_pipeline.download`).
* ``search`` — rank a configured dataset's indexed images for a query image
  (:mod:`cw_pipeline.query`).
* ``datasets`` — the configured datasets and the state of their index
  (:mod:`cw_pipeline.compute.catalog`).
* ``serve`` — the search page and its JSON API (:mod:`cw_pipeline.web`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from cw_pipeline.compute.features import progress_listener, progress_logger
from cw_pipeline.core.backbones import BACKBONES, DEFAULT_BACKBONE, check_device
from cw_pipeline.core.experiment import FeatureSet, Method, SearchParams, settings_record
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.jsonsafe import dumps as strict_json
from cw_pipeline.core.methods import AGGREGATIONS
from cw_pipeline.core.runner import (
    LAYOUTS,
    evaluate_methods,
    extract_features,
    extract_queries,
    grouped_groundtruth,
    load_benchmark,
    pca_groups,
)
from cw_pipeline.core.search import RerankConfig
from cw_pipeline.core.validation import error_message
from cw_pipeline.instance import InstanceBusyError
from cw_pipeline.progress import ImageBar, bars_enabled

logger = logging.getLogger("cw_pipeline")

#: The measured default (see README, "Results on UKBench").
DEFAULT_METHOD = "ofa"
DEFAULT_N_PCA = 8


class CLIError(Exception):
    """An error the user can act on: printed as one line, exit status 2."""


def _add_extraction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    g.add_argument("--layer", default=None, help="layer giving X (default: the CAM layer)")
    g.add_argument("--weights", default=None, help="packaged | imagenet | random | FILE")
    g.add_argument(
        "--resize",
        default=None,
        help="native | paper[:MIN[:MAX]] | fixed:WxH | paper_fixed "
        "(default: native for ukbench/holidays, paper:720:1024 otherwise)",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=16)


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("aggregation and search")
    g.add_argument(
        "--aggregated-classes",
        "--n-classes",
        dest="aggregated_classes",
        type=int,
        default=64,
        help="N_C, classes aggregated per descriptor (the images store as many classes as "
        "the search settings read)",
    )
    g.add_argument(
        "--n-pca", type=int, default=DEFAULT_N_PCA, help="class vectors per image for PCA"
    )
    g.add_argument("--pca-dims", type=int, default=None, help="keep this many PCA dimensions")
    g.add_argument(
        "--qe", type=int, default=None, help="query expansion with the top K (every method)"
    )
    g.add_argument(
        "--rerank", type=int, default=None, help="CAM-box re-ranking of the top R (every method)"
    )
    g.add_argument(
        "--rerank-query-classes",
        "--rerank-classes",
        dest="rerank_query_classes",
        type=int,
        default=6,
        help="query classes whose CAMs re-rank the top R (default: 6)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cw-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate methods on an image folder with ground truth")
    ev.add_argument("--layout", required=True, choices=LAYOUTS)
    ev.add_argument("--images", required=True, type=Path, help="image folder")
    ev.add_argument("--groundtruth", type=Path, default=None, help="gt folder or gnd_*.pkl")
    ev.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"{' | '.join(AGGREGATIONS)}, with +r<R> and/or +qe<K> (repeatable; default: ofa, "
        "with --qe/--rerank applied)",
    )
    pca = ev.add_mutually_exclusive_group()
    pca.add_argument("--pca-from", type=Path, default=None, help="image folder to learn PCA on")
    pca.add_argument(
        "--pca-split",
        action="store_true",
        help="split the objects in two halves; evaluate each with PCA learned on the other",
    )
    ev.add_argument("--protocol", choices=("paper", "crop"), default="crop")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_extraction_args(ev)
    _add_search_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    ix = sub.add_parser("index", help="index a configured dataset through the Dagster pipeline")
    ix.add_argument("--dataset", required=True, help="a name from the datasets YAML")
    ix.add_argument("--config", type=Path, default=None, help="datasets YAML")
    ix.add_argument("--no-refresh", action="store_true", help="only manifest and features")
    ix.add_argument("--force", action="store_true", help="re-run every shard")
    ix.add_argument("--json", action="store_true")
    ix.add_argument("--quiet", action="store_true", help="no progress bars or run log")
    ix.set_defaults(func=cmd_index)

    dm = sub.add_parser("demo", help="build the demo, materialize everything, serve the UI")
    dm.add_argument("--config", type=Path, default=None, help="datasets YAML")
    dm.add_argument("--no-ui", action="store_true", help="print the report and exit")
    dm.add_argument(
        "--regenerate",
        action="store_true",
        help="rebuild demo folders that differ from the generator's output (refused when a "
        "folder holds files the generator did not write); by default an existing demo folder "
        "is the user's data and is never modified",
    )
    dm.add_argument(
        "--host",
        default=DEFAULT_UI_HOST,
        help="address the UI binds to (default: 127.0.0.1, loopback only; the UI has no "
        "authentication)",
    )
    dm.add_argument("--port", type=int, default=3000)
    dm.add_argument("--json", action="store_true")
    dm.set_defaults(func=cmd_demo)
    _add_download_parser(sub)
    _add_query_parsers(sub)
    _add_report_figures_parser(sub)
    _add_serve_parser(sub)
    return parser


def _dagster_home() -> Path:
    """$DAGSTER_HOME, or the project's ``.dagster/`` seeded with its instance settings
    (``deploy/dagster.yaml``)."""
    import os
    import shutil

    from cw_pipeline.config import project_root
    from cw_pipeline.instance import INSTANCE_YAML

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


def _pipeline(config_path: Path | None):
    import os

    from cw_pipeline.config import load_config

    if config_path is not None:
        os.environ["CW_PIPELINE_CONFIG"] = str(Path(config_path).resolve())
    config = load_config(config_path)
    _check_devices(config)
    from cw_pipeline.defs import build_definitions

    return config, build_definitions(config)


def _check_devices(config) -> None:
    """CLIError (one line) when a forward pass of ``index``/``demo`` would need a device this
    machine lacks: ``$CW_PIPELINE_DEVICE``, else every dataset's ``device`` (their runs, and
    the refresh after them, execute in this process)."""
    import os

    from cw_pipeline.core.backbones import DeviceUnavailableError
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


def _generate(config, regenerate: bool = False) -> list[str]:
    """Generate the demo folders that do not exist yet (or, with ``regenerate``, rebuild
    those that hold only generated files); never touches anything else."""
    from cw_pipeline.core.demo import generate_demo

    roots = {ds.generate_root for ds in config.datasets.values() if ds.generate == "demo"}
    made = []
    for root in sorted(r for r in roots if r is not None):
        try:
            info = generate_demo(root, regenerate=regenerate)
        except FileExistsError as exc:
            raise CLIError(str(exc)) from exc
        made += list(info.generated)
    return made


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    from cw_pipeline.defs.assets import CNN_POOL
    from cw_pipeline.instance import open_instance
    from cw_pipeline.pending import daemon_running, pending_refreshes
    from cw_pipeline.runs import console_log_level, index_dataset, refresh
    from cw_pipeline.store import FeatureStore

    home = _dagster_home()
    config, defs = _pipeline(args.config)
    ds = config.dataset(args.dataset)
    if ds.generate == "demo":
        _generate(config)
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
    still stale and who refreshes it when (:class:`cw_pipeline.pending.Pending`), where to
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


#: Where ``cw-pipeline demo`` serves the Dagster UI unless ``--host`` says otherwise.
DEFAULT_UI_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface only (``localhost``, 127.x, ``::1``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_command(host: str, port: int) -> list[str]:
    """The ``dg dev`` command line serving the UI on ``host:port`` only (run in the project
    root: the code location comes from ``[tool.dg]`` in pyproject.toml)."""
    return ["dg", "dev", "-h", host, "-p", str(port)]


#: Where ``cw-pipeline demo`` writes its full log, in ``$DAGSTER_HOME`` (not in its ``logs/``,
#: which Dagster's processes manage).
DEMO_LOG = Path("cw-pipeline-demo.log")
#: Seconds the demo waits for the UI to load the code location.
UI_START_TIMEOUT = 300.0


def lineage_url(base: str, groups: Sequence[str]) -> str:
    """The global Lineage page with every one of ``groups`` expanded (the page opens with
    groups collapsed)."""
    expanded = ",".join(f"global@global:{g}" for g in sorted(groups))
    return f"{base}/asset-groups?expanded={expanded}"


def ui_pages(base: str, groups: Sequence[str], evaluation: str | None) -> list[tuple[str, str]]:
    """(what, address) of the UI pages a newcomer opens first."""
    pages = [
        ("Lineage, the asset graph (every group expanded)", lineage_url(base, groups)),
        ("Runs, what ran and when", f"{base}/runs"),
    ]
    if evaluation is not None:
        pages.append((f"the mAP report of {evaluation}", f"{base}/assets/{evaluation}/map_report"))
    return pages


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any] | None:
    """Generate the demo, materialize every asset (a line per finished step, everything else in
    ``$DAGSTER_HOME/cw-pipeline-demo.log``), print the mAP table, then serve the UI with
    ``dg dev`` until Ctrl-C (unless ``--no-ui``)."""
    from cw_pipeline.defs.assets import CNN_POOL
    from cw_pipeline.instance import open_instance
    from cw_pipeline.run_console import StepReporter, log_to_file, map_table, terminal
    from cw_pipeline.runs import CHECK_LOG, console_log_level, index_dataset, refresh, run_events
    from cw_pipeline.store import REPORT_JSON, FeatureStore, report_path

    home = _dagster_home()
    log_path = home / DEMO_LOG
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON only
    print(f"cw-pipeline demo: full logs in {_shown(log_path)}", file=out, flush=True)
    t0 = time.perf_counter()
    indexed = {}
    with log_to_file(log_path), terminal(out) as term:
        reporter = StepReporter(term, start=t0)
        config, defs = _pipeline(args.config)
        made = _generate(config, regenerate=args.regenerate)
        if made:
            print(
                f"[{time.perf_counter() - t0:6.1f} s] generated the demo images: {', '.join(made)}",
                file=term,
                flush=True,
            )
        store = FeatureStore(config.warehouse)
        try:
            with (
                open_instance(home, pools=[CNN_POOL]) as instance,
                console_log_level("CRITICAL", evaluator=False),
                run_events(reporter),
            ):
                for name in config.datasets:
                    indexed[name] = index_dataset(defs, instance, config, name, store).as_dict()
                refresh(defs, instance, include_cron=True)
        except Exception as exc:
            if not reporter.failed:  # not a step of a run: not the pipeline's
                raise
            raise CLIError(
                f"the demo stopped: {reporter.failed[-1]} (the traceback is in {log_path})"
            ) from exc
    if reporter.steps == 0:
        print("nothing to materialize: every asset is up to date", file=out)
    reports = FeatureStore(config.reports)  # a folder or a URL (s3://...)
    results = {
        ev: reports.read_json(report_path(ev, REPORT_JSON))["results"]
        for ev in sorted(config.evaluations)
        if reports.exists(report_path(ev, REPORT_JSON))
    }
    seconds = round(time.perf_counter() - t0, 2)
    failed = [f"{k} {c} ({sev})" for k, c, ok, sev in CHECK_LOG if not ok]
    checks = {"evaluated": len(CHECK_LOG), "failed": failed}
    if args.json:
        out_json = {
            "datasets": indexed,
            "seconds": seconds,
            "checks": checks,
            "reports": results,
            "log": str(log_path),
        }
        if args.no_ui:
            return out_json
        print(strict_json(out_json, sort_keys=False, default=str), flush=True)
    else:
        where = reports.url()
        where = where if "://" in where else _shown(Path(where))
        print(f"\nmAP (reports with figures: {where}/<evaluation>/report.md)\n", file=out)
        print(map_table(results), file=out)
        print("", file=out)
        if CHECK_LOG:
            passed = len(CHECK_LOG) - len(failed)
            print(f"asset checks: {passed}/{len(CHECK_LOG)} passed", file=out)
        for line in failed:
            print(f"  failed: {line}", file=out)
        print(f"demo materialized in {seconds:.1f} s", file=out, flush=True)
    if args.no_ui:
        if not args.json:
            print("`make ui` (or `make demo`) serves the Dagster UI over it", file=out)
        return None
    groups = sorted({node.group_name for node in defs.resolve_asset_graph().asset_nodes})
    base = ui_base(args.host, args.port)
    _serve_ui(
        args.host, args.port, ui_pages(base, groups, next(iter(results), None)), log_path, out
    )
    return None


def ui_base(host: str, port: int) -> str:
    """The address to open for a UI bound to ``host:port`` (loopback for 0.0.0.0 / ::)."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}"


def _serve_ui(
    host: str, port: int, pages: Sequence[tuple[str, str]], log_path: Path, out: Any
) -> None:
    """Run ``dg dev`` (its output appended to ``log_path``) until it ends or Ctrl-C; print
    ``pages`` (what, address) once the UI has loaded the code location."""
    import os
    import signal
    import subprocess

    from cw_pipeline.config import project_root

    if not is_loopback(host):
        print(
            f"warning: the Dagster UI has no authentication and {host} is not a loopback "
            "address; expose it through an SSH tunnel or a reverse proxy with authentication",
            file=sys.stderr,
        )
    print(f"starting the Dagster UI (dg dev) on {ui_base(host, port)} ...", file=out, flush=True)
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix  # dg warns when the project's .venv is not the active one
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"---- {' '.join(ui_command(host, port))} ----\n")
        log.flush()
        proc = subprocess.Popen(
            ui_command(host, port),
            env=env,
            cwd=project_root(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # A SIGTERM (a service manager, a test) stops the UI too, like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _wait_for_ui(proc, ui_base(host, port), log_path)
        print("\nopen:", file=out)
        width = max(len(what) for what, _ in pages)
        for what, url in pages:
            print(f"  {what + ':':<{width + 1}}  {url}", file=out)
        print(f"\nthe Dagster UI runs until Ctrl-C (its log: {_shown(log_path)})", file=out)
        print(
            "search the index in a browser: `make serve` (cw-pipeline serve), "
            "http://127.0.0.1:3001",
            file=out,
        )
        out.flush()
        return_code = proc.wait()
    except KeyboardInterrupt:
        print("stopping the Dagster UI ...", file=out, flush=True)
        return_code = _stop(proc, interrupted=True)
    except BaseException:
        _stop(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if return_code not in (0, 130, -2):
        raise CLIError(f"dg dev exited with status {return_code}; its log: {log_path}")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: Any, interrupted: bool = False) -> int:
    """Stop ``dg dev`` as Ctrl-C does (SIGINT: it stops the webserver and the daemon), then
    harder if it does not end. ``interrupted``: a Ctrl-C reached it already (the terminal
    signals the whole foreground group), so give it time first: a second SIGINT would cut its
    own shutdown short."""
    import signal
    import subprocess

    steps = [(None, 120.0)] if interrupted else []
    steps += [(signal.SIGINT, 120.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, 30.0)]
    for sig, wait in steps:
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _wait_for_ui(proc: Any, base: str, log_path: Path, timeout: float = UI_START_TIMEOUT) -> None:
    """Wait until the webserver at ``base`` has loaded every code location; CLIError naming
    the log when ``proc`` exits first or it takes longer than ``timeout``."""
    import json
    import urllib.request

    query = (
        "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    )
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise CLIError(
                f"dg dev exited with status {proc.returncode} before the UI answered; its log: "
                f"{log_path}"
            )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                body = json.loads(resp.read())
            entries = body["data"]["workspaceOrError"]["locationEntries"]
            errors = [
                (e["locationOrLoadError"].get("message", "").strip().splitlines() or ["?"])[0]
                for e in entries
                if (e.get("locationOrLoadError") or {}).get("__typename") == "PythonError"
            ]
            if errors:
                _stop(proc)
                raise CLIError(f"the UI could not load the code location: {errors[0]}")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not answering yet
        if time.monotonic() > deadline:
            _stop(proc)
            raise CLIError(
                f"the Dagster UI did not load within {timeout:.0f} s; its log: {log_path}"
            )
        time.sleep(0.5)


def _add_serve_parser(sub: Any) -> None:
    from cw_pipeline.web import DEFAULT_PORT
    from cw_pipeline.web.engine import DEFAULT_MAP_CACHE_BYTES, DEFAULT_MAX_UPLOAD_BYTES

    sv = sub.add_parser("serve", help="serve the search page over the materialized index")
    sv.add_argument("--config", type=Path, default=None, help="datasets YAML")
    sv.add_argument(
        "--host",
        default=DEFAULT_UI_HOST,
        help="address to bind (default: 127.0.0.1, loopback only; the page has no authentication)",
    )
    sv.add_argument("--port", type=int, default=DEFAULT_PORT)
    sv.add_argument(
        "--dagster-url",
        default="http://127.0.0.1:3000",
        help="the Dagster UI that result pages link to (default: http://127.0.0.1:3000)",
    )
    sv.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest query image accepted (default: %(default)g MiB)",
    )
    sv.add_argument(
        "--map-cache-mb",
        type=float,
        default=DEFAULT_MAP_CACHE_BYTES / 2**20,
        help="database feature maps (OnA, +r) kept across searches, least recently used "
        "dropped first; 0 keeps none (default: %(default)g MiB)",
    )
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from cw_pipeline.web import serve
    from cw_pipeline.web.engine import WebError

    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}")
    if args.map_cache_mb < 0:
        raise CLIError(f"--map-cache-mb must be >= 0, got {args.map_cache_mb:g}")
    print(f"serving the search page on http://{args.host}:{args.port}", flush=True)
    if not is_loopback(args.host):
        print(
            f"warning: the search page has no authentication and {args.host} is not a "
            "loopback address; expose it through an SSH tunnel or a reverse proxy with "
            "authentication",
            file=sys.stderr,
            flush=True,
        )
    try:
        serve(
            args.config,
            args.host,
            args.port,
            dagster_url=args.dagster_url,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            map_cache_bytes=int(args.map_cache_mb * 2**20),
        )
    except WebError as exc:
        raise CLIError(exc.message) from exc


def _add_download_parser(sub: Any) -> None:
    from cw_pipeline.download import ALIASES, CATALOGUE, DEFAULT_TIMEOUT, MIRROR_ENV

    names = ", ".join([*CATALOGUE, *ALIASES])
    dl = sub.add_parser(
        "download",
        help="fetch Oxford5k, Paris6k, their ground truth or the distractors",
        description="Download a benchmark from its official sources into the layout of its "
        "entry in the datasets YAML (or, while the entry is commented out, the layout that "
        "entry would use): resumable, verified, safely extracted.",
    )
    dl.add_argument("name", metavar="NAME", help=f"one of: {names}")
    dl.add_argument("--config", type=Path, default=None, help="datasets YAML")
    dl.add_argument(
        "--root",
        type=Path,
        default=None,
        help="use the default layout under this folder instead of the config's",
    )
    dl.add_argument(
        "--mirror",
        default=None,
        help=f"fetch scheme://host/path from MIRROR/host/path instead (or ${MIRROR_ENV})",
    )
    dl.add_argument(
        "--distractor-archives",
        type=int,
        default=None,
        metavar="N",
        help="flickr100k: how many 10k-image revisitop1m archives (default 10, at most 100)",
    )
    dl.add_argument("--dry-run", action="store_true", help="print what would be fetched, where")
    dl.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    dl.add_argument("--keep-archives", action="store_true", help="keep archives once extracted")
    dl.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to connect / per read"
    )
    dl.add_argument("--cache", type=Path, default=None, help="archive folder (default: downloads/)")
    dl.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> dict[str, Any] | None:
    from cw_pipeline import download

    plan = download.plan_download(
        args.name,
        config=args.config,
        root=args.root,
        mirror=download.resolve_mirror(args.mirror),
        distractor_archives=args.distractor_archives,
        cache=args.cache,
    )
    if args.dry_run:
        print("\n".join(download.describe_plan(plan)))
        return None
    if args.timeout <= 0:
        raise CLIError(f"--timeout must be positive, got {args.timeout}")
    download.run_plan(
        plan,
        progress=bars_enabled(args.quiet),
        log=None if args.quiet else print,
        keep_archives=args.keep_archives,
        timeout=args.timeout,
    )
    return None


def _add_query_parsers(sub: Any) -> None:
    """``search`` and ``datasets``: read the materialized index (no Dagster instance)."""
    se = sub.add_parser(
        "search", help="rank a configured dataset's indexed images for a query image"
    )
    se.add_argument("image", type=Path, help="query image file")
    se.add_argument("--dataset", required=True, help="a name from the datasets YAML")
    se.add_argument(
        "--box",
        nargs=4,
        type=float,
        metavar=("X1", "Y1", "X2", "Y2"),
        help="query region in the (upright) image's pixels",
    )
    se.add_argument("--top", type=int, default=10, help="results to print (default 10)")
    se.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"{' | '.join(AGGREGATIONS)}, optionally +r<R>/+qe<K> (default: ofa)",
    )
    se.add_argument("--qe", type=int, default=None, help="query expansion with the top K")
    se.add_argument("--rerank", type=int, default=None, help="CAM-box re-ranking of the top R")
    se.add_argument(
        "--protocol",
        choices=("crop", "paper"),
        default=None,
        help="how a box is applied (default: the dataset's query_protocol)",
    )
    se.add_argument("--sheet", type=Path, default=None, help="write a results sheet (PNG)")
    se.add_argument("--config", type=Path, default=None, help="datasets YAML")
    se.add_argument("--json", action="store_true", help="print one JSON object")
    se.set_defaults(func=cmd_search)

    da = sub.add_parser("datasets", help="configured datasets and the state of their index")
    da.add_argument("--config", type=Path, default=None, help="datasets YAML")
    da.add_argument("--json", action="store_true", help="print one JSON object")
    da.set_defaults(func=cmd_datasets)


def cmd_search(args: argparse.Namespace) -> dict[str, Any] | None:
    from cw_pipeline.config import load_config
    from cw_pipeline.query import format_results, search

    method = Method.parse(args.method)
    for name in ("qe", "rerank"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CLIError(f"--{name} must be >= 0, got {value}")
    method = Method(
        method.aggregation,
        rerank=method.rerank if args.rerank is None else args.rerank,
        qe=method.qe if args.qe is None else args.qe,
    )
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    if args.sheet is not None and args.sheet.suffix.lower() != ".png":
        raise CLIError(f"--sheet writes a PNG: give a file ending in .png, not {args.sheet}")
    config = load_config(args.config)
    result = search(
        config,
        args.dataset,
        args.image,
        box=args.box,
        top=args.top,
        method=method,
        protocol=args.protocol,
    )
    out = result.as_dict()
    if args.sheet is not None:
        from cw_pipeline.figures import SheetItem, results_sheet, save_png

        items = [SheetItem(h.path, h.score, caption=h.image_id) for h in result.hits]
        title = f"{result.dataset} | {result.method} | {result.query.name}"
        out["sheet"] = str(
            save_png(results_sheet(result.query, result.box, items, title), args.sheet)
        )
    if args.json:
        return out
    print(format_results(result))
    if args.sheet is not None:
        print(f"results sheet: {out['sheet']}")
    return None


def cmd_datasets(args: argparse.Namespace) -> dict[str, Any] | None:
    from cw_pipeline.compute.catalog import format_table, list_datasets
    from cw_pipeline.config import load_config

    config = load_config(args.config)
    statuses = list_datasets(config)
    if args.json:
        return {"config": str(config.source), "datasets": [s.as_dict() for s in statuses]}
    print(format_table(statuses))
    return None


def _add_report_figures_parser(sub: Any) -> None:
    rf = sub.add_parser(
        "report-figures",
        help="redraw the report and pictures of materialized evaluations",
        description="Redraw data/reports/<evaluation>/ (report.md, results sheets, CAM "
        "overlays, precision-recall curves, per-query AP) from the stored rankings.",
    )
    rf.add_argument("evaluation", nargs="*", help="evaluation names (default: every one)")
    rf.add_argument("--config", type=Path, default=None, help="datasets YAML")
    rf.add_argument(
        "--queries", type=int, default=100, help="results sheets per evaluation (default 100)"
    )
    rf.add_argument("--top", type=int, default=10, help="results per sheet (default 10)")
    rf.add_argument("--method", default=None, help="method of the sheets (default: best mAP)")
    rf.add_argument("--cams", type=int, default=3, help="CAM overlays (0: no network needed)")
    rf.add_argument("--json", action="store_true", help="print one JSON object")
    rf.set_defaults(func=cmd_report_figures)


def cmd_report_figures(args: argparse.Namespace) -> dict[str, Any] | None:
    from cw_pipeline.config import load_config
    from cw_pipeline.report_figures import FigureOptions, redraw

    for name, low in (("queries", 0), ("top", 1), ("cams", 0)):
        if getattr(args, name) < low:
            raise CLIError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    options = FigureOptions(
        max_queries=args.queries, top=args.top, cam_samples=args.cams, method=args.method
    )
    config = load_config(args.config)
    names = args.evaluation or sorted(config.evaluations)
    done = [redraw(config, name, options) for name in names]
    if args.json:
        return {"evaluations": done}
    for d in done:
        print(
            f"{d['evaluation']}: {d['queries']} results sheets ({d['method']}), {d['cams']} CAM "
            f"overlays, {len(d['charts'])} charts in {d['folder']}"
        )
    return None


def _methods(args: argparse.Namespace) -> list[Method]:
    """The evaluated methods: ``--qe``/``--rerank`` apply to each ``--method`` (as in
    ``search``), never silently ignored."""
    for name in ("qe", "rerank"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CLIError(f"--{name} must be >= 0, got {value}")
    texts = args.method or [DEFAULT_METHOD]
    out = []
    for text in texts:
        m = Method.parse(text)
        out.append(
            Method(
                m.aggregation,
                rerank=m.rerank if args.rerank is None else args.rerank,
                qe=m.qe if args.qe is None else args.qe,
            )
        )
    return out


def _search_params(args: argparse.Namespace) -> SearchParams:
    """The search settings of the command line (CLIError naming the first invalid one)."""
    try:
        return SearchParams(
            aggregated_classes=args.aggregated_classes,
            n_pca=args.n_pca,
            pca_dims=args.pca_dims,
            rerank=RerankConfig(query_classes=args.rerank_query_classes),
        )
    except ValidationError as exc:
        raise CLIError(error_message(exc.errors()[0])) from None


def _extractor(
    args: argparse.Namespace, resize: str, params: SearchParams, keep_maps: bool
) -> FeatureExtractor:
    """The extractor of ``evaluate``: images store the classes ``params`` read, no more."""
    try:
        config = ExtractionConfig(
            backbone=args.backbone,
            layer=args.layer,
            weights=args.weights,
            resize=resize,
            stored_classes=params.classes_needed,
        )
    except ValidationError as exc:
        raise CLIError(error_message(exc.errors()[0])) from None
    return FeatureExtractor(
        config,
        device=args.device,
        num_threads=args.threads,
        batch_size=args.batch_size,
        keep_maps=keep_maps,
    )


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Everything that can be checked is checked before the first forward pass: methods, device,
    # the PCA folder, the image folder and its ground truth.
    methods = _methods(args)
    needs_pca = any(m.uses_pca for m in methods)
    if needs_pca and not (args.pca_from or args.pca_split):
        raise CLIError(
            "methods with PCA need a training set: --pca-from DIR or --pca-split "
            "(the evaluated images are never used to fit PCA)"
        )
    check_device(args.device)
    pca_images = _pca_images(args.pca_from)
    bench = load_benchmark(args.layout, args.images, args.groundtruth)
    if args.pca_split and not bench.grouped:
        raise CLIError(f"--pca-split needs a grouped layout (ukbench, holidays), not {args.layout}")
    resize = args.resize or ("native" if bench.grouped else "paper:720:1024")
    params = _search_params(args)
    extractor = _extractor(args, resize, params, keep_maps=any(m.needs_maps for m in methods))
    with _progress(args, "features") as progress:
        feats = extract_features(extractor, bench.ids, bench.paths, progress)
    result: dict[str, Any] = {
        "dataset": bench.name,
        "images": len(bench.ids),
        **settings_record(extractor.config, params, methods),
    }
    if args.pca_split:
        per_half = []
        for group in pca_groups(len(feats), bench.labels):
            db, train = feats.subset(group.rows), feats.subset(group.training)
            scores = evaluate_methods(
                methods,
                db,
                None,
                train,
                params,
                extractor,
                groundtruth=grouped_groundtruth(args.layout, db.ids),
                pca_metadata={"training_set": f"{bench.name}-half{group.training_half}"},
            )
            per_half.append([s.as_dict() for s in scores])
        merged = []
        for i, m in enumerate(methods):
            entry: dict[str, Any] = {"method": m.name}
            for key in ("map", "ns_score"):
                vals = [half[i][key] for half in per_half if key in half[i]]
                if vals:
                    entry[key] = round(float(np.mean(vals)), 4)
            entry["halves"] = [half[i] for half in per_half]
            merged.append(entry)
        result["pca"] = "split"
        result["results"] = merged
    else:
        train = _training_features(args, extractor, pca_images)
        queries = None
        if not bench.grouped:
            queries = extract_queries(extractor, bench, args.protocol)
        scores = evaluate_methods(
            methods,
            feats,
            queries,
            train,
            params,
            extractor,
            groundtruth=bench.groundtruth,
            pca_metadata={"training_set": str(args.pca_from)},
        )
        result["pca"] = str(args.pca_from) if args.pca_from else None
        result["protocol"] = None if bench.grouped else args.protocol
        result["results"] = [s.as_dict() for s in scores]
    first = result["results"][0]
    result["method"] = first["method"]
    result["map"] = first["map"]
    if "ns_score" in first:
        result["ns_score"] = first["ns_score"]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _pca_images(folder: Path | None) -> list[tuple[str, Path]]:
    """(id, path) of the images under ``--pca-from`` (empty without it); CLIError naming the
    folder when it is missing, not a folder or holds no images."""
    if folder is None:
        return []
    from cw_pipeline.core.datasets import scan_image_folder

    root = Path(folder)
    if not root.exists():
        raise CLIError(f"--pca-from folder not found: {root}")
    if not root.is_dir():
        raise CLIError(f"--pca-from is not a folder: {root}")
    found = scan_image_folder(root)
    if not found:
        raise CLIError(f"no images under --pca-from {root}")
    return [(i, root / r) for i, r in found]


def _training_features(
    args: argparse.Namespace, extractor: FeatureExtractor, images: list[tuple[str, Path]]
) -> FeatureSet:
    """Features of the ``--pca-from`` images (an empty set, never used, without PCA)."""
    if not images:
        return FeatureSet(
            [],
            np.zeros((0, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 4)),
        )
    with _progress(args, "PCA training features") as progress:
        return extract_features(extractor, [i for i, _ in images], [p for _, p in images], progress)


@contextlib.contextmanager
def _progress(args: argparse.Namespace, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback: a bar on a terminal (unless --quiet), else log lines with -v."""
    if bars_enabled(args.quiet):
        with ImageBar(label) as bar:
            yield bar
    elif args.verbose:
        yield progress_logger(logger, label, every_seconds=5)
    else:
        yield None


def _print_human(result: dict[str, Any]) -> None:
    print(f"dataset {result['dataset']}: {result['images']} images, backbone {result['backbone']}")
    for r in result["results"]:
        ns = f"  N-S {r['ns_score']:.3f}" if "ns_score" in r else ""
        rev = ""
        if "revisited" in r:
            rev = "  E/M/H " + "/".join(
                f"{r['revisited'][k]:.3f}" for k in ("easy", "medium", "hard")
            )
        print(f"  {r['method']:<16} mAP {r['map']:.4f}{ns}{rev}")
    print(f"  ({result['seconds']:.1f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("cw-pipeline: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError, KeyError, InstanceBusyError) as exc:
        if args.debug:
            raise
        print(f"cw-pipeline: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        if getattr(args, "json", False):
            print(strict_json(result, sort_keys=False, default=str))
        elif args.command == "evaluate":
            _print_human(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
