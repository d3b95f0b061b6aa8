"""Executor selection and the CNN steps' executor tags (``cw_pipeline.defs.executors``), and the
per-process torch device (``$CW_PIPELINE_DEVICE``)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from cw_pipeline.config import ConfigError, load_config
from cw_pipeline.defs import resources
from cw_pipeline.defs.executors import (
    CELERY_CONFIG_ENV,
    CELERY_QUEUE_TAG,
    CNN_CELERY_QUEUE_ENV,
    CNN_K8S_CONFIG_ENV,
    EXECUTOR_ENV,
    K8S_CONFIG_TAG,
    cnn_op_tags,
    executor_from_env,
)
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.defs.resources import DEVICE_ENV, PipelineResource
from cw_pipeline_tests.defs.project import synthetic_jpeg

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"}},
}


@pytest.fixture
def config_path(tmp_path) -> Path:
    """A one-dataset project (two images in one folder shard)."""
    for i in range(2):
        synthetic_jpeg(tmp_path / "images" / "a" / f"{i}.jpg", seed=i)
    data = {
        "warehouse": str(tmp_path / "wh"),
        "datasets": {"things": {"layout": "folder", "images": "images", "shard_by": "folder"}},
    }
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_default_is_one_process_per_run_and_no_tags(monkeypatch, config_path) -> None:
    """Launched runs execute their steps in the run's process (no per-step interpreter)."""
    for var in (EXECUTOR_ENV, CNN_CELERY_QUEUE_ENV, CNN_K8S_CONFIG_ENV):
        monkeypatch.delenv(var, raising=False)
    assert executor_from_env().name == "in_process"
    assert cnn_op_tags() == {}
    defs = build_definitions(load_config(config_path))
    assert defs.resolve_job_def("index_things").executor_def.name == "in_process"
    op = defs.resolve_assets_def(dg.AssetKey(["things", "cam_features"])).op
    assert CELERY_QUEUE_TAG not in op.tags and K8S_CONFIG_TAG not in op.tags


@pytest.mark.parametrize(
    ("name", "executor"),
    [("in_process", "in_process"), ("multiprocess", "multiprocess"), ("k8s", "k8s")],
)
def test_named_executors(name: str, executor: str) -> None:
    assert executor_from_env({EXECUTOR_ENV: name}).name == executor


def test_celery_executor_reads_the_worker_yaml(tmp_path) -> None:
    env = {EXECUTOR_ENV: "celery", CELERY_CONFIG_ENV: str(REPO / "celery.yaml")}
    executor = executor_from_env(env)
    assert executor.name == "celery"
    # The project's celery.yaml is what `dagster-celery worker start -y` reads too.
    block = yaml.safe_load((REPO / "celery.yaml").read_text())["execution"]["config"]
    assert block["broker"] == {"env": "CW_PIPELINE_CELERY_BROKER"}
    assert block["config_source"]["task_acks_late"] is True

    bad = tmp_path / "celery.yaml"
    bad.write_text("execution:\n  config:\n    broker: redis://h/0\n    brokr: x\n")
    with pytest.raises(ConfigError, match=r"\$CW_PIPELINE_CELERY_CONFIG.*brokr"):
        executor_from_env({EXECUTOR_ENV: "celery", CELERY_CONFIG_ENV: str(bad)})
    bad.write_text("execution: {}\n")
    with pytest.raises(ConfigError, match="at least 'broker'"):
        executor_from_env({EXECUTOR_ENV: "celery", CELERY_CONFIG_ENV: str(bad)})
    with pytest.raises(ConfigError, match=r"\$CW_PIPELINE_CELERY_CONFIG.*cannot read"):
        executor_from_env({EXECUTOR_ENV: "celery", CELERY_CONFIG_ENV: str(tmp_path / "no.yaml")})


def test_unknown_executor_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\$CW_PIPELINE_EXECUTOR: 'dask': unknown executor"):
        executor_from_env({EXECUTOR_ENV: "dask"})


def test_cnn_tags(monkeypatch, config_path) -> None:
    tags = cnn_op_tags({CNN_CELERY_QUEUE_ENV: "gpu", CNN_K8S_CONFIG_ENV: json.dumps(GPU_CONFIG)})
    assert tags[CELERY_QUEUE_TAG] == "gpu"
    assert json.loads(tags[K8S_CONFIG_TAG]) == GPU_CONFIG

    # In the definitions: on the CNN steps only; a local run ignores them.
    monkeypatch.setenv(CNN_CELERY_QUEUE_ENV, "gpu")
    monkeypatch.setenv(CNN_K8S_CONFIG_ENV, json.dumps(GPU_CONFIG))
    defs = build_definitions(load_config(config_path))
    features = defs.resolve_assets_def(dg.AssetKey(["things", "cam_features"])).op
    manifest = defs.resolve_assets_def(dg.AssetKey(["things", "manifest"])).op
    assert features.tags[CELERY_QUEUE_TAG] == "gpu"
    assert json.loads(features.tags[K8S_CONFIG_TAG]) == GPU_CONFIG
    assert CELERY_QUEUE_TAG not in manifest.tags and K8S_CONFIG_TAG not in manifest.tags
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("things_shards", ["a"])
    result = dg.materialize(
        list(defs.assets or []), instance=instance, resources=defs.resources, partition_key="a"
    )
    assert result.success


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (CNN_CELERY_QUEUE_ENV, "gpu queue", "a queue name is"),
        (CNN_K8S_CONFIG_ENV, "{nope", "invalid JSON"),
        (CNN_K8S_CONFIG_ENV, "[1]", "expected a JSON object"),
        (CNN_K8S_CONFIG_ENV, '{"container": {}}', r"unknown key\(s\) \['container'\]"),
    ],
)
def test_bad_cnn_tags_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"\${var}: .*{message}"):
        cnn_op_tags({var: value})


def test_device_of_the_process_overrides_the_datasets(monkeypatch, config_path) -> None:
    calls = []
    monkeypatch.setattr(resources, "_extractor", lambda *args: calls.append(args))
    ds = load_config(config_path).dataset("things")
    pipeline = PipelineResource(config_path=str(config_path))
    monkeypatch.setenv(DEVICE_ENV, "cpu:0")
    pipeline.extractor(ds)
    monkeypatch.delenv(DEVICE_ENV)
    pipeline.extractor(ds)
    assert [c[4] for c in calls] == ["cpu:0", "cpu"]
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"\$CW_PIPELINE_DEVICE: invalid device 'gpu'"):
        pipeline.extractor(ds)
