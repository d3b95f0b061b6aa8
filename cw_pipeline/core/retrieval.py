"""The one search path of the method: ranking, OnA, CAM-box re-ranking of the top R, then QE.

``cw-pipeline evaluate``, the rankings asset, ``cw-pipeline search``, the report figures and the
benchmarks all rank through :func:`search`. Feature maps (for OnA and re-ranking) come from a
:class:`MapSource`: maps held in memory (:class:`InMemoryMaps`) or recomputed on demand by a
batched forward pass (:class:`ComputedMaps`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cw_pipeline.core.aggregation import PCAWhitening, aggregate
from cw_pipeline.core.experiment import FeatureSet, SearchParams, offline_descriptors
from cw_pipeline.core.extract import FeatureExtractor, FeatureMaps
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search import (
    FullOrder,
    OnlineIndex,
    Ranking,
    expand_queries,
    rank,
    rerank,
)

logger = logging.getLogger(__name__)

__all__ = ["ComputedMaps", "InMemoryMaps", "MapCache", "MapSource", "SubsetMaps", "search"]


class MapSource(Protocol):
    """Feature maps of the database images (row ``i`` of the database) and the classifier."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __len__(self) -> int: ...

    def get(self, i: int) -> FeatureMaps: ...

    def prefetch(self, indices: Sequence[int]) -> None: ...


class InMemoryMaps:
    """Maps already held in memory (``FeatureSet.maps``)."""

    def __init__(self, maps: Sequence[FeatureMaps], weight: torch.Tensor, bias: torch.Tensor):
        self.maps = list(maps)
        self.weight, self.bias = weight, bias
        self.forward_passes = 0

    def __len__(self) -> int:
        return len(self.maps)

    def get(self, i: int) -> FeatureMaps:
        return self.maps[i]

    def prefetch(self, indices: Sequence[int]) -> None:
        """Nothing to compute."""


class MapCache:
    """Feature maps of database images kept across searches, least recently used dropped
    first once they hold more than ``max_bytes`` (a map larger than that is not kept).

    Keyed by image file: the owner drops it (``clear``) when the files or the extraction
    settings it was computed with may have changed.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Path, FeatureMaps] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: Path) -> FeatureMaps | None:
        maps = self._items.get(path)
        if maps is not None:
            self._items.move_to_end(path)
        return maps

    def put(self, path: Path, maps: FeatureMaps) -> None:
        old = self._items.pop(path, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if maps.nbytes > self.max_bytes:
            return
        self._items[path] = maps
        self.nbytes += maps.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


class ComputedMaps:
    """Maps recomputed by one forward pass per image on first use, then cached.

    Maps are not stored in the warehouse (about 2 MB per Oxford-size image). A shared
    :class:`MapCache` (``cache``) also keeps them across instances: a later search finds them
    there instead of running the network again (``forward_passes`` counts the passes run).
    """

    def __init__(
        self, extractor: FeatureExtractor, paths: Sequence[Path], cache: MapCache | None = None
    ):
        self.extractor = extractor
        self.paths = list(paths)
        self.shared = cache
        self._cache: dict[int, FeatureMaps] = {}
        self.forward_passes = 0
        bb = extractor.backbone
        self.weight, self.bias = bb.classifier_weight, bb.classifier_bias

    def __len__(self) -> int:
        return len(self.paths)

    def _from_shared(self, i: int) -> bool:
        found = None if self.shared is None else self.shared.get(Path(self.paths[i]))
        if found is not None:
            self._cache[i] = found
        return found is not None

    def _keep(self, i: int, maps: FeatureMaps) -> None:
        self._cache[i] = maps
        self.forward_passes += 1
        if self.shared is not None:
            self.shared.put(Path(self.paths[i]), maps)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Compute the maps of many images in batches (decode overlapped with the network)."""
        todo = sorted({int(i) for i in indices} - set(self._cache))
        todo = [i for i in todo if not self._from_shared(i)]
        if not todo:
            return
        keep = self.extractor.keep_maps
        self.extractor.keep_maps = True
        try:
            items = [(i, self.paths[i]) for i in todo]
            for i, rec in self.extractor.extract_files(items):
                self._keep(i, rec.maps)  # type: ignore[arg-type]
        finally:
            self.extractor.keep_maps = keep

    def get(self, i: int) -> FeatureMaps:
        if i not in self._cache and not self._from_shared(i):
            image, orig = self.extractor.load(self.paths[i])
            keep = self.extractor.keep_maps
            self.extractor.keep_maps = True
            try:
                rec = self.extractor.encode_batch([image], [orig])[0]
            finally:
                self.extractor.keep_maps = keep
            self._keep(i, rec.maps)  # type: ignore[arg-type]
        return self._cache[i]


class SubsetMaps:
    """A map source restricted to some of its rows (a self-split half, say)."""

    def __init__(self, maps: MapSource, rows: np.ndarray):
        self._maps, self._rows = maps, np.asarray(rows)
        self.weight, self.bias = maps.weight, maps.bias

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, i: int) -> FeatureMaps:
        return self._maps.get(int(self._rows[i]))

    def prefetch(self, indices: Sequence[int]) -> None:
        self._maps.prefetch([int(self._rows[i]) for i in indices])

    @property
    def forward_passes(self) -> int:
        return int(getattr(self._maps, "forward_passes", 0))


