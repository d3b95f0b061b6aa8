"""Runs whose process is gone (cw_pipeline/runtime/recovery.py): a ``cw-pipeline index`` killed
while it holds the ``cnn`` slot, or inside the rankings step, must not block later commands.

The CLI children run against an on-disk instance seeded with the project's ``dagster.yaml``
(``cnn`` pool of one slot, run monitoring); the faults are injected by
``python -m cw_pipeline_tests.faults cli`` (test code only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.events import EngineEventData
from dagster._core.storage.tags import TagType, get_tag_type

from cw_pipeline.defs import resources
from cw_pipeline.runtime import recovery
from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline.runtime.recovery import (
    dead_run_reason,
    pool_wait_line,
    process_alive,
    process_start_time,
    process_tags,
    recover_dead_runs,
)
from cw_pipeline.runtime.run_tags import (
    CRASHED_TAG,
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    SHARD_TAG,
    process_of,
)
from cw_pipeline.store import FeatureStore
from cw_pipeline_tests.conftest import REPO_ROOT
from cw_pipeline_tests.defs.project import synthetic_jpeg, tiny_defaults
from cw_pipeline_tests.defs.test_crashes import (
    DATASET,
    N_IMAGES,
    checkpoints_of,
    forward_batches,
    ids,
    make_project,
    shard,
    store_of,
)

TIMEOUT = 300  #: seconds a CLI child may take before the test fails (it must not hang)
POOL = "cnn"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def home(tmp_path) -> Path:
    """A $DAGSTER_HOME with the project's dagster.yaml."""
    path = tmp_path / "dagster_home"
    path.mkdir()
    shutil.copyfile(REPO_ROOT / INSTANCE_YAML, path / "dagster.yaml")
    return path


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["DAGSTER_HOME"] = str(home)
    env["CW_PIPELINE_DEVICE"] = "cpu"
    return env


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Children started by a test: killed at its end, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)


def start(procs, home: Path, tmp: Path, name: str, argv: list[str], fault: list[str] | None):
    """Start ``cw-pipeline ARGV`` (through the fault injector when ``fault`` is given);
    stdout and stderr go to ``tmp/<name>.out`` and ``.err``."""
    if fault is None:
        cmd = [sys.executable, "-m", "cw_pipeline.cli", *argv]
    else:
        log = str(tmp / f"{name}.log")
        cmd = [sys.executable, "-m", "cw_pipeline_tests.faults", "cli", "--log", log, *fault]
        cmd += ["--", *argv]
    out = open(tmp / f"{name}.out", "w", encoding="utf-8")
    err = open(tmp / f"{name}.err", "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(home), stdout=out, stderr=err)
    out.close()
    err.close()
    procs.append(proc)
    return proc


def wait(proc: subprocess.Popen, tmp: Path, name: str) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = (tmp / f"{name}.err").read_text(encoding="utf-8")
        pytest.fail(f"`cw-pipeline` {name} still running after {TIMEOUT} s: {err[-3000:]}")
    out = (tmp / f"{name}.out").read_text(encoding="utf-8")
    return rc, out, (tmp / f"{name}.err").read_text(encoding="utf-8")


def run_cli(procs, home, tmp, name, argv, fault=None) -> tuple[int, str, str]:
    return wait(start(procs, home, tmp, name, argv, fault), tmp, name)


def instance_of(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


def cli_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return [r.dagster_run for r in instance.get_run_records()]


# --------------------------------------------------------------------------- the helper


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


def test_process_alive_tells_live_dead_and_reused_pids() -> None:
    me = os.getpid()
    start_time = process_start_time(me)
    assert start_time is not None and start_time.isdigit()
    assert process_alive(me, start_time)
    assert process_alive(me)  # no start time recorded: the pid alone
    assert not process_alive(me, str(int(start_time) + 1))  # same pid, another process
    gone = dead_pid()
    assert process_start_time(gone) is None
    assert not process_alive(gone) and not process_alive(gone, start_time)
    assert not process_alive(0) and not process_alive(-1)


def test_process_start_time_reads_names_with_spaces_and_parentheses(tmp_path) -> None:
    stat = "4242 (we ird) name) S" + "".join(f" {k}" for k in range(4, 30))
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(stat, encoding="ascii")
    assert process_start_time(4242, tmp_path) == "22"  # field 22
    assert process_alive(4242, "22", tmp_path) and not process_alive(4242, "23", tmp_path)
    assert not process_alive(4243, None, tmp_path)


def test_dead_run_reason_only_for_gone_processes_of_this_host() -> None:
    host, me = socket.gethostname(), os.getpid()
    alive = process_tags()
    assert alive[HOST_TAG] == host and alive[PID_TAG] == str(me)
    assert dead_run_reason(alive) is None
    gone = dead_pid()
    dead = {HOST_TAG: host, PID_TAG: str(gone), PID_START_TAG: "1"}
    reason = dead_run_reason(dead)
    assert reason is not None and f"pid {gone} on {host}" in reason
    reused = {**alive, PID_START_TAG: str(int(alive[PID_START_TAG]) + 1)}
    reason = dead_run_reason(reused)
    assert reason is not None and f"pid {me}" in reason and "another process" in reason
    assert dead_run_reason({**dead, HOST_TAG: "elsewhere.example"}) is None  # another host
    assert dead_run_reason({}) is None  # not started by the CLI (daemon, UI)
    assert dead_run_reason({HOST_TAG: host, PID_TAG: "x"}) is None
    # Runs recorded before the process tags were hidden carry them under their plain names.
    legacy = {"cw_pipeline/host": host, "cw_pipeline/pid": str(gone)}
    reason = dead_run_reason(legacy)
    assert reason is not None and f"pid {gone} on {host}" in reason


def test_the_process_tags_are_hidden_from_the_runs_page() -> None:
    """Host, pid and start time are for the code; the Runs page hides Dagster's hidden tags."""
    tags = process_tags()
    assert set(tags) == {HOST_TAG, PID_TAG, PID_START_TAG}
    assert {get_tag_type(t) for t in tags} == {TagType.HIDDEN}
    assert process_of(tags) == tags
    assert process_of({"cw_pipeline/pid": "7", PID_TAG: "8"}) == {PID_TAG: "8"}


def _add_run(instance: dg.DagsterInstance, tags: dict[str, str], status) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=status, tags=tags))
    return run_id


