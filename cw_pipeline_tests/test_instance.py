"""Opening and writing the Dagster instance from several processes at once
(:mod:`cw_pipeline.runtime.instance`)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from cw_pipeline.runtime.instance import (
    LOCK_NAME,
    InstanceBusyError,
    add_partitions,
    instance_lock,
    is_transient_storage_error,
    migrate_instance_settings,
    open_instance,
    retry_busy,
)
from cw_pipeline_tests.conftest import REPO_ROOT

PROCESSES = 4


def _home(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    return path


def _open_and_write(home: str, barrier, queue) -> None:
    os.environ["DAGSTER_HOME"] = home
    try:
        barrier.wait()
        with open_instance(Path(home)) as instance:
            add_partitions(instance, "shards", ["a", "b"])
            queue.put("ok")
    except BaseException as exc:  # reported to the test
        queue.put(f"{type(exc).__name__}: {exc}")


def _add_rounds(home: str, rounds: int, barrier, queue) -> None:
    os.environ["DAGSTER_HOME"] = home
    errors = []
    with dg.DagsterInstance.get() as instance:
        for r in range(rounds):
            barrier.wait()
            try:
                add_partitions(instance, f"p{r}", [f"k{r}_{i}" for i in range(3)])
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    queue.put(errors)


def _run_all(target, args_of, n: int = PROCESSES) -> list:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of, barrier, queue)) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        out = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def test_first_opens_of_a_fresh_instance_at_once_all_succeed(tmp_path):
    """4 processes open (so create) one fresh SQLite instance at the same moment, twice:
    every open succeeds and the instance opens afterwards (before: alembic_version races, or a
    database stamped twice that never opens again)."""
    for attempt in range(2):
        home = _home(tmp_path / f"home{attempt}")
        assert _run_all(_open_and_write, (str(home),)) == ["ok"] * PROCESSES
        with open_instance(home) as instance:
            assert instance.get_dynamic_partitions("shards") == ["a", "b"]


def test_partitions_added_by_several_processes_at_once(tmp_path):
    """4 processes add the same 3 new partition keys at the same moment, 15 times: never an
    error (Dagster's own add fails with ``UNIQUE constraint failed: dynamic_partitions``)."""
    home = _home(tmp_path / "home")
    with open_instance(home):  # created once, beforehand
        pass
    assert _run_all(_add_rounds, (str(home), 15)) == [[]] * PROCESSES
    with open_instance(home) as instance:
        assert instance.get_dynamic_partitions("p14") == ["k14_0", "k14_1", "k14_2"]


def test_a_command_waits_for_the_instance_lock_and_says_so(tmp_path):
    """While another process holds ``$DAGSTER_HOME/.cw_pipeline_instance.lock`` a command
    waits, logging that it does, and opens the instance once the lock is released."""
    home = _home(tmp_path / "home")
    code = (
        "import logging, sys; from pathlib import Path; "
        "logging.basicConfig(level=logging.WARNING); "
        "from cw_pipeline.runtime.instance import open_instance; "
        "open_instance(Path(sys.argv[1])).dispose(); print('opened')"
    )
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    with instance_lock(home) as lock:
        assert lock == home / LOCK_NAME
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(home)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(8)  # the child imports Dagster, then waits for the lock
            assert proc.poll() is None, proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "opened"
    assert "another cw-pipeline command is opening the Dagster instance" in err, err
    assert str(home / LOCK_NAME) in err


def test_instance_lock_times_out_naming_the_lock_file(tmp_path):
    home = _home(tmp_path / "home")
    with instance_lock(home):
        # flock locks belong to open file descriptions: a second open in this process is
        # refused like another process would be.
        with pytest.raises(InstanceBusyError, match=LOCK_NAME), instance_lock(home, timeout=0.3):
            pass


def test_busy_storage_errors_are_retried_and_logged(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    with caplog.at_level(logging.WARNING, logger="cw_pipeline.runtime.instance"):
        assert retry_busy(flaky, "indexing x", first_delay=0.01) == "done"
    assert len(calls) == 3
    waits = [r.getMessage() for r in caplog.records]
    assert len(waits) == 2 and all(
        "indexing x: the Dagster instance's storage is busy" in w for w in waits
    ), waits
    assert "waiting 0.0 s, then retrying (attempt 2 of 8)" in waits[0]


def test_busy_storage_errors_give_up_after_a_bounded_number_of_attempts():
    def locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(InstanceBusyError, match=r"indexing x: .* still busy after 3 attempts"):
        retry_busy(locked, "indexing x", attempts=3, first_delay=0.01)


def test_other_errors_are_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise sqlite3.OperationalError("no such table: runs")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_busy(broken, "x", first_delay=0.01)
    assert calls == [1]
    assert not is_transient_storage_error(ValueError("database is locked"))
    assert is_transient_storage_error(
        sqlite3.IntegrityError("UNIQUE constraint failed: alembic_version.version_num")
    )
    assert is_transient_storage_error(
        sqlite3.OperationalError("table secondary_indexes already exists")
    )


def test_instance_settings_naming_the_old_launcher_module_are_migrated(tmp_path, caplog):
    """A $DAGSTER_HOME set up before the launcher moved to cw_pipeline.runtime names
    ``module: cw_pipeline.launcher``: opening it rewrites those lines, and only those."""
    from cw_pipeline.runtime.launcher import WarmRunLauncher

    current = (REPO_ROOT / "deploy" / "dagster.yaml").read_text()
    assert "module: cw_pipeline.runtime.launcher" in current
    old = current.replace("cw_pipeline.runtime.launcher", "cw_pipeline.launcher")
    old = old.replace("class: WarmRunLauncher", "class: WarmRunLauncher  # kept comment")
    (tmp_path / "dagster.yaml").write_text(old)
    with caplog.at_level(logging.WARNING):
        instance = open_instance(tmp_path)
    try:
        assert isinstance(instance.run_launcher, WarmRunLauncher)
    finally:
        instance.dispose()
    assert (tmp_path / "dagster.yaml").read_text() == current.replace(
        "class: WarmRunLauncher", "class: WarmRunLauncher  # kept comment"
    )
    assert "cw_pipeline.launcher -> cw_pipeline.runtime.launcher" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not migrate_instance_settings(tmp_path)  # nothing left to rename
    assert not migrate_instance_settings(tmp_path / "absent")
