"""Tags of the runs that index a shard, and which shards such runs hold (wiring only)."""

from __future__ import annotations

import dagster as dg

__all__ = ["ACTIVE_STATUSES", "DATASET_TAG", "SHARD_TAG", "active_index_shards", "index_run_tags"]

#: Tags of every run that indexes a shard (sensor, schedule, CLI): the dataset, and
#: ``<dataset>/<shard>``, which dagster.yaml limits to one run at a time per value.
DATASET_TAG = "cw_pipeline/dataset"
SHARD_TAG = "cw_pipeline/shard"
#: Run statuses during which a run may still write its shard.
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


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
