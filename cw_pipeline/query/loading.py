"""Loading the materialized database a query is ranked against (no Dagster).

Where the database descriptors come from:

* a dataset with ground truth: its ``descriptors`` asset;
* a folder dataset that is the distractor set of an evaluation: that evaluation's distractor
  descriptors (with the PCA of the evaluation's dataset; the first such evaluation by name);
* any other folder dataset: raw sum-pooling from its stored features (``--method raw`` only).

An evaluation's database (:func:`load_evaluation_index`) is its dataset's followed by each
distractor set's, as its rankings asset ranks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cw_pipeline.compute.catalog import index_command, pca_rels, stored_shards
from cw_pipeline.compute.descriptors import read_descriptors
from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.compute.pca import pca_groups_of, pca_models_for
from cw_pipeline.compute.shards import stored_code_version
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.core.aggregation import PCAWhitening, raw_descriptors
from cw_pipeline.core.experiment import Method
from cw_pipeline.query.common import NotIndexedError, SearchIndex
from cw_pipeline.store import (
    FEATURES,
    MANIFEST,
    FeatureStore,
    descriptors_path,
    distractor_descriptors_folder,
    distractor_descriptors_path,
    features_path,
    manifest_path,
)

__all__ = ["load_evaluation_index", "load_index"]


def _check_features(config: ProjectConfig, store: FeatureStore, ds: DatasetConfig) -> list[str]:
    """Stored feature shards of ``ds``, checked against the current extraction settings."""

    shards = stored_shards(store, FEATURES, ds.name)
    if not shards:
        raise NotIndexedError(
            f"dataset {ds.name!r} is not indexed yet: run `{index_command(config, ds.name)}`"
        )
    current = feature_code_version(ds)
    if any(stored_code_version(store, ds, s) != current for s in shards):
        raise NotIndexedError(
            f"the features of {ds.name!r} were computed with other extraction settings than "
            f"{config.source} gives now: run `{index_command(config, ds.name)}`"
        )
    return shards


def _paths(
    config: ProjectConfig, store: FeatureStore, ds: DatasetConfig, ids: Sequence[str]
) -> list[Path]:
    """Image paths of ``ids`` from the stored manifests."""
    where: dict[str, Path] = {}
    for shard in stored_shards(store, MANIFEST, ds.name):
        t = store.read_table(manifest_path(ds.name, shard), ["image_id", "relpath"])
        for i, rel in zip(
            t.column("image_id").to_pylist(), t.column("relpath").to_pylist(), strict=True
        ):
            if i not in where or not where[i].exists():  # a file moved between shards
                where[i] = ds.images / rel
    missing = [i for i in ids if i not in where]
    if missing:
        raise NotIndexedError(
            f"{len(missing)} indexed images of {ds.name!r} have no manifest row (e.g. "
            f"{missing[0]!r}): run `{index_command(config, ds.name)} --force`"
        )
    return [where[i] for i in ids]


def load_index(
    config: ProjectConfig, store: FeatureStore, name: str, method: Method
) -> SearchIndex:
    """The materialized database of dataset ``name`` for ``method`` (see the module doc).

    Raises:
        UnknownNameError: no such dataset (lists the known ones).
        NotIndexedError: the descriptors or PCA it needs are not materialized (says what to run).
        ValueError: a folder dataset without PCA asked for a method that needs one.
    """

    ds = config.dataset(name)
    _check_features(config, store, ds)
    agg = method.stored_aggregation
    if ds.has_groundtruth:
        paired = config.paired(ds.name)
        rel = descriptors_path(ds.name, agg)
        have_pca = all(store.pca_exists(r) for r in pca_rels(ds))
        if not (have_pca and store.exists(rel)):
            todo = []
            if paired is not None and paired.name != ds.name:
                if not stored_shards(store, FEATURES, paired.name):
                    todo.append(index_command(config, paired.name))
            todo.append(index_command(config, ds.name))
            learned = "the other half of its objects" if ds.self_split else repr(ds.pca_from)
            raise NotIndexedError(
                f"dataset {ds.name!r} has features but no {'descriptors' if have_pca else 'PCA'}"
                f" yet (its PCA is learned on {learned}): run "
                + " then ".join(f"`{c}`" for c in todo)
            )
        ids, mat = read_descriptors(store, rel)
        groups = [(g.rows, pca_models_for(store, ds, g.half)) for g in pca_groups_of(ds, ids)]
        if ds.self_split:
            source = f"descriptors of {ds.name} (each half with the PCA of the other)"
        else:
            source = f"descriptors of {ds.name} (PCA learned on {ds.pca_from})"
        return SearchIndex(ds, ids, _paths(config, store, ds, ids), {agg: mat}, groups, source)
    return _folder_index(config, store, ds, method)


def _distractor_descriptors(
    store: FeatureStore, ev_name: str, dataset: str, agg: str, shards: Sequence[str]
) -> tuple[list[str], np.ndarray] | None:
    """The descriptors of distractor set ``dataset`` under evaluation ``ev_name`` (None: none
    materialized yet)."""

    if not store.list(distractor_descriptors_folder(ev_name, dataset, agg)):
        return None
    ids, mats = [], []
    for shard in shards:
        rel = distractor_descriptors_path(ev_name, dataset, agg, shard)
        if store.exists(rel):  # a shard without readable images has none
            i, m = read_descriptors(store, rel)
            ids += i
            mats.append(m)
    return (ids, np.concatenate(mats)) if ids else None


def _folder_index(
    config: ProjectConfig, store: FeatureStore, ds: DatasetConfig, method: Method
) -> SearchIndex:

    agg = method.stored_aggregation
    shards = stored_shards(store, FEATURES, ds.name)
    evaluations = [e for e in config.evaluations_for(ds.name) if ds.name in e.distractors]
    for ev in evaluations:
        found = _distractor_descriptors(store, ev.name, ds.name, agg, shards)
        if found is None:
            continue
        ids, mat = found
        owner = config.dataset(ev.dataset)
        groups = [(np.arange(len(ids)), pca_models_for(store, owner))]
        source = f"distractor descriptors of evaluation {ev.name} (PCA learned on {owner.pca_from})"
        return SearchIndex(ds, ids, _paths(config, store, ds, ids), {agg: mat}, groups, source)
    if evaluations:
        first = evaluations[0]
        raise NotIndexedError(
            f"dataset {ds.name!r} has no descriptors yet (they are built with the PCA of "
            f"{first.dataset!r} for evaluation {first.name!r}): run "
            f"`{index_command(config, first.dataset)}` then `{index_command(config, ds.name)}`"
        )
    if method.uses_pca:
        raise ValueError(
            f"dataset {ds.name!r} (layout folder) has no PCA: it is not the distractor set of "
            f"any evaluation; search it with --method raw"
        )
    ids, vecs = [], []
    for shard in shards:
        t = store.read_table(features_path(ds.name, shard), ["image_id", "sum_pooled"])
        if t.num_rows:
            dim = t.schema.field("sum_pooled").type.list_size
            flat = t.column("sum_pooled").combine_chunks().flatten()
            ids += t.column("image_id").to_pylist()
            vecs.append(flat.to_numpy(zero_copy_only=False).reshape(t.num_rows, dim))
    if not ids:
        raise ValueError(f"dataset {ds.name!r} has no indexed images (none was readable)")
    desc = raw_descriptors(np.concatenate(vecs))
    groups: list[tuple[np.ndarray, dict[str, PCAWhitening] | None]] = [(np.arange(len(ids)), None)]
    source = f"raw sum-pooled features of {ds.name} (no PCA)"
    return SearchIndex(ds, ids, _paths(config, store, ds, ids), {agg: desc}, groups, source)


def load_evaluation_index(
    config: ProjectConfig, store: FeatureStore, name: str, method: Method
) -> SearchIndex:
    """The database of evaluation ``name``: its dataset's descriptors followed by those of
    each distractor set (built with the dataset's PCA), as its rankings asset ranks them.

    Raises:
        UnknownNameError: no such evaluation.
        NotIndexedError: a part of it is not materialized (says what to run).
        ValueError: image ids that are not unique across its datasets.
    """
    ev = config.evaluation(name)
    base = load_index(config, store, ev.dataset, method)
    if not ev.distractors:
        return base
    agg = method.stored_aggregation
    ids, paths, mats = list(base.ids), list(base.paths), [base.descriptors[agg]]
    owners = [(0, base.dataset.name)]
    for dname in ev.distractors:
        dset = config.dataset(dname)
        shards = _check_features(config, store, dset)
        found = _distractor_descriptors(store, ev.name, dname, agg, shards)
        if found is None:
            raise NotIndexedError(
                f"evaluation {ev.name!r}: the descriptors of its distractor set {dname!r} are "
                f"not materialized yet: run `{index_command(config, dname)}`"
            )
        owners.append((len(ids), dname))
        ids += found[0]
        paths += _paths(config, store, dset, found[0])
        mats.append(found[1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"evaluation {ev.name}: image ids are not unique across its datasets")
    n_base = len(base)
    extra = np.arange(n_base, len(ids))
    groups = [(np.concatenate([rows, extra]), pcas) for rows, pcas in base.groups]
    source = f"{base.source} + distractors {', '.join(ev.distractors)}"
    return SearchIndex(
        base.dataset, ids, paths, {agg: np.concatenate(mats)}, groups, source, tuple(owners)
    )
