"""`evaluate`'s library path and the pipeline's rankings asset rank alike (issue 13)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cw_pipeline.compute.catalog import stored_shards
from cw_pipeline.compute.features import load_features, table_to_featureset
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.compute.rankings import score_rankings
from cw_pipeline.core.evaluation import score
from cw_pipeline.core.methods import Method, fit_pca
from cw_pipeline.core.runner import evaluate_search
from cw_pipeline.store import query_features_path
from cw_pipeline_tests.published import rankings_rel


def test_evaluate_library_path_and_pipeline_give_identical_rankings(indexed_project):
    project = indexed_project
    config, store = project.config, project.store
    params = config.search
    checked = 0
    for ev in config.evaluations.values():
        if ev.distractors:
            continue
        ds = config.dataset(ev.dataset)
        feats = load_features(store, ds.name, stored_shards(store, "cam_features", ds.name))
        train = load_features(store, ds.pca_from, stored_shards(store, "cam_features", ds.pca_from))
        qt = store.read_table(query_features_path(ds.name))
        queries = table_to_featureset(qt.drop_columns(["bbox", "query_name"]))
        gt = load_groundtruth(ds, feats.ids)
        for m in ev.methods:
            method = Method.parse(m.name)
            pca = fit_pca(method, train, params)
            library = evaluate_search(method, feats, queries, pca, params)
            table: pa.Table = store.read_table(rankings_rel(store, ev.name, m.name))
            assert table.column("query_id").to_pylist() == queries.ids
            pos = {i: k for k, i in enumerate(feats.ids)}
            stored = np.array([[pos[i] for i in row] for row in table["ranked_ids"].to_pylist()])
            np.testing.assert_array_equal(library.indices[:, : stored.shape[1]], stored)
            lib_score = score(library.indices, gt, feats.ids, queries.ids)
            assert score_rankings(ds, gt, feats.ids, table)["map"] == lib_score.map
            checked += 1
    assert checked >= 4
