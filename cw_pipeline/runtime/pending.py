"""What automation will refresh, and when: the assets whose inputs' data changed since they
were computed (or that were never computed), as :func:`cw_pipeline.defs.automation.is_stale`
and the daemon's ``refresh_downstream`` sensor see them.

``cw-pipeline index`` reports them beside what it refreshed itself: an asset gated by its
evaluation's cron (``schedule:``) waits for the next tick, unless its work is small enough to be
done at once (a distractor set of at most ``reproject_at_once`` images); one that a run is
materializing right now (the daemon got there first) is in that run; one whose parent is stale
follows its parent; anything else is refreshed by the sensor at its next tick (every 5 s)
while the daemon runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import dagster as dg
from dagster._utils.schedules import cron_string_iterator

from cw_pipeline.defs.automation import at_once_node, inputs_changed_node, is_stale
from cw_pipeline.defs.dependencies import graph_order
from cw_pipeline.runtime.run_tags import ACTIVE_STATUSES

__all__ = ["Pending", "daemon_running", "pending_refreshes"]

#: The daemon's automation sensor (cw_pipeline.defs.sensors).
SENSOR = "refresh_downstream"
#: Seconds since the sensor daemon's last heartbeat within which it counts as running.
HEARTBEAT_SECONDS = 120.0


def daemon_running(instance: dg.DagsterInstance, now: dt.datetime | None = None) -> bool:
    """Whether a ``dagster-daemon`` evaluating sensors (``make ui``, ``make demo``, ``dg dev``)
    sent a heartbeat to this instance within the last :data:`HEARTBEAT_SECONDS`."""
    now = now or dt.datetime.now(dt.UTC)
    beat = instance.get_daemon_heartbeats().get("SENSOR")
    return beat is not None and now.timestamp() - beat.timestamp < HEARTBEAT_SECONDS


@dataclass(frozen=True)
class Pending:
    """A stale asset and who refreshes it when."""

    asset: str  #: the asset key, as a user string
    reason: str  #: "cron", "running", "after_parent" or "sensor"
    when: str  #: one sentence: who refreshes it, and when
    partitions: tuple[str, ...] = ()  #: the stale partitions of a partitioned asset
    run_id: str | None = None  #: the run materializing it ("running")
    next_tick: str | None = None  #: ISO time of the cron tick it waits for ("cron")
    then: tuple[str, ...] = field(default=())  #: automated assets downstream, in graph order

    def as_dict(self) -> dict:
        out: dict = {"asset": self.asset, "reason": self.reason, "when": self.when}
        if self.partitions:
            out["partitions"] = list(self.partitions)
        if self.run_id:
            out["run_id"] = self.run_id
        if self.next_tick:
            out["next_tick"] = self.next_tick
        if self.then:
            out["then"] = list(self.then)
        return out


def _cron(condition: dg.AutomationCondition | None) -> tuple[str, str] | None:
    """(cron, timezone) of the cron tick a condition waits for, if any."""
    if condition is None:
        return None
    cron = getattr(condition, "cron_schedule", None)
    if cron:
        return str(cron), str(getattr(condition, "cron_timezone", None) or "UTC")
    for child in condition.children:
        found = _cron(child)
        if found is not None:
            return found
    return None


def next_tick(cron: str, timezone: str, now: dt.datetime) -> dt.datetime:
    """The first tick of ``cron`` (in ``timezone``) after ``now``."""
    # Dagster's own cron iterator: the tick the automation condition will see.
    return next(cron_string_iterator(now.timestamp(), cron, timezone))


def _running_run(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: Iterable[str]
) -> str | None:
    """The id of a queued or running run that plans to materialize the asset (partitions)."""
    parts = list(partitions)
    if parts:
        attempts = instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(  # noqa: E501
            key
        )
        run_ids = {attempts[p][0] for p in parts if p in attempts}
    else:
        planned = instance.event_log_storage.get_latest_planned_materialization_info(key)
        latest = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1)
        done = latest.records[0].storage_id if latest.records else 0
        run_ids = {planned.run_id} if planned is not None and planned.storage_id > done else set()
    if not run_ids:
        return None
    for record in instance.get_run_records(dg.RunsFilter(run_ids=sorted(run_ids))):
        if record.dagster_run.status in ACTIVE_STATUSES:
            return record.dagster_run.run_id
    return None


def _descendants(graph, key: dg.AssetKey) -> set[dg.AssetKey]:
    seen: set[dg.AssetKey] = set()
    todo = [key]
    while todo:
        for child in graph.get(todo.pop()).child_keys:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def pending_refreshes(
    defs: dg.Definitions, instance: dg.DagsterInstance, now: dt.datetime | None = None
) -> list[Pending]:
    """The automated assets (partitions) that are stale now, in graph order, each with who
    refreshes it and when (see the module's docstring)."""
    now = now or dt.datetime.now(dt.UTC)
    graph = defs.resolve_asset_graph()
    stale: dict[dg.AssetKey, tuple[str, ...]] = {}
    order = graph_order(graph)
    position = {k: i for i, k in enumerate(order)}
    for key in order:
        node = graph.get(key)
        condition = node.automation_condition
        if inputs_changed_node(condition) is None:
            continue
        if node.partitions_def is None:
            if is_stale(instance, key, condition):
                stale[key] = ()
            continue
        parts = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        bad = tuple(p for p in parts if is_stale(instance, key, condition, p))
        if bad:
            stale[key] = bad
    out = []
    for key, parts in stale.items():
        node = graph.get(key)
        name = key.to_user_string()
        then = tuple(
            k.to_user_string()
            for k in sorted(_descendants(graph, key), key=position.__getitem__)
            if k not in stale and inputs_changed_node(graph.get(k).automation_condition)
        )
        run_id = _running_run(instance, key, parts)
        stale_parents = sorted(p.to_user_string() for p in node.parent_keys if p in stale)
        cron = _cron(node.automation_condition)
        at_once = at_once_node(node.automation_condition)
        if at_once is not None and at_once.holds_now():
            cron = None  # small enough to be refreshed at once
        if run_id is not None:
            out.append(
                Pending(name, "running", f"being materialized by run {run_id}", parts, run_id)
            )
        elif stale_parents:
            when = f"after {', '.join(stale_parents)}, by the daemon's {SENSOR} sensor"
            out.append(Pending(name, "after_parent", when, parts, then=then))
        elif cron is not None:
            tick = next_tick(cron[0], cron[1], now)
            when = (
                f"after the cron tick '{cron[0]}' ({cron[1]}) of its evaluation's schedule, "
                f"next at {tick:%Y-%m-%d %H:%M %Z}, by the daemon's {SENSOR} sensor"
            )
            out.append(Pending(name, "cron", when, parts, next_tick=tick.isoformat(), then=then))
        else:
            when = f"at the next tick of the daemon's {SENSOR} sensor, while the daemon runs"
            out.append(Pending(name, "sensor", when, parts, then=then))
    return out
