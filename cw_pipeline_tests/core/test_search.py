"""Tests for cw_pipeline.core.search: ranking, QE, online aggregation and CAM-box re-ranking."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cw_pipeline.core.aggregation import PCAWhitening, l2_normalize
from cw_pipeline.core.cams import batch_matmul
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.search import (
    FullOrder,
    OnlineIndex,
    Ranking,
    RerankConfig,
    expand_queries,
    online_descriptors,
    order_positions,
    rank,
    region_boxes,
    rerank,
    rerank_scores,
)


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


# --------------------------------------------------------------------------- online aggregation


def _maps(rng: np.random.Generator, shapes, k: int = 5, k_a: int | None = None) -> list:
    out = []
    for h, w in shapes:
        x = np.maximum(rng.normal(size=(k, h, w)), 0).astype(np.float16)
        a = None if k_a is None else np.maximum(rng.normal(size=(k_a, h, w)), 0).astype(np.float16)
        out.append(FeatureMaps(features=x, cam_maps=a, input_size=(w * 32, h * 32)))
    return out


def _reference_ona(m: FeatureMaps, classes, weight: torch.Tensor) -> np.ndarray:
    """OnA descriptor of one image without PCA, with explicit loops (float64)."""
    x = m.features.astype(np.float64)
    a = x if m.cam_maps is None else m.cam_maps.astype(np.float64)
    w = weight.double().numpy()
    k, h, wd = x.shape
    q = np.array([(x[ch] > 0).mean() for ch in range(k)])
    cw = np.array([math.log(q.sum() / q[ch]) if q[ch] > 0 else 0.0 for ch in range(k)])
    total = np.zeros(k)
    for c in classes:
        cam = np.zeros((h, wd))
        for ch in range(a.shape[0]):
            cam += w[c, ch] * a[ch]
        cam = np.maximum(cam / cam.max(), 0) if cam.max() > 0 else np.zeros_like(cam)
        f = np.array([cw[ch] * (x[ch] * cam).sum() for ch in range(k)])
        total += f / max(np.linalg.norm(f), 1e-12)
    return total / np.linalg.norm(total)


def test_online_descriptors_equal_explicit_reference():
    rng = np.random.default_rng(3)
    maps = _maps(rng, [(3, 4), (3, 4), (2, 5)])
    weight = torch.from_numpy(rng.normal(size=(10, 5)).astype(np.float32))
    bias = torch.zeros(10)
    classes = np.array([7, 2, 3])
    out = online_descriptors(maps, classes, weight, bias, None)
    assert out.shape == (3, 5)
    for i, m in enumerate(maps):
        np.testing.assert_allclose(out[i], _reference_ona(m, classes, weight), atol=1e-5)


def test_online_descriptors_with_cells_crop_each_image():
    rng = np.random.default_rng(4)
    maps = _maps(rng, [(4, 4), (4, 4)])
    weight = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    cells = [(1, 0, 3, 2), None]
    out = online_descriptors(maps, [0, 5], weight, torch.zeros(6), None, cells=cells)
    cropped = FeatureMaps(features=maps[0].features[:, 0:2, 1:3])
    np.testing.assert_allclose(out[0], _reference_ona(cropped, [0, 5], weight), atol=1e-5)
    np.testing.assert_allclose(out[1], _reference_ona(maps[1], [0, 5], weight), atol=1e-5)


@pytest.mark.parametrize("separate_a", [False, True])
@pytest.mark.parametrize("use_pca", [False, True])
def test_online_index_equals_online_descriptors(separate_a, use_pca):
    rng = np.random.default_rng(5)
    k_a = 6 if separate_a else None
    maps = _maps(rng, [(3, 4), (2, 5), (3, 4), (3, 4), (2, 5)], k=5, k_a=k_a)
    weight = torch.from_numpy(rng.normal(size=(10, k_a or 5)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=10).astype(np.float32))
    pca = PCAWhitening.fit(l2_normalize(rng.normal(size=(40, 5))), dims=3) if use_pca else None
    index = OnlineIndex(maps, np.arange(10), weight, bias, pca, chunk=2)
    assert index.vectors.shape == (5, 10, 3 if use_pca else 5)
    assert index.nbytes == index.vectors.nbytes
    for classes in ([7, 2, 3], [0], [9, 1, 4, 5, 6]):
        expected = online_descriptors(maps, np.array(classes), weight, bias, pca)
        np.testing.assert_allclose(index.descriptors(np.array(classes)), expected, atol=1e-5)


def test_online_index_only_knows_its_classes():
    rng = np.random.default_rng(6)
    maps = _maps(rng, [(2, 2)])
    weight = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    index = OnlineIndex(maps, np.array([3, 1, 3]), weight, torch.zeros(4), None)
    assert index.classes.tolist() == [1, 3]
    assert index.descriptors(np.array([3])).shape == (1, 5)
    with pytest.raises(ValueError, match="class 2 is not in this online index"):
        index.descriptors(np.array([1, 2]))


# --------------------------------------------------------------------------- re-ranking


def _rerank_scene():
    """Synthetic database: image 1 holds the query object in a 3×3 region, amid clutter.

    Channels 0 and 1 carry the object; channels 2 and 3 carry clutter everywhere. Class 0's
    weights select channel 0, class 1's channel 1, so their CAMs light up the object only.
    """
    rng = np.random.default_rng(7)
    k, h, w = 4, 8, 8
    weight = torch.tensor(
        [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]], dtype=torch.float32
    )
    bias = torch.zeros(4)

    target = np.zeros((k, h, w), dtype=np.float32)
    target[2:] = rng.uniform(0.5, 1.5, size=(2, h, w))  # clutter everywhere
    target[0, 5:8, 4:7] = 1.0  # the object: rows 5-7, cols 4-6
    target[1, 5:8, 4:7] = rng.uniform(1.0, 2.0, size=(3, 3))
    target = target.astype(np.float16)
    query = FeatureMaps(features=target[:, 5:8, 4:7].copy())

    # Distractors: the object's pattern smeared over the whole image, with noise.
    distractors = []
    for _ in range(2):
        d = np.zeros((k, h, w), dtype=np.float32)
        d[0] = rng.uniform(0.5, 1.0, size=(h, w))
        d[1] = rng.uniform(1.0, 2.0, size=(h, w))
        d[2:] = rng.uniform(0.3, 1.5, size=(2, h, w))
        distractors.append(FeatureMaps(features=d.astype(np.float16)))
    database = [distractors[0], FeatureMaps(features=target), distractors[1]]
    return database, query, weight, bias


def test_region_boxes_find_the_object():
    database, _, weight, _ = _rerank_scene()
    boxes = region_boxes(database[1], np.array([0, 1, 2]), weight, RerankConfig())
    # Every threshold gives the object's box (x1, y1, x2, y2) = (4, 5, 7, 8); listed once.
    assert boxes == [(4, 5, 7, 8)]
    # Boxes under min_cells cells are skipped.
    assert region_boxes(database[1], np.array([0, 1]), weight, RerankConfig(min_cells=10)) == []


def test_rerank_moves_the_image_with_a_matching_region_up():
    database, query, weight, bias = _rerank_scene()
    classes = np.array([0, 1])
    q = online_descriptors([query], classes, weight, bias, None)[0]
    whole = online_descriptors(database, classes, weight, bias, None)
    initial = rank(q, whole).indices[0]
    assert initial[0] != 1  # before re-ranking, a distractor comes first
    assert initial[-1] == 1  # and the image with the object last

    order, scores = rerank(
        q, classes, initial, database.__getitem__, weight, bias, None, RerankConfig(), top_r=3
    )
    assert order[0] == 1
    assert sorted(order.tolist()) == [0, 1, 2]
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # the region is the query itself
    assert (np.diff(scores) <= 0).all()
    # The distractors' scores are at least their whole-image scores.
    for pos, idx in enumerate(order[1:], start=1):
        assert scores[pos] >= float(whole[idx] @ q) - 1e-6


def test_rerank_only_touches_the_top_r():
    database, query, weight, bias = _rerank_scene()
    classes = np.array([0, 1])
    q = online_descriptors([query], classes, weight, bias, None)[0]
    loaded: list[int] = []

    def load(i: int) -> FeatureMaps:
        loaded.append(i)
        return database[i]

    order, scores = rerank(q, classes, np.array([0, 2, 1]), load, weight, bias, None, top_r=2)
    assert loaded == [0, 2]
    assert order[2] == 1  # outside the top R: keeps its place
    assert sorted(order[:2].tolist()) == [0, 2]
    assert scores.shape == (2,)


def test_rerank_equal_scores_keep_the_previous_order():
    m = FeatureMaps(features=np.ones((2, 3, 3), dtype=np.float16))
    weight = torch.eye(2)
    q = online_descriptors([m], [0, 1], weight, torch.zeros(2), None)[0]
    order, scores = rerank(
        q, np.array([0, 1]), np.array([2, 0, 1]), lambda i: m, weight, torch.zeros(2), None
    )
    assert order.tolist() == [2, 0, 1]
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)


def test_ranking_dataclass_holds_arrays():
    r = Ranking(indices=np.array([[1, 0]]), scores=np.array([[0.5, 0.1]]))
    np.testing.assert_array_equal(expand_queries(np.eye(2), r, 1), [[0.0, 1.0]])


def test_online_descriptors_take_read_only_class_ids_without_a_warning():
    """Class ids read from Parquet are read-only arrays: no torch UserWarning ("not writable")
    reaches the user. In a new process, as torch gives that warning once per process."""
    code = (
        "import warnings, numpy as np, torch\n"
        "from cw_pipeline.core.search import online_descriptors\n"
        "from cw_pipeline.core.extract import FeatureMaps\n"
        "warnings.simplefilter('error')\n"
        "x = np.ones((5, 3, 4), np.float16)\n"
        "ids = np.array([1, 2]); ids.setflags(write=False)\n"
        "out = online_descriptors([FeatureMaps(features=x)], ids, torch.ones(4, 5), "
        "torch.zeros(4), None)\n"
        "assert out.shape == (1, 5)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_per_image_values_do_not_depend_on_the_batch() -> None:
    """What the search keeps per image (re-ranking scores, OnA descriptors) is computed in
    batches; each image's value must be the same bit for bit alone, in any batch, at any place
    of it: CAM and class-vector products (batch_matmul), the PCA (row_invariant), the scores."""
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    a = torch.relu(torch.randn(9, 64, 5, 7, generator=gen))
    w = torch.randn(30, 64, generator=gen)
    full = batch_matmul(w[:6].expand(9, -1, -1), a.reshape(9, 64, 35))
    for i in range(9):
        alone = batch_matmul(w[:6].expand(1, -1, -1), a[i : i + 1].reshape(1, 64, 35))
        assert torch.equal(alone[0], full[i])
    assert torch.equal(batch_matmul(w[:6].expand(4, -1, -1), a[3:7].reshape(4, 64, 35)), full[3:7])
    train = rng.standard_normal((200, 64)).astype(np.float32)
    pca = PCAWhitening.fit(train, dims=7)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    both = pca(x, row_invariant=True)
    for lo, hi in ((0, 1), (3, 4), (5, 17), (20, 50)):
        np.testing.assert_array_equal(pca(x[lo:hi], row_invariant=True), both[lo:hi])
    # the scores of re-ranking: each image alone equals its score among the others
    maps = _maps(rng, [(5, 7), (5, 7), (4, 6), (6, 5), (5, 7)], k=64)
    q = l2_normalize(rng.standard_normal(7).astype(np.float32))
    cfg = RerankConfig(query_classes=3, box_classes=2, min_cells=1)
    classes = np.array([1, 4, 9])
    together = rerank_scores(q, classes, maps, w, torch.zeros(30), pca, cfg)
    for j, m in enumerate(maps):
        alone = rerank_scores(q, classes, [m], w, torch.zeros(30), pca, cfg)
        assert alone[0] == together[j]
    np.testing.assert_array_equal(
        rerank_scores(q, classes, maps[2:], w, torch.zeros(30), pca, cfg), together[2:]
    )
