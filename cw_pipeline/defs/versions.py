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
failed, so nothing is ever computed from a half-updated or broken upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

#: Tag (Dagster's) holding a materialization's data version.
DATA_VERSION_TAG = "dagster/data_version"
#: Tag of a materialization: the input version it was computed from.
INPUT_VERSION_TAG = "cw_pipeline/input_version"

__all__ = [
    "DATA_VERSION_TAG",
    "INPUT_VERSION_TAG",
    "Dep",
    "InputsChanged",
    "combine",
    "input_version",
    "on_cron_when_inputs_change",
    "refresh_when_inputs_change",
]


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


def _latest_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def _partition_versions(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Sequence[str]
) -> dict[str, str | None]:
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        key,
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        [DATA_VERSION_TAG],
        asset_partitions=list(partitions),
    )
    return {p: tags.get(p, {}).get(DATA_VERSION_TAG) for p in partitions}


def dep_version(instance: dg.DagsterInstance, dep: Dep, partition: str | None) -> str | None:
    """The data version ``dep`` has now (None: missing, or a partition of it is missing)."""
    if dep.partitions is None:
        return _latest_version(instance, dep.key)
    if dep.same_partition:
        if partition is None:
            raise ValueError(f"{dep.key.to_user_string()}: a partition is needed")
        return _partition_versions(instance, dep.key, [partition])[partition]
    keys = sorted(instance.get_dynamic_partitions(dep.partitions.name))
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
        event = instance.get_latest_materialization_event(key)
        mat = event.asset_materialization if event is not None else None
        return {None: (mat.tags or {}).get(INPUT_VERSION_TAG) if mat is not None else None}
    ids = instance.get_latest_storage_id_by_partition(
        key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions)
    )
    out: dict[str | None, str | None] = dict.fromkeys(partitions)
    if ids:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)
        ).records
        for rec in records:
            mat = rec.asset_materialization
            if mat is not None and mat.partition in out:
                out[mat.partition] = (mat.tags or {}).get(INPUT_VERSION_TAG)
    return out


#: A custom input version: (instance) -> version, for assets whose real input is narrower
#: than their dependencies (e.g. the queries' images only, not every image of the manifest).
VersionFn = Callable[[dg.DagsterInstance], "str | None"]


class InputsChanged(dg.AutomationCondition):
    """True for an asset (partition) whose inputs' data versions differ from those its latest
    materialization was computed from, or that was never materialized while its inputs exist.

    It keeps no state: it compares the instance's data versions, so it gives the same answer
    to the daemon's automation sensor and to the CLI's in-process refresh.
    """

    def __init__(self, deps: Sequence[Dep], version_fn: VersionFn | None = None):
        self._deps = tuple(deps)
        self._version_fn = version_fn

    @property
    def name(self) -> str:
        return "inputs_changed"

    @property
    def description(self) -> str:
        return "the data versions of the inputs differ from those of the latest materialization"

    @property
    def requires_cursor(self) -> bool:
        return False

    def current(self, instance: dg.DagsterInstance, partition: str | None) -> str | None:
        if self._version_fn is not None:
            return self._version_fn(instance)
        return input_version(instance, self._deps, partition)

    def evaluate(self, context):  # type: ignore[override]
        candidate = context.candidate_subset
        if candidate.is_empty:
            return dg.AutomationResult(context=context, true_subset=candidate)
        instance = context.asset_graph_view.instance
        if context.partitions_def is None:
            recorded = recorded_input_versions(instance, context.key, None)[None]
            current = self.current(instance, None)
            stale = current is not None and current != recorded
            true = candidate if stale else context.get_empty_subset()
            return dg.AutomationResult(context=context, true_subset=true)
        keys = sorted(candidate.expensively_compute_partition_keys())
        recorded = recorded_input_versions(instance, context.key, keys)
        stale = set()
        for pk in keys:
            current = self.current(instance, pk)
            if current is not None and current != recorded.get(pk):
                stale.add(pk)
        return dg.AutomationResult(
            context=context, true_subset=candidate.compute_intersection_with_partition_keys(stale)
        )


