"""The folder sensors and the daily schedule: new shards become partitions, and only new or
changed shards are indexed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.utils import make_new_run_id

from cw_pipeline.defs.sensors import DEFAULT_WATCH_INTERVAL, SCAN_TIME_SHARE, scan_pause
from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline.runtime.recovery import process_tags
from cw_pipeline.runtime.run_tags import PID_TAG, SHARD_TAG, active_index_shards, index_run_tags
from cw_pipeline_tests.defs.project import Project, materialize, synthetic_jpeg, write_config

REPO = Path(__file__).resolve().parents[2]


def tick(project: Project, name: str, cursor: str | None) -> dg.SensorResult:
    sensor = project.defs.resolve_sensor_def(f"watch_{name}")
    with dg.build_sensor_context(
        instance=project.instance, cursor=cursor, resources=project.defs.resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def apply_partition_requests(project: Project, result: dg.SensorResult) -> None:
    """What the sensor daemon does with a result's dynamic partition requests."""
    for req in result.dynamic_partitions_requests or []:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            project.instance.add_dynamic_partitions(req.partitions_def_name, req.partition_keys)
        else:
            for key in req.partition_keys:
                project.instance.delete_dynamic_partition(req.partitions_def_name, key)


def partition_requests(result) -> list[tuple[str, str, list[str]]]:
    return [
        (type(r).__name__, r.partitions_def_name, sorted(r.partition_keys))
        for r in result.dynamic_partitions_requests or []
    ]


def requested_shards(requests) -> list[str]:
    return sorted(r.partition_key for r in requests)


def run(project: Project, name: str, result: dg.SensorResult) -> None:
    """What the daemon does with a tick: partitions first, then one run per requested shard."""
    apply_partition_requests(project, result)
    for r in result.run_requests:
        assert r.tags == index_run_tags(name, r.partition_key)
        keys = [f"{name}/manifest", f"{name}/cam_features"]
        assert materialize(project, keys, r.partition_key).success


def test_folder_sensor(fresh_project):
    project = fresh_project
    alpha = project.images("alpha")
    job = project.defs.resolve_sensor_def("watch_alpha").job_name
    assert job == "index_alpha"

    first = tick(project, "alpha", None)
    assert partition_requests(first) == [
        ("AddDynamicPartitionsRequest", "alpha_shards", ["part1", "part2", "part3"])
    ]
    assert requested_shards(first.run_requests) == ["part1", "part2", "part3"]
    # Not run yet: the next tick asks again, under the same run keys (which Dagster's sensor
    # daemon skips: a shard is never requested twice for the same files).
    again = tick(project, "alpha", first.cursor)
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in first.run_requests}
    run(project, "alpha", first)

    # a new shard (folder): added as a partition and indexed, nothing else
    synthetic_jpeg(alpha / "part4" / "extra_000.jpg", seed=1)
    synthetic_jpeg(alpha / "part4" / "extra_001.jpg", seed=2)
    second = tick(project, "alpha", first.cursor)
    assert partition_requests(second) == [
        ("AddDynamicPartitionsRequest", "alpha_shards", ["part4"])
    ]
    assert requested_shards(second.run_requests) == ["part4"]
    run(project, "alpha", second)

    # unchanged: nothing
    third = tick(project, "alpha", second.cursor)
    assert not third.run_requests and not third.dynamic_partitions_requests

    # a file added to one shard: only that shard, under a new run key
    synthetic_jpeg(alpha / "part2" / "extra_002.jpg", seed=3)
    fourth = tick(project, "alpha", third.cursor)
    assert not fourth.dynamic_partitions_requests
    assert requested_shards(fourth.run_requests) == ["part2"]
    (old_key,) = [r.run_key for r in first.run_requests if r.partition_key == "part2"]
    assert fourth.run_requests[0].run_key != old_key
    run(project, "alpha", fourth)

    # a removed shard folder: its partition is deleted, nothing is run
    shutil.rmtree(alpha / "part3")
    fifth = tick(project, "alpha", fourth.cursor)
    assert partition_requests(fifth) == [
        ("DeleteDynamicPartitionsRequest", "alpha_shards", ["part3"])
    ]
    assert not fifth.run_requests
    apply_partition_requests(project, fifth)
    assert sorted(project.instance.get_dynamic_partitions("alpha_shards")) == [
        "part1",
        "part2",
        "part4",
    ]
    assert not tick(project, "alpha", fifth.cursor).run_requests

    # other extraction settings: every shard again, under new run keys
    write_config(project.root, resize="native")
    changed = tick(project.reload(), "alpha", fifth.cursor)
    assert requested_shards(changed.run_requests) == ["part1", "part2", "part4"]
    assert not {r.run_key for r in changed.run_requests} & {
        r.run_key for r in (*first.run_requests, *second.run_requests, *fourth.run_requests)
    }


