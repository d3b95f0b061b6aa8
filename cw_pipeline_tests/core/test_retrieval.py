"""Tests for cw_pipeline.core.retrieval: the one search path over feature sets (ranking, OnA,
re-ranking, QE), full orders, the map cache and kept pair values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cw_pipeline.core.aggregation import aggregate, l2_normalize
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.methods import Method, fit_pca, offline_descriptors
from cw_pipeline.core.online_aggregation import online_descriptors
from cw_pipeline.core.reranking import rerank
from cw_pipeline.core.retrieval import InMemoryMaps, MapCache, PairCache, search
from cw_pipeline.core.runner import evaluate_search
from cw_pipeline.core.search_settings import RerankConfig, SearchParams
from cw_pipeline_tests.core.random_features import N_C, PARAMS, random_feature_set


def _brute_rank(q: np.ndarray, db: np.ndarray) -> list[list[int]]:
    s = q.astype(np.float32) @ db.astype(np.float32).T
    return [sorted(range(db.shape[0]), key=lambda j, r=row: (-r[j], j)) for row in s]


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    "name",
    ["raw", "raw+pca", "ofa", "ofa+qe2", "ona", "ona+qe2", "ofa+r3", "ona+r3+qe2", "ofa+r100"],
)
def test_search_gives_full_rankings(scene, name):
    clf, train, database, queries = scene
    method = Method.parse(name)
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS, classifier=clf)
    assert result.indices.shape == (3, 10)
    assert result.scores.shape == (3, 10)
    for row in result.indices:
        assert sorted(row.tolist()) == list(range(10))
    assert np.isfinite(result.scores).all()


@pytest.mark.parametrize("name", ["raw", "raw+pca", "ofa", "ona", "ofa+r3", "ona+r3"])
def test_queries_equal_to_database_items_rank_first(scene, name):
    clf, train, database, queries = scene
    method = Method.parse(name)
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS, classifier=clf)
    assert result.indices[:, 0].tolist() == [7, 2, 4]
    if not method.rerank:
        np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
        assert (result.scores[:, 1] < 1.0 - 1e-4).all()


def test_search_ofa_equals_brute_force(scene):
    _, train, database, queries = scene
    method = Method.parse("ofa")
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS)
    q = aggregate(queries.class_vectors, pca, N_C)
    db = aggregate(database.class_vectors, pca, N_C)
    assert result.indices.tolist() == _brute_rank(q, db)
    expected = np.take_along_axis(q @ db.T, result.indices, axis=1)
    np.testing.assert_allclose(result.scores, expected, atol=1e-6)
    assert (np.diff(result.scores, axis=1) <= 0).all()
    # The core search over precomputed database descriptors gives the same result.
    again = search(method, queries, db, pca, None, PARAMS)
    np.testing.assert_array_equal(again.indices, result.indices)


def test_search_ofa_qe_equals_brute_force(scene):
    _, train, database, queries = scene
    method = Method.parse("ofa+qe3")
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS)
    q = aggregate(queries.class_vectors, pca, N_C)
    db = aggregate(database.class_vectors, pca, N_C)
    expanded = []
    for i, order in enumerate(_brute_rank(q, db)):
        s = db[order[:3]].astype(np.float64).sum(axis=0)
        expanded.append(s / np.linalg.norm(s))
        assert order[0] == [7, 2, 4][i]
    assert result.indices.tolist() == _brute_rank(np.array(expanded), db)


def test_search_ona_equals_per_query_online_descriptors(scene):
    clf, train, database, queries = scene
    method = Method.parse("ona")
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS, classifier=clf)
    q = aggregate(queries.class_vectors, pca, N_C)
    for i in range(len(queries)):
        db = online_descriptors(database.maps, queries.class_ids[i], *clf, pca)
        assert result.indices[i].tolist() == _brute_rank(q[i : i + 1], db)[0]
        np.testing.assert_allclose(result.scores[i], (db @ q[i])[result.indices[i]], atol=1e-5)


def test_search_needs_maps_and_classifier(scene):
    clf, _, database, queries = scene
    no_maps = random_feature_set(4, seed=5, classifier=clf, prefix="n", keep_maps=False)
    with pytest.raises(ValueError, match="'ona' needs stored feature maps"):
        evaluate_search(Method.parse("ona"), no_maps, queries, None, PARAMS, classifier=clf)
    with pytest.raises(ValueError, match="'ofa\\+r10' needs stored feature maps"):
        evaluate_search(Method.parse("ofa+r10"), database, queries, None, PARAMS)


# --------------------------------------------------------------------------- pinned behaviour
# Where the two former search paths disagreed (issue 13), these pin the behaviour kept.


def test_rerank_scores_are_the_region_scores_and_qe_expands_the_reranked_list(scene):
    """The paper re-sorts the top R by the best region score alone: the scores returned are
    those region scores, and QE sums the top K of the re-ranked list."""
    clf, train, database, queries = scene
    method = Method.parse("ofa+r5")
    pca = fit_pca(method, train, PARAMS)
    result = evaluate_search(method, database, queries, pca, PARAMS, classifier=clf)
    q = aggregate(queries.class_vectors, pca, N_C)
    db = aggregate(database.class_vectors, pca, N_C)
    q_r = aggregate(queries.class_vectors, pca, PARAMS.rerank.query_classes)
    cfg = PARAMS.rerank
    for i, first in enumerate(_brute_rank(q, db)):
        order, new = rerank(
            q_r[i],
            queries.class_ids[i],
            np.array(first),
            database.maps.__getitem__,
            *clf,
            pca,
            cfg,
            top_r=5,
        )
        assert result.indices[i].tolist() == order.tolist()
        np.testing.assert_allclose(result.scores[i, :5], new, atol=1e-6)
    assert (np.diff(result.scores[:, :5], axis=1) <= 0).all()
    with_qe = evaluate_search(
        Method.parse("ofa+r5+qe3"), database, queries, pca, PARAMS, classifier=clf
    )
    expanded = l2_normalize(db[result.indices[:, :3]].sum(axis=1))
    assert with_qe.indices.tolist() == _brute_rank(expanded, db)


def test_ona_rerank_uses_the_rerank_classes_not_capped_by_n_c(scene):
    """Re-ranking takes the query's top ``rerank.query_classes`` classes under OnA as under OfA,
    even when N_C is smaller."""
    clf, train, database, queries = scene
    params = SearchParams(
        aggregated_classes=2, n_pca=1, rerank=RerankConfig(query_classes=4, min_cells=1)
    )
    method = Method.parse("ona+r4")
    pca = fit_pca(method, train, params)
    result = evaluate_search(method, database, queries, pca, params, classifier=clf)
    q = aggregate(queries.class_vectors, pca, 2)
    q_r = aggregate(queries.class_vectors, pca, 4)
    cfg = params.rerank
    for i in range(len(queries)):
        db = online_descriptors(database.maps, queries.class_ids[i, :2], *clf, pca)
        first = np.array(_brute_rank(q[i : i + 1], db)[0])
        order, new = rerank(
            q_r[i], queries.class_ids[i], first, database.maps.__getitem__, *clf, pca, cfg, 4
        )
        assert result.indices[i].tolist() == order.tolist()
        np.testing.assert_allclose(result.scores[i, :4], new, atol=1e-5)


def test_top_k_is_the_prefix_of_the_full_search(scene):
    clf, train, database, queries = scene
    for name in ("ofa", "ofa+r5+qe3", "ona+r3+qe2"):
        method = Method.parse(name)
        pca = fit_pca(method, train, PARAMS)
        db = offline_descriptors(method, database, pca, PARAMS)
        maps = InMemoryMaps(database.maps, *clf)
        full = search(method, queries, db, pca, maps, PARAMS)
        top = search(method, queries, db, pca, maps, PARAMS, top_k=4)
        np.testing.assert_array_equal(top.indices, full.indices[:, :4])


@pytest.mark.parametrize(
    "name", ["raw", "ofa", "ofa+qe3", "ofa+r5", "ofa+r5+qe3", "ona", "ona+r3", "ona+r3+qe2"]
)
def test_full_order_is_the_full_search(scene, name):
    """``full_order``: the top k unchanged, and each query's order of the whole database (a
    re-ranked head kept whole even when k is shorter) is the full search's ranking."""
    clf, train, database, queries = scene
    method = Method.parse(name)
    pca = fit_pca(method, train, PARAMS)
    db = offline_descriptors(method, database, pca, PARAMS)
    maps = InMemoryMaps(database.maps, *clf)
    full = search(method, queries, db, pca, maps, PARAMS)
    assert full.orders is None
    for top_k in (1, 2, 10):
        part = search(method, queries, db, pca, maps, PARAMS, top_k=top_k, full_order=True)
        np.testing.assert_array_equal(part.indices, full.indices[:, :top_k])
        assert part.orders is not None and len(part.orders) == len(queries)
        for i, order in enumerate(part.orders):
            np.testing.assert_array_equal(order.ranking(), full.indices[i])
            np.testing.assert_array_equal(order.positions(full.indices[i]), np.arange(10))
            np.testing.assert_allclose(order.row_scores()[full.indices[i]], full.scores[i])


