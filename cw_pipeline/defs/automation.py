"""Incremental indexing: a folder sensor per dataset, a daily schedule, and the automation
sensor that refreshes everything downstream of new features."""

import os
import warnings

import dagster as dg

from cw_pipeline.config import ConfigError, DatasetConfig
from cw_pipeline.defs.assets import ident, partitions_def
from cw_pipeline.defs.recovery import recover_dead_runs
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.defs.run_tags import (
    active_index_shards,
    index_run_tags,
)
from cw_pipeline.indexing import feature_code_version, plan_shards
from cw_pipeline.instance import add_partitions

#: Cron of the daily incremental indexing (override with $CW_PIPELINE_INDEX_CRON).
DEFAULT_INDEX_CRON = "0 2 * * *"
#: Seconds between two scans of a dataset's folder by its sensor.
WATCH_INTERVAL_ENV = "CW_PIPELINE_WATCH_INTERVAL"
DEFAULT_WATCH_INTERVAL = 15
#: Seconds between two evaluations of the automation conditions.
AUTOMATION_INTERVAL_ENV = "CW_PIPELINE_AUTOMATION_INTERVAL"
DEFAULT_AUTOMATION_INTERVAL = 10


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
    """Run key of indexing a shard: changes with its files and with the extraction settings.

    A run that failed is not requested again for the same files (its run key is spent): a
    deterministic failure is not retried every tick; changing a file of the shard is a new key.
    """
    return f"{shard}:{fp}:{feature_code_version(ds)}"


def _interval(var: str, default: int) -> int:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        seconds = int(value)
    except ValueError:
        raise ConfigError(f"expected whole seconds, got {value!r}", source=f"${var}") from None
    if seconds < 1:
        raise ConfigError(f"expected at least 1 second, got {seconds}", source=f"${var}")
    return seconds


def _requests(ds: DatasetConfig, store, instance: dg.DagsterInstance, existing: set[str]):
    """Plan from what the store holds: the shards whose files or settings differ from their
    stored manifest and features, less those being indexed right now (by the daemon, the UI
    or the CLI)."""
    fps, new, todo, removed = plan_shards(ds, store, existing)
    # A shard whose indexing process was killed (a `cw-pipeline index` on this host) is not
    # "being indexed" for ever: such runs are marked failed and their slots freed first.
    recover_dead_runs(instance)
    busy = active_index_shards(instance, ds.name)
    requests = [
        dg.RunRequest(
            partition_key=s, run_key=_run_key(ds, s, fps[s]), tags=index_run_tags(ds.name, s)
        )
        for s in todo
        if s not in busy
    ]
    return requests, new, removed, sorted(set(todo) & busy)


def dataset_sensor(ds: DatasetConfig, job) -> dg.SensorDefinition:
    parts = partitions_def(ds.name)
    interval = _interval(WATCH_INTERVAL_ENV, DEFAULT_WATCH_INTERVAL)

    @dg.sensor(
        name=f"watch_{ident(ds.name)}",
        job=job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Watches {ds.images} every {interval} s: new shards become partitions; "
        "shards whose files differ from what the store holds are indexed (never one shard "
        "twice at once).",
    )
    def watch(context: dg.SensorEvaluationContext, pipeline: PipelineResource):
        store = pipeline.store()
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        requests, new, removed, busy = _requests(ds, store, context.instance, existing)
        if busy:
            context.log.info("%s: shard(s) %s are being indexed: next tick", ds.name, busy)
        dyn = []
        if new:
            dyn.append(parts.build_add_request(new))
        if removed:
            dyn.append(parts.build_delete_request(removed))
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=dyn)

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
        requests, new, removed, _ = _requests(ds, store, context.instance, existing)
        if new:
            add_partitions(context.instance, parts.name, new)  # racing commands: fine
        for s in removed:
            context.instance.delete_dynamic_partition(parts.name, s)
        return requests or dg.SkipReason(f"{ds.name}: nothing new")

    return daily


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    with warnings.catch_warnings():  # use_user_code_server is Beta: a warning per import
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _automation_sensor()


def _automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "refresh_downstream",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=_interval(AUTOMATION_INTERVAL_ENV, DEFAULT_AUTOMATION_INTERVAL),
        # The conditions compare data versions in Python (cw_pipeline.defs.versions): they
        # are evaluated in the code location's process.
        use_user_code_server=True,
        description="Refreshes PCA, descriptors, rankings and reports whose inputs' data "
        "changed: one run per tick for the affected assets, never while a parent is missing, "
        "running or failed.",
    )
