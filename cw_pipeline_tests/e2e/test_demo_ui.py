"""The README's demo on a fresh instance: every asset materialized, every check passed, and the
webserver's GraphQL endpoint reports the lineage graph with materialized assets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory) -> dict:
    """A temporary project config (demo datasets, own warehouse) and DAGSTER_HOME."""
    root = tmp_path_factory.mktemp("demo")
    text = (REPO / "data" / "datasets.yaml").read_text()
    text = text.replace("warehouse: warehouse", f"warehouse: {root / 'warehouse'}")
    text = text.replace("reports: reports", f"reports: {root / 'reports'}")
    text = text.replace("demo/demo-", f"{root}/demo/demo-")
    cfg = root / "datasets.yaml"
    cfg.write_text(text)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    env = dict(os.environ, DAGSTER_HOME=str(home), CW_PIPELINE_CONFIG=str(cfg))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {"root": root, "config": cfg, "env": env}


@pytest.fixture(scope="module")
def demo_result(demo_env: dict) -> dict:
    proc = subprocess.run(
        [str(BIN / "cw-pipeline"), "demo", "--no-ui", "--json"],
        env=demo_env["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_webserver_serves_the_materialized_lineage_graph(demo_result: dict, demo_env: dict) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            "-w",
            str(REPO / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=demo_env["env"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-3000:]) from None
                time.sleep(1)
        data = _graphql(
            port,
            "{ assetNodes { assetKey { path } dependencyKeys { path } } "
            "assetsOrError { ... on AssetConnection { nodes { key { path } "
            "assetMaterializations(limit: 1) { timestamp } } } } }",
        )["data"]
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
