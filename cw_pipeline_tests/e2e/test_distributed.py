"""The feature steps of two shards on Celery workers (``CW_PIPELINE_EXECUTOR=celery``).

The test starts, on 127.0.0.1, a Redis server (Debian's ``redis-server``; ``make test`` installs
it) and two ``dagster-celery`` workers — separate processes, one step at a time each, started
with the project's ``celery.yaml`` like the README says. It materializes the features of two
shards, one run per shard, both at once, with the README's command (``dagster asset
materialize``, a process each) against a persistent Dagster instance, and checks that

* every step ran in a worker process (Dagster records each event's process id), the two shards'
  ``cam_features`` steps in two different ones, taken from the ``cnn`` queue that
  ``CW_PIPELINE_CELERY_CNN_QUEUE`` routes them to;
* the stored features equal those of a single-process run.

Redis and the workers are stopped when the module's tests end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from celery import Celery

from cw_pipeline.config import CONFIG_ENV, load_config
from cw_pipeline.defs.executors import (
    CELERY_CONFIG_ENV,
    CELERY_QUEUE_TAG,
    CNN_CELERY_QUEUE_ENV,
    EXECUTOR_ENV,
)
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.store import FeatureStore
from cw_pipeline_tests.defs.project import synthetic_jpeg
from cw_pipeline_tests.e2e.processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CELERY_YAML = REPO / "celery.yaml"
BROKER_ENV = "CW_PIPELINE_CELERY_BROKER"  # what celery.yaml reads the broker URL from

DATASET = "shots"
SHARDS = ("s1", "s2")
IMAGES_PER_SHARD = 6
JOB = f"index_{DATASET}"
FEATURES_KEY = dg.AssetKey([DATASET, "cam_features"])
FEATURES_STEP = f"{DATASET}__cam_features"


def write_config(root: Path, images: Path, name: str) -> Path:
    """A one-dataset project (two folder shards) with its own warehouse ``root/<name>_wh``."""
    data = {
        "warehouse": str(root / f"{name}_wh"),
        "reports": str(root / f"{name}_reports"),
        "defaults": {
            "backbone": "efficientnet_lite0",
            "resize": "fixed:160x160",
            "stored_classes": 16,
            "batch_size": 8,
            "device": "cpu",
            "num_threads": 1,
        },
        "datasets": {DATASET: {"layout": "folder", "images": str(images), "shard_by": "folder"}},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    for k, shard in enumerate(SHARDS):
        for i in range(IMAGES_PER_SHARD):
            synthetic_jpeg(images / shard / f"{shard}_{i}.jpg", seed=500 + 10 * k + i)
    home = root / "dagster_home"
    home.mkdir()
    instance_yaml = {
        "telemetry": {"enabled": False},
        # One `cnn` step per worker: the pool allows as many at once as there are workers.
        "concurrency": {"pools": {"default_limit": 2}},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml), encoding="utf-8")
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create its storage now, not in two worker processes at once
    return {
        "root": root,
        "home": home,
        "celery": write_config(root, images, "celery"),
        "local": write_config(root, images, "local"),
    }


@pytest.fixture(scope="module")
def broker(project) -> Iterator[str]:
    """A Redis server on a free loopback port (no persistence); its URL."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server not found: install Debian's redis-server (make test does)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_group(proc, grace=30)


def cluster_env(project: dict[str, Path], broker: str) -> dict[str, str]:
    """The environment of the workers and of the processes that start runs: the same project,
    instance, Celery settings and queue of the CNN steps."""
    env = dict(os.environ)
    env.update(
        {
            "DAGSTER_HOME": str(project["home"]),
            CONFIG_ENV: str(project["celery"]),
            EXECUTOR_ENV: "celery",
            CELERY_CONFIG_ENV: str(CELERY_YAML),
            BROKER_ENV: broker,
            CNN_CELERY_QUEUE_ENV: "cnn",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


@pytest.fixture(scope="module")
def workers(project, broker) -> Iterator[dict[str, int]]:
    """Two dagster-celery workers (queues ``dagster`` and ``cnn``, one step at a time each);
    their process ids by worker name."""
    env = cluster_env(project, broker)
    procs = []
    logs = []
    app = Celery(broker=broker, backend=broker)
    try:
        for i in range(2):
            log = open(project["root"] / f"worker{i}.log", "wb")
            logs.append(log)
            cmd = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app"]
            cmd += ["-y", str(CELERY_YAML), "-n", f"cw{i}", "-q", "dagster,cnn"]
            cmd += ["-l", "WARNING", "--", "--pool", "solo"]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + 180
        stats: dict = {}
        while len(stats) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"the Celery workers did not start; see {project['root']}/worker*.log")
            stats = app.control.inspect(timeout=1).stats() or {}
        yield {name: int(s["pid"]) for name, s in stats.items()}
    finally:
        app.control.shutdown()  # warm shutdown of every worker; each CLI then exits
        for proc in procs:
            stop_group(proc, grace=30, exit_first=30)  # the worker exits after shutdown
        for log in logs:
            log.close()


def step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, set[int]]:
    """Process ids of each step's events in a run."""
    out: dict[str, set[int]] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.step_key and event.is_step_event:
            out.setdefault(event.step_key, set()).add(event.pid)
    return out


