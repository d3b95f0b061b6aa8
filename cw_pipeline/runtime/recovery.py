"""Runs whose process is gone: detect them, mark them failed, free their pool slots (wiring).

Every run the CLI starts executes in the CLI's own process (``dg.materialize``) and is tagged
with that process: host (:data:`HOST_TAG`), pid (:data:`PID_TAG`) and the process's start
time (:data:`PID_START_TAG`, from ``/proc``; it tells a reused pid from the original). A
process killed with SIGKILL (or by the OOM killer, a reboot...) leaves its run ``STARTED``
and its slot of the ``cnn`` pool claimed for ever: later runs would wait for that slot, and
declarative automation would take the run's assets as in progress.

:func:`recover_dead_runs`, called by the CLI before it indexes or refreshes, finds the queued
or running runs whose recorded process on this host is gone, marks them failed (tag
:data:`CRASHED_TAG`, so automation retries their assets, see
:func:`cw_pipeline.defs.dependencies.failed_attempt`), and frees the slots they hold; it also frees
slots still held by runs that already ended. Runs of another host, and runs without these
tags, are left alone. A run launched by the daemon (a ``dagster api execute_run`` process per
run) tags itself with its run worker's process when its resources are set up
(:func:`tag_run_worker`), so it is recovered the same way; the folder sensors run
:func:`recover_dead_runs` at every tick.

:func:`pool_wait_line` names the runs that hold a pool's slots, for the CLI to say what it
waits for.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from cw_pipeline.runtime.run_tags import (
    ACTIVE_STATUSES,
    CRASHED_TAG,
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    SHARD_TAG,
    process_of,
)

logger = logging.getLogger(__name__)

PROC = Path("/proc")

__all__ = [
    "dead_run_reason",
    "pool_wait_line",
    "process_alive",
    "process_start_time",
    "process_tags",
    "recover_dead_runs",
    "tag_run_worker",
]


def process_start_time(pid: int, proc: Path = PROC) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, ``/proc/<pid>/stat`` field 22);
    None when there is no such process or no ``/proc``."""
    try:
        stat = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start_time: str | None = None, proc: Path = PROC) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that started at
    ``start_time`` (when given and ``/proc`` is there: a reused pid is not alive)."""
    if pid <= 0:
        return False
    if proc.is_dir():
        now = process_start_time(pid, proc)
        if now is None:
            return False
        return start_time is None or now == start_time
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return socket.gethostname()


def process_tags() -> dict[str, str]:
    """The tags naming this process (for the runs it executes in-process)."""
    pid = os.getpid()
    tags = {HOST_TAG: _host(), PID_TAG: str(pid)}
    start = process_start_time(pid)
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def tag_run_worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Tag ``run`` with this process if this process is its run worker (the process whose
    pid the run's "Started process for run" engine event records) and it has no process tags
    yet. A step subprocess of the multiprocess executor is not the run worker: its end is not
    the run's, so it tags nothing. Returns whether the run was tagged."""
    if PID_TAG in process_of(run.tags):
        return False
    pid = str(os.getpid())
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        recorded = (data.metadata or {}).get("pid") if data is not None else None
        if recorded is not None and str(recorded.value) == pid:
            instance.add_run_tags(run.run_id, process_tags())
            return True
    return False


def dead_run_reason(
    tags: Mapping[str, str], host: str | None = None, proc: Path = PROC
) -> str | None:
    """Why the run with these tags has no process any more (its pid on this host is gone or
    reused), or None: alive, of another host, or not started by the CLI."""
    tags = process_of(tags)
    host = _host() if host is None else host
    if tags.get(HOST_TAG) != host or PID_TAG not in tags:
        return None
    try:
        pid = int(tags[PID_TAG])
    except ValueError:
        return None
    start = tags.get(PID_START_TAG)
    if process_alive(pid, start, proc):
        return None
    if proc.is_dir() and process_start_time(pid, proc) is not None:
        return f"pid {pid} on {host} is now another process (the run's process was gone)"
    return f"its process (pid {pid} on {host}) is gone"


def _describe(run: dg.DagsterRun) -> str:
    tags = {**run.tags, **process_of(run.tags)}
    parts = []
    if PID_TAG in tags:
        parts.append(f"pid {tags[PID_TAG]} on {tags.get(HOST_TAG, '?')}")
    if SHARD_TAG in tags:
        parts.append(f"shard {tags[SHARD_TAG]}")
    return f"run {run.run_id}" + (f" ({', '.join(parts)})" if parts else "")


def _frees_slots(instance: dg.DagsterInstance) -> bool:
    return bool(getattr(instance.event_log_storage, "supports_global_concurrency_limits", False))


def recover_dead_runs(instance: dg.DagsterInstance, proc: Path = PROC) -> list[str]:
    """Mark failed the queued or running runs whose process on this host is gone, and free
    the pool slots they (or runs that already ended) hold; one WARNING per run. Returns the
    ids of the runs marked failed."""
    host, me = _host(), os.getpid()
    failed = []
    for rec in instance.get_run_records(dg.RunsFilter(statuses=ACTIVE_STATUSES)):
        run = rec.dagster_run
        reason = dead_run_reason(run.tags, host, proc)
        if reason is None:
            continue
        current = instance.get_run_by_id(run.run_id)  # another command may have done it
        if current is None or current.status not in ACTIVE_STATUSES:
            continue
        message = (
            f"{_describe(run)}: {reason} (killed or crashed); marked failed by cw-pipeline "
            f"(pid {me}), its pool slots freed"
        )
        instance.add_run_tags(run.run_id, {CRASHED_TAG: reason})
        instance.report_run_failed(current, message)
        if _frees_slots(instance):
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        logger.warning("%s", message)
        failed.append(run.run_id)
    if _frees_slots(instance):
        _free_slots_of_ended_runs(instance)
    return failed


def _free_slots_of_ended_runs(instance: dg.DagsterInstance) -> None:
    storage = instance.event_log_storage
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return
    known = {
        rec.dagster_run.run_id: rec.dagster_run
        for rec in instance.get_run_records(dg.RunsFilter(run_ids=list(holders)))
    }
    for run_id in sorted(holders):
        run = known.get(run_id)
        if run is not None and run.status in ACTIVE_STATUSES:
            continue
        storage.free_concurrency_slots_for_run(run_id)
        status = "deleted" if run is None else run.status.value
        logger.warning("freed the pool slots still held by run %s (%s)", run_id, status)


def pool_wait_line(instance: dg.DagsterInstance, pool: str) -> str | None:
    """One line naming the runs that hold every slot of ``pool`` (with their pid, host and
    shard when known), or None when a slot is free or the instance has no pools."""
    if not _frees_slots(instance):
        return None
    info = instance.event_log_storage.get_concurrency_info(pool)
    limit = info.limit if info.limit is not None else info.slot_count
    holders = sorted(info.active_run_ids)
    if not holders or limit is None or len(info.claimed_slots) < limit:
        return None
    runs = {
        rec.dagster_run.run_id: rec.dagster_run
        for rec in instance.get_run_records(dg.RunsFilter(run_ids=holders))
    }
    named = [_describe(runs[r]) if r in runs else f"run {r}" for r in holders]
    return f"waiting for a slot of pool {pool!r} (limit {limit}), held by " + "; ".join(named)
