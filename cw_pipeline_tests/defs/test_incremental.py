"""Incremental indexing: only new or changed images get a forward pass, only the changed
shard is re-run, and automation refreshes exactly what depends on the change."""

from __future__ import annotations

import dagster as dg

from cw_pipeline.compute.descriptors import read_descriptors
from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.runtime.runs import refresh
from cw_pipeline_tests.defs.project import (
    ALPHA_DOWNSTREAM,
    DATASETS,
    DISTRACTOR_EVAL,
    METHODS,
    Automation,
    check_evaluations,
    synthetic_jpeg,
    truncated_jpeg,
    write_config,
)
from cw_pipeline_tests.published import descriptors_rel, rankings_rel

ALPHA_IMAGES = 48
PART2_IMAGES = 18

#: After the nightly cron tick: the descriptors of beta's distractor set, with beta's new PCA
#: (partitioned, in runs of their own), then the evaluation's rankings and report.
BETA_DISTRACTORS = {
    f"{DISTRACTOR_EVAL}/gamma_descriptors[b000]",
    f"{DISTRACTOR_EVAL}/gamma_descriptors[b001]",
}


def test_new_images_in_one_shard(indexed_project):
    project = indexed_project
    auto = Automation(project)
    assert auto.start() == set(), "a fully materialized project has nothing to refresh"
    counts = {
        (ds, s): project.materialization_count(f"{ds}/cam_features", s)
        for ds in DATASETS
        for s in project.instance.get_dynamic_partitions(f"{ds}_shards")
    }
    assert set(counts.values()) == {1}

    new = [
        synthetic_jpeg(project.images("alpha") / "part2" / f"new_{i:03d}.jpg", 500 + i)
        for i in range(5)
    ]
    res = project.index("alpha")
    assert res.indexed_shards == ["part2"]
    assert res.forward_passes == 5
    assert res.reused == PART2_IMAGES
    assert res.rejected == 0
    assert res.images == ALPHA_IMAGES + 5
    ids = set(project.features("alpha", "part2").column("image_id").to_pylist())
    assert {p.stem for p in new} <= ids and len(ids) == PART2_IMAGES + 5
    for other in ("beta", "gamma", "delta"):
        r = project.index(other)
        assert (r.indexed_shards, r.forward_passes, r.reused) == ([], 0, 0), other
    # only alpha's part2 was re-run
    for (ds, s), n in counts.items():
        expected = n + 1 if (ds, s) == ("alpha", "part2") else n
        assert project.materialization_count(f"{ds}/cam_features", s) == expected, (ds, s)
        assert project.materialization_count(f"{ds}/manifest", s) == expected, (ds, s)

    rounds = auto.rounds()
    assert rounds == [ALPHA_DOWNSTREAM]  # one run; the evaluation with distractors: at 03:00
    for requests in rounds:
        assert not any(r.startswith(("gamma/", "delta/")) for r in requests)
        assert "alpha/pca_model" not in requests
        assert f"{DISTRACTOR_EVAL}/rankings" not in requests
    ids, _ = read_descriptors(project.store, descriptors_rel(project.store, "alpha", "ofa"))
    assert len(ids) == ALPHA_IMAGES + 5 and {p.stem for p in new} <= set(ids)

    # re-observing unchanged folders: nothing to index, nothing to refresh
    for ds in DATASETS:
        r = project.index(ds)
        assert (r.indexed_shards, r.forward_passes, r.reused) == ([], 0, 0), ds
    assert auto.tick() == set()
    assert project.materialization_count("alpha/cam_features", "part2") == 2


