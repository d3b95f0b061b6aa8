"""Sensors: a folder sensor per dataset, and the automation sensor that refreshes everything
downstream of changed data."""

import os
import warnings
from typing import TYPE_CHECKING

import dagster as dg

from cw_pipeline.config import ConfigError, DatasetConfig
from cw_pipeline.defs.jobs import index_requests
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = [
    "AUTOMATION_INTERVAL_ENV",
    "WATCH_INTERVAL_ENV",
    "automation_sensor",
    "dataset_sensor",
]

#: Seconds between two scans of a dataset's folder by its sensor. A scan stats every file
#: (0.5 CPU-seconds per 20,000 files on the 2-core reference machine): raise it for folders
#: of tens of thousands of images.
WATCH_INTERVAL_ENV = "CW_PIPELINE_WATCH_INTERVAL"
DEFAULT_WATCH_INTERVAL = 10
#: Seconds between two evaluations of the automation conditions (the daemon's sensor loop runs
#: every 5 s: less changes nothing); a refresh waits for one tick after its indexing run. On the
#: demo, 5 s instead of 10 s cut that wait from 13-14 s to 2-8 s, for about 2 CPU-seconds more
#: per 90 s (benchmarks/daemon_latency.py).
AUTOMATION_INTERVAL_ENV = "CW_PIPELINE_AUTOMATION_INTERVAL"
DEFAULT_AUTOMATION_INTERVAL = 5


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


def dataset_sensor(ds: DatasetConfig, job: "UnresolvedAssetJobDefinition") -> dg.SensorDefinition:
    """``watch_<ds>``: scans the folder (stat only); new shards become partitions, removed
    ones are deleted, changed ones are indexed by ``job``."""
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
        requests, new, removed, busy = index_requests(ds, store, context.instance, existing)
        if busy:
            context.log.info("%s: shard(s) %s are being indexed: next tick", ds.name, busy)
        dyn = []
        if new:
            dyn.append(parts.build_add_request(new))
        if removed:
            dyn.append(parts.build_delete_request(removed))
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=dyn)

    return watch


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    """``refresh_downstream``: evaluates the assets' automation conditions (running by
    default), in the code location's process."""
    with warnings.catch_warnings():  # use_user_code_server is Beta: a warning per import
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.AutomationConditionSensorDefinition(
            "refresh_downstream",
            target=dg.AssetSelection.all(),
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=_interval(
                AUTOMATION_INTERVAL_ENV, DEFAULT_AUTOMATION_INTERVAL
            ),
            # The conditions compare data versions in Python (cw_pipeline.defs.versions):
            # they are evaluated in the code location's process.
            use_user_code_server=True,
            description="Refreshes PCA, descriptors, rankings and reports whose inputs' data "
            "changed: one run per tick for the affected assets, never while a parent is "
            "missing, running or failed.",
        )
