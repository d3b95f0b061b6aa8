"""End-to-end evaluation of one method: features → PCA → descriptors → search → scores.

The pieces the CLI and the Dagster assets share: a columnar ``FeatureSet`` of per-image records,
the search settings, PCA fitting on a *training* set and the offline descriptors, both through
the aggregation registry (:mod:`cw_pipeline.core.methods`, which also parses method strings
such as ``ofa+r100+qe10``); the search itself is :func:`cw_pipeline.core.retrieval.search`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.extract import ExtractionConfig, FeatureMaps, ImageFeatures
from cw_pipeline.core.methods import PCA_SPACES, Method
from cw_pipeline.core.search import RerankConfig
from cw_pipeline.core.validation import Settings, bounded_int

__all__ = [
    "FeatureSet",
    "Method",
    "SearchParams",
    "fit_pca",
    "fit_pca_space",
    "offline_descriptors",
    "settings_record",
]


class SearchParams(Settings):
    """Search settings (the YAML's ``search`` block).

    Attributes:
        aggregated_classes: N_C, the classes aggregated into each descriptor per search
            (OfA: the image's top N_C; OnA: the query's top N_C).
        n_pca: N_pca, class vectors per training image that fit the class-space PCA.
        pca_dims: PCA dimensions kept (None: all that carry variance).
        rerank: CAM-box re-ranking settings (its query classes among them).
    """

    aggregated_classes: bounded_int(1, 1000) = 64  # type: ignore[valid-type]
    n_pca: bounded_int(1) = 1  # type: ignore[valid-type]
    pca_dims: bounded_int(1) | None = None  # type: ignore[valid-type]
    rerank: RerankConfig = RerankConfig()

    def class_needs(self, rerank: bool = True) -> dict[str, int]:
        """How many class vectors per image each setting reads (``rerank``: count the
        re-ranking's query classes), by its name in the YAML's ``search`` block."""
        out = {"aggregated_classes": self.aggregated_classes, "n_pca": self.n_pca}
        if rerank:
            out["rerank.query_classes"] = self.rerank.query_classes
        return out

    @property
    def classes_needed(self) -> int:
        """The class vectors each image must store for these settings (N_C stored)."""
        return max(self.class_needs().values())


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


def fit_pca(
    method: Method,
    train: FeatureSet,
    params: SearchParams,
    metadata: dict | None = None,
) -> PCAWhitening | None:
    """PCA-whitening for a method, fitted on a training set (never the evaluated images);
    None for a method without PCA."""
    space = method.spec.pca_space
    return None if space is None else fit_pca_space(space, train, params, metadata)


def fit_pca_space(
    space: str, train: FeatureSet, params: SearchParams, metadata: dict | None = None
) -> PCAWhitening:
    """PCA-whitening of one registered space (:data:`PCA_SPACES`) fitted on ``train``."""
    spec = PCA_SPACES[space]
    meta = {"n_pca": params.n_pca, "training_images": len(train), **(metadata or {})}
    meta["vectors"] = spec.vectors
    return PCAWhitening.fit(spec.training_vectors(train, params), params.pca_dims, metadata=meta)


def offline_descriptors(
    method: Method, features: FeatureSet, pca: PCAWhitening | None, params: SearchParams
) -> np.ndarray:
    """Descriptors stored at indexing time for the method's aggregation (its ``describe``)."""
    return method.spec.describe(features, pca, params)


def settings_record(
    extraction: ExtractionConfig, params: SearchParams, methods: Sequence[Method]
) -> dict[str, Any]:
    """The settings a result was computed with, enough to compute it again.

    A summary (backbone, resolved layer, resize, N_C stored and aggregated, N_pca, PCA dims,
    method strings) and the full ``extraction`` and ``search`` settings, which validate back
    into equal objects: ``ExtractionConfig(**r["extraction"])``, ``SearchParams(**r["search"])``.
    """
    return {
        "backbone": extraction.backbone,
        "layer": extraction.resolved_layer,
        "resize": extraction.resize,
        "stored_classes": extraction.stored_classes,
        "aggregated_classes": params.aggregated_classes,
        "n_pca": params.n_pca,
        "pca_dims": params.pca_dims,
        "methods": [m.name for m in methods],
        "extraction": extraction.model_dump(mode="json"),
        "search": params.model_dump(mode="json"),
    }
