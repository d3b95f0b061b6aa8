"""Run the pipeline in-process against a Dagster instance (used by the CLI and tests).

``index_dataset`` does what the folder sensor and the automation daemon do, synchronously:
add new shards as partitions, materialize manifest + features of new or changed shards, then
execute what declarative automation requests until nothing is left.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import dagster as dg

from cw_pipeline.compute.shards import plan_shards
from cw_pipeline.config import ProjectConfig
from cw_pipeline.core.datasets import DEFAULT_IMAGE_EXTENSIONS
from cw_pipeline.defs.automation import is_stale
from cw_pipeline.defs.dependencies import graph_order
from cw_pipeline.defs.jobs import index_job_name
from cw_pipeline.defs.partitions import current_shards, ident, partitions_def
from cw_pipeline.runtime.instance import add_partitions
from cw_pipeline.runtime.recovery import pool_wait_line, process_tags, recover_dead_runs
from cw_pipeline.runtime.run_tags import active_index_shards, index_run_tags
from cw_pipeline.store import FeatureStore, features_path

logger = logging.getLogger(__name__)


@dataclass
class IndexResult:
    dataset: str
    shards: int = 0
    indexed_shards: list[str] = field(default_factory=list)
    images: int = 0
    forward_passes: int = 0
    feature_seconds: float = 0.0  #: time inside the cam_features steps
    reused: int = 0
    resumed: int = 0  #: of ``reused``: rows from the checkpoints of an interrupted run
    rejected: int = 0
    seconds: float = 0.0
    #: the malloc setting of the process that ran the forward passes (core/allocator.py)
    malloc: str = ""

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "shards": self.shards,
            "indexed_shards": self.indexed_shards,
            "images": self.images,
            "forward_passes": self.forward_passes,
            "reused": self.reused,
            "resumed": self.resumed,
            "rejected": self.rejected,
            "feature_seconds": round(self.feature_seconds, 3),
            "seconds": round(self.seconds, 2),
            "malloc": self.malloc,
        }


def _assets(defs: dg.Definitions) -> list:
    return list(defs.assets or [])


#: Asset check evaluations of the runs executed by this module in this process:
#: (asset key, check name, passed, severity).
CHECK_LOG: list[tuple[str, str, bool, str]] = []


#: Threshold of the console log of the runs started here (None: Dagster's default, DEBUG).
_CONSOLE_LEVEL: ContextVar[str | None] = ContextVar("cw_pipeline_console_level", default=None)


@contextmanager
def console_log_level(level: str | None, evaluator: bool = True) -> Iterator[None]:
    """Runs started inside the context print their events to the console from ``level`` up
    (e.g. ``"WARNING"`` while the CLI draws progress bars; None: Dagster's default); with
    ``evaluator``, so do refresh's automation evaluations (Python logging)."""
    token = _CONSOLE_LEVEL.set(level)
    # refresh's automation evaluations log through Python logging, one line per asset.
    evaluator_log = logging.getLogger("dagster.automation_condition_tester")
    previous = evaluator_log.level
    if level is not None and evaluator:
        evaluator_log.setLevel(level)
    try:
        yield
    finally:
        _CONSOLE_LEVEL.reset(token)
        evaluator_log.setLevel(previous)


#: Receives every event of the runs started here (see :func:`run_events`).
_EVENT_LISTENER: ContextVar[Callable[[dg.EventLogEntry], None] | None] = ContextVar(
    "cw_pipeline_event_listener", default=None
)


@contextmanager
def run_events(listener: Callable[[dg.EventLogEntry], None]) -> Iterator[None]:
    """Runs started inside the context pass each of their events (as the instance stores it:
    steps, materializations, checks, log lines) to ``listener``, in order, while they run."""
    token = _EVENT_LISTENER.set(listener)
    try:
        yield
    finally:
        _EVENT_LISTENER.reset(token)


#: Keys named one by one in a refresh run's job name; more are counted.
JOB_NAME_KEYS = 2


def refresh_job_name(keys: Sequence[dg.AssetKey]) -> str:
    """The job name of a CLI run that refreshes ``keys``: ``refresh_`` then the keys as
    Dagster identifiers (``refresh_demo_eval__rankings``), the first
    :data:`JOB_NAME_KEYS` named, the rest counted (``…_and_3_more``)."""
    if not keys:
        raise ValueError("a refresh run needs at least one asset key")
    named = "_and_".join("__".join(ident(p) for p in k.path) for k in keys[:JOB_NAME_KEYS])
    more = len(keys) - JOB_NAME_KEYS
    return f"refresh_{named}" + (f"_and_{more}_more" if more > 0 else "")


def _materialize(
    defs,
    instance,
    keys: Iterable[dg.AssetKey],
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    job_name: str | None = None,
):
    """``dg.materialize`` of ``keys`` on ``instance`` as a job named ``job_name`` (default
    :func:`refresh_job_name`), with this module's console level and event listener (a run id
    chosen here, so that the listener is subscribed before it runs)."""
    keys = list(keys)
    name = job_name or refresh_job_name(keys)
    level = _CONSOLE_LEVEL.get()
    _say_pool_waits(defs, instance, keys)
    job = dg.Definitions(
        jobs=[dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys))],
        assets=_assets(defs),
        resources=defs.resources,
    ).resolve_job_def(name)
    run_id = str(uuid.uuid4())
    listener = _EVENT_LISTENER.get()
    if listener is not None:
        instance.add_event_listener(run_id, listener)
    result = job.execute_in_process(
        instance=instance,
        partition_key=partition_key,
        run_id=run_id,
        # The run executes in this process: tagged with it, so that a later command finds
        # the run whose process was killed (cw_pipeline.runtime.recovery).
        tags={**(tags or {}), **process_tags()},
        run_config=None
        if level is None
        else {"loggers": {"console": {"config": {"log_level": level}}}},
    )
    for ev in result.get_asset_check_evaluations():
        CHECK_LOG.append(
            (ev.asset_key.to_user_string(), ev.check_name, bool(ev.passed), ev.severity.value)
        )
    return result


