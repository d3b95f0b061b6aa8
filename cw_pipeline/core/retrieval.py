"""The one search path of the method: ranking, OnA, CAM-box re-ranking of the top R, then QE.

``cw-pipeline evaluate``, the rankings asset, ``cw-pipeline search``, the report figures and the
benchmarks all rank through :func:`search`. Feature maps (for OnA and re-ranking) come from a
:class:`MapSource`: maps held in memory (:class:`InMemoryMaps`) or computed on demand by a
batched forward pass (:class:`ComputedMaps`), which first looks for them in a :class:`MapStore`
(maps kept by image content, so that no image content gets a second forward pass).

A :class:`PairCache` keeps what OnA and re-ranking compute per (query, image) pair: the best
CAM-box region score and the OnA descriptor. A search given one computes only the pairs it has
not seen (a new or changed image, an image new to a query's top R, a new query), and reuses the
others bit for bit: each value is keyed by everything it is a function of (see
:func:`pair_context`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cw_pipeline.core.aggregation import PCAWhitening, aggregate
from cw_pipeline.core.extract import FeatureExtractor, FeatureMaps
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.lru import ByteLRU
from cw_pipeline.core.methods import Method, offline_descriptors
from cw_pipeline.core.online_aggregation import OnlineIndex
from cw_pipeline.core.ranking import FullOrder, Ranking, expand_queries, rank
from cw_pipeline.core.reranking import rerank_order, rerank_scores
from cw_pipeline.core.search_settings import SearchParams

logger = logging.getLogger(__name__)

__all__ = [
    "ComputedMaps",
    "InMemoryMaps",
    "MapCache",
    "MapSource",
    "MapStore",
    "PairCache",
    "SubsetMaps",
    "pair_context",
    "search",
]


class MapSource(Protocol):
    """Feature maps of the database images (row ``i`` of the database) and the classifier."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __len__(self) -> int: ...

    def get(self, i: int) -> FeatureMaps: ...

    def prefetch(self, indices: Sequence[int]) -> None: ...


class MapStore(Protocol):
    """Feature maps kept by content key (an image's sha1 under one extraction's settings)."""

    def get(self, key: str) -> FeatureMaps | None: ...

    def put(self, key: str, maps: FeatureMaps) -> None: ...


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


class MapCache(ByteLRU[Path, FeatureMaps]):
    """Feature maps of database images kept across searches, least recently used dropped
    first once they hold more than ``max_bytes`` (a map larger than that is not kept).

    Keyed by image file: the owner drops it (``clear``) when the files or the extraction
    settings it was computed with may have changed. Safe to share between threads (searches
    running at once).
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda maps: maps.nbytes)


class ComputedMaps:
    """Maps computed by one forward pass per image on first use, then cached.

    Looked up first in memory, then in the shared :class:`MapCache` (``cache``: kept across
    instances, by file), then in the :class:`MapStore` (``store``, by ``keys[i]``: the image's
    content); only then computed, and put in both. ``forward_passes`` counts the passes run,
    ``stored_reused`` the maps the store gave.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        paths: Sequence[Path],
        cache: MapCache | None = None,
        *,
        keys: Sequence[str] | None = None,
        store: MapStore | None = None,
    ):
        if keys is not None and len(keys) != len(paths):
            raise ValueError(f"{len(keys)} content keys for {len(paths)} images")
        self.extractor = extractor
        self.paths = list(paths)
        self.keys = None if keys is None else list(keys)
        self.shared = cache
        self.store = store if keys is not None else None
        self._cache: dict[int, FeatureMaps] = {}
        self.forward_passes = 0
        self.stored_reused = 0
        bb = extractor.backbone
        self.weight, self.bias = bb.classifier_weight, bb.classifier_bias

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str | None:
        """The content key of row ``i`` (None: unknown, its pairs are not cached)."""
        return None if self.keys is None else self.keys[i]

    def _from_shared(self, i: int) -> bool:
        found = None if self.shared is None else self.shared.get(Path(self.paths[i]))
        if found is None and self.store is not None:
            found = self.store.get(self.keys[i])  # type: ignore[index]
            if found is not None:
                self.stored_reused += 1
                if self.shared is not None:
                    self.shared.put(Path(self.paths[i]), found)
        if found is not None:
            self._cache[i] = found
        return found is not None

    def _keep(self, i: int, maps: FeatureMaps) -> None:
        self._cache[i] = maps
        self.forward_passes += 1
        if self.shared is not None:
            self.shared.put(Path(self.paths[i]), maps)
        if self.store is not None:
            self.store.put(self.keys[i], maps)  # type: ignore[index]

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

    def key(self, i: int) -> str | None:
        return map_key(self._maps, int(self._rows[i]))

    @property
    def forward_passes(self) -> int:
        return int(getattr(self._maps, "forward_passes", 0))