def test_sensor_plans_from_the_store_not_from_its_cursor(fresh_project):
    """A shard indexed by the CLI is not indexed again by the sensor, and a shard that a run
    (of the daemon, the UI or the CLI) is indexing right now is not requested twice."""
    project = fresh_project
    first = tick(project, "delta", None)
    run(project, "delta", first)
    synthetic_jpeg(project.images("delta") / "misc1" / "extra_000.jpg", seed=21)
    assert project.index("delta").indexed_shards == ["misc1"]  # the CLI, not the sensor
    assert not tick(project, "delta", first.cursor).run_requests

    synthetic_jpeg(project.images("delta") / "misc2" / "extra_001.jpg", seed=22)
    busy = dg.DagsterRun(
        job_name="index_delta",
        run_id=make_new_run_id(),
        status=dg.DagsterRunStatus.STARTED,
        tags={**index_run_tags("delta", "misc2"), "dagster/partition": "misc2"},
    )
    project.instance.add_run(busy)
    assert active_index_shards(project.instance, "delta") == {"misc2"}
    assert not tick(project, "delta", None).run_requests
    project.instance.report_run_failed(busy)  # it failed: misc2 still differs, request it
    assert requested_shards(tick(project, "delta", None).run_requests) == ["misc2"]

    # a `cw-pipeline index` of this host killed while indexing misc2: the tick marks its run
    # failed (its process is gone) instead of waiting for it for ever
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = dg.DagsterRun(
        job_name="index_delta",
        run_id=make_new_run_id(),
        status=dg.DagsterRunStatus.STARTED,
        tags={**index_run_tags("delta", "misc2"), **process_tags(), PID_TAG: str(gone.pid)},
    )
    project.instance.add_run(killed)
    assert requested_shards(tick(project, "delta", None).run_requests) == ["misc2"]
    status = project.instance.get_run_by_id(killed.run_id).status
    assert status == dg.DagsterRunStatus.FAILURE


def test_batch_sensor_requests_the_bucket_of_a_new_file(fresh_project):
    project = fresh_project
    first = tick(project, "gamma", None)
    assert requested_shards(first.run_requests) == ["b000", "b001"]
    run(project, "gamma", first)
    synthetic_jpeg(project.images("gamma") / "extra_000.jpg", seed=4)
    second = tick(project, "gamma", first.cursor)
    assert not second.dynamic_partitions_requests  # the bucket count is fixed
    assert len(second.run_requests) == 1
    assert second.run_requests[0].partition_key in ("b000", "b001")


def _schedule(project: Project, name: str):
    schedule = project.defs.resolve_schedule_def(f"daily_index_{name}")
    # Closed after use: the context opens an instance of its own from the reference, which
    # must not outlive it as Dagster's current definitions-state storage.
    with dg.build_schedule_context(
        instance=project.instance, resources=project.defs.resources
    ) as context:
        return schedule(context)


def _execute(project: Project, name: str, requests) -> None:
    for r in requests:
        result = materialize(project, [f"{name}/manifest", f"{name}/cam_features"], r.partition_key)
        assert result.success


def test_daily_schedule_requests_only_changed_shards(fresh_project):
    # A schedule context needs an instance that can be referenced, not an ephemeral one; its
    # SQLite files go to memory where possible (on disk every event costs a commit).
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as home:
        with dg.instance_for_test(temp_dir=home) as instance:
            _daily_schedule(dataclasses.replace(fresh_project, instance=instance))


def _daily_schedule(project: Project) -> None:
    delta = project.images("delta")
    schedule = project.defs.resolve_schedule_def("daily_index_delta")
    assert schedule.job_name == "index_delta"

    first = _schedule(project, "delta")
    assert requested_shards(first) == ["misc1", "misc2"]
    assert sorted(project.instance.get_dynamic_partitions("delta_shards")) == ["misc1", "misc2"]
    _execute(project, "delta", first)

    assert isinstance(_schedule(project, "delta"), dg.SkipReason)  # unchanged

    synthetic_jpeg(delta / "misc1" / "extra_000.jpg", seed=5)
    synthetic_jpeg(delta / "misc3" / "extra_001.jpg", seed=6)
    shutil.rmtree(delta / "misc2")
    second = _schedule(project, "delta")
    assert requested_shards(second) == ["misc1", "misc3"]
    assert sorted(project.instance.get_dynamic_partitions("delta_shards")) == ["misc1", "misc3"]
    _execute(project, "delta", second)
    assert isinstance(_schedule(project, "delta"), dg.SkipReason)


def test_the_instance_runs_one_indexing_run_per_shard_at_a_time(tmp_path) -> None:
    """The project's dagster.yaml limits runs tagged with one shard to one at a time (the run
    queue holds a second one until the first ends)."""
    settings = yaml.safe_load((REPO / INSTANCE_YAML).read_text())
    with dg.instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {
        "key": SHARD_TAG,
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in limits
    assert index_run_tags("demo-a", "b000")[SHARD_TAG] == "demo-a/b000"


def test_a_folder_that_takes_long_to_scan_is_scanned_less_often(fresh_project):
    """The sensor records when it scanned and how long it took; a scan that took longer than
    SCAN_TIME_SHARE of the interval makes the next ticks skip until scanning is that share of
    the time (a 100k-image folder), while a quick scan never delays the next one."""
    project = fresh_project
    first = tick(project, "delta", None)
    last = json.loads(first.cursor)
    assert last["scan_seconds"] >= 0 and abs(last["scanned_at"] - time.time()) < 60
    assert scan_pause(first.cursor, DEFAULT_WATCH_INTERVAL, time.time()) == 0  # quick
    slow = json.dumps({"scanned_at": time.time(), "scan_seconds": 2.5})
    pause = scan_pause(slow, DEFAULT_WATCH_INTERVAL, time.time())
    assert 49 <= pause <= 2.5 / SCAN_TIME_SHARE
    assert scan_pause(slow, DEFAULT_WATCH_INTERVAL, time.time() + 51) == 0
    assert scan_pause("not json", DEFAULT_WATCH_INTERVAL, time.time()) == 0
    sensor = project.defs.resolve_sensor_def("watch_delta")
    with dg.build_sensor_context(
        instance=project.instance, cursor=slow, resources=project.defs.resources
    ) as context:
        skipped = sensor(context)
    assert isinstance(skipped, dg.SkipReason)
    assert "the last scan took 2.5 s; next scan in" in skipped.skip_message
