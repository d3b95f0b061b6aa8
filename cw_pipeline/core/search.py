"""Search: cosine ranking, query expansion, online aggregation and CAM-box re-ranking.

Descriptors are l2-normalised, so cosine similarity is a matrix product. Top-k uses
``argpartition`` and a stable order on ties (higher score first, then lower database index), so
the same inputs always give the same ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from cw_pipeline.core.aggregation import PCAWhitening, l2_normalize
from cw_pipeline.core.cams import BOX_THRESHOLDS, heatmap_boxes, mean_cam
from cw_pipeline.core.extract import FeatureMaps, crop_cells, encode_maps
from cw_pipeline.core.validation import Settings, bounded_int


@dataclass
class FullOrder:
    """One query's order of the whole database, kept without sorting all of it.

    The order is ``head`` (database rows, best first, scored ``head_scores``) followed by every
    other row by descending ``scores``, then ascending row on ties: what ``rank`` with
    ``top_k=None`` lists, after any re-ranking of the head. ``positions`` finds where given
    rows stand in O(n_db) vectorised work, so a query's AP needs no sort of the database.
    """

    head: np.ndarray  #: (h,) database rows, best first
    head_scores: np.ndarray  #: (h,) their scores (re-ranking's region scores for its top R)
    scores: np.ndarray  #: (n_db,) every row's score under the ranking that orders the rest

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def row_scores(self) -> np.ndarray:
        """Every row's score as the full ranking lists it (the head's own scores)."""
        out = np.array(self.scores, dtype=np.float32)
        out[self.head] = self.head_scores
        return out

    def positions(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """0-based positions of database ``rows`` in the order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty(rows.shape, dtype=np.int64)
        head = np.asarray(self.head, dtype=np.int64)
        in_head = np.zeros(rows.shape, dtype=bool)
        if head.size:
            sorter = np.argsort(head)
            at = np.minimum(np.searchsorted(head, rows, sorter=sorter), head.size - 1)
            in_head = head[sorter[at]] == rows
            out[in_head] = sorter[at[in_head]]
        rest = rows[~in_head]
        if rest.size:
            keys = self.scores
            if head.size:  # every head row stands before every other row
                keys = np.array(keys, dtype=np.float32)
                keys[head] = np.inf
            out[~in_head] = order_positions(keys, rest)
        return out

    def ranking(self) -> np.ndarray:
        """The whole order as an array of rows (a sort of the database)."""
        n = len(self)
        rest = np.setdiff1d(np.arange(n), self.head, assume_unique=True)
        rest = rest[np.argsort(-np.asarray(self.scores)[rest], kind="stable")]
        return np.concatenate([np.asarray(self.head, dtype=np.int64), rest])