def map_key(maps: MapSource, i: int) -> str | None:
    """The content key of a map source's row ``i``, when it has one."""
    key = getattr(maps, "key", None)
    return None if key is None else key(i)


# --------------------------------------------------------------------------- pair cache


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


_PCA_DIGESTS: dict[int, tuple[PCAWhitening, str]] = {}


def _pca_digest(pca: PCAWhitening | None) -> str:
    if pca is None:
        return "none"
    hit = _PCA_DIGESTS.get(id(pca))
    if hit is None or hit[0] is not pca:
        hit = (pca, _digest(pca.npz_bytes()))
        _PCA_DIGESTS[id(pca)] = hit
    return hit[1]


def pair_context(
    kind: str, pca: PCAWhitening | None, params: SearchParams, extraction: str, extra: str = ""
) -> str:
    """The key of everything a pair value of ``kind`` depends on besides the query and the
    image: the PCA model (its arrays), the search settings, the extraction's code version
    (which computed the maps) and ``extra`` (OnA: the classes the index encodes together)."""
    settings = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return _digest(kind, _pca_digest(pca), settings, extraction, extra)


@dataclass
class PairCache:
    """Values of (query, image) pairs, by (context, query key, image key).

    ``region`` holds best CAM-box region scores (re-ranking), ``ona`` OnA descriptors. The
    counters say how many were computed and how many reused in this search; ``touched``
    lists every entry read or written (an owner keeps those and drops the rest).
    """

    extraction: str = ""
    region: dict[tuple[str, str, str], float] = field(default_factory=dict)
    ona: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=lambda: {"region": 0, "ona": 0})
    reused: dict[str, int] = field(default_factory=lambda: {"region": 0, "ona": 0})
    touched: dict[str, set] = field(default_factory=lambda: {"region": set(), "ona": set()})

    def lookup(self, kind: str, key: tuple[str, str, str]):
        table = self.region if kind == "region" else self.ona
        value = table.get(key)
        if value is not None:
            self.reused[kind] += 1
            self.touched[kind].add(key)
        return value

    def store(self, kind: str, key: tuple[str, str, str], value) -> None:
        (self.region if kind == "region" else self.ona)[key] = value
        self.computed[kind] += 1
        self.touched[kind].add(key)

    def statistics(self) -> dict[str, int]:
        """Computed and reused counts: region scores and OnA descriptors."""
        return {
            "region_scores_computed": self.computed["region"],
            "region_scores_reused": self.reused["region"],
            "ona_descriptors_computed": self.computed["ona"],
            "ona_descriptors_reused": self.reused["ona"],
        }


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
    pairs: PairCache | None = None,
) -> Ranking:
    """Rank the database for every query with ``method`` (top ``top_k``; None: all of it).

    ``pairs`` keeps the region scores and OnA descriptors of (query, image) pairs whose image
    has a content key (:meth:`ComputedMaps.key`): those it holds are not computed again.

    ``full_order`` also returns each query's order of the whole database
    (:attr:`Ranking.orders`, a :class:`~cw_pipeline.core.ranking.FullOrder`) without sorting
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
        return _search_online(method, queries, q, pca, maps, params, top_k, full_order, pairs)  # type: ignore[arg-type]
    depth = min(n_db, max(top_k, method.rerank, method.qe))
    res = rank(q, database, top_k=depth, full_order=full_order)
    return _rerank_expand(
        method, res, database, queries, pca, maps, params, top_k, full_order, pairs
    )


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
    pairs: PairCache | None = None,
) -> Ranking:
    """Re-rank the top R of a first ranking, then expand the queries with the top K."""
    if method.rerank:
        res = _rerank_all(res, queries, pca, maps, params, method, pairs)  # type: ignore[arg-type]
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
    pairs: PairCache | None = None,
) -> Ranking:
    """CAM-box re-ranking of each query's top R with the query's top
    ``rerank.query_classes`` classes (a setting of its own, not N_C, under OfA and OnA alike).

    With ``pairs``, a (query, image) pair's best region score is computed once: the key is the
    query's re-ranking descriptor and classes, the image's content key, and the context (PCA,
    settings, extraction)."""
    cfg = params.rerank
    q_r = aggregate(queries.class_vectors, pca, cfg.query_classes)
    idx, scores = res.indices.copy(), res.scores.copy()
    r = min(method.rerank, idx.shape[1])
    ctx = "" if pairs is None else pair_context("region", pca, params, pairs.extraction)
    known: list[dict[int, float]] = []
    qkeys: list[str] = []
    todo: set[int] = set()
    for i in range(len(queries)):
        classes = np.asarray(queries.class_ids[i][: cfg.query_classes], dtype=np.int64)
        qkeys.append(_digest(q_r[i].tobytes(), classes.tobytes()))
        found: dict[int, float] = {}
        for j in idx[i, :r]:
            ikey = None if pairs is None else map_key(maps, int(j))
            value = None if ikey is None else pairs.lookup("region", (ctx, qkeys[i], ikey))  # type: ignore[union-attr]
            if value is None:
                todo.add(int(j))
            else:
                found[int(j)] = float(value)
        known.append(found)
    maps.prefetch(sorted(todo))
    for i in range(len(queries)):
        head = [int(j) for j in idx[i, :r]]
        missing = [j for j in head if j not in known[i]]
        new = rerank_scores(
            q_r[i],
            queries.class_ids[i],
            [maps.get(j) for j in missing],
            maps.weight,
            maps.bias,
            pca,
            cfg,
        )
        for j, value in zip(missing, new, strict=True):
            known[i][j] = float(value)
            ikey = None if pairs is None else map_key(maps, j)
            if ikey is not None:
                pairs.store("region", (ctx, qkeys[i], ikey), float(value))  # type: ignore[union-attr]
        head_scores = np.array([known[i][j] for j in head], dtype=np.float32)
        order, new_scores = rerank_order(idx[i], head_scores)
        idx[i], scores[i, : len(new_scores)] = order, new_scores
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
    pairs: PairCache | None = None,
) -> Ranking:
    """OnA: per query, database descriptors aggregated over the query's top N_C classes.

    With ``pairs``, an image's OnA descriptors are computed only when some query has none
    kept for it; the context includes the union of the queries' classes (the classes encoded
    together), so a kept descriptor is the one this search would compute."""
    n_c = params.aggregated_classes
    if n_c > queries.class_ids.shape[1]:
        raise ValueError(
            f"N_C = {n_c} classes aggregated, but the queries store "
            f"{queries.class_ids.shape[1]} classes per image"
        )
    n = len(maps)
    class_ids = np.asarray(queries.class_ids[:, :n_c], dtype=np.int64)
    union = np.unique(class_ids)
    qkeys = [_digest(row.tobytes()) for row in class_ids]
    keys = [None if pairs is None else map_key(maps, j) for j in range(n)]
    ctx = ""
    if pairs is not None:
        ctx = pair_context("ona", pca, params, pairs.extraction, union.tobytes().hex())
    distinct = set(qkeys)
    need = [
        j
        for j in range(n)
        if keys[j] is None or any((ctx, qk, keys[j]) not in pairs.ona for qk in distinct)  # type: ignore[union-attr]
    ]
    maps.prefetch(need)
    index = None
    if need:
        need_maps = [maps.get(j) for j in need]
        # A descriptor depends on its image, the classes and the PCA only (batch-invariant
        # products), so a kept one equals a recomputed one bit for bit.
        index = OnlineIndex(need_maps, union, maps.weight, maps.bias, pca)
        logger.info(
            "OnA index: %d of %d images x %d classes, %.1f MB",
            len(need),
            n,
            len(index.classes),
            index.nbytes / 1e6,
        )
        del need_maps
    need_set = set(need)
    reuse = [j for j in range(n) if j not in need_set]
    depth = min(n, max(top_k, method.rerank, method.qe))
    out_idx, out_scores, orders = [], [], []
    for i in range(len(queries)):
        parts = []
        if index is not None:
            fresh = index.descriptors(class_ids[i])
            if pairs is not None:
                for row, j in enumerate(need):
                    if keys[j] is not None:
                        pairs.store("ona", (ctx, qkeys[i], keys[j]), fresh[row])
            parts.append((need, fresh))
        if reuse:
            kept = np.stack([pairs.lookup("ona", (ctx, qkeys[i], keys[j])) for j in reuse])  # type: ignore[union-attr]
            parts.append((reuse, kept))
        dim = parts[0][1].shape[1]
        db = np.empty((n, dim), dtype=np.float32)
        for rows, values in parts:
            db[rows] = values
        res = rank(q[i : i + 1], db, top_k=depth, full_order=full_order)
        res = _rerank_expand(
            method, res, db, queries.subset([i]), pca, maps, params, top_k, full_order, pairs
        )
        out_idx.append(res.indices[0])
        out_scores.append(res.scores[0])
        orders += res.orders or []
    return Ranking(np.stack(out_idx), np.stack(out_scores), orders if full_order else None)
