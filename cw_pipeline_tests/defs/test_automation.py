"""Declarative automation: what the automation sensor requests after indexing, when, and how
`refresh` (the CLI's synchronous stand-in for it) follows it.

The conditions compare data versions (``cw_pipeline.defs.automation``): an asset runs when the
data of its inputs changed, not when they were merely re-materialized, and never while a
parent is missing, running or failed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import threading

import dagster as dg
import pytest

from cw_pipeline.compute.descriptors import dataset_descriptors, offline_aggregations
from cw_pipeline.compute.features import dataset_extractor
from cw_pipeline.compute.rankings import evaluation_input_problems, evaluation_rankings
from cw_pipeline.defs.assets import descriptors as descriptor_assets
from cw_pipeline.defs.dependencies import INPUT_VERSION_TAG
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.runtime.runs import index_dataset, materialize_missing, refresh
from cw_pipeline.store import commit_path, distractor_descriptors_path, features_path
from cw_pipeline_tests.defs.project import (
    ALPHA_DOWNSTREAM,
    DATASETS,
    DISTRACTOR_EVAL,
    Automation,
    materialize,
    synthetic_jpeg,
    write_config,
)
from cw_pipeline_tests.published import rankings_rel

EV = DISTRACTOR_EVAL
GROUND_TRUTH_ASSETS = {
    f"{ds}/{asset}"
    for ds in ("alpha", "beta")
    for asset in ("query_features", "pca_model", "descriptors", "rankings", "map_report")
}
GAMMA_DESCRIPTORS = {f"{EV}/gamma_descriptors[b000]", f"{EV}/gamma_descriptors[b001]"}
CRON_RUN = {f"{EV}/rankings", f"{EV}/map_report"}


def K(text: str) -> dg.AssetKey:
    return dg.AssetKey.from_user_string(text)


def next_cron_tick(now: dt.datetime) -> dt.datetime:
    """A minute after the next 03:00 UTC (the evaluations' nightly schedule)."""
    tick = now.replace(hour=3, minute=1, second=0, microsecond=0)
    return tick if tick > now else tick + dt.timedelta(days=1)


def _names(condition: dg.AutomationCondition) -> set[str]:
    out = {condition.name, condition.get_label() or ""}
    for child in condition.children:
        out |= _names(child)
    return out


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
    for key in (*GROUND_TRUTH_ASSETS, f"{EV}/gamma_descriptors", *CRON_RUN):
        names = _names(graph.get(K(key)).automation_condition)
        assert {"inputs_changed", "parents_ready", "in_progress"} <= names, key
        # the distractor descriptors wait for the nightly tick unless the set is small; the
        # rankings with distractors follow at once while those are current or the set small
        cron = any(n.startswith("cron_tick_passed") for n in names)
        assert cron == (key == f"{EV}/gamma_descriptors"), key
        assert ("at_once" in names) == (key == f"{EV}/gamma_descriptors"), key
        assert ("derived_parents_usable" in names) == (key == f"{EV}/rankings"), key


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
    assert {"alpha/query_features", "beta/pca_model", "alpha/descriptors"} <= auto.tick()


def test_automation_after_indexing(indexed_no_refresh):
    project = indexed_no_refresh
    auto = Automation(project)

    # Everything whose inputs exist runs in one tick (the unpartitioned assets share a run).
    assert auto.start() == GROUND_TRUTH_ASSETS
    auto.execute()
    assert auto.rounds() == []
    # the evaluation with distractors waits for its cron tick: descriptors first, then the
    # rankings once they are all current (never in the same tick: other runs)
    for key in (*CRON_RUN, f"{EV}/gamma_descriptors"):
        assert project.instance.get_latest_materialization_event(K(key)) is None
    assert auto.tick(at=next_cron_tick(auto.now)) == GAMMA_DESCRIPTORS
    auto.execute()
    assert auto.rounds() == [CRON_RUN]
    assert materialize_missing(project.defs, project.instance) == []

    # a dataset nothing depends on: indexed, nothing to refresh
    synthetic_jpeg(project.images("delta") / "misc1" / "extra_000.jpg", seed=11)
    assert project.index("delta").forward_passes == 1
    assert auto.tick() == set()

    # beta learns its PCA from alpha: a change of alpha reaches beta's evaluation with
    # distractors at the next cron tick (this night's tick was handled already)
    synthetic_jpeg(project.images("alpha") / "part1" / "extra_001.jpg", seed=12)
    assert project.index("alpha").forward_passes == 1
    assert auto.rounds() == [ALPHA_DOWNSTREAM]
    assert auto.tick(at=next_cron_tick(auto.now)) == GAMMA_DESCRIPTORS
    auto.execute()
    assert auto.rounds() == [CRON_RUN]

    # The next night nothing changed: nothing runs, and the tick stays pending until a change.
    # Then the rankings run, but only after the distractors' descriptors were rebuilt with
    # beta's new PCA (partitioned, they run a tick after it; rankings started earlier would
    # mix the old and the new PCA, or fail on different dimensions).
    assert auto.tick(at=next_cron_tick(auto.now)) == set()
    synthetic_jpeg(project.images("alpha") / "part3" / "extra_002.jpg", seed=13)
    assert project.index("alpha").forward_passes == 1
    assert auto.rounds() == [ALPHA_DOWNSTREAM, GAMMA_DESCRIPTORS, CRON_RUN]


def test_a_small_distractor_set_follows_a_new_pca_at_once(indexed_no_refresh):
    """With gamma under ``reproject_at_once`` (the default), a change of beta's PCA source
    refreshes the evaluation with distractors in the same run as the PCA: its rankings
    project gamma's out-of-date shards themselves, exactly as gamma's descriptors are
    re-projected a tick later (other runs: partitioned), which then sets off nothing."""
    write_config(indexed_no_refresh.root, reproject_at_once=None)  # indexing does not read it
    project = indexed_no_refresh.reload()
    refresh(project.defs, project.instance, include_cron=True)
    auto = Automation(project)
    assert auto.start() == set()
    synthetic_jpeg(project.images("alpha") / "part1" / "extra_001.jpg", seed=12)
    assert project.index("alpha").forward_passes == 1
    assert auto.rounds() == [ALPHA_DOWNSTREAM | CRON_RUN, GAMMA_DESCRIPTORS]
    store, ev = project.store, project.config.evaluations[EV]
    meta = project.instance.get_latest_materialization_event(K(f"{EV}/rankings"))
    gamma = current_shards(project.instance, "gamma")
    gamma_images = sum(store.row_count(features_path("gamma", s)) for s in gamma)
    assert meta.asset_materialization.metadata["distractors_projected"].value == gamma_images > 0
    shards = {ds: current_shards(project.instance, ds) for ds in ("beta", "gamma")}
    assert evaluation_input_problems(project.config, store, ev, shards) == []
    # The rankings from gamma projected in memory equal those from its stored re-projection.
    cnn = dataset_extractor(project.config.dataset("beta"))
    tables, stats = evaluation_rankings(project.config, store, ev, shards, cnn)
    assert stats["distractors_projected"] == 0
    for m in ev.methods:
        assert tables[m.name].equals(store.read_table(rankings_rel(store, EV, m.name))), m.name
    # The same through the CLI's refresh: nothing is left for a cron.
    synthetic_jpeg(project.images("alpha") / "part3" / "extra_002.jpg", seed=13)
    assert project.index("alpha").forward_passes == 1
    done = refresh(project.defs, project.instance)
    assert sorted(done) == sorted(ALPHA_DOWNSTREAM | GAMMA_DESCRIPTORS | CRON_RUN)
    assert refresh(project.defs, project.instance) == []
    # Distractor descriptors of another PCA are projected again by the rankings of a small
    # set, and refused before ranking for a large one (the rankings would mix two
    # projections); tables that predate the recorded version are not.
    rel = distractor_descriptors_path(EV, "gamma", offline_aggregations()[0], "b000")
    table = store.read_table(rel)
    store.write_table(rel, table.replace_schema_metadata({"pca": "0123456789abcdef"}))
    assert evaluation_input_problems(project.config, store, ev, shards) == []
    _, stats = evaluation_rankings(project.config, store, ev, shards, cnn)
    assert stats["distractors_projected"] == table.num_rows
    large = ev.model_copy(update={"reproject_at_once": 0})
    [problem] = evaluation_input_problems(project.config, store, large, shards)
    assert "gamma shard 'b000' were projected with another PCA than the evaluation's" in problem
    with pytest.raises(ValueError, match="another PCA"):
        evaluation_rankings(project.config, store, large, shards, cnn)
    store.write_table(rel, table.replace_schema_metadata(None))
    assert evaluation_input_problems(project.config, store, large, shards) == []


def test_an_idle_tick_reads_no_materialization_again(indexed_project, monkeypatch):
    """While the event log and the partitions are unchanged, a tick reuses what the previous
    one read of the assets' materializations (one row read instead of every asset's history);
    the next event makes it read again, and it sees the change."""
    project = indexed_project
    auto = Automation(project)
    assert auto.start() == set()
    reads = []
    for name in (
        "get_latest_materialization_event",
        "fetch_materializations",
        "get_latest_storage_id_by_partition",
    ):
        real = getattr(project.instance, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(project.instance, name, spy)
    assert auto.tick() == set()
    assert reads == []
    synthetic_jpeg(project.images("alpha") / "part1" / "extra_003.jpg", seed=17)
    assert project.index("alpha").forward_passes == 1
    assert auto.tick() == ALPHA_DOWNSTREAM
    assert reads


def test_refresh_follows_the_data_not_a_cursor(indexed_no_refresh):
    """`refresh` and the automation sensor agree: both compare data versions, so what one
    refreshed the other finds current (no second run of anything)."""
    project = indexed_no_refresh
    assert set(refresh(project.defs, project.instance)) == GROUND_TRUTH_ASSETS
    assert refresh(project.defs, project.instance, include_cron=True) == [
        f"{EV}/gamma_descriptors[b000]",
        f"{EV}/gamma_descriptors[b001]",
        f"{EV}/rankings",
        f"{EV}/map_report",
    ]
    assert refresh(project.defs, project.instance, include_cron=True) == []
    assert Automation(project).start() == set()  # the daemon's sensor: nothing either

    synthetic_jpeg(project.images("beta") / "extra_000.jpg", seed=13)
    assert project.index("beta").forward_passes == 1
    # beta's own downstream assets, and alpha's PCA (learned on beta) with what depends on it;
    # not beta's PCA (learned on alpha), nor beta's query features (no query image changed),
    # nor the distractors' descriptors (beta's PCA did not change): the evaluation with
    # distractors follows beta in the same refresh
    expected = {
        "beta/descriptors",
        "beta/rankings",
        "beta/map_report",
        "alpha/pca_model",
        "alpha/descriptors",
        "alpha/rankings",
        "alpha/map_report",
        f"{EV}/rankings",
        f"{EV}/map_report",
    }
    auto = Automation(project)  # what the daemon would do, first
    assert auto.start() == expected
    auto.execute()
    assert refresh(project.defs, project.instance) == []  # ...the CLI then has nothing to do


def test_unchanged_data_triggers_nothing(indexed_project):
    """Re-indexing with no change (0 forward passes, same ids and sha1s) and re-materializing
    an asset that produces the same data set off nothing downstream."""
    project = indexed_project
    forced = index_dataset(
        project.defs, project.instance, project.config, "alpha", project.store, force=True
    )
    assert forced.forward_passes == 0 and forced.indexed_shards  # materialized again
    assert materialize(project, ["beta/pca_model", "alpha/descriptors"]).success
    auto = Automation(project)
    assert auto.start() == set()
    assert refresh(project.defs, project.instance) == []

    # each automated materialization recorded the input version it was computed from
    event = project.instance.get_latest_materialization_event(K("alpha/rankings"))
    assert event.asset_materialization.tags[INPUT_VERSION_TAG]


def test_a_failed_parent_stops_the_chain_until_fixed(indexed_no_refresh):
    """A query image deleted: query_features runs and fails (the ground truth names it);
    rankings and the report are not rebuilt from the old query features, and the failure is
    not retried every tick."""
    project = indexed_no_refresh
    refresh(project.defs, project.instance)
    before = {k: project.materialization_count(k) for k in ("beta/rankings", "beta/map_report")}
    query_file = sorted((project.root / "beta" / "gt").glob("*_query.txt"))[0]
    name = query_file.read_text().split()[0].removeprefix("oxc1_")
    query = project.images("beta") / f"{name}.jpg"
    kept = project.root / "kept.jpg"
    shutil.move(query, kept)
    assert project.index("beta").forward_passes == 0

    auto = Automation(project)
    got = auto.start()
    assert "beta/query_features" in got
    with pytest.raises(ValueError, match="names 1 image"):
        materialize(project, sorted(got))  # beta/query_features fails: gt names the image
    # Neither the rankings nor the report are requested while query_features failed, and
    # query_features is not retried while its inputs stay the same.
    for _ in range(2):
        assert not auto.tick() & {"beta/query_features", "beta/rankings", "beta/map_report"}
    for key, n in before.items():
        assert project.materialization_count(key) == n, key

    # Restored: the data is what the last good query features, rankings and report were
    # computed from again, so once the descriptors are rebuilt nothing else needs to run.
    shutil.move(kept, query)
    project.index("beta")
    done = set().union(*auto.rounds())
    assert "beta/descriptors" in done
    assert not done & {"beta/query_features", "beta/rankings", "beta/map_report"}
    for key, n in before.items():
        assert project.materialization_count(key) == n, key
    shards = {"beta": current_shards(project.instance, "beta")}
    ev = project.config.evaluations["beta"]
    assert evaluation_input_problems(project.config, project.store, ev, shards) == []


def test_a_parent_being_rebuilt_holds_its_children(fresh_project, monkeypatch, tmp_path):
    """While alpha's descriptors are being rebuilt (a run in progress), neither they nor the
    rankings and report downstream are requested, even when another parent of the rankings
    (the query features) is refreshed meanwhile; once the run has finished, the rankings and
    the report are (the race that failed with a bare KeyError)."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        project = dataclasses.replace(fresh_project, instance=instance)
        for ds in ("alpha", "beta"):
            project.index(ds)
        refresh(project.defs, project.instance)
        synthetic_jpeg(project.images("alpha") / "part1" / "extra_009.jpg", seed=31)
        assert project.index("alpha").forward_passes == 1

        entered, release = threading.Event(), threading.Event()
        real = dataset_descriptors

        def slow(config, store, ds, feats, pca=None):
            if ds.name == "alpha":
                entered.set()
                assert release.wait(120)
            return real(config, store, ds, feats, pca)

        monkeypatch.setattr(descriptor_assets, "dataset_descriptors", slow)
        results = []
        worker = threading.Thread(
            target=lambda: results.append(materialize(project, ["alpha/descriptors"]))
        )
        worker.start()
        try:
            assert entered.wait(120)
            # meanwhile a query image changes: its features are stale, and the rankings would
            # follow them into the same run — but they must wait for the descriptors
            query_file = sorted((project.root / "alpha" / "gt").glob("*_query.txt"))[0]
            name = query_file.read_text().split()[0].removeprefix("oxc1_")
            (query,) = project.images("alpha").rglob(f"{name}.jpg")
            synthetic_jpeg(query, seed=32)
            assert project.index("alpha").forward_passes == 1
            got = Automation(project).start()
            assert "alpha/query_features" in got
            assert not got & {"alpha/descriptors", "alpha/rankings", "alpha/map_report"}, got
        finally:
            release.set()
            worker.join(120)
        assert results and results[0].success
        assert {"alpha/rankings", "alpha/map_report"} <= Automation(project).start()


def test_rankings_refuse_inputs_of_different_states(indexed_no_refresh):
    """Rankings asked for (by hand, in the UI) while the descriptors are out of date fail
    before writing anything, naming what is out of date; map_report is not run after them."""
    project = indexed_no_refresh
    refresh(project.defs, project.instance)
    rel = commit_path("evaluation", "alpha", "rankings")
    before = project.store.read_bytes(rel)
    synthetic_jpeg(project.images("alpha") / "part2" / "extra_010.jpg", seed=41)
    project.index("alpha")
    with pytest.raises(dg.Failure, match=r"descriptors hold 48 images, the stored features 49"):
        materialize(project, ["alpha/rankings", "alpha/map_report"])
    assert project.store.read_bytes(rel) == before
    assert project.materialization_count("alpha/map_report") == 1