def _say_pool_waits(defs: dg.Definitions, instance: dg.DagsterInstance, keys) -> None:
    """Log which runs hold the slots of the pools of ``keys``' steps, when all are held."""
    wanted = set(keys)
    pools = sorted(
        {
            a.op.pool
            for a in _assets(defs)
            if isinstance(a, dg.AssetsDefinition) and a.op.pool and wanted & set(a.keys)
        }
    )
    for pool in pools:
        line = pool_wait_line(instance, pool)
        if line is not None:
            logger.warning("%s", line)


def index_dataset(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    config: ProjectConfig,
    name: str,
    store: FeatureStore,
    force: bool = False,
    wait_seconds: float = 3600.0,
) -> IndexResult:
    """Index new or changed shards of one dataset (manifest + features).

    A shard that another run is indexing (the daemon's sensor, a UI materialization, another
    command) is never indexed twice at once: this waits for that run (up to
    ``wait_seconds``, saying so in the log), then indexes the shard only if it still differs.
    Runs whose process is gone are marked failed first, and their pool slots freed
    (:func:`cw_pipeline.runtime.recovery.recover_dead_runs`).
    """
    t0 = time.perf_counter()
    recover_dead_runs(instance)
    ds = config.dataset(name)
    parts = partitions_def(name)
    existing = set(instance.get_dynamic_partitions(parts.name))
    fps, new, todo, removed = plan_shards(ds, store, existing)
    if new:  # another command may add the same shards at this moment: not an error
        add_partitions(instance, parts.name, new)
    for s in removed:
        instance.delete_dynamic_partition(parts.name, s)
    if not fps:
        raise ValueError(
            f"dataset {name!r} ({config.source}) has no images under {ds.images} "
            f"(looked for {' '.join(DEFAULT_IMAGE_EXTENSIONS)} files, hidden ones skipped)"
        )
    if force:
        todo = sorted(fps)
    result = IndexResult(name, shards=len(fps), indexed_shards=[])
    keys = [dg.AssetKey([name, "manifest"]), dg.AssetKey([name, "cam_features"])]
    for shard in todo:
        if not force and _wait_for_other_runs(instance, ds.name, shard, wait_seconds):
            # Another run (the daemon's sensor, the UI, another command) indexed it meanwhile:
            # index it only if what it left still differs from the files.
            if shard not in plan_shards(ds, store, set(fps))[2]:
                continue
        result.indexed_shards.append(shard)
        run = _materialize(
            defs,
            instance,
            keys,
            partition_key=shard,
            tags=index_run_tags(name, shard),
            job_name=index_job_name(name),
        )
        for mat in run.asset_materializations_for_node(f"{ident(name)}__cam_features"):
            md = mat.metadata
            result.forward_passes += int(md["forward_passes"].value)
            result.reused += int(md["reused"].value)
            result.resumed += int(md["resumed"].value)
            result.rejected += int(md["rejected"].value)
            result.feature_seconds += float(md["seconds"].value)
            if "malloc" in md:
                result.malloc = str(md["malloc"].value)
    for shard in current_shards(instance, name):
        rel = features_path(name, shard)
        if store.exists(rel):
            result.images += store.read_table(rel, ["image_id"]).num_rows
    result.seconds = time.perf_counter() - t0
    return result


