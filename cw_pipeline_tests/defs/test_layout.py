"""One warehouse layout (issue 13): every file the pipeline writes is at a path that
:mod:`cw_pipeline.store` names, and every named artefact of the project is there."""

from __future__ import annotations

from pathlib import Path

from cw_pipeline.compute.descriptors import offline_aggregations
from cw_pipeline.compute.feature_maps import maps_wanted_at_indexing
from cw_pipeline.core.methods import PCA_SPACES
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.store import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_PER_QUERY,
    FeatureStore,
    commit_path,
    descriptors_path,
    distractor_descriptors_path,
    feature_maps_path,
    features_path,
    manifest_path,
    pair_cache_path,
    pca_path,
    plan_path,
    query_features_path,
    ranked_database_path,
    rankings_path,
    rejected_path,
    report_folder,
    report_path,
)
from cw_pipeline.store.commits import read_commit


def _named_artefacts(project) -> set[str]:
    """The store's name of every artefact the project's configuration calls for."""
    config, named = project.config, set()
    store = FeatureStore(project.root / "warehouse")
    for ds in config.datasets.values():
        for shard in current_shards(project.instance, ds.name):
            named |= {f(ds.name, shard) for f in (manifest_path, features_path, rejected_path)}
        if ds.shard_by == "batch":
            named.add(plan_path(ds.name))
        if not ds.has_groundtruth:
            continue
        if not ds.grouped:
            named.add(query_features_path(ds.name))
        pca, index = (read_commit(store, "dataset", ds.name, u) for u in ("pca", "index"))
        named |= {commit_path("dataset", ds.name, u) for u in ("pca", "index")}
        halves = (1, 2) if ds.self_split else (None,)
        for space in PCA_SPACES:
            for half in halves:  # the index names the PCA generation it was projected with
                assert index.refs == {"pca": pca.generation}
                rel = pca_path(ds.name, space, half, pca.generation)
                named |= {f"{rel}.{ext}" for ext in ("npz", "json")}
        named |= {descriptors_path(ds.name, a, index.generation) for a in offline_aggregations()}
    for ev in config.evaluations.values():
        for dname in ev.distractors:
            for shard in current_shards(project.instance, dname):
                for agg in offline_aggregations():
                    named.add(distractor_descriptors_path(ev.name, dname, agg, shard))
        rankings = read_commit(store, "evaluation", ev.name, "rankings")
        named.add(commit_path("evaluation", ev.name, "rankings"))
        named |= {rankings_path(ev.name, m.name, rankings.generation) for m in ev.methods}
        named.add(ranked_database_path(ev.name, rankings.generation))
        if any(m.rerank for m in ev.methods):
            named.add(pair_cache_path(ev.name, "region"))
        if any(m.spec.online for m in ev.methods):
            named.add(pair_cache_path(ev.name, "ona"))
    return named


def _kept_maps(project) -> tuple[set[str], set[str]]:
    """The feature maps the features steps keep (required), and every image's maps that a
    rankings step may keep under an evaluated dataset's extraction (allowed)."""
    config, store = project.config, FeatureStore(project.root / "warehouse")
    required, allowed = set(), set()
    for ds in config.datasets.values():
        shas = set()
        for shard in current_shards(project.instance, ds.name):
            rows = store.read_table(manifest_path(ds.name, shard), ["sha1", "error"]).to_pylist()
            shas |= {r["sha1"] for r in rows if not r["error"]}
        if maps_wanted_at_indexing(config, ds):
            required |= {feature_maps_path(ds.extraction.code_version(), s) for s in shas}
        for ev in config.evaluations.values():
            if ds.name in (ev.dataset, *ev.distractors):
                version = config.dataset(ev.dataset).extraction.code_version()
                allowed |= {feature_maps_path(version, s) for s in shas}
    return required, allowed | required


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_every_stored_file_is_at_a_path_the_store_names(indexed_project) -> None:
    project = indexed_project
    stored = _files(project.root / "warehouse")
    named = _named_artefacts(project)
    kept, may_keep = _kept_maps(project)
    assert stored - named - may_keep == set(), "files at paths the store does not name"
    assert (named | kept) - stored == set(), "artefacts of the configuration not written"
    reports = project.root / "reports"
    for ev in project.config.evaluations:
        for name in (REPORT_MARKDOWN, REPORT_JSON, REPORT_PER_QUERY):
            assert (reports / report_path(ev, name)).is_file()
    tops = {Path(rel).parts[0] for rel in _files(reports)}
    assert tops == {report_folder(ev) for ev in project.config.evaluations}