def test_deleted_image_leaves_features_and_downstream(indexed_project):
    project = indexed_project
    gone = "cat_000003"
    (project.images("alpha") / "part1" / f"{gone}.jpg").unlink()
    # A benchmark's ground truth may only name existing images (else query_features fails
    # naming them, see test_bad_input.py): the image leaves its lists too.
    for names in (project.root / "alpha" / "gt").glob("*.txt"):
        if not names.name.endswith("_query.txt"):
            kept = [n for n in names.read_text().splitlines() if n.strip() != gone]
            names.write_text("".join(f"{n}\n" for n in kept))

    res = project.index("alpha")
    assert res.indexed_shards == ["part1"]
    assert (res.forward_passes, res.rejected) == (0, 0)
    assert res.reused == 17
    assert res.images == ALPHA_IMAGES - 1
    features = project.features("alpha", "part1").column("image_id").to_pylist()
    manifest = project.store.read_table(project.store.shard_path("manifest", "alpha", "part1"))
    assert gone not in features and gone not in manifest.column("image_id").to_pylist()
    assert len(features) == 17

    # refresh (what `cw-pipeline index` runs after indexing) rebuilds what depends on alpha
    # (and alpha's query features: its ground-truth files changed); the evaluation with
    # distractors waits for its cron, or include_cron
    done = set(refresh(project.defs, project.instance))
    assert done == ALPHA_DOWNSTREAM | {"alpha/query_features"}
    cron = set(refresh(project.defs, project.instance, include_cron=True))
    assert cron == BETA_DISTRACTORS | {
        f"{DISTRACTOR_EVAL}/rankings",
        f"{DISTRACTOR_EVAL}/map_report",
    }
    for agg in ("raw", "raw+pca", "ofa"):
        ids, _ = read_descriptors(project.store, descriptors_rel(project.store, "alpha", agg))
        assert gone not in ids and len(ids) == ALPHA_IMAGES - 1
    for method in METHODS:
        table = project.store.read_table(rankings_rel(project.store, "alpha", method))
        assert all(gone not in row for row in table.column("ranked_ids").to_pylist())
    pca = project.instance.get_latest_materialization_event(dg.AssetKey(["beta", "pca_model"]))
    assert pca.asset_materialization.metadata["training_images"].value == ALPHA_IMAGES - 1
    assert refresh(project.defs, project.instance) == []


def test_changed_extraction_settings_recompute_features(indexed_project):
    project = indexed_project
    store = project.store
    old_version = feature_code_version(project.config.dataset("alpha"))
    rel = store.shard_path("cam_features", "alpha", "part1")
    assert store.read_metadata(rel)["code_version"] == old_version

    write_config(project.root, resize="native")  # was fixed:160x160
    project = project.reload()
    graph_old = indexed_project.defs.resolve_asset_graph()
    graph_new = project.defs.resolve_asset_graph()
    key = dg.AssetKey(["alpha", "cam_features"])
    new_version = graph_new.get(key).code_version
    assert graph_old.get(key).code_version == old_version != new_version
    assert new_version == feature_code_version(project.config.dataset("alpha"))

    # the files did not change, but every stored row carries the old code version
    res = project.index("alpha")
    assert res.indexed_shards == ["part1", "part2", "part3"]
    assert res.forward_passes == ALPHA_IMAGES
    assert res.reused == 0
    for shard in res.indexed_shards:
        rel = store.shard_path("cam_features", "alpha", shard)
        assert store.read_metadata(rel)["code_version"] == new_version
        feats = store.read_table(rel, ["image_id", "input_w", "input_h"]).to_pylist()
        man = store.read_table(store.shard_path("manifest", "alpha", shard)).to_pylist()
        native = {m["image_id"]: (m["width"], m["height"]) for m in man}
        # computed with the new settings: native size, not 160x160
        assert {f["image_id"]: (f["input_w"], f["input_h"]) for f in feats} == native
    assert any(size != (160, 160) for size in native.values())
    again = project.index("alpha")
    assert (again.indexed_shards, again.forward_passes) == ([], 0)


def test_corrupt_image_is_rejected_and_the_shard_indexed(indexed_project):
    project = indexed_project
    part3 = project.images("alpha") / "part3"
    truncated_jpeg(part3 / "broken_000.jpg", seed=7)
    (part3 / "garbage_000.jpg").write_bytes(b"not a jpeg at all" * 10)
    n_before = len(check_evaluations(project.instance))

    res = project.index("alpha")
    assert res.indexed_shards == ["part3"]
    assert (res.forward_passes, res.reused, res.rejected) == (0, 12, 2)
    ids = project.features("alpha", "part3").column("image_id").to_pylist()
    assert len(ids) == 12 and "broken_000" not in ids and "garbage_000" not in ids

    rejected = project.store.read_table("rejected/dataset=alpha/shard=part3.parquet").to_pylist()
    assert sorted(r["image_id"] for r in rejected) == ["broken_000", "garbage_000"]
    assert all(r["reason"] and r["relpath"].startswith("part3/") for r in rejected)

    latest = {
        (e.asset_check_key.asset_key.to_user_string(), e.asset_check_key.name): e
        for e, shard in check_evaluations(project.instance)[n_before:]
        if shard == "part3"
    }
    warn = dg.AssetCheckSeverity.WARN
    check = latest[("alpha/cam_features", "no_rejected_images")]
    assert not check.passed and check.severity == warn
    assert check.metadata["rejected"].value == 2
    assert latest[("alpha/cam_features", "features_finite_and_shaped")].passed
    readable = latest[("alpha/manifest", "ids_unique_and_readable")]
    assert not readable.passed and readable.severity == warn  # the garbage file's header
    assert readable.metadata["unreadable"].value == 1
