"""What the automation conditions read of an asset's dependencies from the Dagster instance
(wiring only).

Every asset of the graph reports a *data version* (tag :data:`DATA_VERSION_TAG`, computed by
:mod:`cw_pipeline.compute.data_versions`): a hash of what it holds. Every automated asset also
records, as the tag :data:`INPUT_VERSION_TAG` of its materialization, the *input version* it
was computed from: a hash of its dependencies' data versions, read before it reads them.

Here: a dependency (:class:`Dep`), the data version it has now (:func:`dep_version`), the
input version of an asset's dependencies now (:func:`input_version`) and the one its latest
materialization recorded (:func:`recorded_input_versions`); the run states of a dependency
(:func:`dep_state`: missing, in progress, failed; :func:`failed_attempt`); the graph's
assets parents first (:func:`graph_order`). The reads go through one cache, kept while the
instance's event log is unchanged (:func:`evaluating`): the automation conditions of
:mod:`cw_pipeline.defs.automation` read them at every tick.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import dagster as dg

from cw_pipeline.compute.data_versions import combine
from cw_pipeline.runtime.run_tags import ACTIVE_STATUSES, CRASHED_TAG

if TYPE_CHECKING:
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

_T = TypeVar("_T")

#: Tag (Dagster's) holding a materialization's data version.
DATA_VERSION_TAG = "dagster/data_version"
#: Tag of a materialization: the input version it was computed from.
INPUT_VERSION_TAG = "cw_pipeline/input_version"

__all__ = [
    "DATA_VERSION_TAG",
    "INPUT_VERSION_TAG",
    "Dep",
    "DepState",
    "dep_state",
    "dep_version",
    "dynamic_partition_keys",
    "evaluating",
    "failed_attempt",
    "graph_order",
    "input_version",
    "recorded_input_versions",
]


def graph_order(graph: BaseAssetGraph) -> list[dg.AssetKey]:
    """Every asset key of ``graph``, parents before children; keys of one level sorted by name
    (so lists built from it do not depend on Python's set order)."""
    levels = graph.toposorted_asset_keys_by_level
    return [k for level in levels for k in sorted(level, key=lambda k: k.to_user_string())]


@dataclass(frozen=True)
class Dep:
    """A dependency of an automated asset.

    ``partitions``: the dependency's dynamic partitions definition (None: unpartitioned).
    ``same_partition``: the dependency is partitioned like the asset, partition to partition
    (distractor descriptors of a shard ← features of that shard); otherwise every current
    partition of the dependency is an input.
    """

    key: dg.AssetKey
    partitions: dg.DynamicPartitionsDefinition | None = None
    same_partition: bool = False

    def __post_init__(self) -> None:
        if self.partitions is not None and self.partitions.name:
            _PARTITIONS.add(self.partitions.name)


def _latest_event(instance: dg.DagsterInstance, key: dg.AssetKey):
    """The latest materialization event (the events of reports carry their markdown and are
    slow to decode: cached while the event log is unchanged, :class:`_TickCache`)."""
    return _CACHE.kept(("event", key), lambda: instance.get_latest_materialization_event(key))


def _latest_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    event = _latest_event(instance, key)
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def _partition_versions(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Sequence[str]
) -> dict[str, str | None]:
    def read() -> dict[str, str | None]:
        tags = instance.event_log_storage.get_latest_tags_by_partition(
            key,
            dg.DagsterEventType.ASSET_MATERIALIZATION,
            [DATA_VERSION_TAG],
            asset_partitions=list(partitions),
        )
        return {p: tags.get(p, {}).get(DATA_VERSION_TAG) for p in partitions}

    return _CACHE.kept(("versions", key, tuple(partitions)), read)


def dep_version(instance: dg.DagsterInstance, dep: Dep, partition: str | None) -> str | None:
    """The data version ``dep`` has now (None: missing, or a partition of it is missing)."""
    if dep.partitions is None:
        return _latest_version(instance, dep.key)
    if dep.same_partition:
        if partition is None:
            raise ValueError(f"{dep.key.to_user_string()}: a partition is needed")
        return _partition_versions(instance, dep.key, [partition])[partition]
    keys = dynamic_partition_keys(instance, dep.partitions.name)
    if not keys:  # a dataset without shards has no data yet
        return None
    versions = _partition_versions(instance, dep.key, keys)
    if any(v is None for v in versions.values()):
        return None
    return combine((p, v or "") for p, v in versions.items())


def input_version(
    instance: dg.DagsterInstance, deps: Sequence[Dep], partition: str | None = None
) -> str | None:
    """Hash of the dependencies' current data versions (None while one is missing)."""
    versions = []
    for dep in deps:
        v = dep_version(instance, dep, partition)
        if v is None:
            return None
        versions.append((dep.key.to_user_string(), v))
    return combine(versions)


def recorded_input_versions(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Sequence[str] | None
) -> dict[str | None, str | None]:
    """The input version recorded by the latest materialization (of each partition)."""
    if partitions is None:
        event = _latest_event(instance, key)
        mat = event.asset_materialization if event is not None else None
        return {None: (mat.tags or {}).get(INPUT_VERSION_TAG) if mat is not None else None}

    def read() -> dict[str | None, str | None]:
        ids = instance.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions)
        )
        out: dict[str | None, str | None] = dict.fromkeys(partitions)
        if ids:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())),
                limit=len(ids),
            ).records
            for rec in records:
                mat = rec.asset_materialization
                if mat is not None and mat.partition in out:
                    out[mat.partition] = (mat.tags or {}).get(INPUT_VERSION_TAG)
        return out

    return dict(_CACHE.kept(("recorded", key, tuple(partitions)), read))


