"""The README's demo on a fresh instance: every asset materialized, every check passed, and the
webserver's GraphQL endpoint reports the lineage graph with materialized assets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from cw_pipeline.cli import demo
from cw_pipeline.config import load_config
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline_tests.e2e.conftest import BIN, REPO, graphql
from cw_pipeline_tests.e2e.processes import free_port

#: What a newcomer must not find in the demo's terminal output.
ALARMING = ("DEBUG", "Warning", "WARNING", "warning", "Traceback", "dagster.yaml")
#: A progress line: seconds since the start, then what finished.
STEP = re.compile(r"\[ *\d+\.\d s\] (?P<what>.*)")

# demo_env, demo_result and webserver_port are session fixtures in conftest.py, shared with the
# browser test (test_ui_browser.py) so the demo is materialized once.


def test_demo_materializes_everything_and_checks_pass(demo_result: dict, demo_env: dict) -> None:
    assert set(demo_result["datasets"]) == {"demo-a", "demo-b", "demo-distractors"}
    for ds in demo_result["datasets"].values():
        assert ds["images"] > 0 and ds["rejected"] == 0
    assert demo_result["checks"]["evaluated"] > 0
    assert demo_result["checks"]["failed"] == []
    reports = demo_result["reports"]
    assert {"demo-a", "demo-b", "demo-a-distractors", "demo-b-distractors"} <= set(reports)
    for results in reports.values():
        ofa = next(r for r in results if r["method"] == "ofa")
        assert ofa["map"] >= 0.5
    assert (demo_env["root"] / "reports" / "demo-a" / "report.md").exists()


def test_webserver_serves_the_materialized_lineage_graph(webserver_port: int) -> None:
    data = graphql(
        webserver_port,
        "{ assetNodes { assetKey { path } dependencyKeys { path } } "
        "assetsOrError { ... on AssetConnection { nodes { key { path } "
        "assetMaterializations(limit: 1) { timestamp } } } } }",
    )
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    for key in (
        "demo-a/manifest",
        "demo-a/cam_features",
        "demo-a/pca_model",
        "demo-a/descriptors",
        "demo-a/rankings",
        "demo-a/map_report",
        "demo-a-distractors/rankings",
    ):
        assert key in nodes, sorted(nodes)
    deps = {"/".join(d["path"]) for d in nodes["demo-a/pca_model"]["dependencyKeys"]}
    assert deps == {"demo-b/cam_features"}
    materialized = {
        "/".join(n["key"]["path"]): bool(n["assetMaterializations"])
        for n in data["assetsOrError"]["nodes"]
    }
    missing = [k for k in nodes if not materialized.get(k)]
    assert missing == []


def _asset_keys(demo_env: dict) -> set[str]:
    defs = build_definitions(load_config(demo_env["config"]))
    return {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}


def _alarming(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(bad in line for bad in ALARMING)]


def test_demo_prints_one_line_per_step_and_logs_the_rest_to_a_file(
    demo_run: subprocess.CompletedProcess, demo_result: dict, demo_env: dict
) -> None:
    """The headless demo's terminal output (stderr with --json): a line per finished step
    with counts and seconds; every Dagster event in the log file it names."""
    log = Path(demo_result["log"])
    lines = demo_run.stderr.splitlines()
    assert lines[0] == f"cw-pipeline demo: full logs in {log}"
    assert _alarming(demo_run.stderr) == []
    steps = [m["what"] for m in map(STEP.fullmatch, lines[1:]) if m]
    assert len(steps) == len(lines) - 1, lines  # nothing else
    done = {re.sub(r" \[.*", "", s.split(":")[0]) for s in steps if ": " in s}
    assert done >= _asset_keys(demo_env), sorted(_asset_keys(demo_env) - done)
    assert any(re.fullmatch(r"demo folders: .*demo-a generated.*", s) for s in steps), steps
    assert any(
        re.fullmatch(
            r"demo-a/cam_features \[b000\]: \d+ images, \d+ forward passes \(\d+\.\d s\)", s
        )
        for s in steps
    ), steps
    assert any(
        re.fullmatch(r"demo-a/map_report: best mAP 0\.\d{4} \(.+\) \(\d+\.\d s\)", s) for s in steps
    )
    assert demo_run.stdout.count("\n") == 1  # the JSON alone
    text = log.read_text(encoding="utf-8")
    assert "DEBUG run " in text and "STEP_SUCCESS" in text and "PIPELINE_SUCCESS" in text


def test_demo_rerun_prints_the_map_table_and_nothing_alarming(
    demo_result: dict, demo_env: dict
) -> None:
    """``make demo-headless`` on a materialized demo: nothing to do, the mAP table."""
    proc = subprocess.run(
        [str(BIN / "cw-pipeline"), "demo", "--no-ui"],
        env=demo_env["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _alarming(proc.stdout + proc.stderr) == [], proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "nothing to materialize: every asset is up to date" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("| method "))
    evaluations = [c.strip() for c in lines[header].split("|")[2:-1]]
    assert evaluations == sorted(demo_result["reports"])
    ofa = next(line for line in lines[header:] if line.startswith("| ofa "))
    cells = [c.strip() for c in ofa.split("|")[2:-1]]
    for ev, cell in zip(evaluations, cells, strict=True):
        expected = next(r["map"] for r in demo_result["reports"][ev] if r["method"] == "ofa")
        assert cell == f"{expected:.4f}", (ev, cell)
    assert lines[-1] == "`make ui` (or `make demo`) serves the Dagster UI over it"


def _read_lines(stream, into: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_demo_serves_the_ui_with_dg_dev_and_says_where_to_look(
    demo_result: dict, demo_env: dict
) -> None:
    """``make demo``: the UI (dg dev) starts, the pages it prints answer, the UI's own output
    goes to the log file (without Dagster's warnings about dagster.yaml or ``dagster dev``),
    and Ctrl-C stops everything."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "cw-pipeline"), "demo", "--port", str(port)],
        env=demo_env["env"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, like a terminal's foreground job
    )
    out: list[str] = []
    err: list[str] = []
    pumps = [_read_lines(proc.stdout, out), _read_lines(proc.stderr, err)]
    try:
        deadline = time.monotonic() + 400
        while not any(line.startswith("the Dagster UI runs until Ctrl-C") for line in out):
            assert proc.poll() is None, "\n".join(out + err)
            assert time.monotonic() < deadline, "\n".join(out + err)
            time.sleep(0.5)
        start = out.index("open:")
        pages = dict(re.split(r":\s{2,}", line.strip(), maxsplit=1) for line in out[start + 1 : -2])
        base = f"http://127.0.0.1:{port}"
        nodes = graphql(port, "{ assetNodes { groupName } }")["assetNodes"]
        groups = sorted({n["groupName"] for n in nodes})
        assert pages == dict(demo.ui_pages(base, groups, "demo-a")), pages
        for url in pages.values():
            with urllib.request.urlopen(url, timeout=60) as resp:
                assert resp.status == 200, url
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=200)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pump in pumps:
            pump.join(10)
    assert proc.returncode == 0, "\n".join(out + err)
    assert "stopping the Dagster UI ..." in out
    assert _alarming("\n".join(out + err)) == [], out + err
    log = Path(demo_result["log"]).read_text(encoding="utf-8")
    ui = log[log.index(f"---- dg dev -h 127.0.0.1 -p {port} ----") :]
    assert f"Serving dagster-webserver on http://127.0.0.1:{port}" in ui
    assert "will not be used to configure Dagster" not in ui  # no dagster.yaml here
    assert "SupersessionWarning" not in ui and "dg dev" in ui