def test_two_shards_features_on_two_celery_workers_equal_one_process(
    project, broker, workers, monkeypatch
):
    env = cluster_env(project, broker)
    for var in (EXECUTOR_ENV, CELERY_CONFIG_ENV, BROKER_ENV, CNN_CELERY_QUEUE_ENV):
        monkeypatch.setenv(var, env[var])
    worker_pids = set(workers.values())
    assert len(worker_pids) == 2

    # The code location with these variables: every step a Celery task, the CNN's on `cnn`.
    defs = build_definitions(load_config(project["celery"]))
    assert defs.resolve_job_def(JOB).executor_def.name == "celery"
    assert defs.resolve_assets_def(FEATURES_KEY).op.tags[CELERY_QUEUE_TAG] == "cnn"

    with dg.DagsterInstance.from_config(str(project["home"])) as instance:
        instance.add_dynamic_partitions(f"{DATASET}_shards", list(SHARDS))
        for shard in SHARDS:  # manifests here: the workers' first steps are the features
            assert dg.materialize(
                list(defs.assets or []),
                instance=instance,
                resources=defs.resources,
                partition_key=shard,
                selection=[f"{DATASET}/manifest"],
            ).success

        # Both runs at once, like the sensor's requests (each run in its own process).
        materialize = [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "cw_pipeline.definitions",
        ]
        runs = [
            subprocess.Popen(
                [*materialize, "--select", f"{DATASET}/cam_features", "--partition", shard],
                env=env,
                cwd=project["root"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for shard in SHARDS
        ]
        for shard, proc in zip(SHARDS, runs, strict=True):
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"run of shard {shard} failed:\n{out[-3000:]}"

        run_ids = {}
        for shard in SHARDS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=FEATURES_KEY, asset_partitions=[shard]), limit=5
            ).records
            assert len(records) == 1, shard
            run_ids[shard] = records[0].run_id
            metadata = records[0].asset_materialization.metadata
            assert metadata["forward_passes"].value == IMAGES_PER_SHARD

        pids = {shard: step_pids(instance, run_id) for shard, run_id in run_ids.items()}
        for shard, steps in pids.items():
            assert FEATURES_STEP in steps, (shard, steps)
            for step, step_pid in steps.items():
                assert len(step_pid) == 1 and step_pid <= worker_pids, (shard, step, step_pid)
        (first,), (second,) = (pids[s][FEATURES_STEP] for s in SHARDS)
        assert first != second, f"both shards' feature steps ran in worker process {first}"

    # The same two shards in one process (dg.materialize: no executor involved).
    for var in (EXECUTOR_ENV, CNN_CELERY_QUEUE_ENV):
        monkeypatch.delenv(var)
    local_defs = build_definitions(load_config(project["local"]))
    local_instance = dg.DagsterInstance.ephemeral()
    local_instance.add_dynamic_partitions(f"{DATASET}_shards", list(SHARDS))
    for shard in SHARDS:
        assert dg.materialize(
            list(local_defs.assets or []),
            instance=local_instance,
            resources=local_defs.resources,
            partition_key=shard,
            selection=[f"{DATASET}/manifest", f"{DATASET}/cam_features"],
        ).success

    dist_store = FeatureStore(load_config(project["celery"]).warehouse)
    local_store = FeatureStore(load_config(project["local"]).warehouse)
    for shard in SHARDS:
        for kind in ("manifest", "cam_features"):
            rel = FeatureStore.shard_path(kind, DATASET, shard)
            dist, local = dist_store.read_table(rel), local_store.read_table(rel)
            assert dist.num_rows == IMAGES_PER_SHARD
            assert dist.equals(local, check_metadata=True), f"{rel} differs"
