"""The automation conditions of the assets, built on their data versions (wiring only).

:class:`InputsChanged` compares the input version the dependencies have now with the one
the latest materialization recorded (:mod:`cw_pipeline.defs.dependencies`). It looks at data,
not at events: a re-materialization that produced the same data changes nothing downstream,
a CLI run and a daemon run that produced the same data are the same, and it keeps no cursor,
so the CLI's ``refresh`` and the daemon's automation sensor agree on what is stale.

The conditions also wait for parents that are missing, in progress or whose latest run
failed (:class:`ParentsReady`), so nothing is ever computed from a half-updated or broken
upstream. Each is one node of the evaluation tree, computed in Python with a cache per tick:
Dagster serializes every node's subsets at every tick, and the same checks written with
``any_deps_match`` cost about 2 s of CPU per tick on the demo.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import dagster as dg

from cw_pipeline.compute.data_versions import combine
from cw_pipeline.defs.dependencies import (
    Dep,
    dep_state,
    dep_version,
    dynamic_partition_keys,
    evaluating,
    failed_attempt,
    input_version,
    recorded_input_versions,
)

__all__ = [
    "AtOnce",
    "DerivedParent",
    "DerivedParentsUsable",
    "InputsChanged",
    "ParentRequestedNow",
    "ParentsReady",
    "VersionFn",
    "at_once_node",
    "at_once_or_on_cron",
    "input_version_when_current",
    "inputs_changed_node",
    "is_stale",
    "on_cron_when_inputs_change",
    "parent_current",
    "refresh_when_derived_parents_usable",
    "refresh_when_inputs_change",
]

#: A custom input version: (instance) -> version, for assets whose real input is narrower
#: than their dependencies (e.g. the queries' images only, not every image of the manifest).
VersionFn = Callable[[dg.DagsterInstance], "str | None"]


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
        with evaluating(context):
            keys = _partition_keys(candidate)
            true = {pk for pk in keys if self.holds(context, instance, pk)}
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
        keys = dynamic_partition_keys(instance, dep.partitions.name)
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
            keys = dynamic_partition_keys(instance, dep.partitions.name)
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
