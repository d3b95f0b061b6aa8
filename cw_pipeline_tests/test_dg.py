"""Dagster's ``dg`` CLI works from the repository root (``[tool.dg]`` in pyproject.toml), as the
README says: ``dg check defs`` validates the graph, ``dg list defs`` lists it, and ``dg dev``
serves the same code location as ``dagster dev -w workspace.yaml`` (one name: shared sensor,
schedule and automation state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cw_pipeline.config import load_config
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.runtime.instance import INSTANCE_YAML

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).parent / "dg"


@pytest.fixture
def dg_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who runs ``dg`` from the venv: a fresh DAGSTER_HOME with the
    project's instance settings, the repository's datasets YAML (its demo folders absent
    here: they are generated on the first demo)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / INSTANCE_YAML).read_text(encoding="utf-8"))
    config = tmp_path / "datasets.yaml"
    text = (REPO / "data" / "datasets.yaml").read_text(encoding="utf-8")
    text = text.replace("warehouse: warehouse", f"warehouse: {tmp_path / 'warehouse'}")
    text = text.replace("reports: reports", f"reports: {tmp_path / 'reports'}")
    config.write_text(text.replace("demo/demo-", f"{tmp_path}/demo/demo-"), encoding="utf-8")
    env = dict(os.environ, DAGSTER_HOME=str(home), CW_PIPELINE_CONFIG=str(config))
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = f"{DG.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _dg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DG), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_dg_check_defs_passes(dg_env: dict[str, str]) -> None:
    proc = _dg(dg_env, "check", "defs")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "All definitions loaded successfully." in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_dg_list_defs_lists_the_graph(dg_env: dict[str, str]) -> None:
    proc = _dg(dg_env, "list", "defs", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = json.loads(proc.stdout)
    defs = build_definitions(load_config(Path(dg_env["CW_PIPELINE_CONFIG"])))
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {a["asset_key"] for a in listed["assets"]} == keys
    assert {"refresh_downstream", "watch_demo_a"} <= {s["name"] for s in listed["sensors"]}
    report = next(a for a in listed["assets"] if a["asset_key"] == "demo-a/map_report")
    assert report["dependency_keys"] == ["demo-a/rankings"]


def test_dg_serves_the_code_location_workspace_yaml_names() -> None:
    """`dg dev` and `dagster dev -w workspace.yaml` load one module under one location name
    (a different name would keep two sets of sensor and automation state)."""
    dg_project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["dg"]
    assert dg_project["directory_type"] == "project"
    (entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    module = entry["python_module"]
    assert dg_project["project"]["code_location_name"] == module["location_name"]
    assert dg_project["project"]["code_location_target_module"] == module["module_name"]
