"""The code location loads and validates; the asset graph has the expected keys and lineage;
after a full materialization every asset check passed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from cw_pipeline.config import load_config
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.defs.partitions import partitions_def
from cw_pipeline.runtime.runs import materialize_missing, refresh_job_name
from cw_pipeline_tests.defs.project import (
    DATASETS,
    DISTRACTOR_EVAL,
    check_evaluations,
    open_project,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"


def K(text: str) -> dg.AssetKey:
    return dg.AssetKey.from_user_string(text)


def deps_of(graph, key: str) -> set[str]:
    return {k.to_user_string() for k in graph.get(K(key)).parent_keys}


def test_dagster_definitions_validate_default_config(tmp_path):
    """`dagster definitions validate -m cw_pipeline.definitions` from the repo root, with the
    default config (data/datasets.yaml)."""
    env = {k: v for k, v in os.environ.items() if k != "CW_PIPELINE_CONFIG"}
    env["DAGSTER_HOME"] = str(tmp_path)  # never the developer's instance
    proc = subprocess.run(
        [DAGSTER, "definitions", "validate", "-m", "cw_pipeline.definitions"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_config_loads_without_generated_demo(tmp_path):
    """On a clean checkout the demo folders do not exist yet (they are generated lazily): the
    default config must still load and build, with demo-a's PCA learned on demo-b."""
    shutil.copy(REPO_ROOT / "data" / "datasets.yaml", tmp_path / "datasets.yaml")
    assert not (tmp_path / "demo").exists()
    config = load_config(tmp_path / "datasets.yaml")
    assert {"demo-a", "demo-b", "demo-distractors"} <= set(config.datasets)
    defs = build_definitions(config)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert "demo-b/cam_features" in deps_of(graph, "demo-a/pca_model")
    assert "demo-a/cam_features" in deps_of(graph, "demo-b/pca_model")
    assert graph.has(K("demo-a-distractors/demo-distractors_descriptors"))


def test_every_asset_and_check_says_whose_it_is(fresh_project):
    """Issue 15: the Lineage graph labels nodes with the last part of their key, so a node of
    another group reads only ``pca_model``: every asset's description starts with the dataset
    or evaluation it belongs to, and a cross-group input is named in full."""
    graph = fresh_project.defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        owner = key.path[0]
        description = graph.get(key).description or ""
        assert description.startswith(f"{owner} "), (key.to_user_string(), description)
    assert (
        "learned on beta (features of beta/cam_features)"
        in graph.get(K("alpha/pca_model")).description
    )
    assert (
        f"{DISTRACTOR_EVAL} distractor descriptors: raw, raw+PCA and OfA descriptors of gamma"
        in (graph.get(K(f"{DISTRACTOR_EVAL}/gamma_descriptors")).description)
    )
    for check in graph.asset_check_keys:
        assert graph.get_check_spec(check).description, check


def test_temp_project_definitions(fresh_project):
    defs = fresh_project.defs
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}

    expected = set()
    for ds in DATASETS:
        expected |= {f"{ds}/manifest", f"{ds}/cam_features"}
    for ds in ("alpha", "beta"):  # ground-truth datasets, each evaluated alone too
        expected |= {f"{ds}/query_features", f"{ds}/pca_model", f"{ds}/descriptors"}
        expected |= {f"{ds}/rankings", f"{ds}/map_report"}
    ev = DISTRACTOR_EVAL
    expected |= {f"{ev}/rankings", f"{ev}/map_report", f"{ev}/gamma_descriptors"}
    assert keys == expected

    # lineage
    for ds in DATASETS:
        assert deps_of(graph, f"{ds}/manifest") == set()
        assert deps_of(graph, f"{ds}/cam_features") == {f"{ds}/manifest"}
    assert deps_of(graph, "alpha/pca_model") == {"beta/cam_features"}
    assert deps_of(graph, "beta/pca_model") == {"alpha/cam_features"}
    assert deps_of(graph, "alpha/query_features") == {"alpha/manifest"}
    assert deps_of(graph, "alpha/descriptors") == {"alpha/cam_features", "alpha/pca_model"}
    assert deps_of(graph, "alpha/rankings") == {
        "alpha/descriptors",
        "alpha/pca_model",
        "alpha/query_features",
    }
    assert deps_of(graph, "alpha/map_report") == {"alpha/rankings"}
    assert deps_of(graph, f"{ev}/gamma_descriptors") == {"gamma/cam_features", "beta/pca_model"}
    assert deps_of(graph, f"{ev}/rankings") == {
        "beta/descriptors",
        "beta/pca_model",
        "beta/query_features",
        f"{ev}/gamma_descriptors",
    }
    assert deps_of(graph, f"{ev}/map_report") == {f"{ev}/rankings"}

    # partitions: shards per dataset; distractor descriptors follow their distractor set
    for ds in DATASETS:
        for asset in ("manifest", "cam_features"):
            assert graph.get(K(f"{ds}/{asset}")).partitions_def == partitions_def(ds)
    assert graph.get(K(f"{ev}/gamma_descriptors")).partitions_def == partitions_def("gamma")
    for key in ("alpha/pca_model", "alpha/descriptors", "alpha/rankings", f"{ev}/rankings"):
        assert graph.get(K(key)).partitions_def is None

    # features carry the extraction settings as code version
    assert graph.get(K("alpha/cam_features")).code_version
    assert graph.get(K("alpha/manifest")).code_version is None

    # asset checks
    check_keys = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    for ds in DATASETS:
        assert (f"{ds}/manifest", "ids_unique_and_readable") in check_keys
        assert (f"{ds}/cam_features", "features_finite_and_shaped") in check_keys
        assert (f"{ds}/cam_features", "no_rejected_images") in check_keys
        assert (f"{ds}/manifest", "shards_readable") in check_keys
        assert (f"{ds}/cam_features", "shards_readable") in check_keys
    for ev_name in ("alpha", "beta", ev):
        assert (f"{ev_name}/rankings", "covers_every_query") in check_keys

    # jobs, sensors, schedules, automation
    for ds in DATASETS:
        name = ds.replace("-", "_")
        assert repo.has_job(f"index_{name}")
        assert repo.get_sensor_def(f"watch_{name}").job_name == f"index_{name}"
        assert repo.get_schedule_def(f"daily_index_{name}").job_name == f"index_{name}"
    assert isinstance(
        repo.get_sensor_def("refresh_downstream"), dg.AutomationConditionSensorDefinition
    )


