"""What readers open: the published generation of a dataset's PCA, its index and an
evaluation's rankings (commit points, :mod:`cw_pipeline.store.commits`).

* ``pca`` (a dataset): its PCA models, roles ``pca:<space>[-half<k>]``; published by the
  ``<ds>/pca_model`` asset.
* ``index`` (a dataset): its descriptor tables, roles ``descriptors:<aggregation>``, and the
  PCA models they were projected with (the same ``pca:`` roles, pointing into that PCA
  generation, which the pointer *refers* to); published by ``<ds>/descriptors``. A search
  reads only this pointer, so the query is encoded with the PCA of the descriptors it is
  ranked against, whatever a concurrent re-index has written since.
* ``rankings`` (an evaluation): one table per method, roles ``rankings:<method>``, and the
  database they ranked (``database``: image ids in order, with the dataset of each);
  published by ``<ev>/rankings``, read by its report and figures.

A store written before commit points has no pointers: its files at the older paths are
read as they are (one state, as that code wrote it) until the next materialization
publishes a generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.methods import PCA_SPACES, stored_descriptors
from cw_pipeline.store import (
    FeatureStore,
    descriptors_path,
    pca_path,
    ranked_database_path,
    rankings_path,
)
from cw_pipeline.store.commits import Commit, new_generation, publish, read_commit

__all__ = [
    "LEGACY",
    "current_index",
    "current_pca",
    "current_rankings",
    "pca_role",
    "publish_index",
    "publish_pca",
    "publish_rankings",
]

#: The generation name of files written before commit points (never removed).
LEGACY = "legacy"


def pca_role(space: str, half: int | None = None) -> str:
    """``pca:<space>[-half<k>]``: the role of a PCA model in a commit."""
    return f"pca:{space}" if half is None else f"pca:{space}-half{half}"


def descriptors_role(aggregation: str) -> str:
    return f"descriptors:{aggregation}"


def rankings_role(method: str) -> str:
    return f"rankings:{method}"


def _halves(ds: DatasetConfig) -> tuple[int | None, ...]:
    return (1, 2) if ds.self_split else (None,)


# ---- PCA ------------------------------------------------------------------------------------


def publish_pca(
    store: FeatureStore, ds: DatasetConfig, models: Mapping[str, PCAWhitening]
) -> Commit:
    """Write ``models`` (by :func:`pca_role`) as a new generation and publish it."""
    generation = new_generation()
    files = {}
    for role, model in models.items():
        space_half = role.removeprefix("pca:")
        space, _, half = space_half.partition("-half")
        rel = pca_path(ds.name, space, int(half) if half else None, generation)
        files[role] = store.write_pca(rel, model)
    return publish(store, "dataset", ds.name, "pca", generation, files)


def _legacy_pca_files(store: FeatureStore, ds: DatasetConfig) -> dict[str, str] | None:
    files = {
        pca_role(space, half): pca_path(ds.name, space, half)
        for space in PCA_SPACES
        for half in _halves(ds)
    }
    return files if all(store.pca_exists(rel) for rel in files.values()) else None


def current_pca(store: FeatureStore, ds: DatasetConfig) -> Commit | None:
    """The published PCA models of ``ds`` (None: none yet)."""
    commit = read_commit(store, "dataset", ds.name, "pca")
    if commit is not None:
        return commit
    files = _legacy_pca_files(store, ds)
    return None if files is None else Commit("dataset", ds.name, "pca", LEGACY, files)


# ---- the index (descriptors + the PCA they were projected with) ------------------------------


def publish_index(
    store: FeatureStore,
    ds: DatasetConfig,
    tables: Mapping[str, pa.Table],
    pca: Commit,
    metadata: Mapping[str, str] | None = None,
) -> Commit:
    """Write the descriptor tables (by aggregation) as a new generation and publish it with
    the PCA generation ``pca`` they were projected with."""
    generation = new_generation()
    files = {role: rel for role, rel in pca.files.items() if role.startswith("pca:")}
    for agg, table in tables.items():
        rel = descriptors_path(ds.name, agg, generation)
        files[descriptors_role(agg)] = store.write_table(rel, table, metadata=metadata)
    refs = {} if pca.generation == LEGACY else {"pca": pca.generation}
    # The index it replaces stays readable: distractor descriptors projected with its PCA are
    # ranked with it until they are re-projected.
    return publish(
        store, "dataset", ds.name, "index", generation, files, refs=refs, keep_previous=True
    )


def current_index(store: FeatureStore, ds: DatasetConfig) -> Commit | None:
    """The published descriptors of ``ds`` with their PCA (None: none yet)."""
    commit = read_commit(store, "dataset", ds.name, "index")
    if commit is not None:
        return commit
    tables = {descriptors_role(a): descriptors_path(ds.name, a) for a in stored_descriptors()}
    if not all(store.exists(rel) for rel in tables.values()):
        return None
    pca = _legacy_pca_files(store, ds) or {}
    return Commit("dataset", ds.name, "index", LEGACY, {**pca, **tables})


def descriptors_file(index: Commit, aggregation: str) -> str:
    """The store path of ``aggregation``'s descriptors in an index commit."""
    return index.file(descriptors_role(aggregation))


def has_pca(commit: Commit | None, ds: DatasetConfig) -> bool:
    """Whether ``commit`` names every PCA model ``ds`` uses."""
    if commit is None:
        return False
    return all(pca_role(s, h) in commit.files for s in PCA_SPACES for h in _halves(ds))


# ---- rankings -------------------------------------------------------------------------------


def database_table(parts: Sequence[tuple[str, Sequence[str]]]) -> pa.Table:
    """The ranked database as a table: ``image_id`` in order, ``dataset`` of each."""
    ids = [i for _, part in parts for i in part]
    names = [name for name, part in parts for _ in part]
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "dataset": pa.array(names, pa.string()).dictionary_encode(),
        }
    )


def publish_rankings(
    store: FeatureStore,
    evaluation: str,
    tables: Mapping[str, pa.Table],
    database: pa.Table,
    meta: Mapping[str, Any] | None = None,
) -> Commit:
    """Write one ranking table per method and the database they ranked
    (:func:`database_table`) as a new generation, and publish it."""
    generation = new_generation()
    files = {
        rankings_role(m): store.write_table(rankings_path(evaluation, m, generation), t)
        for m, t in tables.items()
    }
    files["database"] = store.write_table(ranked_database_path(evaluation, generation), database)
    return publish(store, "evaluation", evaluation, "rankings", generation, files, meta=meta)


def current_rankings(
    store: FeatureStore, evaluation: str, methods: tuple[str, ...] | list[str] = ()
) -> Commit | None:
    """The published rankings of ``evaluation`` (None: none yet; ``methods``: the methods a
    store written before commit points must hold to count)."""
    commit = read_commit(store, "evaluation", evaluation, "rankings")
    if commit is not None or not methods:
        return commit
    files = {rankings_role(m): rankings_path(evaluation, m) for m in methods}
    if not all(store.exists(rel) for rel in files.values()):
        return None
    return Commit("evaluation", evaluation, "rankings", LEGACY, files)


def rankings_file(rankings: Commit, method: str) -> str:
    """The store path of ``method``'s rankings in a rankings commit."""
    return rankings.file(rankings_role(method))


def has_rankings(rankings: Commit | None, method: str) -> bool:
    return rankings is not None and rankings_role(method) in rankings.files


def ranked_database(store: FeatureStore, rankings: Commit) -> pa.Table | None:
    """The database a rankings generation ranked (None: written before it was kept)."""
    rel = rankings.files.get("database")
    return None if rel is None else store.read_table(rel)
