"""End-to-end evaluation of one method: features → PCA → descriptors → search → scores.

The pieces the CLI and the Dagster assets share: a columnar ``FeatureSet`` of per-image records,
method strings such as ``ofa+r100+qe10``, PCA fitting on a *training* set and the offline
descriptors; the search itself is :func:`cw_pipeline.core.retrieval.search`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cw_pipeline.core.aggregation import (
    PCAWhitening,
    aggregate,
    l2_normalize,
    pca_training_vectors,
    raw_descriptors,
)
from cw_pipeline.core.extract import FeatureMaps, ImageFeatures
from cw_pipeline.core.search import RerankConfig

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
    def stored_aggregation(self) -> str:
        """The offline descriptors the method ranks (OnA: the OfA query descriptor; its
        database descriptors are aggregated online from the maps)."""
        return "ofa" if self.aggregation == "ona" else self.aggregation

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