def test_recover_dead_runs_fails_only_dead_ones_and_frees_their_slots(home, caplog) -> None:
    instance = instance_of(home)
    storage = instance.event_log_storage
    host, gone = socket.gethostname(), dead_pid()
    dead_tags = {HOST_TAG: host, PID_TAG: str(gone), SHARD_TAG: "crash/s1"}
    started, starting = dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING
    dead = _add_run(instance, dead_tags, started)
    dead_queued = _add_run(instance, dead_tags, dg.DagsterRunStatus.NOT_STARTED)
    alive = _add_run(instance, process_tags(), started)
    other_host = _add_run(instance, {**dead_tags, HOST_TAG: "elsewhere.example"}, starting)
    untagged = _add_run(instance, {}, started)
    ended = _add_run(instance, {}, dg.DagsterRunStatus.FAILURE)
    storage.initialize_concurrency_limit_to_default(POOL)  # as a run's first claim does
    assert storage.claim_concurrency_slot(POOL, dead, "crash__cam_features").is_claimed
    storage.claim_concurrency_slot(POOL, alive, "x__cam_features")  # waits: pending
    line = pool_wait_line(instance, POOL)
    assert line is not None and dead in line and f"pid {gone} on {host}" in line
    assert "shard crash/s1" in line and "limit 1" in line

    with caplog.at_level("WARNING", logger="cw_pipeline.runtime.recovery"):
        failed = recover_dead_runs(instance)
    assert sorted(failed) == sorted([dead, dead_queued])
    status = {r.run_id: r for r in cli_runs(instance)}
    for run_id in failed:
        assert status[run_id].status == dg.DagsterRunStatus.FAILURE
        assert f"pid {gone}" in status[run_id].tags[CRASHED_TAG]
    assert status[alive].status == started and status[untagged].status == started
    assert status[other_host].status == starting
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all(f"pid {gone} on {host}" in m for m in warned)
    (failure,) = [
        e
        for e in instance.all_logs(dead)
        if e.dagster_event is not None and e.dagster_event.event_type_value == "PIPELINE_FAILURE"
    ]
    assert f"pid {gone}" in failure.dagster_event.message
    # The dead run's slot went to the live run waiting for it.
    info = storage.get_concurrency_info(POOL)
    assert info.active_run_ids <= {alive} and dead not in info.pending_run_ids

    # A slot still held by a run that ended (failed by hand in the UI) is freed too.
    storage.free_concurrency_slots_for_run(alive)
    assert storage.claim_concurrency_slot(POOL, ended, "y__cam_features").is_claimed
    assert recover_dead_runs(instance) == []
    assert storage.get_concurrency_info(POOL).claimed_slots == []
    assert pool_wait_line(instance, POOL) is None  # a free slot: nothing to wait for
    assert recover_dead_runs(instance) == []  # nothing left to do: idempotent


