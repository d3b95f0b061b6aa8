"""End-to-end fixtures shared by the demo, GraphQL and browser tests: one temporary project with
the demo materialized and one Dagster webserver over it, both per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline_tests.e2e.daemon import demo_config
from cw_pipeline_tests.e2e.processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST ``query`` to the webserver's GraphQL endpoint; fail on GraphQL errors."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors for {query[:80]!r}: {body['errors']}")
    return body["data"]


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory) -> dict:
    """A temporary project config (demo datasets, own warehouse and reports) and DAGSTER_HOME."""
    root = tmp_path_factory.mktemp("demo")
    cfg = demo_config(root)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / INSTANCE_YAML).read_text())
    env = dict(os.environ, DAGSTER_HOME=str(home), CW_PIPELINE_CONFIG=str(cfg))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {"root": root, "config": cfg, "env": env}


@pytest.fixture(scope="session")
def demo_run(demo_env: dict) -> subprocess.CompletedProcess:
    """``cw-pipeline demo --no-ui --json`` on the temporary instance (materializes everything):
    the JSON on stdout, its progress lines on stderr."""
    proc = subprocess.run(
        [str(BIN / "cw-pipeline"), "demo", "--no-ui", "--json"],
        env=demo_env["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def demo_result(demo_run: subprocess.CompletedProcess) -> dict:
    """The JSON ``cw-pipeline demo --no-ui --json`` printed."""
    return json.loads(demo_run.stdout.strip().splitlines()[-1])


def _wait_until_loaded(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    """Wait for the webserver to answer and its code location to be loaded."""
    deadline = time.monotonic() + timeout
    query = (
        "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    )
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"dagster-webserver exited with {proc.returncode}; log {log}:\n"
                + log.read_text()[-3000:]
            )
        try:
            entries = graphql(port, query)["workspaceOrError"]["locationEntries"]
            errors = [
                f"{e['name']}: {e['locationOrLoadError'].get('message', '')}"
                for e in entries
                if e["locationOrLoadError"]
                and e["locationOrLoadError"]["__typename"] == "PythonError"
            ]
            if errors:
                raise AssertionError("code location failed to load: " + "; ".join(errors))
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
            last = f"location entries {entries}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"dagster-webserver on port {port} not ready after {timeout:.0f} s ({last}); "
                f"log {log}:\n" + log.read_text()[-3000:]
            )
        time.sleep(0.5)


@pytest.fixture(scope="session")
def webserver(demo_result: dict, demo_env: dict) -> Iterator[str]:
    """``dagster-webserver`` on 127.0.0.1 over the demo instance; yields its base URL.

    Runs in its own process group, killed (TERM, then KILL) at the end of the session; its output
    goes to ``webserver.log`` in the temporary project, quoted in failures.
    """
    port = free_port()
    log = demo_env["root"] / "webserver.log"
    with log.open("wb") as out:
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
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_loaded(proc, port, log, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, grace=30)


@pytest.fixture(scope="session")
def webserver_port(webserver: str) -> int:
    """The webserver's port (for :func:`graphql`)."""
    return int(webserver.rsplit(":", 1)[1])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """List the screenshots a test recorded (``record_property("screenshot…", path)``) in its
    report, so a failure shows where to look."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        shots = [str(v) for k, v in item.user_properties if str(k).startswith("screenshot")]
        if shots:
            report.sections.append(("screenshots", "\n".join(shots)))
