"""What automation will refresh, and when (:mod:`cw_pipeline.runtime.pending`): what
``cw-pipeline index`` reports beside what it refreshed itself."""

from __future__ import annotations

import datetime as dt
import threading

import dagster as dg
from dagster._daemon.types import DaemonHeartbeat

from cw_pipeline.cli.index import format_refresh
from cw_pipeline.runtime.pending import _running_run, daemon_running, pending_refreshes
from cw_pipeline.runtime.runs import refresh
from cw_pipeline_tests.defs.project import DISTRACTOR_EVAL, NIGHTLY, synthetic_jpeg

EV = DISTRACTOR_EVAL
NOON = dt.datetime(2031, 5, 6, 12, 0, tzinfo=dt.UTC)


def test_pending_says_who_refreshes_each_stale_asset_and_when(indexed_no_refresh) -> None:
    project = indexed_no_refresh

    # Indexed, nothing refreshed: the assets whose inputs all exist are stale; what follows
    # them is listed after them.
    pending = {p.asset: p for p in pending_refreshes(project.defs, project.instance, NOON)}
    assert set(pending) == {
        f"{ds}/{asset}" for ds in ("alpha", "beta") for asset in ("pca_model", "query_features")
    }
    assert {p.reason for p in pending.values()} == {"sensor"}
    assert pending["alpha/pca_model"].then == (
        "alpha/descriptors",
        "alpha/rankings",
        "alpha/map_report",
    )
    assert "beta-gamma/rankings" in pending["beta/pca_model"].then

    # The CLI's refresh did what automation would; the evaluation with distractors waits for
    # its nightly tick: its descriptors (every shard of gamma), then its rankings and report
    # (not stale themselves yet: an input of theirs is missing).
    refresh(project.defs, project.instance)
    got = pending_refreshes(project.defs, project.instance, NOON)
    assert [p.as_dict() for p in got] == [
        {
            "asset": f"{EV}/gamma_descriptors",
            "reason": "cron",
            "when": f"after the cron tick '{NIGHTLY}' (UTC) of its evaluation's schedule, next "
            "at 2031-05-07 03:00 UTC, by the daemon's refresh_downstream sensor",
            "partitions": ["b000", "b001"],
            "next_tick": "2031-05-07T03:00:00+00:00",
            "then": [f"{EV}/rankings", f"{EV}/map_report"],
        },
    ]
    lines = format_refresh(["alpha/descriptors"], got, daemon=False)
    assert lines[0] == "  refreshed by this command: alpha/descriptors"
    assert lines[1] == "  stale on this instance, left to automation:"
    assert lines[2].startswith(f"    {EV}/gamma_descriptors [b000, b001]: after the cron tick")
    assert lines[2].endswith(f"; then {EV}/rankings, {EV}/map_report")
    assert "the Dagster daemon is not running on this instance" in lines[3]
    assert lines[-2].startswith("  see: the Runs page of the Dagster UI")
    assert format_refresh([], [], daemon=True) == ["  nothing else is stale"]

    # A new image of alpha, indexed without a refresh (`index --no-refresh`): alpha's chain is
    # stale again, from its descriptors (and beta's PCA, learned on alpha) down; the daemon's
    # sensor refreshes them at its next tick.
    synthetic_jpeg(project.images("alpha") / "part1" / "extra_000.jpg", seed=41)
    assert project.index("alpha").forward_passes == 1
    got = {p.asset: p for p in pending_refreshes(project.defs, project.instance, NOON)}
    assert set(got) == {"alpha/descriptors", "beta/pca_model", f"{EV}/gamma_descriptors"}
    assert got["alpha/descriptors"].reason == got["beta/pca_model"].reason == "sensor"
    # graph order, assets of one level by name (the same whatever the hash seed)
    assert got["beta/pca_model"].then[:3] == (
        "beta/descriptors",
        "beta-gamma/rankings",
        "beta/rankings",
    ), got["beta/pca_model"].then


@dg.asset(key=["slow", "one"])
def slow_one(context) -> None:
    _hold()


@dg.asset(key=["slow", "parts"], partitions_def=dg.StaticPartitionsDefinition(["p1", "p2"]))
def slow_parts(context) -> None:
    _hold()


_ENTERED = threading.Event()
_RELEASE = threading.Event()


def _hold() -> None:
    _ENTERED.set()
    assert _RELEASE.wait(120)


def test_an_asset_a_run_is_materializing_names_that_run(tmp_path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for asset, key, parts, partition in (
            (slow_one, dg.AssetKey(["slow", "one"]), [], None),
            (slow_parts, dg.AssetKey(["slow", "parts"]), ["p2"], "p2"),
        ):
            _ENTERED.clear()
            _RELEASE.clear()
            results: list[dg.ExecuteInProcessResult] = []
            worker = threading.Thread(
                target=lambda a=asset, p=partition, r=results: r.append(
                    dg.materialize([a], instance=instance, partition_key=p)
                )
            )
            worker.start()
            try:
                assert _ENTERED.wait(120)
                run_id = _running_run(instance, key, parts)
                assert run_id is not None
                assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
                if parts:
                    assert _running_run(instance, key, ["p1"]) is None  # another partition
                else:  # a run being canceled still runs until it has stopped
                    instance.report_run_canceling(instance.get_run_by_id(run_id))
                    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELING
                    assert _running_run(instance, key, parts) == run_id
            finally:
                _RELEASE.set()
                worker.join(120)
            assert results[0].success and results[0].run_id == run_id
            assert _running_run(instance, key, parts) is None  # done


def test_the_daemon_counts_as_running_while_its_sensor_heartbeat_is_recent() -> None:
    with dg.instance_for_test() as instance:
        now = dt.datetime.now(dt.UTC)
        assert not daemon_running(instance, now)
        beat = now - dt.timedelta(seconds=30)
        instance.add_daemon_heartbeat(DaemonHeartbeat(beat.timestamp(), "SENSOR", "d1"))
        assert daemon_running(instance, now)
        assert not daemon_running(instance, now + dt.timedelta(minutes=5))