def test_project_instance_monitors_runs_and_frees_slots(home) -> None:
    instance = instance_of(home)
    assert instance.run_monitoring_enabled
    settings = instance.run_monitoring_settings
    assert 0 < settings["free_slots_after_run_end_seconds"] <= 60
    assert settings["start_timeout_seconds"] > 0 and settings["cancel_timeout_seconds"] > 0
    assert settings["poll_interval_seconds"] <= 60
    assert instance.event_log_storage.get_concurrency_info(POOL).limit == 1


# --------------------------------------------------------------------------- CLI crashes


def index_argv(config: Path, dataset: str = DATASET) -> list[str]:
    return ["index", "--config", str(config), "--dataset", dataset, "--json", "--quiet"]


def test_index_killed_holding_the_cnn_slot_does_not_block_the_rerun(tmp_path, home, procs) -> None:
    config = make_project(tmp_path, N_IMAGES)
    store, cps = store_of(config), checkpoints_of(config)
    rc, _, err = run_cli(
        procs, home, tmp_path, "killed", index_argv(config), ["--kill-after-batches", "2"]
    )
    assert rc == -signal.SIGKILL, err[-3000:]
    assert forward_batches(tmp_path / "killed.log") == [ids(2), ids(4, 2), ids(6, 4)]
    assert len(cps.files()) == 2
    instance = instance_of(home)
    (dead,) = cli_runs(instance)
    assert dead.status == dg.DagsterRunStatus.STARTED  # what the killed process left
    pid = int(dead.tags[PID_TAG])
    assert dead.tags[HOST_TAG] == socket.gethostname() and dead.tags[SHARD_TAG] == "crash/s1"
    assert instance.event_log_storage.get_concurrency_info(POOL).active_run_ids == {dead.run_id}

    rc, out, err = run_cli(procs, home, tmp_path, "rerun", index_argv(config))
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["forward_passes"], result["resumed"]) == (N_IMAGES - 4, 4)
    assert result["images"] == N_IMAGES and store.exists(shard(store))
    assert result["malloc"] == "keep"  # the CLI's forward passes keep their buffers
    assert cps.files() == []
    warned = [ln for ln in err.splitlines() if dead.run_id in ln]
    assert len(warned) == 1 and "WARNING" in warned[0] and f"pid {pid}" in warned[0]

    instance = instance_of(home)
    runs = {r.run_id: r for r in cli_runs(instance)}
    assert runs[dead.run_id].status == dg.DagsterRunStatus.FAILURE
    assert f"pid {pid}" in runs[dead.run_id].tags[CRASHED_TAG]
    rerun = [r for r in runs.values() if r.run_id != dead.run_id]
    assert [r.status for r in rerun] == [dg.DagsterRunStatus.SUCCESS]
    assert instance.event_log_storage.get_concurrency_info(POOL).claimed_slots == []


def test_index_waiting_for_the_cnn_slot_names_the_run_holding_it(tmp_path, home, procs) -> None:
    """A live run (this test process) holds the slot: the command waits, saying for which
    run, and proceeds once the slot is freed."""
    config = make_project(tmp_path, 2)
    instance = instance_of(home)
    holder = _add_run(
        instance, {**process_tags(), SHARD_TAG: "other/s9"}, dg.DagsterRunStatus.STARTED
    )
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default(POOL)
    assert storage.claim_concurrency_slot(POOL, holder, "other__cam_features").is_claimed
    proc = start(procs, home, tmp_path, "waiting", index_argv(config), None)
    deadline = time.monotonic() + TIMEOUT
    while "waiting for a slot" not in (tmp_path / "waiting.err").read_text(encoding="utf-8"):
        assert proc.poll() is None, (tmp_path / "waiting.err").read_text(encoding="utf-8")
        assert time.monotonic() < deadline, "the command never said what it waits for"
        time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting: the holder is alive
    storage.free_concurrency_slots_for_run(holder)
    rc, out, err = wait(proc, tmp_path, "waiting")
    assert rc == 0, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "waiting for a slot" in ln]
    assert f"pool '{POOL}'" in line and holder in line
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line and "other/s9" in line
    assert json.loads(out.strip().splitlines()[-1])["forward_passes"] == 2
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.STARTED  # untouched


