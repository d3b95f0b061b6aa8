"""Tests for cw_pipeline.core.reranking: CAM boxes, region scores and the re-ranked top R."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cw_pipeline.core.aggregation import PCAWhitening, l2_normalize
from cw_pipeline.core.cams import batch_matmul
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.online_aggregation import online_descriptors
from cw_pipeline.core.ranking import rank
from cw_pipeline.core.reranking import region_boxes, rerank, rerank_scores
from cw_pipeline.core.search_settings import RerankConfig
from cw_pipeline_tests.core.random_features import random_maps


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
    maps = random_maps(rng, [(5, 7), (5, 7), (4, 6), (6, 5), (5, 7)], k=64)
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