def test_code_version_follows_extraction_settings(tmp_path, fresh_project):
    """Features are versioned by the settings that change them (here: the resize policy)."""
    graph = fresh_project.defs.resolve_asset_graph()
    write_config(fresh_project.root, resize="native")
    native = open_project(fresh_project.root).defs.resolve_asset_graph()
    for ds in DATASETS:
        key = K(f"{ds}/cam_features")
        assert graph.get(key).code_version != native.get(key).code_version
    key = K("alpha/query_features")
    assert graph.get(key).code_version != native.get(key).code_version


def test_full_materialization_every_check_passes(indexed_project):
    project = indexed_project
    assert all(r.rejected == 0 for r in project.index_results.values())
    # nothing is left missing, cron-gated evaluations included
    assert materialize_missing(project.defs, project.instance) == []

    evaluations = check_evaluations(project.instance)
    failed = [(e.asset_check_key, shard, e.metadata) for e, shard in evaluations if not e.passed]
    assert not failed
    # every check of every asset (and of every shard of partitioned ones) was evaluated
    graph = project.defs.resolve_asset_graph()
    seen = {(e.asset_check_key, shard) for e, shard in evaluations}
    for check_key in graph.asset_check_keys:
        pdef = graph.get(check_key.asset_key).partitions_def
        shards = (
            [None]
            if pdef is None
            else pdef.get_partition_keys(dynamic_partitions_store=project.instance)
        )
        for shard in shards:
            assert (check_key, shard) in seen, (check_key, shard)


def test_cli_runs_are_named_for_what_they_did(indexed_project):
    """Runs of ``cw-pipeline index`` are listed under the dataset's indexing job, refresh runs
    under a job naming what they refreshed: never Dagster's ``__ephemeral_asset_job__``."""
    project = indexed_project
    runs = project.instance.get_runs()
    assert runs
    index_jobs = {f"index_{name.replace('-', '_')}" for name in project.config.datasets}
    for run in runs:
        keys = sorted(
            {
                e.dagster_event.asset_key
                for e in project.instance.all_logs(
                    run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
                )
            }
        )
        assert keys, run.job_name
        if run.job_name in index_jobs:
            dataset = run.job_name.removeprefix("index_")
            assert {k.path[-1] for k in keys} == {"manifest", "cam_features"}
            assert {k.path[0].replace("-", "_") for k in keys} == {dataset}
        else:
            assert run.job_name.startswith("refresh_"), run.job_name
            idents = {"__".join(p.replace("-", "_") for p in k.path) for k in keys}
            named = run.job_name.removeprefix("refresh_").split("_and_")
            more = len(keys) - 2
            if more > 0:
                assert named.pop() == f"{more}_more", run.job_name
            assert len(named) == min(len(keys), 2) and set(named) <= idents, run.job_name
    names = {run.job_name for run in runs}
    assert index_jobs <= names
    assert any(n.startswith("refresh_") for n in names)


def test_refresh_job_names_name_two_keys_and_count_the_rest():
    key = dg.AssetKey
    assert refresh_job_name([key(["demo-eval", "rankings"])]) == "refresh_demo_eval__rankings"
    assert (
        refresh_job_name([key(["a", "pca_model"]), key(["b.c", "pca_model"])])
        == "refresh_a__pca_model_and_b_c__pca_model"
    )
    many = [key([f"ds{i}", "descriptors"]) for i in range(5)]
    assert refresh_job_name(many) == "refresh_ds0__descriptors_and_ds1__descriptors_and_3_more"
    for keys in ([key(["x"])], many):
        dg.define_asset_job(refresh_job_name(keys))  # a valid Dagster job name
