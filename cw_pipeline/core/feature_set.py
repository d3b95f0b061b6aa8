"""The columnar form of a set of images' features: :class:`FeatureSet`, the per-image records
of :mod:`cw_pipeline.core.extract` (:class:`~cw_pipeline.core.extract.ImageFeatures`) stacked
column-wise, with the feature maps kept for OnA and re-ranking when there are any."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cw_pipeline.core.extract import FeatureMaps, ImageFeatures


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
