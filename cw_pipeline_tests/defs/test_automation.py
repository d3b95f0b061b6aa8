"""Declarative automation: what the automation sensor requests after indexing, when, and how
`refresh` (the CLI's synchronous stand-in for it) follows it."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from cw_pipeline.defs.assets import eager, on_cron_if_changed
from cw_pipeline.runs import materialize_missing, refresh
from cw_pipeline_tests.defs.project import (
    ALPHA_DOWNSTREAM,
    DATASETS,
    DISTRACTOR_EVAL,
    NIGHTLY,
    Automation,
    synthetic_jpeg,
)

EV = DISTRACTOR_EVAL
GROUND_TRUTH_ASSETS = {
    f"{ds}/{asset}"
    for ds in ("alpha", "beta")
    for asset in ("query_features", "pca_model", "descriptors", "rankings", "map_report")
}
GAMMA_DESCRIPTORS = {f"{EV}/gamma_descriptors[b000]", f"{EV}/gamma_descriptors[b001]"}


def K(text: str) -> dg.AssetKey:
    return dg.AssetKey.from_user_string(text)


def next_cron_tick(now: dt.datetime) -> dt.datetime:
    """A minute after the next 03:00 UTC (the evaluations' nightly schedule)."""
    tick = now.replace(hour=3, minute=1, second=0, microsecond=0)
    return tick if tick > now else tick + dt.timedelta(days=1)


def test_automation_sensor_and_conditions(fresh_project):
    defs = fresh_project.defs
    sensor = defs.resolve_sensor_def("refresh_downstream")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert sensor.asset_selection.resolve(graph) == graph.get_all_asset_keys()

    for ds in DATASETS:  # indexed by the folder sensors and schedules, not by automation
        for asset in ("manifest", "cam_features"):
            assert graph.get(K(f"{ds}/{asset}")).automation_condition is None
    for key in (*GROUND_TRUTH_ASSETS, f"{EV}/gamma_descriptors", f"{EV}/map_report"):
        assert graph.get(K(key)).automation_condition == eager(), key
    # rankings with distractors wait for their nightly tick, and only run after a change
    assert graph.get(K(f"{EV}/rankings")).automation_condition == on_cron_if_changed(NIGHTLY)


CRON_RUN = {f"{EV}/rankings", f"{EV}/map_report"}


def test_automation_waits_for_a_dataset_without_shards(fresh_project):
    """Only beta indexed: alpha has no shards (no partitions at all), so nothing that reads
    alpha's shards is requested (it would fail on an empty input) until alpha is indexed.
    alpha's PCA is learned on beta: it can run."""
    project = fresh_project
    project.index("beta")
    auto = Automation(project)
    assert auto.start() == {"beta/query_features", "alpha/pca_model"}
    auto.execute()
    assert auto.rounds() == []
    project.index("alpha")
    assert {"alpha/query_features", "beta/pca_model"} <= auto.tick()


def test_automation_after_indexing(fresh_project):
    project = fresh_project
    for ds in DATASETS:
        project.index(ds)
    auto = Automation(project)

    # Missing assets are filled, not only newly missing ones; everything whose inputs exist
    # runs in one go (unpartitioned assets share a run), partitioned descriptors a tick later.
    assert auto.start() == GROUND_TRUTH_ASSETS
    auto.execute()
    assert auto.rounds() == [GAMMA_DESCRIPTORS]
    # the evaluation with distractors waits for its cron tick
    for key in CRON_RUN:
        assert project.instance.get_latest_materialization_event(K(key)) is None
    assert auto.tick(at=next_cron_tick(auto.now)) == CRON_RUN
    auto.execute()
    assert auto.rounds() == []
    assert materialize_missing(project.defs, project.instance) == []

    # a dataset nothing depends on: indexed, nothing to refresh
    synthetic_jpeg(project.images("delta") / "misc1" / "extra_000.jpg", seed=11)
    assert project.index("delta").forward_passes == 1
    assert auto.tick() == set()

    # beta learns its PCA from alpha: a change of alpha reaches beta's evaluation with
    # distractors at the next cron tick (this night's tick was handled already)
    synthetic_jpeg(project.images("alpha") / "part1" / "extra_001.jpg", seed=12)
    assert project.index("alpha").forward_passes == 1
    assert auto.rounds() == [ALPHA_DOWNSTREAM, GAMMA_DESCRIPTORS]
    assert auto.tick(at=next_cron_tick(auto.now)) == CRON_RUN
    auto.execute()
    assert auto.rounds() == []

    # The next night nothing changed: nothing runs, and the tick stays pending until a change.
    # Then the rankings run, but only after the distractors' descriptors were rebuilt with
    # beta's new PCA (partitioned, they run a tick after it; rankings started earlier would
    # mix the old and the new PCA, or fail on different dimensions).
    assert auto.tick(at=next_cron_tick(auto.now)) == set()
    synthetic_jpeg(project.images("alpha") / "part3" / "extra_002.jpg", seed=13)
    assert project.index("alpha").forward_passes == 1
    assert auto.rounds() == [ALPHA_DOWNSTREAM, GAMMA_DESCRIPTORS, CRON_RUN]


def test_refresh_follows_automation_across_calls(fresh_project):
    """`refresh` keeps its automation cursor in the instance: each call picks up what changed
    since the previous one (the first evaluation of a new cursor requests nothing)."""
    project = fresh_project
    for ds in DATASETS:
        project.index(ds)
    first = refresh(project.defs, project.instance)
    assert set(first) == GROUND_TRUTH_ASSETS | GAMMA_DESCRIPTORS
    assert refresh(project.defs, project.instance, include_cron=True) == [
        f"{EV}/rankings",
        f"{EV}/map_report",
    ]
    assert refresh(project.defs, project.instance, include_cron=True) == []

    synthetic_jpeg(project.images("beta") / "extra_000.jpg", seed=13)
    assert project.index("beta").forward_passes == 1
    # beta's own downstream assets, and alpha's PCA (learned on beta) with what depends on it;
    # not beta's PCA (learned on alpha), nor the distractors' descriptors (with beta's PCA)
    assert set(refresh(project.defs, project.instance)) == {
        "beta/query_features",
        "beta/descriptors",
        "beta/rankings",
        "beta/map_report",
        "alpha/pca_model",
        "alpha/descriptors",
        "alpha/rankings",
        "alpha/map_report",
    }
    assert refresh(project.defs, project.instance) == []
