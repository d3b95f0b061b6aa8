"""Offline descriptors: one per image and stored aggregation (raw, raw+PCA, OfA, ...).

The descriptors of a ground-truth dataset (each self-split half with its own PCA) and of a
distractor shard (with the PCA of the evaluated dataset) are computed with
:func:`descriptor_sets` and stored as ``image_id`` + fixed-size ``descriptor`` tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from cw_pipeline.compute.pca import method_pca, pca_groups_of, pca_models_for
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import AGGREGATIONS, Method, offline_descriptors, stored_descriptors
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.store import FeatureStore
from cw_pipeline.store.commits import Commit


def descriptor_table(ids: Sequence[str], desc: np.ndarray) -> pa.Table:
    dim = desc.shape[1]
    flat = pa.array(np.ascontiguousarray(desc, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table(
        {
            "image_id": pa.array(list(ids), pa.string()),
            "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def table_descriptors(t: pa.Table) -> tuple[list[str], np.ndarray]:
    """Image ids and the descriptor matrix of a table written by :func:`descriptor_table`."""
    dim = t.schema.field("descriptor").type.list_size
    values = t.column("descriptor").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return t.column("image_id").to_pylist(), values.reshape(t.num_rows, dim)


def read_descriptors(store: FeatureStore, rel: str) -> tuple[list[str], np.ndarray]:
    return table_descriptors(store.read_table(rel))


def offline_aggregations() -> tuple[str, ...]:
    """The stored descriptors of every dataset: one per registered aggregation's ``stored``
    (raw, raw+pca, ofa, and any registered since)."""
    return stored_descriptors()


def descriptor_sets(
    feats: FeatureSet, pcas: dict[str, PCAWhitening] | None, params: SearchParams
) -> dict[str, np.ndarray]:
    """The stored descriptors (:func:`offline_aggregations`) of a feature set."""
    out = {}
    for agg in offline_aggregations():
        method = Method(AGGREGATIONS[agg].name)
        out[agg] = offline_descriptors(method, feats, method_pca(method, pcas), params)
    return out


def dataset_descriptors(
    config: ProjectConfig,
    store: FeatureStore,
    ds: DatasetConfig,
    feats: FeatureSet,
    pca: Commit | None = None,
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Offline descriptors of a ground-truth dataset (self-split: each half with its PCA),
    with the PCA models of ``pca`` (default: the published ones)."""
    params = config.search
    out: dict[str, list] = {agg: [[], []] for agg in offline_aggregations()}
    for group in pca_groups_of(ds, feats.ids):
        sub = feats.subset(group.rows)
        d = descriptor_sets(sub, pca_models_for(store, ds, group.half, pca), params)
        for agg, v in d.items():
            out[agg][0].extend(sub.ids)
            out[agg][1].append(v)
    return {agg: (ids, np.concatenate(vs)) for agg, (ids, vs) in out.items()}
