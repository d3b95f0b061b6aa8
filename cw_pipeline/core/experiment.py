"""End-to-end evaluation of one method: features → PCA → descriptors → search → scores.

The pieces the CLI and the Dagster assets share: a columnar ``FeatureSet`` of per-image records,
method strings such as ``ofa+r100+qe10``, PCA fitting on a *training* set, and ``run_search``
which returns full rankings for a set of queries.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cw_pipeline.core.aggregation import (
    PCAWhitening,
    aggregate,
    l2_normalize,
    pca_training_vectors,
    raw_descriptors,
)
from cw_pipeline.core.extract import FeatureMaps, ImageFeatures
from cw_pipeline.core.search import (
    OnlineIndex,
    Ranking,
    RerankConfig,
    expand_queries,
    rank,
    rerank,
)

Aggregation = Literal["raw", "raw+pca", "ofa", "ona"]
AGGREGATIONS: tuple[str, ...] = ("raw", "raw+pca", "ofa", "ona")
_METHOD_RE = re.compile(r"^(raw\+pca|raw|ofa|ona)((?:\+(?:qe|r)\d+)*)$")


@dataclass(frozen=True)
class Method:
    """A retrieval method: aggregation, optional CAM-box re-ranking of the top R, then QE.

    Parsed from strings such as ``raw``, ``raw+pca``, ``ofa``, ``ona+qe10``, ``ofa+r100+qe10``.
    """

    aggregation: Aggregation = "ofa"
    rerank: int = 0
    qe: int = 0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r} (expected one of {AGGREGATIONS})"
            )
        for name in ("rerank", "qe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Method:
        m = _METHOD_RE.match(text.strip().lower())
        if not m:
            raise ValueError(
                f"invalid method {text!r}: expected raw|raw+pca|ofa|ona, optionally followed by "
                "+r<R> and/or +qe<k> (e.g. ofa+r100+qe10)"
            )
        opts = dict(re.findall(r"\+(qe|r)(\d+)", m.group(2)))
        return cls(aggregation=m.group(1), rerank=int(opts.get("r", 0)), qe=int(opts.get("qe", 0)))

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        parts = [self.aggregation]
        if self.rerank:
            parts.append(f"r{self.rerank}")
        if self.qe:
            parts.append(f"qe{self.qe}")
        return "+".join(parts)

    @property
    def uses_pca(self) -> bool:
        return self.aggregation != "raw"

    @property
    def needs_maps(self) -> bool:
        return self.aggregation == "ona" or self.rerank > 0


@dataclass(frozen=True)
class SearchParams:
    """Aggregation settings: N_C classes aggregated, N_pca vectors per image for PCA, dims."""

    n_classes: int = 64
    n_pca: int = 1
    pca_dims: int | None = None
    rerank: RerankConfig = field(default_factory=RerankConfig)


@dataclass
class FeatureSet:
    """Per-image records of a set of images, stacked column-wise."""

    ids: list[str]
    class_ids: np.ndarray  # n × N_C
    class_probs: np.ndarray  # n × N_C
    class_vectors: np.ndarray  # n × N_C × K
    sum_pooled: np.ndarray  # n × K
    boxes: np.ndarray  # n × T × 4
    maps: list[FeatureMaps] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(cls, ids: Sequence[str], records: Sequence[ImageFeatures]) -> FeatureSet:
        if len(ids) != len(records):
            raise ValueError(f"{len(ids)} ids for {len(records)} records")
        if not records:
            raise ValueError("an empty set of images has no features")
        has_maps = all(r.maps is not None for r in records)
        return cls(
            ids=list(ids),
            class_ids=np.stack([r.class_ids for r in records]),
            class_probs=np.stack([r.class_probs for r in records]),
            class_vectors=np.stack([r.class_vectors for r in records]),
            sum_pooled=np.stack([r.sum_pooled for r in records]),
            boxes=np.stack([r.boxes for r in records]),
            maps=[r.maps for r in records] if has_maps else None,
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        idx = np.asarray(indices, dtype=np.int64)
        return FeatureSet(
            ids=[self.ids[i] for i in idx],
            class_ids=self.class_ids[idx],
            class_probs=self.class_probs[idx],
            class_vectors=self.class_vectors[idx],
            sum_pooled=self.sum_pooled[idx],
            boxes=self.boxes[idx],
            maps=None if self.maps is None else [self.maps[i] for i in idx],
        )

    @staticmethod
    def concat(sets: Sequence[FeatureSet]) -> FeatureSet:
        keep_maps = all(s.maps is not None for s in sets)
        return FeatureSet(
            ids=[i for s in sets for i in s.ids],
            class_ids=np.concatenate([s.class_ids for s in sets]),
            class_probs=np.concatenate([s.class_probs for s in sets]),
            class_vectors=np.concatenate([s.class_vectors for s in sets]),
            sum_pooled=np.concatenate([s.sum_pooled for s in sets]),
            boxes=np.concatenate([s.boxes for s in sets]),
            maps=[m for s in sets for m in s.maps] if keep_maps else None,  # type: ignore[union-attr]
        )


def fit_pca(
    method: Method,
    train: FeatureSet,
    params: SearchParams,
    metadata: dict | None = None,
) -> PCAWhitening | None:
    """PCA-whitening for a method, fitted on a training set (never the evaluated images)."""
    if not method.uses_pca:
        return None
    meta = {"n_pca": params.n_pca, "training_images": len(train), **(metadata or {})}
    if method.aggregation == "raw+pca":
        meta["vectors"] = "sum_pooled"
        return PCAWhitening.fit(l2_normalize(train.sum_pooled), params.pca_dims, metadata=meta)
    meta["vectors"] = "class_vectors"
    vecs = pca_training_vectors(train.class_vectors, params.n_pca)
    return PCAWhitening.fit(vecs, params.pca_dims, metadata=meta)


def offline_descriptors(
    method: Method, features: FeatureSet, pca: PCAWhitening | None, params: SearchParams
) -> np.ndarray:
    """Descriptors stored at indexing time: raw (± PCA) or OfA."""
    if method.aggregation in ("raw", "raw+pca"):
        return raw_descriptors(features.sum_pooled, pca)
    n_c = min(params.n_classes, features.class_vectors.shape[1])
    return aggregate(features.class_vectors, pca, n_c)


@dataclass
class SearchResult:
    """Full rankings (n_q × n_db, best first) and their scores."""

    rankings: np.ndarray
    scores: np.ndarray


def run_search(
    method: Method,
    database: FeatureSet,
    queries: FeatureSet,
    pca: PCAWhitening | None,
    params: SearchParams,
    classifier: tuple[torch.Tensor, torch.Tensor] | None = None,
    db_descriptors: np.ndarray | None = None,
) -> SearchResult:
    """Rank the whole database for every query with ``method``.

    OnA and re-ranking need the database's stored maps and the classifier ``(weight, bias)``.
    """
    if method.needs_maps and (database.maps is None or classifier is None):
        raise ValueError(f"method {method.name!r} needs stored feature maps and the classifier")
    n_db = len(database)
    n_c = min(params.n_classes, queries.class_vectors.shape[1])
    if method.aggregation == "ona":
        return _run_online(method, database, queries, pca, params, classifier, n_c)
    db = (
        db_descriptors
        if db_descriptors is not None
        else offline_descriptors(method, database, pca, params)
    )
    q = offline_descriptors(method, queries, pca, params)
    result = rank(q, db)
    indices, scores = result.indices, result.scores
    if method.rerank:
        weight, bias = classifier  # type: ignore[misc]
        n_r = min(params.rerank.n_classes, queries.class_ids.shape[1])
        q_r = aggregate(queries.class_vectors, pca, n_r)
        for i in range(len(queries)):
            order, _ = rerank(
                q_r[i],
                queries.class_ids[i],
                indices[i],
                database.maps.__getitem__,  # type: ignore[union-attr]
                weight,
                bias,
                pca,
                _rerank_cfg(params, method),
            )
            indices[i] = order
    if method.qe:
        expanded = expand_queries(db, Ranking(indices, scores), method.qe)
        result = rank(expanded, db)
        indices, scores = result.indices, result.scores
    else:
        scores = np.take_along_axis(q @ db.T, indices, axis=1)
    assert indices.shape == (len(queries), n_db)
    return SearchResult(indices, scores)


def _rerank_cfg(params: SearchParams, method: Method) -> RerankConfig:
    """The search's re-ranking settings with the method's R."""
    return dataclasses.replace(params.rerank, top_r=method.rerank)


def _run_online(
    method: Method,
    database: FeatureSet,
    queries: FeatureSet,
    pca: PCAWhitening | None,
    params: SearchParams,
    classifier: tuple[torch.Tensor, torch.Tensor] | None,
    n_c: int,
) -> SearchResult:
    weight, bias = classifier  # type: ignore[misc]
    q = aggregate(queries.class_vectors, pca, n_c)
    index = OnlineIndex(database.maps, queries.class_ids[:, :n_c], weight, bias, pca)  # type: ignore[arg-type]
    all_idx, all_scores = [], []
    for i in range(len(queries)):
        classes = queries.class_ids[i, :n_c]
        db = index.descriptors(classes)
        res = rank(q[i : i + 1], db)
        idx = res.indices[0]
        if method.rerank:
            n_r = min(params.rerank.n_classes, n_c)
            q_r = aggregate(queries.class_vectors[i : i + 1], pca, n_r)[0]
            idx, _ = rerank(
                q_r,
                classes,
                idx,
                database.maps.__getitem__,  # type: ignore[union-attr]
                weight,
                bias,
                pca,
                _rerank_cfg(params, method),
            )
        if method.qe:
            exp = expand_queries(db, Ranking(idx[None], res.scores), method.qe)
            res = rank(exp, db)
            idx = res.indices[0]
        all_idx.append(idx)
        all_scores.append((q[i] @ db.T)[idx] if not method.qe else res.scores[0])
    return SearchResult(np.stack(all_idx), np.stack(all_scores))
