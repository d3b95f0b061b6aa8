"""Tests for cw_pipeline.core.ranking: cosine ranking, full orders and query expansion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cw_pipeline.core.aggregation import l2_normalize
from cw_pipeline.core.ranking import FullOrder, Ranking, expand_queries, order_positions, rank


def _brute_force(queries: np.ndarray, database: np.ndarray) -> list[list[int]]:
    """Reference ranking: sort by (−score, index) with plain Python."""
    out = []
    for q in queries:
        scores = [float(np.dot(q.astype(np.float32), d.astype(np.float32))) for d in database]
        out.append(sorted(range(len(database)), key=lambda j, s=scores: (-s[j], j)))
    return out


def _random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, d))).astype(np.float32)


# --------------------------------------------------------------------------- rank


def test_rank_equals_brute_force_sort():
    rng = np.random.default_rng(0)
    q, db = _random_unit(rng, 3, 8), _random_unit(rng, 20, 8)
    ranking = rank(q, db)
    assert ranking.indices.shape == (3, 20)
    assert ranking.indices.tolist() == _brute_force(q, db)
    scores = q @ db.T
    np.testing.assert_allclose(
        ranking.scores, np.take_along_axis(scores, ranking.indices, axis=1), atol=1e-6
    )
    assert (np.diff(ranking.scores, axis=1) <= 0).all()


def test_rank_ties_broken_by_index_deterministically():
    db = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], dtype=np.float32)
    q = np.array([1, 0], dtype=np.float32)  # 1-D query accepted
    first = rank(q, db)
    # scores: 1, 0, 1, 0.6, 1 → the three ties by index, then 0.6, then 0.
    assert first.indices.tolist() == [[0, 2, 4, 3, 1]]
    np.testing.assert_allclose(first.scores, [[1, 1, 1, 0.6, 0]], atol=1e-6)
    for _ in range(3):
        assert rank(q, db).indices.tolist() == first.indices.tolist()
    assert rank(q, db, top_k=1).indices.tolist() == [[0]]
    assert rank(q, db, top_k=2).indices.tolist() == [[0, 2]]
    assert rank(q, db, top_k=4).indices.tolist() == [[0, 2, 4, 3]]


def test_top_k_equals_prefix_of_full_ranking_with_many_ties():
    rng = np.random.default_rng(1)
    # Scores from a set of 3 values: many ties straddle every cut.
    db = np.zeros((40, 3), dtype=np.float32)
    db[np.arange(40), rng.integers(0, 3, size=40)] = 1.0
    q = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    full = rank(q, db)
    assert full.indices.tolist() == _brute_force(q, db)
    for k in range(1, 41):
        part = rank(q, db, top_k=k)
        np.testing.assert_array_equal(part.indices, full.indices[:, :k])
        np.testing.assert_array_equal(part.scores, full.scores[:, :k])
    assert rank(q, db, top_k=100).indices.shape == (2, 40)  # clamped to the database


def test_top_k_prefix_random_scores():
    rng = np.random.default_rng(2)
    q, db = _random_unit(rng, 4, 16), _random_unit(rng, 50, 16)
    full = rank(q, db)
    for k in (1, 7, 49):
        np.testing.assert_array_equal(rank(q, db, top_k=k).indices, full.indices[:, :k])


def _where(ranking: np.ndarray) -> np.ndarray:
    """Position of every row in a full ranking (its inverse permutation)."""
    out = np.empty(len(ranking), dtype=np.int64)
    out[ranking] = np.arange(len(ranking))
    return out


@pytest.mark.parametrize("levels", [None, 7, 1])  # continuous scores, many ties, all tied
def test_order_positions_equal_a_full_stable_sort(levels):
    rng = np.random.default_rng(3)
    n = 2000
    if levels is None:
        s = rng.standard_normal(n).astype(np.float32)
    else:
        s = rng.integers(0, levels, size=n).astype(np.float32) / 7
    where = _where(np.argsort(-s, kind="stable"))  # the straightforward order: sort it all
    for rows in (rng.choice(n, size=60, replace=False), np.arange(n), np.array([n - 1, 0])):
        np.testing.assert_array_equal(order_positions(s, rows), where[rows])
    assert order_positions(s, []).shape == (0,)


def test_order_positions_errors():
    with pytest.raises(ValueError, match="NaN"):
        order_positions(np.array([0.5, np.nan], dtype=np.float32), [0])
    with pytest.raises(ValueError, match=r"rows must be in 0\.\.1, got 0\.\.2"):
        order_positions(np.zeros(2, dtype=np.float32), [0, 2])
    with pytest.raises(ValueError, match="1-D"):
        order_positions(np.zeros((2, 2), dtype=np.float32), [0])


def test_rank_full_order_is_the_full_ranking():
    rng = np.random.default_rng(4)
    db = np.zeros((300, 3), dtype=np.float32)  # tie-heavy: three distinct scores per query
    db[np.arange(300), rng.integers(0, 3, size=300)] = 1.0
    q = np.vstack([np.array([[1.0, 0.5, 0.0]], np.float32), _random_unit(rng, 1, 3)])
    full = rank(q, db)
    for k in (1, 5, 299, 300):
        part = rank(q, db, top_k=k, full_order=True)
        assert part.orders is not None and len(part.orders) == 2
        for i, order in enumerate(part.orders):
            np.testing.assert_array_equal(order.ranking(), full.indices[i])
            np.testing.assert_array_equal(order.positions(np.arange(300)), _where(full.indices[i]))
            np.testing.assert_array_equal(order.row_scores()[full.indices[i]], full.scores[i])
    assert rank(q, db, top_k=3).orders is None


def test_full_order_with_a_reordered_head():
    """Re-ranking reorders the head (with scores of its own): the head comes first, in its
    order, then the other rows by their scores."""
    rng = np.random.default_rng(5)
    s = rng.integers(0, 5, size=500).astype(np.float32)  # ties in the tail too
    head = np.argsort(-s, kind="stable")[:40]
    head = head[rng.permutation(40)]
    head_scores = rng.random(40).astype(np.float32) - 2  # below every tail score
    order = FullOrder(head, head_scores, s)
    rest = np.array([r for r in np.argsort(-s, kind="stable") if r not in set(head.tolist())])
    expected = np.concatenate([head, rest])
    np.testing.assert_array_equal(order.ranking(), expected)
    rows = rng.choice(500, size=100, replace=False)
    np.testing.assert_array_equal(order.positions(rows), _where(expected)[rows])
    scores = order.row_scores()
    np.testing.assert_array_equal(scores[head], head_scores)
    np.testing.assert_array_equal(np.delete(scores, head), np.delete(s, head))


def test_rank_errors():
    db = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="query dimension 2 != database dimension 3"):
        rank(np.ones((1, 2)), db)
    with pytest.raises(ValueError, match="empty"):
        rank(np.ones((1, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        rank(np.ones((1, 3)), np.ones(3))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        rank(np.ones((1, 3)), db, top_k=0)


# --------------------------------------------------------------------------- query expansion


def _qe_example() -> tuple[np.ndarray, np.ndarray]:
    db = np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], dtype=np.float32)
    return np.array([[1, 0]], dtype=np.float32), db


def test_expand_queries_by_hand():
    q, db = _qe_example()
    first = rank(q, db)  # scores 1, 0.6, 0, -1 → order 0, 1, 2, 3
    assert first.indices.tolist() == [[0, 1, 2, 3]]
    expanded = expand_queries(db, first, 3)
    # (1, 0) + (0.6, 0.8) + (0, 1) = (1.6, 1.8), l2 → / sqrt(5.8)
    expected = np.array([[1.6, 1.8]]) / math.sqrt(5.8)
    np.testing.assert_allclose(expanded, expected, atol=1e-6)
    # k = 1: the best result alone (the original query is not added).
    np.testing.assert_allclose(expand_queries(db, first, 1), [[1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="k >= 1"):
        expand_queries(db, first, 0)


def test_query_expansion_by_hand():
    q, db = _qe_example()
    out = rank(expand_queries(db, rank(q, db, top_k=3), 3), db)
    e = np.array([1.6, 1.8]) / math.sqrt(5.8)  # (0.664, 0.747)
    # new scores: d0 0.664, d1 0.6·0.664 + 0.8·0.747 = 0.997, d2 0.747, d3 −0.664
    assert out.indices.tolist() == [[1, 2, 0, 3]]
    np.testing.assert_allclose(
        out.scores, [[0.6 * e[0] + 0.8 * e[1], e[1], e[0], -e[0]]], atol=1e-6
    )
    assert rank(expand_queries(db, rank(q, db, top_k=3), 3), db, top_k=2).indices.tolist() == [
        [1, 2]
    ]


def test_ranking_dataclass_holds_arrays():
    r = Ranking(indices=np.array([[1, 0]]), scores=np.array([[0.5, 0.1]]))
    np.testing.assert_array_equal(expand_queries(np.eye(2), r, 1), [[0.0, 1.0]])
