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

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cw_pipeline.compute.catalog import index_command, stored_shards
from cw_pipeline.compute.descriptors import read_descriptors, table_descriptors
from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.compute.pca import (
    pca_groups_of,
    pca_models_for,
    pca_output_dims,
    pca_size_problem,
    pca_version,
)
from cw_pipeline.compute.published import current_index, current_pca, descriptors_file, has_pca
from cw_pipeline.compute.shards import stored_code_version
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core.aggregation import PCAWhitening, raw_descriptors
from cw_pipeline.core.methods import AGGREGATIONS, Method, stored_descriptors
from cw_pipeline.query.common import (
    BrokenIndexError,
    InconsistentIndexError,
    NotIndexedError,
    SearchIndex,
)
from cw_pipeline.store import (
    FEATURES,
    MANIFEST,
    CorruptFileError,
    FeatureStore,
    distractor_descriptors_folder,
    distractor_descriptors_path,
    features_path,
    manifest_path,
)
from cw_pipeline.store.commits import Commit

__all__ = ["index_problem", "load_evaluation_index", "load_index"]


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


def index_problem(
    store: FeatureStore, ds: DatasetConfig, index: Commit | None = None
) -> str | None:
    """Why the published index of ``ds`` cannot be searched (None: it can, or it has none):
    a pointer, descriptor table or PCA model that does not decode, or descriptors whose
    dimension is not their PCA's output. Reads footers and metadata only."""
    try:
        index = index or current_index(store, ds)
        if index is None or not has_pca(index, ds):
            return None
        dims = pca_output_dims(store, ds, index)
        for agg in stored_descriptors():
            rel = descriptors_file(index, agg)
            field = store.read_schema(rel).field("descriptor")
            have = field.type.list_size
            space = AGGREGATIONS[agg].pca_space if agg in AGGREGATIONS else None
            spaces = [k for k in dims if space is not None and k.split("-half")[0] == space]
            wrong = [f"{k} {dims[k]}" for k in spaces if dims[k] != have]
            if wrong:
                return (
                    f"dataset {ds.name!r}: its {agg} descriptors ({store.url(rel)}) have "
                    f"{have} dimensions but the PCA they were projected with gives "
                    f"{', '.join(wrong)}: the index is damaged; re-index it with --force"
                )
    except (CorruptFileError, KeyError) as exc:
        return f"dataset {ds.name!r}: its published index cannot be read: {exc}"
    except FileNotFoundError as exc:
        return f"dataset {ds.name!r}: a file of its published index is missing: {exc}"
    return None


