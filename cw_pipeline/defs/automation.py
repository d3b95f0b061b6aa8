"""Incremental indexing: a folder sensor per dataset, a daily schedule, and the automation
sensor that refreshes everything downstream of new features."""

import json
import os

import dagster as dg

from cw_pipeline.config import DatasetConfig
from cw_pipeline.defs.assets import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.indexing import feature_code_version, plan_shards

#: Cron of the daily incremental indexing (override with $CW_PIPELINE_INDEX_CRON).
DEFAULT_INDEX_CRON = "0 2 * * *"


def index_job(ds: DatasetConfig):
    """Manifest + features of one dataset, run per shard."""
    return dg.define_asset_job(
        name=f"index_{ident(ds.name)}",
        selection=dg.AssetSelection.assets(
            dg.AssetKey([ds.name, "manifest"]), dg.AssetKey([ds.name, "cam_features"])
        ),
        description=f"Index new or changed shards of {ds.name}.",
    )


def _run_key(ds: DatasetConfig, shard: str, fp: str) -> str:
    """Run key of indexing a shard: changes with its files and with the extraction settings."""
    return f"{shard}:{fp}:{feature_code_version(ds)}"


def dataset_sensor(ds: DatasetConfig, job) -> dg.SensorDefinition:
    parts = partitions_def(ds.name)

    @dg.sensor(
        name=f"watch_{ident(ds.name)}",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Watches {ds.images}: new shards become partitions; new or changed "
        "shards are indexed.",
    )
    def watch(context: dg.SensorEvaluationContext, pipeline: PipelineResource):
        store = pipeline.store()
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        cursor = json.loads(context.cursor) if context.cursor else {}
        if "shards" not in cursor:  # older cursors: the fingerprints only
            cursor = {"shards": cursor, "code_version": None}
        fps, new, todo, removed = plan_shards(
            ds, store, existing, cursor["shards"], cursor["code_version"]
        )
        requests = [dg.RunRequest(partition_key=s, run_key=_run_key(ds, s, fps[s])) for s in todo]
        dyn = []
        if new:
            dyn.append(parts.build_add_request(new))
        if removed:
            dyn.append(parts.build_delete_request(removed))
        code_version = feature_code_version(ds)
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=dyn,
            cursor=json.dumps({"shards": fps, "code_version": code_version}),
        )

    return watch


def dataset_schedule(ds: DatasetConfig, job) -> dg.ScheduleDefinition:
    parts = partitions_def(ds.name)
    cron = os.environ.get("CW_PIPELINE_INDEX_CRON", DEFAULT_INDEX_CRON)

    @dg.schedule(
        name=f"daily_index_{ident(ds.name)}",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Incremental indexing of {ds.name} ({cron}; $CW_PIPELINE_INDEX_CRON).",
    )
    def daily(context: dg.ScheduleEvaluationContext, pipeline: PipelineResource):
        store = pipeline.store()
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        fps, new, todo, removed = plan_shards(ds, store, existing)
        if new:
            context.instance.add_dynamic_partitions(parts.name, new)
        for s in removed:
            context.instance.delete_dynamic_partition(parts.name, s)
        return [dg.RunRequest(partition_key=s, run_key=_run_key(ds, s, fps[s])) for s in todo] or (
            dg.SkipReason(f"{ds.name}: nothing new")
        )

    return daily


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "refresh_downstream",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Refreshes PCA, descriptors, rankings and reports after new features.",
    )
