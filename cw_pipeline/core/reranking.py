"""CAM-box re-ranking of the top R (the paper's Sec. 4.3): each image's new score is the best
score of its regions (the whole image and the boxes of the query classes' CAMs), each region
described like a query by online aggregation (:mod:`cw_pipeline.core.online_aggregation`).
Its settings are :class:`~cw_pipeline.core.search_settings.RerankConfig`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.cams import heatmap_boxes, mean_cam
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.online_aggregation import online_descriptors
from cw_pipeline.core.search_settings import RerankConfig


def region_boxes(
    maps: FeatureMaps, class_ids: np.ndarray, weight: torch.Tensor, config: RerankConfig
) -> list[tuple[int, int, int, int]]:
    """Cell boxes of one image from the mean CAM of the query's first ``box_classes`` classes."""
    x, a = maps.tensors()
    heat = mean_cam(x, a, weight, class_ids[: config.box_classes])
    boxes = heatmap_boxes(heat, config.thresholds, min_cells=config.min_cells)
    uniq: list[tuple[int, int, int, int]] = []
    for b in boxes:
        if np.isnan(b).any():
            continue
        t = tuple(int(v) for v in b)
        if t not in uniq:
            uniq.append(t)
    return uniq


def rerank(
    query_descriptor: np.ndarray,
    query_classes: np.ndarray,
    ranking_indices: np.ndarray,
    load_maps: Callable[[int], FeatureMaps],
    weight: torch.Tensor,
    bias: torch.Tensor,
    pca: PCAWhitening | None,
    config: RerankConfig | None = None,
    top_r: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the top ``top_r`` (R) of one query by the best CAM-box region score.

    For each of the first R images: boxes from the heatmap of the query's top-2 classes; each
    region's descriptor is built like a query's (class vectors of the query's top
    ``query_classes`` on the region, l2 → PCAw → l2, sum, l2); the image's new score is its best
    region score (the whole image counts as a region too, so an image without usable boxes keeps
    a fair score). The top R are re-sorted by it; the rest keep their order.

    Returns the new ordering of ``ranking_indices`` and the new top-R scores.
    """
    config = config or RerankConfig()
    r = min(top_r, len(ranking_indices))
    maps = [load_maps(int(ranking_indices[j])) for j in range(r)]
    scores = rerank_scores(query_descriptor, query_classes, maps, weight, bias, pca, config)
    return rerank_order(ranking_indices, scores)


def rerank_scores(
    query_descriptor: np.ndarray,
    query_classes: np.ndarray,
    maps: Sequence[FeatureMaps],
    weight: torch.Tensor,
    bias: torch.Tensor,
    pca: PCAWhitening | None,
    config: RerankConfig | None = None,
) -> np.ndarray:
    """Each image's best CAM-box region score for one query (see :func:`rerank`).

    All regions of all images in one call: regions of equal shape share one batched product and
    one PCA product. An image's score is the same bit for bit whatever other images are scored
    with it (every product is per image or per row: :func:`~cw_pipeline.core.cams.
    batch_matmul`, :meth:`PCAWhitening.transform`), so a kept score equals a recomputed one.
    """
    config = config or RerankConfig()
    classes = np.asarray(query_classes)[: config.query_classes]
    q = np.asarray(query_descriptor, dtype=np.float32)
    region_maps: list[FeatureMaps] = []
    region_cells: list[Sequence[int] | None] = []
    owner: list[int] = []
    for j, m in enumerate(maps):
        cells: list[Sequence[int] | None] = [None, *region_boxes(m, classes, weight, config)]
        region_maps += [m] * len(cells)
        region_cells += cells
        owner += [j] * len(cells)
    scores = np.full(len(maps), -np.inf, dtype=np.float32)
    if len(maps):
        descs = online_descriptors(region_maps, classes, weight, bias, pca, cells=region_cells)
        np.maximum.at(scores, np.asarray(owner), _cosines(descs, q))
    return scores


def _cosines(descs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each row of ``descs`` dotted with ``q``, row by row: a matrix-vector product's rounding
    depends on the number of rows, and a region's score must not."""
    return (descs * np.asarray(q, dtype=np.float32)).sum(axis=1, dtype=np.float32)


def rerank_order(ranking_indices: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``len(scores)`` of a ranking re-sorted by ``scores`` (ties keep their order),
    the rest unchanged; returns the new ordering and the sorted head's scores."""
    r = len(scores)
    order = np.lexsort((np.arange(r), -scores))
    head = np.asarray(ranking_indices[:r])[order]
    return np.concatenate([head, np.asarray(ranking_indices[r:])]), scores[order]


def region_scores(
    query_descriptor: np.ndarray,
    query_classes: np.ndarray,
    maps: FeatureMaps,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pca: PCAWhitening | None,
    config: RerankConfig | None = None,
) -> list[tuple[tuple[int, int, int, int] | None, float]]:
    """The regions :func:`rerank` scores on one image, with their scores.

    Returns (cell box, or None for the whole image; cosine with ``query_descriptor``) for the
    whole image and each CAM box of the query's classes, in :func:`rerank`'s order; the
    image's re-ranked score is the largest of them.
    """
    config = config or RerankConfig()
    classes = np.asarray(query_classes)[: config.query_classes]
    cells: list[tuple[int, int, int, int] | None] = [
        None,
        *region_boxes(maps, classes, weight, config),
    ]
    descs = online_descriptors([maps] * len(cells), classes, weight, bias, pca, cells=cells)
    scores = _cosines(descs, query_descriptor)
    return [(c, float(s)) for c, s in zip(cells, scores, strict=True)]