# --------------------------------------------------------------------------- run states

#: Run statuses of a failed attempt (ACTIVE_STATUSES: of one that may still materialize).
_FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class DepState:
    """What an asset (all its current partitions, or one) looks like to its children."""

    missing: bool  #: never materialized (a partitioned one: some partition, or no partitions)
    in_progress: bool  #: an attempt to materialize it is queued or running
    failed: bool  #: its latest attempt failed (nothing materialized since)
    latest_storage_id: int  #: of its latest materialization (0: none)


class _TickCache:
    """What the conditions read from the instance while they are being evaluated.

    Run states are read once per tick (``states``, ``runs``). The reads of materializations
    (``kept``) are kept across ticks while the instance's *fingerprint* — the event log's
    newest record id and the dynamic partitions of every :class:`Dep` — is unchanged: every
    materialization, planned materialization and run event adds a record, so an idle
    instance's tick reads one row instead of every asset's history. Outside an evaluation
    nothing is cached."""

    def __init__(self) -> None:
        self.tick: object = None  #: the asset graph view of the tick being evaluated
        self.instance: object = None  #: the instance the kept values were read from
        self.fingerprint: object = None
        self.active = False  #: only inside a condition's evaluation
        self.states: dict[tuple, DepState] = {}
        self.runs: dict[str, dg.DagsterRunStatus | None] = {}
        self.values: dict[tuple, object] = {}

    def enter(self, context) -> None:
        """Start evaluating a node of ``context``'s tick (one asset graph view per tick)."""
        view = context.asset_graph_view
        if view is not self.tick:
            self.tick, self.states, self.runs = view, {}, {}
            fingerprint = _fingerprint(view.instance)
            if view.instance is not self.instance or fingerprint != self.fingerprint:
                self.instance, self.fingerprint, self.values = view.instance, fingerprint, {}
        self.active = True

    def kept(self, key: tuple, read: Callable[[], _T]) -> _T:
        if not self.active:
            return read()
        if key not in self.values:
            self.values[key] = read()
        return self.values[key]  # type: ignore[return-value]


#: The dynamic partitions definitions of every Dep (part of the instance's fingerprint).
_PARTITIONS: set[str] = set()


def dynamic_partition_keys(instance: dg.DagsterInstance, name: str) -> list[str]:
    """The sorted partition keys of a dynamic partitions definition (kept while the instance
    is unchanged, inside :func:`evaluating`)."""
    return _CACHE.kept(("partitions", name), lambda: sorted(instance.get_dynamic_partitions(name)))


def _fingerprint(instance: dg.DagsterInstance) -> tuple:
    newest = instance.event_log_storage.get_maximum_record_id()
    parts = hashlib.sha1()
    for name in sorted(_PARTITIONS):
        parts.update(name.encode() + b"\0")
        for key in sorted(instance.get_dynamic_partitions(name)):
            parts.update(key.encode() + b"\n")
    return newest, parts.hexdigest()


_CACHE = _TickCache()


@contextmanager
def evaluating(context) -> Iterator[None]:
    """Inside: the evaluation of one node of ``context``'s tick (an automation condition's
    ``evaluate``), whose reads of the instance are cached (:class:`_TickCache`)."""
    _CACHE.enter(context)
    try:
        yield
    finally:
        _CACHE.active = False