class RequestedThisTick(dg.AutomationCondition):
    """True for an asset (partition) requested by this evaluation, in whatever run.

    Dagster's ``will_be_requested`` is true only for a parent that runs *in the same run* as
    the child; a parent partitioned otherwise (distractor descriptors per shard, under
    unpartitioned rankings) runs in runs of its own, and its child must wait for them.
    """

    @property
    def name(self) -> str:
        return "requested_this_tick"

    @property
    def requires_cursor(self) -> bool:
        return False

    def evaluate(self, context):  # type: ignore[override]
        requested = context.request_subsets_by_key.get(context.key)
        if requested is None:
            return dg.AutomationResult(context=context, true_subset=context.get_empty_subset())
        true = context.candidate_subset.compute_intersection(requested)
        return dg.AutomationResult(context=context, true_subset=true)


def _parents_ready() -> dg.AutomationCondition:
    """Every parent has data (a partitioned one with no partitions at all has none, though
    ``any_deps_missing`` passes it) and none is running or failed in its latest run."""
    AC = dg.AutomationCondition
    has_input = AC.all_deps_match(~AC.missing() | AC.will_be_requested()).with_label(
        "all_deps_have_data"
    )
    return (
        has_input
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.any_deps_match(AC.execution_failed()).with_label("any_deps_failed")
        & ~AC.any_deps_match(RequestedThisTick() & ~AC.will_be_requested()).with_label(
            "parent_requested_in_another_run"
        )
        & ~AC.in_progress()
    )


def _stale(changed: InputsChanged) -> dg.AutomationCondition:
    """Inputs changed; after a failed run, only once an input has been updated again (so a
    deterministic failure is not retried every tick)."""
    AC = dg.AutomationCondition
    return changed & (~AC.execution_failed() | AC.any_deps_updated()).with_label(
        "not_failed_on_these_inputs"
    )


def refresh_when_inputs_change(
    deps: Sequence[Dep], version_fn: VersionFn | None = None
) -> dg.AutomationCondition:
    """Run when the inputs' data changed, or with a parent requested in the same tick (one
    run for the affected subgraph); never while a parent is missing, running or failed."""
    AC = dg.AutomationCondition
    changed = InputsChanged(deps, version_fn)
    chained = AC.any_deps_match(AC.will_be_requested()).with_label("parent_requested_now")
    return (_stale(changed) | chained) & _parents_ready()


def on_cron_when_inputs_change(cron: str, deps: Sequence[Dep]) -> dg.AutomationCondition:
    """Run once after each tick of ``cron`` if the inputs' data changed since the latest
    materialization, once every parent is current (not itself waiting for changed inputs)."""
    AC = dg.AutomationCondition
    changed = InputsChanged(deps)
    return (
        AC.cron_tick_passed(cron).since_last_handled()
        & _stale(changed)
        & _parents_ready()
        & ~AC.any_deps_match(RequestedThisTick()).with_label("parent_requested_now")
    )


def version_of(payload: bytes | str | Mapping | Iterable) -> str:
    """A data version: hash of bytes, text, or a mapping/iterable of (name, version) pairs."""
    if isinstance(payload, bytes):
        return hashlib.sha1(payload).hexdigest()[:16]
    if isinstance(payload, str):
        return hashlib.sha1(payload.encode()).hexdigest()[:16]
    items = payload.items() if isinstance(payload, Mapping) else payload
    return combine((str(k), str(v)) for k, v in items)


def inputs_changed_node(condition: dg.AutomationCondition | None) -> InputsChanged | None:
    """The :class:`InputsChanged` inside an asset's automation condition, if any."""
    if condition is None:
        return None
    if isinstance(condition, InputsChanged):
        return condition
    for child in condition.children:
        found = inputs_changed_node(child)
        if found is not None:
            return found
    return None


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
