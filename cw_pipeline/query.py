"""Search the materialized index of a configured dataset with a query image (no Dagster).

The query goes through the dataset's own extraction settings (backbone, layer, weights,
resize policy, N_C) and, with a box, its query protocol (``crop``: the box is cut out before the
forward pass; ``paper``: the feature maps are cropped). Its descriptor is aggregated with the
PCA the dataset's descriptors were built with (the ``pca_model`` asset; a self-split dataset's
two halves are searched each with its own PCA and the lists merged by score), and ranked with
:func:`cw_pipeline.core.retrieval.search`, the function the rankings asset and ``evaluate``
use: cosine ranking, then CAM-box re-ranking of the top R and query expansion with the top K.

Where the database descriptors come from:

* a dataset with ground truth: its ``descriptors`` asset;
* a folder dataset that is the distractor set of an evaluation: that evaluation's distractor
  descriptors (with the PCA of the evaluation's dataset; the first such evaluation by name);
* any other folder dataset: raw sum-pooling from its stored features (``--method raw`` only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cw_pipeline.compute.catalog import index_command, pca_rels, stored_shards
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.core.aggregation import PCAWhitening, raw_descriptors
from cw_pipeline.core.experiment import FeatureSet, Method
from cw_pipeline.core.extract import FeatureExtractor, ImageFeatures
from cw_pipeline.core.images import load_image
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

__all__ = [
    "Hit",
    "NotIndexedError",
    "QueryError",
    "QueryResult",
    "SearchIndex",
    "check_box",
    "format_results",
    "load_evaluation_index",
    "load_index",
    "load_query_image",
    "search",
    "search_image",
]

Box = tuple[float, float, float, float]


class QueryError(ValueError):
    """A query the user can fix: missing or unreadable image, or a bad box."""


class NotIndexedError(ValueError):
    """The dataset's index is not (fully) materialized; the message says what to run."""


@dataclass(frozen=True)
class Hit:
    """One result: rank (1-based), image id, cosine score and the image's path."""

    rank: int
    image_id: str
    score: float
    path: Path

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.image_id, "score": self.score, "path": str(self.path)}


