"""Data versions and the automation conditions built on them (wiring only).

Every asset of the graph reports a *data version* (``dagster/data_version``): a hash of what
it holds (the manifest's (id, sha1) pairs, the features' manifest and code version, the
content of a PCA model, descriptors, rankings or report). Every automated asset also records,
as the tag ``cw_pipeline/input_version`` of its materialization, the *input version* it was
computed from: a hash of its dependencies' data versions, read before it reads them.

:class:`InputsChanged` compares the input version the dependencies have now with the one
the latest materialization recorded. It looks at data, not at events: a re-materialization
that produced the same data changes nothing downstream, a CLI run and a daemon run that
produced the same data are the same, and it keeps no cursor, so the CLI's ``refresh`` and the
daemon's automation sensor agree on what is stale.

The conditions also wait for parents that are missing, in progress or whose latest run
failed (:class:`ParentsReady`), so nothing is ever computed from a half-updated or broken
upstream. Each is one node of the evaluation tree, computed in Python with a cache per tick:
Dagster serializes every node's subsets at every tick, and the same checks written with
``any_deps_match`` cost about 2 s of CPU per tick on the demo.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import dagster as dg

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
    "DerivedParent",
    "DerivedParentsUsable",
    "InputsChanged",
    "ParentRequestedNow",
    "ParentsReady",
    "combine",
    "dep_state",
    "graph_order",
    "input_version",
    "input_version_when_current",
    "is_stale",
    "on_cron_when_inputs_change",
    "refresh_when_derived_parents_usable",
    "refresh_when_inputs_change",
    "version_of",
]


def graph_order(graph: BaseAssetGraph) -> list[dg.AssetKey]:
    """Every asset key of ``graph``, parents before children; keys of one level sorted by name
    (so lists built from it do not depend on Python's set order)."""
    levels = graph.toposorted_asset_keys_by_level
    return [k for level in levels for k in sorted(level, key=lambda k: k.to_user_string())]


def combine(items: Iterable[tuple[str, str]]) -> str:
    """A short stable hash of (name, version) pairs, whatever their order."""
    h = hashlib.sha1()
    for name, version in sorted(items):
        h.update(f"{name}\0{version}\n".encode())
    return h.hexdigest()[:16]


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
    keys = _dynamic_keys(instance, dep.partitions.name)
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


#: A custom input version: (instance) -> version, for assets whose real input is narrower
#: than their dependencies (e.g. the queries' images only, not every image of the manifest).
VersionFn = Callable[[dg.DagsterInstance], "str | None"]


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


def _dynamic_keys(instance: dg.DagsterInstance, name: str) -> list[str]:
    """The sorted partition keys of a dynamic partitions definition."""
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
            keys = _dynamic_keys(instance, dep.partitions.name)
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


# --------------------------------------------------------------------------- conditions


def _partition_keys(subset) -> list[str | None]:
    if subset.is_partitioned:
        return sorted(subset.expensively_compute_partition_keys())
    return [None]


def _subset_of(context, keys: set[str | None]):
    if context.partitions_def is None:
        return context.candidate_subset if None in keys else context.get_empty_subset()
    return context.candidate_subset.compute_intersection_with_partition_keys(
        {k for k in keys if k is not None}
    )


class _Condition(dg.AutomationCondition):
    """A condition evaluated in Python over the instance, one node in the evaluation tree
    (Dagster serializes every node's subsets at every tick: a few nodes keep ticks cheap)."""

    def __init__(self, deps: Sequence[Dep]):
        self._deps = tuple(deps)

    @property
    def requires_cursor(self) -> bool:
        return False

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        raise NotImplementedError

    def evaluate(self, context):  # type: ignore[override]
        candidate = context.candidate_subset
        if candidate.is_empty:
            return dg.AutomationResult(context=context, true_subset=candidate)
        instance = context.asset_graph_view.instance
        _CACHE.enter(context)
        try:
            keys = _partition_keys(candidate)
            true = {pk for pk in keys if self.holds(context, instance, pk)}
        finally:
            _CACHE.active = False
        return dg.AutomationResult(context=context, true_subset=_subset_of(context, true))


class InputsChanged(_Condition):
    """True for an asset (partition) whose inputs' data versions differ from those its latest
    materialization was computed from, or that was never materialized while its inputs exist.

    It keeps no state: it compares the instance's data versions, so it gives the same answer
    to the daemon's automation sensor and to the CLI's in-process refresh. After a failed
    attempt it stays false until an input is materialized again (a deterministic failure is
    not retried every tick).
    """

    def __init__(self, deps: Sequence[Dep], version_fn: VersionFn | None = None):
        super().__init__(deps)
        self._version_fn = version_fn

    @property
    def name(self) -> str:
        return "inputs_changed"

    @property
    def description(self) -> str:
        return "the data versions of the inputs differ from those of the latest materialization"

    def current(self, instance: dg.DagsterInstance, partition: str | None) -> str | None:
        if self._version_fn is not None:
            return self._version_fn(instance)
        return input_version(instance, self._deps, partition)

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        key = context.key
        recorded = recorded_input_versions(
            instance, key, None if partition is None else [partition]
        )[partition]
        current = self.current(instance, partition)
        if current is None or current == recorded:
            return False
        failed_at = failed_attempt(instance, key, partition)
        if failed_at is None:
            return True
        newest = max(dep_state(instance, d, partition).latest_storage_id for d in self._deps)
        return newest > failed_at


class ParentsReady(_Condition):
    """Every parent has data and is neither being materialized nor failed in its latest
    attempt; a parent requested in this same evaluation counts as ready only if it runs in the
    same run (an unpartitioned parent of an unpartitioned asset), unless ``strict``: then any
    parent requested now makes the asset wait for a later tick (``strict_keys``: those parents
    only)."""

    def __init__(
        self,
        deps: Sequence[Dep],
        strict: bool = False,
        strict_keys: Iterable[dg.AssetKey] = (),
    ):
        super().__init__(deps)
        self._strict = strict
        self._strict_keys = frozenset(strict_keys)

    @property
    def name(self) -> str:
        return "parents_ready"

    @property
    def description(self) -> str:
        return "no parent missing, in progress, failed or requested in another run"

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        for dep in self._deps:
            requested = context.request_subsets_by_key.get(dep.key)
            if requested is not None and not requested.is_empty:
                same_run = dep.partitions is None and context.partitions_def is None
                if self._strict or dep.key in self._strict_keys or not same_run:
                    return False
                continue
            state = dep_state(instance, dep, partition)
            if state.missing or state.in_progress or state.failed:
                return False
        return True


class ParentRequestedNow(_Condition):
    """True when an unpartitioned parent of this unpartitioned asset is requested in this
    evaluation: the asset joins that run (one run for the affected subgraph)."""

    @property
    def name(self) -> str:
        return "parent_requested_now"

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        if partition is not None:
            return False
        for dep in self._deps:
            requested = context.request_subsets_by_key.get(dep.key)
            if dep.partitions is None and requested is not None and not requested.is_empty:
                return True
        return False


def parent_current(instance: dg.DagsterInstance, dep: Dep, node: InputsChanged) -> bool:
    """Whether every partition of ``dep`` was computed from its inputs' current data (none is
    stale, :func:`is_stale`)."""
    if dep.partitions is None:
        parts: list[str | None] = [None]
        recorded = recorded_input_versions(instance, dep.key, None)
    else:
        keys = _dynamic_keys(instance, dep.partitions.name)
        parts = list(keys)
        recorded = recorded_input_versions(instance, dep.key, keys)
    for p in parts:
        current = node.current(instance, p)
        if current is not None and current != recorded.get(p):
            return False
    return True


@dataclass(frozen=True)
class DerivedParent:
    """A parent whose data is a deterministic function of its own inputs, so that its data
    version is its input version (distractor descriptors: a shard's features and the PCA).
    ``node`` computes that input version; ``at_once`` says whether the child may compute the
    parent's out-of-date data itself (a small set) instead of waiting until it is current."""

    dep: Dep
    node: InputsChanged
    at_once: AtOnce | None = None


def input_version_when_current(
    instance: dg.DagsterInstance, deps: Sequence[Dep], derived: Sequence[DerivedParent]
) -> str | None:
    """The input version of an asset whose ``derived`` parents count with the data versions
    they have *once current* (their input versions now), the other ``deps`` with the ones
    they have; None while one is missing. It equals :func:`input_version` while every derived
    parent is current, and a child that computed a derived parent's new data itself is not
    made stale when that parent is brought up to date afterwards."""
    by_key = {d.dep.key: d for d in derived}
    versions = []
    for dep in deps:
        parent = by_key.get(dep.key)
        v = dep_version(instance, dep, None)  # None: missing (never materialized)
        if parent is None or v is None:
            pass
        elif dep.partitions is None:
            v = parent.node.current(instance, None)
        else:
            keys = _dynamic_keys(instance, dep.partitions.name)
            per = [(p, parent.node.current(instance, p)) for p in keys]
            v = None if not keys or any(x is None for _, x in per) else combine(per)  # type: ignore[misc]
        if v is None:
            return None
        versions.append((dep.key.to_user_string(), v))
    return combine(versions)


class DerivedParentsUsable(_Condition):
    """Every derived parent can be read now: it is current and none of the ``shared`` inputs
    it is computed from is requested in this evaluation (its refresh comes after them), or it
    is small (its ``at_once`` holds) and the child computes its out-of-date data itself, in
    the same run as the shared inputs."""

    def __init__(self, parents: Sequence[DerivedParent], shared: Iterable[dg.AssetKey] = ()):
        super().__init__([p.dep for p in parents])
        self._parents = tuple(parents)
        self._shared = tuple(shared)

    @property
    def name(self) -> str:
        return "derived_parents_usable"

    @property
    def description(self) -> str:
        return "each distractor set current, or small enough to be projected by the rankings"

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        shared_now = any(
            (r := context.request_subsets_by_key.get(k)) is not None and not r.is_empty
            for k in self._shared
        )
        for parent in self._parents:
            if parent.at_once is not None and parent.at_once.holds_now():
                continue
            if shared_now or not parent_current(instance, parent.dep, parent.node):
                return False
        return True


class AtOnce(_Condition):
    """True while ``measure()`` (an amount of work, e.g. a distractor set's images) is at most
    ``limit``: such an asset refreshes as soon as its inputs change instead of at its cron.
    The measure is re-read at most every ``ttl`` seconds."""

    def __init__(self, measure: Callable[[], int], limit: int, what: str, ttl: float = 30.0):
        super().__init__([])
        self._measure, self.limit, self.what, self._ttl = measure, limit, what, ttl
        self._cached: tuple[float, int] | None = None

    @property
    def name(self) -> str:
        return "at_once"

    @property
    def description(self) -> str:
        return f"{self.what} is at most {self.limit}"

    def amount(self) -> int:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._ttl:
            self._cached = (now, int(self._measure()))
        return self._cached[1]

    def holds_now(self) -> bool:
        return self.amount() <= self.limit

    def holds(self, context, instance: dg.DagsterInstance, partition: str | None) -> bool:
        return self.holds_now()


def refresh_when_inputs_change(
    deps: Sequence[Dep], version_fn: VersionFn | None = None
) -> dg.AutomationCondition:
    """Run when the inputs' data changed, or with a parent requested in the same tick (one
    run for the affected subgraph); never while a parent is missing, running or failed."""
    AC = dg.AutomationCondition
    return (
        (InputsChanged(deps, version_fn) | ParentRequestedNow(deps))
        & ParentsReady(deps)
        & ~AC.in_progress()
    )


def on_cron_when_inputs_change(cron: str, deps: Sequence[Dep]) -> dg.AutomationCondition:
    """Run once after each tick of ``cron`` if the inputs' data changed since the latest
    materialization, once every parent is current: not missing, running, failed, nor
    requested in this evaluation (its new data comes first)."""
    AC = dg.AutomationCondition
    return (
        AC.cron_tick_passed(cron).since_last_handled()
        & InputsChanged(deps)
        & ParentsReady(deps, strict=True)
        & ~AC.in_progress()
    )


def refresh_when_derived_parents_usable(
    deps: Sequence[Dep],
    parents: Sequence[DerivedParent],
    shared: Iterable[dg.AssetKey] = (),
) -> dg.AutomationCondition:
    """:func:`refresh_when_inputs_change` for an asset with derived parents (an evaluation's
    distractor descriptors): its input version counts them as they are once current
    (:func:`input_version_when_current`), and it runs only while each is usable
    (:class:`DerivedParentsUsable`): an evaluation with a small distractor set follows its
    dataset and a new PCA in the same run, projecting the set's out-of-date shards itself; one
    with a large set waits until its descriptors are re-projected (at its cron)."""
    AC = dg.AutomationCondition

    def version(instance: dg.DagsterInstance) -> str | None:
        return input_version_when_current(instance, deps, parents)

    return (
        (InputsChanged(deps, version) | ParentRequestedNow(deps))
        & ParentsReady(deps)
        & DerivedParentsUsable(parents, shared)
        & ~AC.in_progress()
    )


def at_once_or_on_cron(cron: str, deps: Sequence[Dep], at_once: AtOnce) -> dg.AutomationCondition:
    """Run as soon as the inputs change while ``at_once`` holds (a small amount of work), else
    once after each tick of ``cron`` (:func:`on_cron_when_inputs_change`); never while a
    parent is missing, running, failed or requested now."""
    AC = dg.AutomationCondition
    return (
        (at_once | AC.cron_tick_passed(cron).since_last_handled())
        & InputsChanged(deps)
        & ParentsReady(deps, strict=True)
        & ~AC.in_progress()
    )


def at_once_node(condition: dg.AutomationCondition | None) -> AtOnce | None:
    """The :class:`AtOnce` inside an asset's automation condition, if any."""
    return _node_of(condition, AtOnce)


def version_of(payload: bytes | str | Mapping | Iterable) -> str:
    """A data version: hash of bytes, text, or a mapping/iterable of (name, version) pairs."""
    if isinstance(payload, bytes):
        return hashlib.sha1(payload).hexdigest()[:16]
    if isinstance(payload, str):
        return hashlib.sha1(payload.encode()).hexdigest()[:16]
    items = payload.items() if isinstance(payload, Mapping) else payload
    return combine((str(k), str(v)) for k, v in items)


_C = TypeVar("_C", bound=dg.AutomationCondition)


def _node_of(condition: dg.AutomationCondition | None, kind: type[_C]) -> _C | None:
    """The first node of type ``kind`` in a condition tree (depth first), if any."""
    if condition is None:
        return None
    if isinstance(condition, kind):
        return condition
    for child in condition.children:
        found = _node_of(child, kind)
        if found is not None:
            return found
    return None


def inputs_changed_node(condition: dg.AutomationCondition | None) -> InputsChanged | None:
    """The :class:`InputsChanged` inside an asset's automation condition, if any."""
    return _node_of(condition, InputsChanged)


def is_stale(
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    condition: dg.AutomationCondition | None,
    partition: str | None = None,
) -> bool:
    """Whether the asset (partition) was computed from inputs whose data has changed since."""
    node = inputs_changed_node(condition)
    if node is None:
        return False
    current = node.current(instance, partition)
    recorded = recorded_input_versions(instance, key, None if partition is None else [partition])
    return current is not None and current != recorded[partition]