def load_index(
    config: ProjectConfig,
    store: FeatureStore,
    name: str,
    method: Method,
    index: Commit | None = None,
) -> SearchIndex:
    """The materialized database of dataset ``name`` for ``method`` (see the module doc):
    for a dataset with ground truth, its published index (``index``: default the current).

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
        # One published index: the descriptors and the PCA they were projected with (a query
        # is encoded with it), whatever a concurrent re-index publishes meanwhile.
        index = index or current_index(store, ds)
        have_pca = has_pca(index, ds) or has_pca(current_pca(store, ds), ds)
        if index is None or not has_pca(index, ds):
            if not have_pca and (problem := pca_size_problem(store, config, ds)) is not None:
                raise NotIndexedError(problem)  # indexing again would not help
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
        problem = index_problem(store, ds, index)
        if problem is not None:
            raise BrokenIndexError(problem)
        ids, mat = read_descriptors(store, descriptors_file(index, agg))
        groups = [
            (g.rows, pca_models_for(store, ds, g.half, index)) for g in pca_groups_of(ds, ids)
        ]
        if ds.self_split:
            source = f"descriptors of {ds.name} (each half with the PCA of the other)"
        else:
            source = f"descriptors of {ds.name} (PCA learned on {ds.pca_from})"
        return SearchIndex(ds, ids, _paths(config, store, ds, ids), {agg: mat}, groups, source)
    return _folder_index(config, store, ds, method)


def _distractor_descriptors(
    store: FeatureStore, ev_name: str, dataset: str, agg: str, shards: Sequence[str]
) -> tuple[list[str], np.ndarray, set[str]] | None:
    """The descriptors of distractor set ``dataset`` under evaluation ``ev_name``, and the
    versions of the PCA their shards were projected with (None: none materialized yet)."""

    if not store.list(distractor_descriptors_folder(ev_name, dataset, agg)):
        return None
    ids, mats, pcas = [], [], set()
    for shard in shards:
        rel = distractor_descriptors_path(ev_name, dataset, agg, shard)
        if store.exists(rel):  # a shard without readable images has none
            table = store.read_table(rel)
            i, m = table_descriptors(table)
            recorded = (table.schema.metadata or {}).get(b"pca")
            if i and recorded is not None:
                pcas.add(recorded.decode())
            ids += i
            mats.append(m)
    if len(pcas) > 1:  # its shards are being re-projected now
        raise _reprojecting(ev_name, dataset, None)
    return (ids, np.concatenate(mats), pcas) if ids else None


def _reprojecting(ev_name: str, dname: str, dataset: str | None) -> InconsistentIndexError:
    of = "its dataset" if dataset is None else repr(dataset)
    return InconsistentIndexError(
        f"evaluation {ev_name!r}: the descriptors of its distractor set {dname!r} were "
        f"projected with another PCA than the published index of {of}: they are being "
        "re-projected (at once for a small set, else at the evaluation's cron); searched "
        "again once they are"
    )


def _owner_pca(
    store: FeatureStore, owner: DatasetConfig, versions: set[str]
) -> dict[str, PCAWhitening]:
    """The PCA models of ``owner`` the distractor descriptors were projected with (recorded
    ``versions``: one, or none for tables written before they were recorded)."""
    for commit in (*_indexes(store, owner), current_pca(store, owner)):
        if has_pca(commit, owner):
            pcas = pca_models_for(store, owner, None, commit)
            if not versions or versions == {pca_version(pcas)}:
                return pcas
    raise InconsistentIndexError(
        f"the distractor descriptors of {owner.name!r}'s evaluations were projected with a "
        "PCA it no longer publishes: they are being re-projected; searched again once they are"
    )


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
        ids, mat, versions = found
        owner = config.dataset(ev.dataset)
        if len(versions) > 1:
            raise _reprojecting(ev.name, ds.name, owner.name)
        groups = [(np.arange(len(ids)), _owner_pca(store, owner, versions))]
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


def _indexes(store: FeatureStore, ds: DatasetConfig) -> list[Commit]:
    """The published index of ``ds`` and the one it replaced (kept readable), newest first."""
    index = current_index(store, ds)
    if index is None:
        return []
    return [index] if index.previous is None else [index, index.previous]


def _index_with_pca(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    method: Method,
    versions: set[str],
) -> SearchIndex:
    """The dataset's database from the published index whose PCA has version ``versions``
    (none recorded: the current one)."""
    ds = config.dataset(ev.dataset)
    for index in _indexes(store, ds):
        if not has_pca(index, ds):
            continue
        if not versions or {pca_version(pca_models_for(store, ds, None, index))} == versions:
            return load_index(config, store, ds.name, method, index)
    if not versions or not _indexes(store, ds):
        return load_index(config, store, ds.name, method)  # says what is missing
    raise _reprojecting(ev.name, ", ".join(ev.distractors), ds.name)


def load_evaluation_index(
    config: ProjectConfig,
    store: FeatureStore,
    name: str,
    method: Method,
    wait_seconds: float = 10.0,
) -> SearchIndex:
    """The database of evaluation ``name``: its dataset's descriptors followed by those of
    each distractor set (built with the dataset's PCA), as its rankings asset ranks them.

    The dataset's part comes from the published index whose PCA the distractor descriptors
    were projected with: after a re-index, the previous one until they are re-projected
    (at once for a small set, else at the evaluation's cron). While their shards are being
    rewritten (some with each PCA), it waits up to ``wait_seconds`` for them to agree.

    Raises:
        UnknownNameError: no such evaluation.
        NotIndexedError: a part of it is not materialized (says what to run).
        InconsistentIndexError: its parts are of two states (see above).
        ValueError: image ids that are not unique across its datasets.
    """
    ev = config.evaluation(name)
    if not ev.distractors:
        return load_index(config, store, ev.dataset, method)
    agg = method.stored_aggregation
    deadline = time.monotonic() + wait_seconds
    while True:
        found, versions = {}, set()
        try:
            for dname in ev.distractors:
                dset = config.dataset(dname)
                found[dname] = _distractor_descriptors(
                    store, ev.name, dname, agg, _check_features(config, store, dset)
                )
                if found[dname] is None:
                    raise NotIndexedError(
                        f"evaluation {ev.name!r}: the descriptors of its distractor set "
                        f"{dname!r} are not materialized yet: run "
                        f"`{index_command(config, dname)}`"
                    )
                versions |= found[dname][2]
            # The dataset's published index whose PCA the distractors were projected with:
            # the current one, or the one it replaced while they are re-projected.
            if len(versions) > 1:  # shards being rewritten now
                raise _reprojecting(ev.name, ", ".join(ev.distractors), ev.dataset)
            base = _index_with_pca(config, store, ev, method, versions)
            break
        except InconsistentIndexError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    ids, paths, mats = list(base.ids), list(base.paths), [base.descriptors[agg]]
    owners = [(0, base.dataset.name)]
    for dname in ev.distractors:
        dset = config.dataset(dname)
        owners.append((len(ids), dname))
        dids, dmat, _ = found[dname]
        ids += dids
        paths += _paths(config, store, dset, dids)
        mats.append(dmat)
    if len(set(ids)) != len(ids):
        raise ValueError(f"evaluation {ev.name}: image ids are not unique across its datasets")
    n_base = len(base)
    extra = np.arange(n_base, len(ids))
    groups = [(np.concatenate([rows, extra]), pcas) for rows, pcas in base.groups]
    source = f"{base.source} + distractors {', '.join(ev.distractors)}"
    return SearchIndex(
        base.dataset, ids, paths, {agg: np.concatenate(mats)}, groups, source, tuple(owners)
    )