def search(
    method: Method,
    queries: FeatureSet,
    database: np.ndarray,
    pca: PCAWhitening | None,
    maps: MapSource | None,
    params: SearchParams,
    top_k: int | None = None,
    query_descriptors: np.ndarray | None = None,
    *,
    full_order: bool = False,
) -> Ranking:
    """Rank the database for every query with ``method`` (top ``top_k``; None: all of it).

    ``full_order`` also returns each query's order of the whole database
    (:attr:`Ranking.orders`, a :class:`~cw_pipeline.core.search.FullOrder`) without sorting
    it: the top ``top_k`` are the same, and its first ``top_k`` rows are these.

    ``database`` holds the stored (offline) descriptors of the method's aggregation
    (:attr:`Method.stored_aggregation`), ``pca`` the method's PCA (the registry's
    ``pca_space``: class vectors for OfA/OnA, sum-pooled vectors for raw+PCA).
    ``query_descriptors`` defaults to the queries' offline descriptors. OnA and re-ranking
    need ``maps`` for the database rows.

    Order of operations (the paper's): first ranking (OfA/raw, or OnA over the query's top
    N_C classes), CAM-box re-ranking of the top R whose scores are the best region scores, then
    query expansion with the top K of that (re-ranked) list.
    """
    if method.needs_maps and maps is None:
        raise ValueError(f"method {method.name!r} needs the database's feature maps")
    n_db = database.shape[0]
    top_k = n_db if top_k is None else min(int(top_k), n_db)
    q = (
        offline_descriptors(method, queries, pca, params)
        if query_descriptors is None
        else query_descriptors
    )
    if method.spec.online:
        return _search_online(method, queries, q, pca, maps, params, top_k, full_order)  # type: ignore[arg-type]
    depth = min(n_db, max(top_k, method.rerank, method.qe))
    res = rank(q, database, top_k=depth, full_order=full_order)
    return _rerank_expand(method, res, database, queries, pca, maps, params, top_k, full_order)


def _rerank_expand(
    method: Method,
    res: Ranking,
    database: np.ndarray,
    queries: FeatureSet,
    pca: PCAWhitening | None,
    maps: MapSource | None,
    params: SearchParams,
    top_k: int,
    full_order: bool = False,
) -> Ranking:
    """Re-rank the top R of a first ranking, then expand the queries with the top K."""
    if method.rerank:
        res = _rerank_all(res, queries, pca, maps, params, method)  # type: ignore[arg-type]
    if method.qe:
        expanded = expand_queries(database, res, method.qe)
        res = rank(expanded, database, top_k=top_k, full_order=full_order)
    # The orders keep the whole (re-ranked) head: truncating it to top_k would lose its order.
    return Ranking(res.indices[:, :top_k], res.scores[:, :top_k], res.orders)


def _rerank_all(
    res: Ranking,
    queries: FeatureSet,
    pca: PCAWhitening | None,
    maps: MapSource,
    params: SearchParams,
    method: Method,
) -> Ranking:
    """CAM-box re-ranking of each query's top R with the query's top
    ``rerank.query_classes`` classes (a setting of its own, not N_C, under OfA and OnA alike)."""
    cfg = params.rerank
    q_r = aggregate(queries.class_vectors, pca, cfg.query_classes)
    idx, scores = res.indices.copy(), res.scores.copy()
    maps.prefetch(np.unique(idx[:, : method.rerank]))
    for i in range(len(queries)):
        order, new = rerank(
            q_r[i],
            queries.class_ids[i],
            idx[i],
            maps.get,
            maps.weight,
            maps.bias,
            pca,
            cfg,
            top_r=method.rerank,
        )
        idx[i], scores[i, : len(new)] = order, new
    orders = None
    if res.orders is not None:  # the re-ranked head, then the rest by the first scores
        orders = [FullOrder(idx[i], scores[i], o.scores) for i, o in enumerate(res.orders)]
    return Ranking(idx, scores, orders)


def _search_online(
    method: Method,
    queries: FeatureSet,
    q: np.ndarray,
    pca: PCAWhitening | None,
    maps: MapSource,
    params: SearchParams,
    top_k: int,
    full_order: bool = False,
) -> Ranking:
    """OnA: per query, database descriptors aggregated over the query's top N_C classes."""
    n_c = params.aggregated_classes
    if n_c > queries.class_ids.shape[1]:
        raise ValueError(
            f"N_C = {n_c} classes aggregated, but the queries store "
            f"{queries.class_ids.shape[1]} classes per image"
        )
    maps.prefetch(range(len(maps)))
    all_maps = [maps.get(i) for i in range(len(maps))]
    index = OnlineIndex(all_maps, queries.class_ids[:, :n_c], maps.weight, maps.bias, pca)
    logger.info(
        "OnA index: %d images x %d classes, %.1f MB",
        len(all_maps),
        len(index.classes),
        index.nbytes / 1e6,
    )
    depth = min(len(all_maps), max(top_k, method.rerank, method.qe))
    out_idx, out_scores, orders = [], [], []
    for i in range(len(queries)):
        db = index.descriptors(queries.class_ids[i, :n_c])
        res = rank(q[i : i + 1], db, top_k=depth, full_order=full_order)
        res = _rerank_expand(
            method, res, db, queries.subset([i]), pca, maps, params, top_k, full_order
        )
        out_idx.append(res.indices[0])
        out_scores.append(res.scores[0])
        orders += res.orders or []
    return Ranking(np.stack(out_idx), np.stack(out_scores), orders if full_order else None)