def _wait_for_other_runs(
    instance: dg.DagsterInstance, dataset: str, shard: str, wait_seconds: float
) -> bool:
    """Wait while a queued or running run indexes ``shard``; True if one did."""
    waited = False
    deadline = time.monotonic() + wait_seconds
    while shard in active_index_shards(instance, dataset):
        if not waited:
            logger.warning(
                "%s: shard %r is being indexed by another run (daemon, UI or command): waiting "
                "for it to finish",
                dataset,
                shard,
            )
            waited = True
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{dataset}: shard {shard!r} is still being indexed by another run after "
                f"{wait_seconds:.0f} s; see the Runs page of the Dagster UI"
            )
        time.sleep(1.0)
    return waited


def refresh(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    max_rounds: int = 10,
    include_cron: bool = False,
) -> list[str]:
    """Execute what declarative automation requests, round after round, until it is quiet.

    With ``include_cron`` every asset still missing or stale afterwards is materialized too
    (cron-gated evaluations would otherwise wait for their tick). Returns the asset keys
    materialized.

    The conditions compare data versions (:mod:`cw_pipeline.defs.automation`), so ``refresh``
    and the daemon's automation sensor agree on what is stale: what one refreshed, the other
    finds current. ``refresh`` keeps its own cursor (in the instance) only for the cron ticks.
    """
    recover_dead_runs(instance)
    done = _automation_rounds(defs, instance, max_rounds)
    if include_cron:
        missing = materialize_missing(defs, instance)
        if missing:
            # Evaluate once more so that the next refresh compares with a state that includes
            # these materializations (else the next change upstream of them would be taken as
            # already handled, and never refreshed).
            missing += _automation_rounds(defs, instance, max_rounds)
        done += missing
    return done


def _automation_rounds(defs: dg.Definitions, instance: dg.DagsterInstance, max_rounds: int):
    done: list[str] = []
    cursor = _load_refresh_cursor(instance)
    initial = cursor is None
    graph = defs.resolve_asset_graph()
    all_keys = graph_order(graph)
    for _ in range(max_rounds):
        with warnings.catch_warnings():  # Dagster's evaluator uses a Beta selection
            warnings.simplefilter("ignore", dg.BetaWarning)
            res = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = res.cursor
        _save_refresh_cursor(instance, cursor)
        if not res.total_requested:
            if initial:  # the initial evaluation never requests: evaluate again
                initial = False
                continue
            break
        initial = False
        by_partition: dict[str | None, list[dg.AssetKey]] = {}
        for key in all_keys:
            for pk in res.get_requested_partitions(key):
                by_partition.setdefault(pk, []).append(key)
        # Partitioned requests first: unpartitioned assets downstream of them read all shards.
        for pk in sorted(by_partition, key=lambda p: (p is None, p or "")):
            keys = by_partition[pk]
            _materialize(defs, instance, keys, partition_key=pk)
            done += [k.to_user_string() + (f"[{pk}]" if pk else "") for k in keys]
    return done


#: Where :func:`refresh` keeps its automation cursor (the instance's daemon cursor storage).
REFRESH_CURSOR_KEY = "cw_pipeline/refresh_cursor"


def _load_refresh_cursor(instance: dg.DagsterInstance):
    stored = instance.daemon_cursor_storage.get_cursor_values({REFRESH_CURSOR_KEY})
    raw = stored.get(REFRESH_CURSOR_KEY)
    if not raw:
        return None
    try:
        return dg.deserialize_value(raw)
    except Exception as exc:  # written by another Dagster version: start afresh
        logger.warning("ignoring the stored refresh cursor (%s)", exc)
        return None


def _save_refresh_cursor(instance: dg.DagsterInstance, cursor) -> None:
    instance.daemon_cursor_storage.set_cursor_values(
        {REFRESH_CURSOR_KEY: dg.serialize_value(cursor)}
    )


def materialize_missing(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Materialize, level by level, every asset (and partition) never materialized or whose
    inputs' data changed since it was (e.g. cron-gated ones, ahead of their tick)."""
    recover_dead_runs(instance)
    graph = defs.resolve_asset_graph()
    done = []
    for key in graph_order(graph):
        node = graph.get(key)
        pdef = node.partitions_def
        condition = node.automation_condition
        if pdef is None:
            never = instance.get_latest_materialization_event(key) is None
            if never or is_stale(instance, key, condition):
                _materialize(defs, instance, [key])
                done.append(key.to_user_string())
            continue
        keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
        have = instance.get_materialized_partitions(key)
        for pk in keys:
            if pk not in have or is_stale(instance, key, condition, pk):
                _materialize(defs, instance, [key], partition_key=pk)
                done.append(f"{key.to_user_string()}[{pk}]")
    return done
