"""``cw-pipeline demo``: generate the demo dataset, materialize the whole graph with a line per
finished step, print the mAP table, then serve the Dagster UI (``dg dev``) until Ctrl-C — its
start, the pages a newcomer opens first, and its shutdown."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cw_pipeline.cli.common import DEFAULT_UI_HOST, CLIError, is_loopback
from cw_pipeline.cli.index import dagster_home, generate_demos, load_pipeline
from cw_pipeline.cli.run_console import StepReporter, log_to_file, map_table, terminal
from cw_pipeline.config import project_root
from cw_pipeline.core.jsonsafe import dumps as strict_json
from cw_pipeline.runtime.instance import open_instance
from cw_pipeline.store import REPORT_JSON, FeatureStore, report_path


def add_parser(sub: Any) -> None:
    """The ``demo`` sub-command."""
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
    from cw_pipeline.runtime.runs import CHECK_LOG

    home = dagster_home()
    log_path = home / DEMO_LOG
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON only
    print(f"cw-pipeline demo: full logs in {_shown(log_path)}", file=out, flush=True)
    t0 = time.perf_counter()
    config, defs, indexed, steps = _materialize(args, home, log_path, out, t0)
    if steps == 0:
        print("nothing to materialize: every asset is up to date", file=out)
    reports = FeatureStore(config.reports)  # a folder or a URL (s3://...)
    results = {
        ev: reports.read_json(report_path(ev, REPORT_JSON))["results"]
        for ev in sorted(config.evaluations)
        if reports.exists(report_path(ev, REPORT_JSON))
    }
    seconds = round(time.perf_counter() - t0, 2)
    failed = [f"{k} {c} ({sev})" for k, c, ok, sev in CHECK_LOG if not ok]
    if args.json:
        out_json = {
            "datasets": indexed,
            "seconds": seconds,
            "checks": {"evaluated": len(CHECK_LOG), "failed": failed},
            "reports": results,
            "log": str(log_path),
        }
        if args.no_ui:
            return out_json
        print(strict_json(out_json, sort_keys=False, default=str), flush=True)
    else:
        _print_summary(reports.url(), results, len(CHECK_LOG), failed, seconds, out)
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


def _materialize(
    args: argparse.Namespace, home: Path, log_path: Path, out: Any, t0: float
) -> tuple[Any, Any, dict[str, Any], int]:
    """Generate the demo folders, index every dataset and refresh everything downstream (a
    line per finished step on ``out``, the rest in ``log_path``): (config, definitions,
    indexing summary per dataset, steps run). CLIError naming the failed step and the log."""
    from cw_pipeline.defs.assets import CNN_POOL
    from cw_pipeline.runtime.runs import console_log_level, index_dataset, refresh, run_events

    indexed = {}
    with log_to_file(log_path), terminal(out) as term:
        reporter = StepReporter(term, start=t0)
        config, defs = load_pipeline(args.config)
        done = generate_demos(config, regenerate=args.regenerate)
        if args.regenerate or any(what != "kept" for what in done.values()):
            print(
                f"[{time.perf_counter() - t0:6.1f} s] demo folders: "
                + ", ".join(f"{Path(folder).name} {what}" for folder, what in done.items()),
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
    return config, defs, indexed, reporter.steps


def _print_summary(
    where: str, results: dict[str, Any], checks: int, failed: list[str], seconds: float, out: Any
) -> None:
    """The human summary of the demo: the mAP table, the ``checks`` asset checks evaluated
    (``failed`` among them), the time taken."""
    where = where if "://" in where else _shown(Path(where))
    print(f"\nmAP (reports with figures: {where}/<evaluation>/report.md)\n", file=out)
    print(map_table(results), file=out)
    print("", file=out)
    if checks:
        print(f"asset checks: {checks - len(failed)}/{checks} passed", file=out)
    for line in failed:
        print(f"  failed: {line}", file=out)
    print(f"demo materialized in {seconds:.1f} s", file=out, flush=True)


def ui_base(host: str, port: int) -> str:
    """The address to open for a UI bound to ``host:port`` (loopback for 0.0.0.0 / ::)."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}"


def _serve_ui(
    host: str, port: int, pages: Sequence[tuple[str, str]], log_path: Path, out: Any
) -> None:
    """Run ``dg dev`` (its output appended to ``log_path``) until it ends or Ctrl-C; print
    ``pages`` (what, address) once the UI has loaded the code location."""
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
        print(
            "\nsearch the index in a browser: `make serve` in another terminal "
            "(cw-pipeline serve, http://127.0.0.1:3001)",
            file=out,
        )
        print("\nopen:", file=out)
        width = max(len(what) for what, _ in pages)
        for what, url in pages:
            print(f"  {what + ':':<{width + 1}}  {url}", file=out)
        print(f"\nthe Dagster UI runs until Ctrl-C (its log: {_shown(log_path)})", file=out)
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
