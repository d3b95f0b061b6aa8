"""Schedules: the daily incremental indexing of each dataset."""

import os
from typing import TYPE_CHECKING

import dagster as dg

from cw_pipeline.config import DatasetConfig
from cw_pipeline.defs.jobs import index_requests
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.runtime.instance import add_partitions

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = ["DEFAULT_INDEX_CRON", "INDEX_CRON_ENV", "dataset_schedule"]

#: Cron of the daily incremental indexing (override with $CW_PIPELINE_INDEX_CRON).
INDEX_CRON_ENV = "CW_PIPELINE_INDEX_CRON"
DEFAULT_INDEX_CRON = "0 2 * * *"


def dataset_schedule(
    ds: DatasetConfig, job: "UnresolvedAssetJobDefinition"
) -> dg.ScheduleDefinition:
    """``daily_index_<ds>``: the folder sensor's work once a day, for deployments that keep
    sensors off."""
    parts = partitions_def(ds.name)
    cron = os.environ.get(INDEX_CRON_ENV, DEFAULT_INDEX_CRON)

    @dg.schedule(
        name=f"daily_index_{ident(ds.name)}",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Incremental indexing of {ds.name} ({cron}; ${INDEX_CRON_ENV}).",
    )
    def daily(context: dg.ScheduleEvaluationContext, pipeline: PipelineResource):
        store = pipeline.store()
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        requests, new, removed, _ = index_requests(ds, store, context.instance, existing)
        if new:
            add_partitions(context.instance, parts.name, new)  # racing commands: fine
        for s in removed:
            context.instance.delete_dynamic_partition(parts.name, s)
        return requests or dg.SkipReason(f"{ds.name}: nothing new")

    return daily
