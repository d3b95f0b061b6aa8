"""Every run tag the pipeline writes or reads, and the run statuses it groups (wiring only).

Tags a user reads on the Runs page are plain (``cw_pipeline/...``); the ones only the code
reads (which process executes a run) carry Dagster's hidden prefix, ``.dagster/``, so the
Runs page does not show them. Runs recorded before those were hidden carry them under their
old plain names: :func:`process_of` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

__all__ = [
    "ACTIVE_STATUSES",
    "CRASHED_TAG",
    "DATASET_TAG",
    "HOST_TAG",
    "LAUNCHER_TAG",
    "PID_START_TAG",
    "PID_TAG",
    "SHARD_TAG",
    "active_index_shards",
    "index_run_tags",
    "process_of",
]

#: Tags of every run that indexes a shard (sensor, schedule, CLI): the dataset, and
#: ``<dataset>/<shard>``, which dagster.yaml limits to one run at a time per value.
DATASET_TAG = "cw_pipeline/dataset"
SHARD_TAG = "cw_pipeline/shard"
#: A run marked failed because its process was gone (cw_pipeline.runtime.recovery), and why:
#: its attempt counts as none (not a failure of the code: the assets are retried).
CRASHED_TAG = "cw_pipeline/crashed"
#: How a run's worker was started: ``warm`` (forked from the warm server,
#: cw_pipeline.runtime.launcher) or absent (Dagster's default launcher).
LAUNCHER_TAG = "cw_pipeline/launcher"

#: Hidden tags naming the process that executes a run: host, pid and the process's start
#: time (from ``/proc``: it tells a reused pid from the original).
HOST_TAG = ".dagster/cw_pipeline/host"
PID_TAG = ".dagster/cw_pipeline/pid"
PID_START_TAG = ".dagster/cw_pipeline/pid_start"
#: Their names on runs recorded before they were hidden.
_PLAIN_PROCESS_TAGS = {
    HOST_TAG: "cw_pipeline/host",
    PID_TAG: "cw_pipeline/pid",
    PID_START_TAG: "cw_pipeline/pid_start",
}

#: Run statuses of a run that is queued or running: it may still write, hold a slot of a
#: pool, or materialize its assets (CANCELING included: it runs until it has stopped). A
#: tuple: ``dg.RunsFilter(statuses=...)`` takes a sequence.
ACTIVE_STATUSES = (
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)


def process_of(tags: Mapping[str, str]) -> dict[str, str]:
    """A run's process tags (:data:`HOST_TAG`, :data:`PID_TAG`, :data:`PID_START_TAG`) under
    their current names, whichever names the run recorded them under."""
    out = {}
    for name, plain in _PLAIN_PROCESS_TAGS.items():
        value = tags.get(name, tags.get(plain))
        if value is not None:
            out[name] = value
    return out


def index_run_tags(ds_name: str, shard: str) -> dict[str, str]:
    return {DATASET_TAG: ds_name, SHARD_TAG: f"{ds_name}/{shard}"}


def active_index_shards(instance: dg.DagsterInstance, ds_name: str) -> set[str]:
    """Shards of ``ds_name`` that a queued or running run is indexing."""
    records = instance.get_run_records(
        dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={DATASET_TAG: ds_name})
    )
    out = set()
    for rec in records:
        tag = rec.dagster_run.tags.get(SHARD_TAG, "")
        if tag.startswith(f"{ds_name}/"):
            out.add(tag[len(ds_name) + 1 :])
    return out