def _run_statuses(
    instance: dg.DagsterInstance, run_ids: Iterable[str]
) -> dict[str, dg.DagsterRunStatus | None]:
    """Status of each run; None for a run that does not exist or whose process was gone (a
    crashed attempt is no attempt: neither in progress nor a failure to wait out)."""
    if not _CACHE.active:
        _CACHE.runs = {}
    todo = [r for r in set(run_ids) if r not in _CACHE.runs]
    if todo:
        for rec in instance.get_run_records(dg.RunsFilter(run_ids=todo)):
            run = rec.dagster_run
            _CACHE.runs[run.run_id] = None if CRASHED_TAG in run.tags else run.status
        for r in todo:
            _CACHE.runs.setdefault(r, None)
    return {r: _CACHE.runs[r] for r in run_ids}


def _latest_storage_id(instance: dg.DagsterInstance, key: dg.AssetKey) -> int:
    def read() -> int:
        flt = dg.AssetRecordsFilter(asset_key=key)
        records = instance.fetch_materializations(flt, limit=1).records
        return records[0].storage_id if records else 0

    return _CACHE.kept(("latest_id", key), read)


def _planned(instance: dg.DagsterInstance, key: dg.AssetKey):
    """The latest planned materialization of an unpartitioned asset (run id, storage id)."""
    return _CACHE.kept(
        ("planned", key),
        lambda: instance.event_log_storage.get_latest_planned_materialization_info(key),
    )


def _attempts(instance: dg.DagsterInstance, key: dg.AssetKey) -> Mapping[str, tuple[str, int]]:
    """Partition -> (run id, storage id) of its latest attempt not followed by a
    materialization."""
    storage = instance.event_log_storage
    return _CACHE.kept(
        ("attempts", key),
        lambda: (
            storage.get_latest_asset_partition_materialization_attempts_without_materializations(
                key
            )
        ),
    )


def _unpartitioned_state(instance: dg.DagsterInstance, key: dg.AssetKey) -> DepState:
    latest = _latest_storage_id(instance, key)
    planned = _planned(instance, key)
    in_progress = failed = False
    if planned is not None and planned.storage_id > latest:
        status = _run_statuses(instance, [planned.run_id])[planned.run_id]
        in_progress = status in ACTIVE_STATUSES
        failed = status in _FAILED
    return DepState(latest == 0, in_progress, failed, latest)


def _partitions_state(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Sequence[str]
) -> DepState:
    if not partitions:
        return DepState(True, False, False, 0)
    wanted = set(partitions)
    latest = _CACHE.kept(
        ("latest_ids", key, tuple(sorted(wanted))),
        lambda: instance.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION, wanted
        ),
    )
    attempts = _attempts(instance, key)
    pending = {pk: run_id for pk, (run_id, _) in attempts.items() if pk in wanted}
    statuses = _run_statuses(instance, pending.values())
    in_progress = any(statuses[r] in ACTIVE_STATUSES for r in pending.values())
    failed = any(statuses[r] in _FAILED for r in pending.values())
    return DepState(
        missing=not wanted <= set(latest),
        in_progress=in_progress,
        failed=failed,
        latest_storage_id=max(latest.values(), default=0),
    )


def dep_state(instance: dg.DagsterInstance, dep: Dep, partition: str | None) -> DepState:
    """The state of a dependency as an input of the asset (partition) being evaluated."""
    scope = partition if dep.same_partition else None
    cache_key = (dep.key, scope)
    if not _CACHE.active:  # outside an evaluation: read now
        _CACHE.states = {}
    if cache_key not in _CACHE.states:
        if dep.partitions is None:
            state = _unpartitioned_state(instance, dep.key)
        elif dep.same_partition:
            if partition is None:
                raise ValueError(f"{dep.key.to_user_string()}: a partition is needed")
            state = _partitions_state(instance, dep.key, [partition])
        else:
            keys = dynamic_partition_keys(instance, dep.partitions.name)
            state = _partitions_state(instance, dep.key, keys)
        _CACHE.states[cache_key] = state
    return _CACHE.states[cache_key]


def failed_attempt(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None
) -> int | None:
    """Storage id of the asset's (partition's) latest attempt when it failed, else None."""
    if partition is None:
        planned = _planned(instance, key)
        if planned is None or planned.storage_id <= _latest_storage_id(instance, key):
            return None
        run_id, storage_id = planned.run_id, planned.storage_id
    else:
        attempts = _attempts(instance, key)
        if partition not in attempts:
            return None
        run_id, storage_id = attempts[partition]
    status = _run_statuses(instance, [run_id])[run_id]
    return storage_id if status in _FAILED else None