@dataclass
class QueryResult:
    """The ranked results of one query."""

    dataset: str
    query: Path
    box: Box | None
    method: str
    protocol: str | None
    database: int
    descriptors: str
    hits: list[Hit]
    seconds: float = 0.0
    map_forward_passes: int = 0
    #: seconds of the query's features (decoded image → forward pass) and of the ranking
    timings: dict[str, float] = field(default_factory=dict)
    #: the query's features (classes, class vectors), for CAM views
    record: ImageFeatures | None = field(default=None, repr=False)
    #: every database row, best first (``search_image(full_ranking=True)`` only)
    ranking: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "query": str(self.query),
            "box": None if self.box is None else list(self.box),
            "method": self.method,
            "protocol": self.protocol,
            "database": self.database,
            "descriptors": self.descriptors,
            "results": [h.as_dict() for h in self.hits],
            "map_forward_passes": self.map_forward_passes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class SearchIndex:
    """Database descriptors of one dataset, by aggregation, and the PCA of each row group.

    ``groups`` lists (rows, PCA models by space ``class``/``raw``, or None without PCA): one
    group, or the two halves of a self-split dataset (each with an evaluation's distractors).
    """

    dataset: DatasetConfig
    ids: list[str]
    paths: list[Path]
    descriptors: dict[str, np.ndarray]
    groups: list[tuple[np.ndarray, dict[str, PCAWhitening] | None]]
    source: str
    #: (first row, dataset) of each dataset's rows; empty: all rows are ``dataset``'s
    owners: tuple[tuple[int, str], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def owner(self, row: int) -> str:
        """The dataset whose image is database row ``row``."""
        name = self.dataset.name
        for first, dataset in self.owners:
            if row >= first:
                name = dataset
        return name


# --------------------------------------------------------------------------- the query


def load_query_image(path: Path):
    """The query as an upright RGB image; QueryError naming the file when it cannot be read."""
    from cw_pipeline.core.images import ImageLoadError

    path = Path(path)
    if not path.exists():
        raise QueryError(f"query image not found: {path}")
    if path.is_dir():
        raise QueryError(f"query image is a folder, not a file: {path}")
    try:
        return load_image(path)
    except ImageLoadError as exc:
        raise QueryError(str(exc)) from exc
    except OSError as exc:
        raise QueryError(f"cannot read query image {path}: {exc.strerror or exc}") from exc


def check_box(box: Sequence[float], size: tuple[int, int], path: Path) -> Box:
    """``box`` (x1, y1, x2, y2 in the upright image's pixels) if it has area and lies inside an
    image of ``size``; QueryError otherwise."""
    values = tuple(float(v) for v in box)
    w, h = size
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise QueryError(f"--box needs 4 finite numbers x1 y1 x2 y2, got {list(box)}")
    x1, y1, x2, y2 = values
    shown = " ".join(f"{v:g}" for v in values)
    if x2 <= x1 or y2 <= y1:
        raise QueryError(f"box {shown} has zero area (need x1 < x2 and y1 < y2)")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise QueryError(
            f"box {shown} is outside the {w}x{h} image {path} (need 0 <= x1 < x2 <= {w}, "
            f"0 <= y1 < y2 <= {h})"
        )
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------- the index


def _check_features(config: ProjectConfig, store: FeatureStore, ds: DatasetConfig) -> list[str]:
    """Stored feature shards of ``ds``, checked against the current extraction settings."""
    from cw_pipeline.compute.features import feature_code_version
    from cw_pipeline.compute.shards import stored_code_version

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
    from cw_pipeline.compute.descriptors import read_descriptors
    from cw_pipeline.compute.pca import pca_groups_of, pca_models_for

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
    from cw_pipeline.compute.descriptors import read_descriptors

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
    from cw_pipeline.compute.pca import pca_models_for

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


# --------------------------------------------------------------------------- search


def search(
    config: ProjectConfig,
    dataset: str,
    image: Path,
    *,
    box: Sequence[float] | None = None,
    top: int = 10,
    method: Method | str = "ofa",
    protocol: str | None = None,
    store: FeatureStore | None = None,
    extractor: FeatureExtractor | None = None,
) -> QueryResult:
    """Rank the indexed images of ``dataset`` for the query ``image`` (optionally its ``box``).

    Loads the image and the index, then ranks with :func:`search_image` (the function the
    search page calls too).

    Raises:
        UnknownNameError, NotIndexedError, QueryError (image, box), ValueError (method).
    """
    t0 = time.perf_counter()
    method = Method.parse(method) if isinstance(method, str) else method
    if top < 1:
        raise QueryError(f"--top must be >= 1, got {top}")
    ds = config.dataset(dataset)
    image = Path(image)
    query = load_query_image(image)
    store = store or FeatureStore(config.warehouse)
    index = load_index(config, store, ds.name, method)
    if extractor is None:
        from cw_pipeline.compute.features import dataset_extractor

        extractor = dataset_extractor(ds)
    result = search_image(
        config,
        index,
        extractor,
        query,
        image,
        box=box,
        top=top,
        method=method,
        protocol=protocol,
    )
    result.seconds = time.perf_counter() - t0
    return result


def search_image(
    config: ProjectConfig,
    index: SearchIndex,
    extractor: FeatureExtractor,
    query: Image.Image,
    name: Path,
    *,
    box: Sequence[float] | None = None,
    top: int = 10,
    method: Method | str = "ofa",
    protocol: str | None = None,
    full_ranking: bool = False,
) -> QueryResult:
    """Rank ``index`` for an upright RGB ``query`` image (``name``: its file, for messages).

    The one search of ``cw-pipeline search`` and the search page: the query's features
    through ``extractor`` (cropped to ``box`` by ``protocol``, default the dataset's), then
    :func:`cw_pipeline.core.retrieval.search` per row group of the index (self-split halves
    merged by score; a row in several groups keeps its best score). ``full_ranking`` also
    keeps the whole database's order in :attr:`QueryResult.ranking` (for the query's AP).

    Raises:
        QueryError (box, a box too small for the network), ValueError (method).
    """
    from cw_pipeline.compute.pca import method_pca
    from cw_pipeline.core.retrieval import ComputedMaps
    from cw_pipeline.core.retrieval import search as search_method

    method = Method.parse(method) if isinstance(method, str) else method
    if top < 1:
        raise QueryError(f"--top must be >= 1, got {top}")
    ds = index.dataset
    if protocol is not None and protocol not in ("crop", "paper"):
        raise QueryError(f"unknown query protocol {protocol!r}; use 'crop' or 'paper'")
    protocol = protocol or ds.query_protocol
    name = Path(name)
    qbox = None if box is None else check_box(box, query.size, name)
    t0 = time.perf_counter()
    try:
        record = extractor.extract_query(query, qbox, protocol)  # type: ignore[arg-type]
    except ValueError as exc:  # a box or image smaller than the network's stride
        raise QueryError(f"query {name}: {exc}") from exc
    t1 = time.perf_counter()
    qfs = FeatureSet.from_records([name.stem], [record])
    params = config.search
    agg = method.stored_aggregation
    db = index.descriptors[agg]
    rows_all, scores_all, passes = [], [], 0
    for rows, pcas in index.groups:
        maps = None
        if method.needs_maps:
            maps = ComputedMaps(extractor, [index.paths[i] for i in rows])
        depth = len(rows) if full_ranking else min(top, len(rows))
        r = search_method(
            method, qfs, _rows_of(db, rows), method_pca(method, pcas), maps, params, depth
        )
        rows_all.append(rows[r.indices[0]])
        scores_all.append(r.scores[0])
        passes += 0 if maps is None else maps.forward_passes
    rows = np.concatenate(rows_all)
    scores = np.concatenate(scores_all)
    if len(index.groups) == 1:
        order = np.arange(len(rows))  # the search's order (re-ranked heads included)
    else:  # self-split halves: merged by score, then database order; each row once
        order = np.lexsort((rows, -scores))
        _, first = np.unique(rows[order], return_index=True)
        order = order[np.sort(first)]
    hits = [
        Hit(k, index.ids[rows[j]], float(scores[j]), index.paths[rows[j]])
        for k, j in enumerate(order[:top], 1)
    ]
    t2 = time.perf_counter()
    return QueryResult(
        dataset=ds.name,
        query=name,
        box=qbox,
        method=method.name,
        protocol=protocol if qbox is not None else None,
        database=len(index),
        descriptors=index.source,
        hits=hits,
        seconds=t2 - t0,
        map_forward_passes=passes,
        timings={"features": t1 - t0, "ranking": t2 - t1},
        record=record,
        ranking=rows[order] if full_ranking else None,
    )


def _rows_of(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]``, without copying when ``rows`` are all of it in order (a copy of a
    105k-image database costs more than ranking it)."""
    n = len(matrix)
    if len(rows) == n and (n == 0 or (rows[0] == 0 and bool(np.all(np.diff(rows) == 1)))):
        return matrix
    return matrix[rows]


def format_results(result: QueryResult) -> str:
    """A human table: rank, score, id, path."""
    box = "" if result.box is None else " box " + " ".join(f"{v:g}" for v in result.box)
    lines = [
        f"{result.dataset}: {result.database} images, method {result.method}, "
        f"query {result.query}{box} ({result.seconds:.1f} s)",
    ]
    width = max([len("id"), *(len(h.image_id) for h in result.hits)])
    lines.append(f"{'rank':>4}  {'score':>7}  {'id':<{width}}  path")
    for h in result.hits:
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.image_id:<{width}}  {h.path}")
    return "\n".join(lines)
