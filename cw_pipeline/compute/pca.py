"""PCA models: which images use which model, fitting them, and reading them back.

A dataset's PCA is learned on its paired dataset (``pca_from``), or, when it is self-split,
one model per half of its objects, each fitted on the other half. One model per registered
space (:data:`cw_pipeline.core.methods.PCA_SPACES`), published as one generation
(:func:`cw_pipeline.compute.published.publish_pca`) and read through its pointer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cw_pipeline.compute.published import current_pca, pca_role
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import PCA_SPACES, Method, fit_pca_space
from cw_pipeline.core.pca_split import PcaGroup, group_labels, pca_groups
from cw_pipeline.store import FEATURES, FeatureStore, shard_folder
from cw_pipeline.store.commits import Commit


def pca_groups_of(ds: DatasetConfig, ids: Sequence[str]) -> list[PcaGroup]:
    """The images ``ids`` of ``ds`` by the PCA model they use (:func:`core.pca_split.pca_groups`):
    the two halves of its objects when it is self-split, else one group of all of them."""
    if not ds.self_split:
        return pca_groups(len(ids))
    if not ds.grouped:
        raise ValueError(f"dataset {ds.name!r} (layout {ds.layout}) has no object groups")
    labels = group_labels(ds.layout, ids)
    objects, sizes = np.unique(labels, return_counts=True)
    if objects.size < MIN_SELF_SPLIT_OBJECTS:
        raise ValueError(
            f"dataset {ds.name!r} (layout {ds.layout}, pca_from: self-split) has "
            f"{objects.size} object(s) ({', '.join(map(str, sizes)) or 'no'} image(s)); at "
            f"least {MIN_SELF_SPLIT_OBJECTS} are needed: each half of its objects is searched "
            "with the PCA learned on the other half. Add the images of another object, or "
            "take the PCA from another dataset (pca_from)"
        )
    return pca_groups(len(ids), labels)


#: Fewest objects a self-split dataset may have: one per half.
MIN_SELF_SPLIT_OBJECTS = 2


#: Fewest images a PCA training set may have: a PCA needs two vectors, and the raw space
#: (raw+PCA) has one per image. (Fewer vectors than ``search.pca_dims`` only truncates the
#: model, with a log line; see ``PCAWhitening.fit``.)
MIN_PCA_TRAINING_IMAGES = 2


def check_pca_training_size(ds: DatasetConfig, source: str, n_images: int) -> None:
    """Refuse (ValueError naming the dataset, the training set, the count and the minimum) a
    PCA training set too small to fit the models of :data:`core.methods.PCA_SPACES`."""
    if n_images < MIN_PCA_TRAINING_IMAGES:
        raise ValueError(
            f"dataset {ds.name!r}: its PCA is learned on {source}, which has {n_images} "
            f"image(s) with features; at least {MIN_PCA_TRAINING_IMAGES} are needed (a PCA "
            "needs two vectors and raw+PCA has one per image): add images to it, or take "
            "the PCA from a larger dataset (pca_from)"
        )


def _training_source(group: PcaGroup) -> str:
    """A self-split half's training set, for messages (with both halves' sizes)."""
    assert group.training is not None
    halves = f"{len(group.training)} and {len(group.rows)} images"
    return f"half {group.training_half} of its objects (self-split; halves of {halves})"


def pca_size_problem(store: FeatureStore, config: ProjectConfig, ds: DatasetConfig) -> str | None:
    """Why the PCA of ``ds`` cannot be fitted on the features stored now (the one-line
    errors of :func:`pca_groups_of` and :func:`check_pca_training_size`), or None."""
    paired = config.paired(ds.name)
    if paired is None:
        return None
    ids: list[str] = []
    for rel in store.list(shard_folder(FEATURES, paired.name)):
        ids += store.read_table(rel, ["image_id"]).column("image_id").to_pylist()
    try:
        for group in pca_groups_of(ds, ids):
            if group.training is None:
                check_pca_training_size(ds, f"dataset {ds.pca_from!r}", len(ids))
            else:
                check_pca_training_size(ds, _training_source(group), len(group.training))
    except ValueError as exc:
        return str(exc)
    return None


def fit_pca_models(
    config: ProjectConfig, ds: DatasetConfig, train: FeatureSet
) -> dict[str, PCAWhitening]:
    """PCA models of ``ds`` fitted on ``train`` (its paired dataset's features), by role
    (:func:`~cw_pipeline.compute.published.pca_role`).

    One model per registered space (:data:`core.methods.PCA_SPACES`: ``class``, class
    vectors, N_pca per image, for OfA/OnA; ``raw``, sum-pooled vectors, for raw+PCA). A
    self-split dataset gets one model per half, each fitted on the *other* half.
    """
    params = config.search
    e = ds.extraction
    base = {
        "dataset": ds.name,
        "backbone": e.backbone,
        "layer": e.layer or "default",
        "resize": e.resize,
        "n_pca": params.n_pca,
        "pca_dims": params.pca_dims,
    }
    out: dict[str, PCAWhitening] = {}
    for group in pca_groups_of(ds, train.ids):
        if group.training is None:  # learned on the paired dataset
            data, source, name = train, f"dataset {ds.pca_from!r}", ds.pca_from
        else:
            data = train.subset(group.training)
            source = _training_source(group)
            name = f"{ds.name}-half{group.training_half}"
        check_pca_training_size(ds, source, len(data))
        meta = {**base, "training_set": name}
        for space in PCA_SPACES:
            out[pca_role(space, group.half)] = fit_pca_space(space, data, params, meta)
    return _agreeing_halves(ds, out)


def _agreeing_halves(ds: DatasetConfig, models: dict[str, PCAWhitening]) -> dict[str, PCAWhitening]:
    """A self-split dataset's halves are ranked as one database: for each space, every half's
    model keeps the components all of them have (a small half's training set has fewer), and
    says so in its metadata (``components_fitted``, ``components_kept``)."""
    if not ds.self_split:
        return models
    out = dict(models)
    for space in PCA_SPACES:
        rels = [r for r in (pca_role(space, h) for h in (1, 2)) if r in models]
        if len(rels) < 2:
            continue
        dims = min(models[r].output_dim for r in rels)
        for r in rels:
            fitted = models[r].output_dim
            out[r] = models[r].truncated(dims, components_fitted=fitted, components_kept=dims)
    return out


def _commit(store: FeatureStore, ds: DatasetConfig, commit: Commit | None) -> Commit:
    if commit is None:
        commit = current_pca(store, ds)
    if commit is None:
        raise FileNotFoundError(f"dataset {ds.name!r} has no PCA model in the feature store")
    return commit


def pca_models_for(
    store: FeatureStore,
    ds: DatasetConfig,
    half: int | None = None,
    commit: Commit | None = None,
) -> dict[str, PCAWhitening]:
    """The PCA models of ``ds`` by space (``half``: 1 or 2 for a self-split dataset), from
    ``commit`` (a ``pca`` or ``index`` commit; default: the published PCA)."""
    commit = _commit(store, ds, commit)
    return {space: store.read_pca(commit.file(pca_role(space, half))) for space in PCA_SPACES}


def pca_version(pcas: dict[str, PCAWhitening]) -> str:
    """A short hash of PCA models' arrays: descriptors projected with equal versions are
    comparable (kept in the descriptor tables' metadata, checked before ranking)."""
    h = hashlib.sha1()
    for space in sorted(pcas):
        m = pcas[space]
        h.update(space.encode())
        for a in (m.mean, m.components, m.eigenvalues):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def pca_output_dims(
    store: FeatureStore, ds: DatasetConfig, commit: Commit | None = None
) -> dict[str, int]:
    """Dimensions of each PCA model of ``ds`` (``class``, ``raw``; ``class-half1`` … for a
    self-split dataset), from the models' metadata (``commit``: default the published PCA)."""
    halves: tuple[int | None, ...] = (1, 2) if ds.self_split else (None,)
    commit = _commit(store, ds, commit)
    out = {}
    for space in PCA_SPACES:
        for half in halves:
            meta = store.read_pca_metadata(commit.file(pca_role(space, half)))
            out[space if half is None else f"{space}-half{half}"] = int(meta["output_dim"])
    return out


def method_pca(method: Method, pcas: dict[str, PCAWhitening] | None) -> PCAWhitening | None:
    """The PCA model a method ranks with: its registered ``pca_space``'s, or none."""
    space = method.spec.pca_space
    return None if pcas is None or space is None else pcas[space]