def make_ukbench_project(root: Path) -> Path:
    """Eight 64×64 images in UKBench naming (2 objects × 4 views), one method."""
    for i in range(8):
        synthetic_jpeg(root / "ukb" / f"ukbench{i:05d}.jpg", seed=100 + i // 4, size=(64, 64))
    config = {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": tiny_defaults(batch_size=4),
        "datasets": {"ukb": {"layout": "ukbench", "images": "ukb", "pca_from": "self-split"}},
        "methods": ["raw"],
        "search": {"n_pca": 2, "aggregated_classes": 8},
    }
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_index_killed_in_the_rankings_step_is_refreshed_by_the_next_index(
    tmp_path, home, procs
) -> None:
    config = make_ukbench_project(tmp_path)
    argv = index_argv(config, "ukb")
    rc, _, err = run_cli(procs, home, tmp_path, "killed", argv, ["--kill-in-rankings"])
    assert rc == -signal.SIGKILL, err[-3000:]
    instance = instance_of(home)
    stuck = [r for r in cli_runs(instance) if r.status == dg.DagsterRunStatus.STARTED]
    assert len(stuck) == 1
    (dead,) = stuck
    reports = FeatureStore(tmp_path / "reports")
    assert not reports.exists("ukb/report.md")

    rc, out, err = run_cli(procs, home, tmp_path, "rerun", argv)
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert "ukb/rankings" in result["refreshed"] and "ukb/map_report" in result["refreshed"]
    assert result["forward_passes"] == 0  # the features were indexed before the crash
    assert reports.exists("ukb/report.md")
    assert any(dead.run_id in ln and "WARNING" in ln for ln in err.splitlines())
    instance = instance_of(home)
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    assert all(
        r.status == dg.DagsterRunStatus.SUCCESS
        for r in cli_runs(instance)
        if r.run_id != dead.run_id
    )

    # And again: nothing left stale or in progress.
    rc, out, err = run_cli(procs, home, tmp_path, "third", argv)
    assert rc == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["refreshed"] == []


def test_a_crashed_attempt_is_retried_a_failed_one_is_not(tmp_path, monkeypatch) -> None:
    """An attempt marked crashed (its process was gone) does not count as a failure:
    automation retries the asset, where it waits for an input to change after a failure."""
    from cw_pipeline.config import load_config
    from cw_pipeline.defs.assets import rankings as ranking_assets
    from cw_pipeline.defs.graph import build_definitions
    from cw_pipeline.runtime.runs import index_dataset, refresh

    config = load_config(make_ukbench_project(tmp_path))
    defs, instance = build_definitions(config), dg.DagsterInstance.ephemeral()
    index_dataset(defs, instance, config, "ukb", FeatureStore(config.warehouse))
    real = ranking_assets.evaluation_rankings

    def broken(*_args, **_kwargs):
        raise RuntimeError("rankings broken")

    monkeypatch.setattr(ranking_assets, "evaluation_rankings", broken)
    with pytest.raises(Exception, match="rankings broken"):
        refresh(defs, instance)  # descriptors and rankings in one run: rankings fail
    with pytest.raises(Exception, match="rankings broken"):
        refresh(defs, instance)  # its inputs are newer than that attempt: retried once
    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    assert len(records) == 2
    failed = records[0].dagster_run  # the latest: the rankings alone (descriptors current)
    descriptors = instance.fetch_materializations(dg.AssetKey(["ukb", "descriptors"]), limit=9)
    assert len(descriptors.records) == 1
    monkeypatch.setattr(ranking_assets, "evaluation_rankings", real)
    assert refresh(defs, instance) == []  # a failure with unchanged inputs: not retried
    instance.add_run_tags(failed.run_id, {CRASHED_TAG: "pid 1 on elsewhere is gone"})
    assert sorted(refresh(defs, instance)) == ["ukb/map_report", "ukb/rankings"]


def test_a_daemon_run_worker_tags_its_run_with_its_process(tmp_path, monkeypatch) -> None:
    """A run launched by the daemon (its "Started process for run (pid: N)" engine event) is
    tagged with its run worker's process when its resources are set up, so a dead worker is
    recovered like a killed command; a process that is not the run worker tags nothing."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        started = dg.DagsterRunStatus.STARTED
        mine = dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=started)
        other = dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=started)
        for run, pid in ((mine, os.getpid()), (other, os.getpid() + 1)):
            instance.add_run(run)
            instance.report_engine_event(
                f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
            )
        assert recovery.tag_run_worker(instance, instance.get_run_by_id(mine.run_id))
        tags = instance.get_run_by_id(mine.run_id).tags
        assert tags[PID_TAG] == str(os.getpid()) and tags[HOST_TAG] == socket.gethostname()
        assert not recovery.tag_run_worker(instance, instance.get_run_by_id(mine.run_id))
        assert not recovery.tag_run_worker(instance, instance.get_run_by_id(other.run_id))
        assert PID_TAG not in instance.get_run_by_id(other.run_id).tags

        # the pipeline resource does it when a run sets it up
        seen = []
        monkeypatch.setattr(resources, "tag_run_worker", lambda i, r: seen.append(r.run_id))

        @dg.asset
        def probe(pipeline: resources.PipelineResource) -> None:
            del pipeline

        result = dg.materialize(
            [probe], instance=instance, resources={"pipeline": resources.PipelineResource()}
        )
        assert seen == [result.run_id]