def test_map_cache_keeps_the_most_recent_maps_within_its_bytes():
    def maps(n_channels: int) -> FeatureMaps:
        return FeatureMaps(features=np.zeros((n_channels, 2, 2), dtype=np.float16))

    cache = MapCache(max_bytes=3 * 80)  # three maps of 10 channels (80 bytes each)
    for name in "abc":
        cache.put(Path(name), maps(10))
    assert len(cache) == 3 and cache.nbytes == 240
    assert cache.get(Path("a")) is not None  # a is now the most recent
    cache.put(Path("d"), maps(10))  # drops b, the least recently used
    assert cache.get(Path("b")) is None
    assert [cache.get(Path(x)) is not None for x in "acd"] == [True, True, True]
    cache.put(Path("e"), maps(20))  # 160 bytes: drops the two least recent (a, c)
    assert cache.get(Path("a")) is None and cache.get(Path("c")) is None
    assert cache.nbytes == 240 and len(cache) == 2
    cache.put(Path("huge"), maps(40))  # larger than the whole cache: not kept, nothing dropped
    assert cache.get(Path("huge")) is None and len(cache) == 2
    cache.put(Path("d"), maps(5))  # replaced, counted once
    assert cache.nbytes == 160 + 40
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        MapCache(-1)


# --------------------------------------------------------------------------- pair cache


