"""The warm run launcher (cw_pipeline/runtime/launcher.py): runs execute in processes forked from a
server with the libraries preloaded, tagged with their process, and can be terminated."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from cw_pipeline.core import allocator
from cw_pipeline.runtime import launcher as launcher_module
from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline.runtime.launcher import (
    WarmQueuedRunCoordinator,
    WarmRunLauncher,
    is_daemon_process,
)
from cw_pipeline.runtime.run_tags import HOST_TAG, LAUNCHER_TAG, PID_TAG
from cw_pipeline_tests.defs import launcher_jobs


@pytest.fixture
def instance(tmp_path: Path):
    settings = {
        "run_launcher": {
            "module": "cw_pipeline.runtime.launcher",
            "class": "WarmRunLauncher",
            "config": {"preload": [launcher_jobs.PRELOAD_PROBE]},
        },
    }
    with dg.instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as inst:
        yield inst
        inst.run_launcher.join(timeout=60)


def _launch(instance: dg.DagsterInstance, job: dg.JobDefinition) -> str:
    origin = dg.reconstructable(job).get_python_origin()
    run = instance.create_run_for_job(job_def=job, job_code_origin=origin)
    instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
    return run.run_id


def _wait(instance: dg.DagsterInstance, run_id: str, until, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if until(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id}: {run.status} after {timeout} s")


def test_runs_execute_in_a_forked_worker_with_the_libraries_preloaded(instance) -> None:
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    run_id = _launch(instance, launcher_jobs.probe_job)
    run = _wait(instance, run_id, lambda r: r.is_finished)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    event = instance.get_latest_materialization_event(dg.AssetKey("launcher_probe"))
    meta = event.asset_materialization.metadata
    worker = meta["pid"].value
    assert worker != os.getpid()
    assert meta["preloaded"].value is True  # imported by the forkserver, before the job's code
    assert run.tags[LAUNCHER_TAG] == "warm"
    assert run.tags[PID_TAG] == str(worker)
    assert HOST_TAG in run.tags
    started = [
        e.dagster_event.engine_event_data.metadata.get("pid")
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if e.dagster_event.engine_event_data.metadata.get("pid") is not None
    ]
    assert [str(m.value) for m in started][:1] == [str(worker)]


@pytest.mark.skipif(allocator._glibc() is None, reason="the tuning is glibc's mallopt")
def test_a_run_worker_running_the_cnn_keeps_its_buffers(instance, monkeypatch) -> None:
    """A forked run worker has the allocator tuning in force: a forward pass after the first
    faults in (almost) no fresh pages. Without it, 8 × 640×480 costs ~85,000 faults a pass."""
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    run_id = _launch(instance, launcher_jobs.cnn_job)
    run = _wait(instance, run_id, lambda r: r.is_finished, timeout=180)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    event = instance.get_latest_materialization_event(dg.AssetKey("launcher_cnn_probe"))
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert meta["pid"] != os.getpid() and meta["main_thread"]
    assert meta["mode"] == "keep"
    assert meta["trim_threshold"] == -1
    assert meta["page_faults"] < 2_000, meta["page_faults_per_pass"]


def test_a_warm_run_can_be_terminated(instance) -> None:
    run_id = _launch(instance, launcher_jobs.slow_job)
    _wait(
        instance,
        run_id,
        lambda r: r.status == dg.DagsterRunStatus.STARTED and PID_TAG in r.tags,
    )
    assert instance.run_launcher.terminate(run_id) is True
    run = _wait(instance, run_id, lambda r: r.is_finished, timeout=60)
    assert run.status == dg.DagsterRunStatus.CANCELED


def test_runs_of_another_interpreter_go_to_the_default_launcher(instance) -> None:
    job = launcher_jobs.probe_job
    origin = dg.reconstructable(job).get_python_origin()
    here = instance.create_run_for_job(job_def=job, job_code_origin=origin)
    assert WarmRunLauncher.runs_here(here)
    elsewhere_origin = origin._replace(
        repository_origin=origin.repository_origin._replace(executable_path="/opt/other/python")
    )
    elsewhere = instance.create_run_for_job(job_def=job, job_code_origin=elsewhere_origin)
    assert not WarmRunLauncher.runs_here(elsewhere)
    with pytest.raises(dg.DagsterInvariantViolationError, match="requires a workspace"):
        instance.launch_run(elsewhere.run_id, workspace=None)  # type: ignore[arg-type]


def test_the_project_instance_uses_the_warm_launcher_and_keeps_its_queue_limits(
    tmp_path: Path,
) -> None:
    settings = yaml.safe_load((Path(__file__).resolve().parents[2] / INSTANCE_YAML).read_text())
    assert settings["run_launcher"] == {
        "module": "cw_pipeline.runtime.launcher",
        "class": "WarmRunLauncher",
    }
    assert settings["run_coordinator"] == {
        "module": "cw_pipeline.runtime.launcher",
        "class": "WarmQueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": 1},
    }
    with dg.instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as inst:
        assert isinstance(inst.run_coordinator, WarmQueuedRunCoordinator)
        # the queue is read every second, and the concurrency block still sets its limits
        assert inst.run_coordinator.dequeue_interval_seconds == 1
        queue = inst.get_concurrency_config().run_queue_config
        limits = settings["concurrency"]["runs"]
        assert queue.max_concurrent_runs == limits["max_concurrent_runs"]
        assert [lim["key"] for lim in queue.tag_concurrency_limits] == [
            lim["key"] for lim in limits["tag_concurrency_limits"]
        ]


def test_is_daemon_process() -> None:
    assert is_daemon_process("/venv/bin/dagster-daemon")
    assert is_daemon_process("/venv/lib/python3.11/site-packages/dagster/_daemon/__main__.py")
    assert not is_daemon_process("/venv/bin/dagster-webserver")
    assert not is_daemon_process("/venv/bin/cw-pipeline")


@pytest.mark.parametrize("daemon", [True, False])
def test_the_coordinator_warms_the_launcher_in_the_daemon_only(
    tmp_path: Path, monkeypatch, daemon: bool
) -> None:
    warmed = []
    monkeypatch.setattr(WarmRunLauncher, "warm", lambda self: warmed.append(self))
    monkeypatch.setattr(launcher_module, "is_daemon_process", lambda: daemon)
    settings = {
        "run_coordinator": {
            "module": "cw_pipeline.runtime.launcher",
            "class": "WarmQueuedRunCoordinator",
        },
        "run_launcher": {"module": "cw_pipeline.runtime.launcher", "class": "WarmRunLauncher"},
    }
    with dg.instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as inst:
        inst.run_coordinator  # noqa: B018 (the daemon reads the queue's settings at once)
        deadline = time.monotonic() + 10
        while daemon and not warmed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert warmed == ([inst.run_launcher] if daemon else [])


def test_warm_starts_the_forkserver_with_the_preload(instance) -> None:
    from multiprocessing import forkserver

    launcher = instance.run_launcher
    launcher.warm()
    assert forkserver._forkserver._forkserver_pid is not None
    assert launcher_jobs.PRELOAD_PROBE in forkserver._forkserver._preload_modules