def order_positions(scores: np.ndarray, rows: np.ndarray | Sequence[int]) -> np.ndarray:
    """0-based positions of ``rows`` when all rows are sorted by descending ``scores`` (1-D),
    ascending row on ties (``rank``'s order), without that sort.

    A position is the number of rows with a higher score plus those with an equal score and a
    lower index. The counts come from the sorted scores alone (a values-only sort, several
    times faster than the stable argsort a ranking needs); rows that tie exactly are looked at
    only when there are any.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    t = np.asarray(rows, dtype=np.int64).reshape(-1)
    n = s.shape[0]
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"rows must be in 0..{n - 1}, got {t.min()}..{t.max()}")
    if np.isnan(s).any():
        raise ValueError("similarity scores contain NaN (descriptors with NaN or infinity?)")
    if t.size == 0:
        return np.empty(0, dtype=np.int64)
    values, which = np.unique(s[t], return_inverse=True)
    ascending = np.sort(s)
    upper = np.searchsorted(ascending, values, side="right")
    above = n - upper  # rows scoring higher than each value
    shared = np.flatnonzero(upper - np.searchsorted(ascending, values, side="left") > 1)
    before = np.zeros(t.size, dtype=np.int64)
    if shared.size:  # exact ties: count the tied rows of lower index
        tied = np.flatnonzero(np.isin(s, values[shared]))
        keys = np.sort(np.searchsorted(values, s[tied]).astype(np.int64) * n + tied)
        group = which.astype(np.int64) * n
        before = np.searchsorted(keys, group + t) - np.searchsorted(keys, group)
    return above[which] + before


@dataclass
class Ranking:
    """Top-k database indices (n_q × k, best first) and their scores.

    ``orders`` (when asked for) holds each query's order of the whole database.
    """

    indices: np.ndarray
    scores: np.ndarray
    orders: list[FullOrder] | None = None


def _check_dims(queries: np.ndarray, database: np.ndarray) -> None:
    if queries.ndim != 2 or database.ndim != 2:
        raise ValueError(
            f"queries and database must be 2-D, got {queries.shape} and {database.shape}"
        )
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"query dimension {queries.shape[1]} != database dimension {database.shape[1]}"
        )
    if database.shape[0] == 0:
        raise ValueError("the database is empty")


def stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row: descending score, ascending index on ties.

    Candidates come from ``torch.topk`` (2-3x faster than ``np.argpartition`` here) and are
    ordered by a stable sort; rows where more than k scores tie with the k-th are redone exactly.
    """
    if np.isnan(scores).any():
        raise ValueError("similarity scores contain NaN (descriptors with NaN or infinity?)")
    n = scores.shape[1]
    if k >= n:
        # A stable sort of the negated scores keeps ascending indices within ties.
        return np.argsort(-scores, axis=1, kind="stable")
    vals, cand = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1, sorted=False)
    cand, vals = cand.numpy(), vals.numpy()
    by_index = np.argsort(cand, axis=1)
    cand = np.take_along_axis(cand, by_index, axis=1)
    vals = np.take_along_axis(vals, by_index, axis=1)
    out = np.take_along_axis(cand, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    kth = vals.min(axis=1, keepdims=True)
    for i in np.flatnonzero((scores >= kth).sum(axis=1) > k):  # ties across the cut-off
        tied = np.flatnonzero(scores[i] >= kth[i])
        out[i] = tied[np.lexsort((tied, -scores[i, tied]))[:k]]
    return out.astype(np.int64, copy=False)


def rank(
    queries: np.ndarray,
    database: np.ndarray,
    top_k: int | None = None,
    *,
    full_order: bool = False,
) -> Ranking:
    """Cosine ranking of l2-normalised descriptors; ``top_k`` None ranks the whole database.

    ``full_order`` also keeps each query's order of the whole database (``Ranking.orders``:
    the top k, then the other rows by score) without sorting it.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    database = np.asarray(database, dtype=np.float32)
    _check_dims(queries, database)
    scores = queries @ database.T
    k = database.shape[0] if top_k is None else min(int(top_k), database.shape[0])
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    idx = stable_top(scores, k)
    top = np.take_along_axis(scores, idx, axis=1)
    orders = [FullOrder(idx[i], top[i], scores[i]) for i in range(len(idx))] if full_order else None
    return Ranking(indices=idx, scores=top, orders=orders)


def expand_queries(database: np.ndarray, ranking: Ranking, k: int) -> np.ndarray:
    """Query expansion as the paper: the new query is l2(Σ of the top-k database descriptors)."""
    if k < 1:
        raise ValueError(f"query expansion needs k >= 1, got {k}")
    top = ranking.indices[:, :k]
    return l2_normalize(np.asarray(database, dtype=np.float32)[top].sum(axis=1))


# --------------------------------------------------------------------------- online aggregation


def online_descriptors(
    maps: Sequence[FeatureMaps],
    class_ids: np.ndarray,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pca: PCAWhitening | None,
    cells: Sequence[Sequence[int] | None] | None = None,
) -> np.ndarray:
    """OnA: descriptors of database images aggregated over the *query's* classes.

    Each image's class vectors are computed from its stored maps (X, A) for ``class_ids``, then
    l2 → PCA-whitening → l2, summed and l2-normalised. ``cells`` optionally restricts each image
    to a region (re-ranking boxes). Maps of equal shape are encoded together in one einsum.
    """
    # A copy: class ids read from Parquet are read-only arrays, which torch warns about.
    ids = torch.from_numpy(np.array(class_ids, dtype=np.int64))
    groups: dict[tuple, list[int]] = {}
    crops: list[tuple[torch.Tensor, torch.Tensor]] = []
    full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one float32 copy per distinct map
    for i, m in enumerate(maps):
        if id(m) not in full:
            full[id(m)] = m.tensors()
        x, a = full[id(m)]
        if cells is not None and cells[i] is not None:
            x, a = crop_cells(x, cells[i]), crop_cells(a, cells[i])
        crops.append((x, a))
        groups.setdefault((tuple(x.shape), tuple(a.shape)), []).append(i)
    k = maps[0].features.shape[0] if maps else 0
    vecs = np.zeros((len(maps), len(ids), k), dtype=np.float32)
    for members in groups.values():
        x = torch.cat([crops[i][0] for i in members])
        a = torch.cat([crops[i][1] for i in members])
        with torch.inference_mode():
            _, _, cv = encode_maps(x, a, weight, bias, n_classes=len(ids), class_ids=ids)
        vecs[members] = cv.numpy()
    # One PCA product for all regions (not one per shape group): most of re-ranking's time.
    per_class = pca(vecs, row_invariant=True) if pca is not None else l2_normalize(vecs)
    return l2_normalize(per_class.sum(axis=1))


class OnlineIndex:
    """Online aggregation over a fixed database: per-image, per-class PCA-whitened vectors.

    For every database image and every class in ``classes`` (the union of the classes that
    queries may ask for; all 1000 at most) it keeps l2(PCAw(l2(f_c))), so each query's OnA
    descriptors are a sum of rows plus one l2 — no forward pass and no PCA at search time.
    Memory: n_db × |classes| × d × 4 bytes (``nbytes``); the paper's reason to offer OnA only
    without distractors.
    """

    def __init__(
        self,
        maps: Sequence[FeatureMaps],
        classes: np.ndarray,
        weight: torch.Tensor,
        bias: torch.Tensor,
        pca: PCAWhitening | None,
        chunk: int = 32,
    ):
        self.classes = np.unique(np.asarray(classes, dtype=np.int64))
        self._pos = {int(c): i for i, c in enumerate(self.classes)}
        ids = torch.as_tensor(self.classes)
        dim = pca.output_dim if pca is not None else (maps[0].features.shape[0] if maps else 0)
        self.vectors = np.zeros((len(maps), len(self.classes), dim), dtype=np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(maps):
            groups.setdefault(
                (m.features.shape, None if m.cam_maps is None else m.cam_maps.shape), []
            ).append(i)
        for members in groups.values():
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                xs, as_ = zip(*(maps[i].tensors() for i in part), strict=True)
                with torch.inference_mode():
                    _, _, cv = encode_maps(
                        torch.cat(xs),
                        torch.cat(as_),
                        weight,
                        bias,
                        n_classes=len(ids),
                        class_ids=ids,
                    )
                vecs = cv.numpy()
                self.vectors[part] = (
                    pca(vecs, row_invariant=True) if pca is not None else l2_normalize(vecs)
                )

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes)

    def descriptors(self, class_ids: np.ndarray) -> np.ndarray:
        """OnA database descriptors (n_db × d) for one query's classes."""
        try:
            pos = [self._pos[int(c)] for c in np.asarray(class_ids)]
        except KeyError as exc:
            raise ValueError(f"class {exc.args[0]} is not in this online index") from None
        return l2_normalize(self.vectors[:, pos].sum(axis=1))


# --------------------------------------------------------------------------- re-ranking


class RerankConfig(Settings):
    """CAM-box re-ranking settings (the paper's Sec. 4.3 / NOTES.md); how many results are
    re-ranked (R) is part of the method string (``ofa+r100``).

    Attributes:
        query_classes: the query's top classes whose CAMs are computed on each image and
            aggregated into each region's descriptor (the code used 6).
        box_classes: how many of them are averaged into the heatmap (2).
        thresholds: fractions of the heatmap maximum giving one box each.
        min_cells: boxes of fewer feature-map cells are skipped.
    """

    query_classes: bounded_int(1, 1000) = 6  # type: ignore[valid-type]
    box_classes: bounded_int(1) = 2  # type: ignore[valid-type]
    thresholds: tuple[float, ...] = Field(default=BOX_THRESHOLDS, strict=False)
    min_cells: bounded_int(1) = 5  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _boxes_within_query_classes(self) -> RerankConfig:
        if self.box_classes > self.query_classes:
            raise ValueError(
                f"box_classes must be in 1..query_classes ({self.query_classes}), "
                f"got {self.box_classes}"
            )
        return self


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