class _KeyedMaps(InMemoryMaps):
    """In-memory maps with a content key per row, as the warehouse's kept maps have."""

    def __init__(self, maps, keys, weight, bias):
        super().__init__(maps, weight, bias)
        self.keys = list(keys)
        self.gets: list[int] = []

    def key(self, i: int) -> str:
        return self.keys[i]

    def get(self, i: int) -> FeatureMaps:
        self.gets.append(i)
        return super().get(i)


PAIR_METHODS = ["ofa+r5", "ofa+r5+qe3", "ona", "ona+qe2", "ona+r3+qe2"]


@pytest.mark.parametrize("name", PAIR_METHODS)
def test_kept_pair_values_give_the_rankings_of_a_fresh_search(scene, name):
    """Rankings from kept region scores / OnA descriptors equal those computed from the maps,
    exactly; a refresh after an image was added computes only that image's pairs."""
    clf, train, database, queries = scene
    method = Method.parse(name)
    pca = fit_pca(method, train, PARAMS)
    db = offline_descriptors(method, database, pca, PARAMS)
    keys = [f"sha-{i}" for i in range(len(database))]
    fresh = search(method, queries, db, pca, _KeyedMaps(database.maps, keys, *clf), PARAMS)
    pairs = PairCache(extraction="x")
    first = search(
        method, queries, db, pca, _KeyedMaps(database.maps, keys, *clf), PARAMS, pairs=pairs
    )
    np.testing.assert_array_equal(first.indices, fresh.indices)
    np.testing.assert_array_equal(first.scores, fresh.scores)
    stats = pairs.statistics()
    kind = "ona_descriptors" if method.spec.online else "region_scores"
    assert stats[f"{kind}_computed"] > 0
    # Again: every pair is kept, no map is read for OnA, the rankings are the same.
    again = PairCache(extraction="x", region=dict(pairs.region), ona=dict(pairs.ona))
    maps = _KeyedMaps(database.maps, keys, *clf)
    second = search(method, queries, db, pca, maps, PARAMS, pairs=again)
    np.testing.assert_array_equal(second.indices, fresh.indices)
    np.testing.assert_array_equal(second.scores, fresh.scores)
    assert again.computed == {"region": 0, "ona": 0}
    assert sum(again.reused.values()) > 0 and maps.gets == []


@pytest.mark.parametrize("name", ["ofa+r10", "ona", "ona+r3"])
def test_an_added_or_changed_image_gets_its_pairs_computed_the_others_reused(scene, name):
    clf, train, database, queries = scene
    method = Method.parse(name)
    pca = fit_pca(method, train, PARAMS)
    base = database.subset(list(range(8)))
    pairs = PairCache(extraction="x")
    keys = [f"sha-{i}" for i in range(8)]
    db = offline_descriptors(method, base, pca, PARAMS)
    search(method, queries, db, pca, _KeyedMaps(base.maps, keys, *clf), PARAMS, pairs=pairs)
    before = Method(method.aggregation)  # the first ranking, before re-ranking

    def heads(db, maps, keys) -> set[tuple[int, str]]:
        first = search(before, queries, db, pca, _KeyedMaps(maps, keys, *clf), PARAMS)
        return {(i, keys[j]) for i, row in enumerate(first.indices) for j in row[: method.rerank]}

    old_heads = heads(db, base.maps, keys)
    # Two images added (rows 8, 9) and row 3 changed: its content key changes with its maps.
    grown = database
    keys = [*keys, "sha-8", "sha-9"]
    keys[3] = "sha-3-edited"
    maps = list(grown.maps)
    maps[3] = grown.maps[9]  # other content under row 3
    feats = grown.subset(list(range(10)))
    db = offline_descriptors(method, feats, pca, PARAMS)
    db[3] = db[9]
    pairs.computed = {"region": 0, "ona": 0}
    pairs.reused = {"region": 0, "ona": 0}
    kept = search(method, queries, db, pca, _KeyedMaps(maps, keys, *clf), PARAMS, pairs=pairs)
    fresh = search(method, queries, db, pca, _KeyedMaps(maps, keys, *clf), PARAMS)
    np.testing.assert_array_equal(kept.indices, fresh.indices)
    np.testing.assert_array_equal(kept.scores, fresh.scores)
    if method.spec.online:  # the pairs of the 3 new images with each query; the rest kept
        assert pairs.computed["ona"] == 3 * len(queries)
        assert pairs.reused["ona"] == 7 * len(queries)
    if method.rerank:  # in each query's top R, only new or changed images and new entrants
        new_heads = heads(db, maps, keys)
        assert pairs.computed["region"] == len(new_heads - old_heads) > 0
        assert pairs.reused["region"] == len(new_heads & old_heads)
