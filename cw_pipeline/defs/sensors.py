"""Sensors: a folder sensor per dataset, and the automation sensor that refreshes everything
downstream of changed data."""

import json
import os
import time
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
    "scan_pause",
]

#: Seconds between two scans of a dataset's folder by its sensor (the daemon's sensor loop
#: runs every 5 s).
WATCH_INTERVAL_ENV = "CW_PIPELINE_WATCH_INTERVAL"
DEFAULT_WATCH_INTERVAL = 5
#: A scan stats every file (0.5 s per 20,000 files on the 2-core reference machine): a folder
#: whose last scan took longer than this share of the interval is scanned less often, so that
#: scanning takes at most this share of the time (a 100k-image folder: about every 50 s).
SCAN_TIME_SHARE = 0.05
#: Seconds between two evaluations of the automation conditions; a refresh waits for one tick
#: after its indexing run. The default ticks at every pass of the daemon's loop (every 5 s, and
#: the loop's own time): with 10 s the wait was 13-14 s on the demo, with 1 s 2-5 s, for about
#: 2 CPU-seconds more per 90 s (benchmarks/daemon_latency.py).
AUTOMATION_INTERVAL_ENV = "CW_PIPELINE_AUTOMATION_INTERVAL"
DEFAULT_AUTOMATION_INTERVAL = 1


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


def scan_pause(cursor: str | None, interval: float, now: float) -> float:
    """Seconds to wait before the next scan, from the sensor's cursor (when and how long the
    last scan took): 0 once the last scan is ``SCAN_TIME_SHARE`` of the time ago (never more
    often than the sensor's interval, which Dagster enforces). A cursor that does not parse
    counts as no scan yet."""
    try:
        last = json.loads(cursor) if cursor else {}
        at, took = float(last["scanned_at"]), float(last["scan_seconds"])
    except (ValueError, KeyError, TypeError):
        return 0.0
    wait = took / SCAN_TIME_SHARE
    if wait <= interval:
        return 0.0
    return max(0.0, at + wait - now)


def dataset_sensor(ds: DatasetConfig, job: "UnresolvedAssetJobDefinition") -> dg.SensorDefinition:
    """``watch_<ds>``: scans the folder (stat only); new shards become partitions, removed
    ones are deleted, changed ones are indexed by ``job``. Its cursor only paces the scans of
    a large folder (:func:`scan_pause`); what to index comes from the store."""
    parts = partitions_def(ds.name)
    interval = _interval(WATCH_INTERVAL_ENV, DEFAULT_WATCH_INTERVAL)

    @dg.sensor(
        name=f"watch_{ident(ds.name)}",
        job=job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Watches {ds.images} every {interval} s (a large folder less often: "
        f"scans take at most {SCAN_TIME_SHARE:.0%} of the time): new shards become "
        "partitions; shards whose files differ from what the store holds are indexed (never "
        "one shard twice at once).",
    )
    def watch(context: dg.SensorEvaluationContext, pipeline: PipelineResource):
        now = time.time()
        pause = scan_pause(context.cursor, interval, now)
        if pause > 0:
            return dg.SkipReason(
                f"{ds.name}: the last scan took {json.loads(context.cursor)['scan_seconds']:.1f}"
                f" s; next scan in {pause:.0f} s (scans take at most {SCAN_TIME_SHARE:.0%} of "
                "the time)"
            )
        store = pipeline.store()
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        t0 = time.perf_counter()
        requests, new, removed, busy = index_requests(ds, store, context.instance, existing)
        took = time.perf_counter() - t0
        if busy:
            context.log.info("%s: shard(s) %s are being indexed: next tick", ds.name, busy)
        dyn = []
        if new:
            dyn.append(parts.build_add_request(new))
        if removed:
            dyn.append(parts.build_delete_request(removed))
        cursor = json.dumps({"scanned_at": round(now, 3), "scan_seconds": round(took, 4)})
        return dg.SensorResult(
            run_requests=requests, dynamic_partitions_requests=dyn, cursor=cursor
        )

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
            # The conditions compare data versions in Python (cw_pipeline.defs.automation):
            # they are evaluated in the code location's process.
            use_user_code_server=True,
            description="Refreshes PCA, descriptors, rankings and reports whose inputs' data "
            "changed: one run per tick for the affected assets, never while a parent is "
            "missing, running or failed.",
        )
