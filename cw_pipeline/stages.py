"""What each pipeline asset computes, over the feature store, without Dagster.

The Dagster assets in ``cw_pipeline.defs`` call these functions; the CLI and tests can call
them directly. Every path in the warehouse is named by :mod:`cw_pipeline.store`
(``features_path``, ``pca_path``, ``descriptors_path``, ``rankings_path`` ...).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core import datasets as gtio
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.evaluation import score
from cw_pipeline.core.experiment import (
    FeatureSet,
    Method,
    SearchParams,
    fit_pca_space,
    offline_descriptors,
)
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.images import load_image
from cw_pipeline.core.methods import AGGREGATIONS, PCA_SPACES, stored_descriptors
from cw_pipeline.core.retrieval import ComputedMaps, SubsetMaps, search
from cw_pipeline.core.runner import PcaGroup, group_labels, pca_groups
from cw_pipeline.core.search import Ranking
from cw_pipeline.indexing import (
    records_to_table,
    table_to_featureset,
)
from cw_pipeline.store import (
    FeatureStore,
    descriptors_path,
    distractor_descriptors_path,
    features_path,
    manifest_path,
    pca_path,
    query_features_path,
    rejected_path,
)

logger = logging.getLogger(__name__)

#: Rankings keep the full list up to this many database images, then the top this many.
MAX_RANKING_LENGTH = 10_000


def load_features(
    store: FeatureStore,
    dataset: str,
    shards: Sequence[str],
    images: Path | str | None = None,
) -> FeatureSet:
    """All feature rows of the given shards of a dataset (missing shards are an error).

    An image id stored in two shards (a stale shard left by a changed shard plan, a copied
    shard file) is an error naming the id and both shards: the index is never silently
    deduplicated. ``images`` (the dataset's folder) only makes the messages more precise.
    """
    where = f" under {images}" if images is not None else ""
    tables = []
    owner: dict[str, str] = {}
    for shard in shards:
        rel = features_path(dataset, shard)
        if not store.exists(rel):
            raise FileNotFoundError(f"features of {dataset} shard {shard} are not materialized")
        t = store.read_table(rel)
        for image_id in t.column("image_id").to_pylist():
            first = owner.setdefault(image_id, shard)
            if first != shard:
                raise ValueError(
                    f"dataset {dataset!r}: image id {image_id!r} is stored in shards {first!r} "
                    f"and {shard!r} (a stale or duplicated feature shard); re-index the dataset "
                    f"(cw-pipeline index --dataset {dataset} --force)"
                )
        if t.num_rows:
            tables.append(t)
    if not tables:
        if not shards:
            raise ValueError(f"dataset {dataset!r} has no images{where} (no shards indexed)")
        rejected = 0
        for shard in shards:
            rej = rejected_path(dataset, shard)
            if store.exists(rej):
                rejected += store.read_table(rej, ["image_id"]).num_rows
        raise ValueError(
            f"dataset {dataset!r} has no feature rows: no readable images{where} "
            f"({len(shards)} shard(s), {rejected} image(s) rejected as unreadable)"
        )
    return table_to_featureset(pa.concat_tables(tables).sort_by("image_id"))


# --------------------------------------------------------------------------- PCA models


def pca_groups_of(ds: DatasetConfig, ids: Sequence[str]) -> list[PcaGroup]:
    """The images ``ids`` of ``ds`` by the PCA model they use (:func:`core.runner.pca_groups`):
    the two halves of its objects when it is self-split, else one group of all of them."""
    if not ds.self_split:
        return pca_groups(len(ids))
    if not ds.grouped:
        raise ValueError(f"dataset {ds.name!r} (layout {ds.layout}) has no object groups")
    return pca_groups(len(ids), group_labels(ds.layout, ids))


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


def fit_pca_models(
    config: ProjectConfig, ds: DatasetConfig, train: FeatureSet
) -> dict[str, PCAWhitening]:
    """PCA models of ``ds`` fitted on ``train`` (its paired dataset's features), by store path.

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
            source = f"half {group.training_half} of its objects (self-split)"
            name = f"{ds.name}-half{group.training_half}"
        check_pca_training_size(ds, source, len(data))
        meta = {**base, "training_set": name}
        for space in PCA_SPACES:
            out[pca_path(ds.name, space, group.half)] = fit_pca_space(space, data, params, meta)
    return out


# --------------------------------------------------------------------------- descriptors


def descriptor_table(ids: Sequence[str], desc: np.ndarray) -> pa.Table:
    dim = desc.shape[1]
    flat = pa.array(np.ascontiguousarray(desc, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table(
        {
            "image_id": pa.array(list(ids), pa.string()),
            "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def read_descriptors(store: FeatureStore, rel: str) -> tuple[list[str], np.ndarray]:
    t = store.read_table(rel)
    dim = t.schema.field("descriptor").type.list_size
    values = t.column("descriptor").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return t.column("image_id").to_pylist(), values.reshape(t.num_rows, dim)


def offline_aggregations() -> tuple[str, ...]:
    """The stored descriptors of every dataset: one per registered aggregation's ``stored``
    (raw, raw+pca, ofa, and any registered since)."""
    return stored_descriptors()


def method_pca(method: Method, pcas: dict[str, PCAWhitening] | None) -> PCAWhitening | None:
    """The PCA model a method ranks with: its registered ``pca_space``'s, or none."""
    space = method.spec.pca_space
    return None if pcas is None or space is None else pcas[space]


def descriptor_sets(
    feats: FeatureSet, pcas: dict[str, PCAWhitening] | None, params: SearchParams
) -> dict[str, np.ndarray]:
    """The stored descriptors (:func:`offline_aggregations`) of a feature set."""
    out = {}
    for agg in offline_aggregations():
        method = Method(AGGREGATIONS[agg].name)
        out[agg] = offline_descriptors(method, feats, method_pca(method, pcas), params)
    return out


def pca_models_for(
    store: FeatureStore, ds: DatasetConfig, half: int | None = None
) -> dict[str, PCAWhitening]:
    """The PCA models of ``ds`` by space (``half``: 1 or 2 for a self-split dataset)."""
    return {space: store.read_pca(pca_path(ds.name, space, half)) for space in PCA_SPACES}


def pca_output_dims(store: FeatureStore, ds: DatasetConfig) -> dict[str, int]:
    """Dimensions of each stored PCA model of ``ds`` (``class``, ``raw``; ``class-half1`` …
    for a self-split dataset), from the models' metadata."""
    halves: tuple[int | None, ...] = (1, 2) if ds.self_split else (None,)
    out = {}
    for space in PCA_SPACES:
        for half in halves:
            meta = store.read_pca_metadata(pca_path(ds.name, space, half))
            out[space if half is None else f"{space}-half{half}"] = int(meta["output_dim"])
    return out


def dataset_descriptors(
    config: ProjectConfig, store: FeatureStore, ds: DatasetConfig, feats: FeatureSet
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Offline descriptors of a ground-truth dataset (self-split: each half with its PCA)."""
    params = config.search
    out: dict[str, list] = {agg: [[], []] for agg in offline_aggregations()}
    for group in pca_groups_of(ds, feats.ids):
        sub = feats.subset(group.rows)
        d = descriptor_sets(sub, pca_models_for(store, ds, group.half), params)
        for agg, v in d.items():
            out[agg][0].extend(sub.ids)
            out[agg][1].append(v)
    return {agg: (ids, np.concatenate(vs)) for agg, (ids, vs) in out.items()}


# --------------------------------------------------------------------------- queries


QUERY_EXTRA = [("bbox", pa.list_(pa.float32(), 4)), ("query_name", pa.string())]


def load_groundtruth(ds: DatasetConfig, image_ids: Sequence[str]) -> gtio.GroundTruth:
    """Ground truth of a dataset for the given database ids."""
    if ds.layout in ("oxford", "paris"):
        return gtio.read_oxford_groundtruth(
            ds.groundtruth, image_ids=list(image_ids), dataset=ds.name
        )  # type: ignore[arg-type]
    if ds.layout in ("gnd", "revisited"):
        return gtio.load_gnd_pickle(ds.groundtruth)  # type: ignore[arg-type]
    if ds.layout == "ukbench":
        return gtio.ukbench_groundtruth(list(image_ids))
    if ds.layout == "holidays":
        return gtio.holidays_groundtruth(list(image_ids))
    raise ValueError(f"dataset {ds.name!r} (layout {ds.layout}) has no ground truth")


def check_groundtruth_images(
    ds: DatasetConfig, gt: gtio.GroundTruth, available: Sequence[str]
) -> None:
    """Fail fast (ValueError naming the ground-truth file, the count and the first ids) when
    the ground truth names images — database, query, positive or junk — that are not files of
    the dataset's folder."""
    have = set(available)
    named = set(gt.image_ids)
    for q in gt.queries:
        named |= {q.image_id} | q.positives | q.junk
    missing = sorted(named - have)
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"{ds.groundtruth}: the ground truth of dataset {ds.name!r} names {len(missing)} "
            f"image(s) that are not in {ds.images}: {shown}{more}"
        )


def query_box(
    ds: DatasetConfig, query: gtio.Query, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """A query's box clipped to its ``width``×``height`` image (None: the whole image).

    A box that is not finite, has zero area or lies entirely outside the image is an error
    naming the ground-truth file, the query, its image and the box; a box reaching past the
    border is clipped to it.
    """
    box = query.bbox
    if box is None:
        return None
    label = f"{ds.groundtruth}: query {query.name or query.image_id!r} (image {query.image_id!r}"
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite((x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{label}): box {tuple(box)} has zero area or is inverted")
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"{label}, {width}x{height} px): box {tuple(box)} lies outside the image")
    return (cx1, cy1, cx2, cy2)


def compute_query_features(
    ds: DatasetConfig,
    manifest: pa.Table,
    extractor: FeatureExtractor,
) -> pa.Table:
    """Features of a box-query dataset's queries (crop or paper protocol).

    The ground truth is checked against the manifest first (missing images, unreadable query
    images, empty or outside boxes fail naming the file and query) before any forward pass.
    """
    ids = manifest.column("image_id").to_pylist()
    gt = load_groundtruth(ds, ids)
    check_groundtruth_images(ds, gt, ids)
    rows = {
        r["image_id"]: r
        for r in manifest.select(["image_id", "relpath", "width", "height", "error"]).to_pylist()
    }
    plan = []
    for q in gt.queries:
        row = rows[q.image_id]
        if row["error"]:
            raise ValueError(
                f"{ds.groundtruth}: query {q.name or q.image_id!r}: its image {q.image_id!r} "
                f"cannot be read: {row['error']}"
            )
        plan.append((q, row["relpath"], query_box(ds, q, row["width"], row["height"])))
    recs, qids, boxes, names = [], [], [], []
    for q, relpath, box in plan:
        try:
            img = load_image(gtio.image_path(ds.images, relpath))
            recs.append(extractor.extract_query(img, box, ds.query_protocol))
        except ValueError as exc:  # ImageLoadError, or a box smaller than the network stride
            raise ValueError(f"{ds.groundtruth}: query {q.name or q.image_id!r}: {exc}") from exc
        qids.append(q.image_id)
        boxes.append(list(q.bbox) if q.bbox is not None else [np.nan] * 4)
        names.append(q.name or q.image_id)
    table = records_to_table(qids, [""] * len(qids), recs)
    table = table.append_column("bbox", pa.array(boxes, pa.list_(pa.float32(), 4)))
    return table.append_column("query_name", pa.array(names, pa.string()))


# --------------------------------------------------------------------------- rankings


def ranking_table(query_ids: Sequence[str], db_ids: Sequence[str], r: Ranking) -> pa.Table:
    """Rankings as rows: query id, ranked image ids (best first), scores."""
    ids = np.asarray(db_ids, dtype=object)
    return pa.table(
        {
            "query_id": pa.array(list(query_ids), pa.string()),
            "ranked_ids": pa.array([ids[row].tolist() for row in r.indices], pa.list_(pa.string())),
            "scores": pa.array(
                [row.astype(np.float32) for row in r.scores], pa.list_(pa.float32())
            ),
        }
    )


def score_rankings(
    ds: DatasetConfig, gt: gtio.GroundTruth, db_ids: Sequence[str], table: pa.Table
) -> dict[str, Any]:
    """mAP (and N-S, or revisited E/M/H) of stored rankings; per-query AP by query id
    (not for UKBench, whose every image is a query). Scored by :func:`core.evaluation.score`."""
    pos = {i: k for k, i in enumerate(db_ids)}
    rankings = [
        np.fromiter((pos[i] for i in row), dtype=np.int64, count=len(row))
        for row in table.column("ranked_ids").to_pylist()
    ]
    # The ground truth was checked against the image folder upstream (check_groundtruth_images).
    s = score(rankings, gt, db_ids, table.column("query_id").to_pylist(), strict=False)
    if s.ns_score is not None:
        return {"map": s.map, "ns_score": s.ns_score}
    out: dict[str, Any] = {"map": s.map}
    if s.revisited is not None:
        out["revisited"] = s.revisited
    out["aps"] = s.aps
    return out


def _read_all_descriptors(store: FeatureStore, rels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    ids, mats = [], []
    for rel in rels:
        if not store.exists(rel):  # a shard without readable images has no descriptors
            continue
        i, m = read_descriptors(store, rel)
        ids.extend(i)
        mats.append(m)
    return ids, np.concatenate(mats) if mats else np.zeros((0, 0), np.float32)


def manifest_paths(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str]
) -> dict[str, Path]:
    """image id → absolute path, from the stored manifests of the given shards.

    Rows with an ``error`` (quarantined files, which have no features) are left out: their
    names may be no valid relative path (a backslash, say)."""
    out: dict[str, Path] = {}
    for shard in shards:
        rel = manifest_path(ds.name, shard)
        for row in store.read_table(rel, ["image_id", "relpath", "error"]).to_pylist():
            if not row["error"]:
                out[row["image_id"]] = gtio.image_path(ds.images, row["relpath"])
    return out


def evaluation_rankings(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    extractor: FeatureExtractor | None = None,
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Rankings of every method of an evaluation, and run statistics.

    ``shards`` lists the current shards of the evaluated dataset and each distractor set.
    ``extractor`` is needed only by OnA and re-ranking methods (maps are recomputed).
    """
    ds = config.dataset(ev.dataset)
    params = config.search
    methods = list(ev.methods)
    aggs = offline_aggregations()
    db_ids, db = [], {}
    for agg in aggs:
        db_ids, db[agg] = read_descriptors(store, descriptors_path(ds.name, agg))
    for dname in ev.distractors:
        rels = {
            agg: [distractor_descriptors_path(ev.name, dname, agg, s) for s in shards[dname]]
            for agg in aggs
        }
        for agg in aggs:
            ids, m = _read_all_descriptors(store, rels[agg])
            if len(ids):
                db[agg] = np.concatenate([db[agg], m])
        db_ids = db_ids + ids
    if len(set(db_ids)) != len(db_ids):
        raise ValueError(f"evaluation {ev.name}: image ids are not unique across its datasets")
    needs_maps = any(m.needs_maps for m in methods)
    maps = None
    if needs_maps:
        if extractor is None:
            raise ValueError(f"evaluation {ev.name}: OnA/re-ranking need a feature extractor")
        paths = manifest_paths(store, ds, shards[ds.name])
        for dname in ev.distractors:
            paths.update(manifest_paths(store, config.dataset(dname), shards[dname]))
        unknown = [i for i in db_ids if i not in paths]
        if unknown:
            raise ValueError(
                f"evaluation {ev.name}: {len(unknown)} described image(s) are not in the current "
                f"manifests (first: {unknown[0]!r}): the descriptors are out of date"
            )
        maps = ComputedMaps(extractor, [paths[i] for i in db_ids])

    # Query groups: (query ids, query FeatureSet, query descriptors, db rows, PCA models).
    groups = []
    if ds.grouped:
        feats = load_features(store, ds.name, shards[ds.name])
        is_query = {q.image_id for q in load_groundtruth(ds, feats.ids).queries}
        pos = {i: k for k, i in enumerate(db_ids)}
        n_ds = len(feats)
        for group in pca_groups_of(ds, feats.ids):
            sub = feats.subset(group.rows)
            rows = np.array([pos[i] for i in sub.ids])
            rows = np.concatenate([rows, np.arange(n_ds, len(db_ids))])  # + distractors
            pcas = pca_models_for(store, ds, group.half)
            keep = np.array([j for j, i in enumerate(sub.ids) if i in is_query], dtype=np.int64)
            qfs = sub.subset(keep)
            qd = {agg: db[agg][rows[keep]] for agg in aggs}
            groups.append((qfs.ids, qfs, qd, rows, pcas))
    else:
        qt = store.read_table(query_features_path(ds.name))
        qfeats = table_to_featureset(qt.drop_columns(["bbox", "query_name"]))
        pcas = pca_models_for(store, ds)
        qd = descriptor_sets(qfeats, pcas, params)
        groups.append((qfeats.ids, qfeats, qd, np.arange(len(db_ids)), pcas))

    tables: dict[str, pa.Table] = {}
    stats: dict[str, Any] = {"database": len(db_ids), "queries": 0, "seconds": {}}
    for method in methods:
        t0 = time.perf_counter()
        qids_all, rows_all, scores_all = [], [], []
        for qids, qfs, qd, rows, pcas in groups:
            agg = method.stored_aggregation
            r = search(
                method,
                qfs,
                db[agg][rows],
                method_pca(method, pcas),
                None if maps is None else SubsetMaps(maps, rows),
                params,
                top_k=min(len(rows), MAX_RANKING_LENGTH),
                query_descriptors=qd[agg],
            )
            qids_all.extend(qids)
            rows_all.append(rows[r.indices])
            scores_all.append(r.scores)
        width = min(x.shape[1] for x in rows_all)
        ranking = Ranking(
            np.concatenate([x[:, :width] for x in rows_all]),
            np.concatenate([x[:, :width] for x in scores_all]),
        )
        tables[method.name] = ranking_table(qids_all, db_ids, ranking)
        stats["seconds"][method.name] = round(time.perf_counter() - t0, 3)
        stats["queries"] = len(qids_all)
    stats["map_forward_passes"] = 0 if maps is None else maps.forward_passes
    return tables, stats


# --------------------------------------------------------------------------- data versions


def table_version(tables: dict[str, pa.Table]) -> str:
    """Content hash of named Arrow tables (Arrow IPC bytes: equal data, equal hash)."""
    import hashlib

    h = hashlib.sha1()
    for name in sorted(tables):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, tables[name].schema.remove_metadata()) as writer:
            writer.write_table(tables[name].replace_schema_metadata(None))
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha1(sink.getvalue().to_pybytes()).digest())
    return h.hexdigest()[:16]


def array_version(arrays: dict[str, np.ndarray], ids: Sequence[str] = ()) -> str:
    """Content hash of named arrays (dtype, shape, bytes) and an id list."""
    import hashlib

    h = hashlib.sha1()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    for i in ids:
        h.update(f"{i}\n".encode())
    return h.hexdigest()[:16]


def _groundtruth_bytes(ds: DatasetConfig) -> bytes:
    """The ground truth's files, concatenated with their names (for its version)."""
    root = Path(str(ds.groundtruth))
    if root.is_file():
        return root.read_bytes()
    out = []
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file():
            out.append(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return b"\n".join(out)


def query_input_version(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str], code_version: str
) -> str | None:
    """What ``<ds>/query_features`` depends on: the ground truth's files, the sha1 of each
    query's image, the extraction settings and the query protocol — not the other images, so
    adding or changing a non-query image leaves the query features as they are.

    None while a manifest shard is missing. A ground truth that cannot be read still gets a
    version (with its error), so the asset runs and fails with that error.
    """
    import hashlib

    rows: dict[str, str] = {}
    for shard in shards:
        rel = manifest_path(ds.name, shard)
        if not store.exists(rel):
            return None
        t = store.read_table(rel, ["image_id", "sha1"])
        rows.update(
            zip(t.column("image_id").to_pylist(), t.column("sha1").to_pylist(), strict=True)
        )
    h = hashlib.sha1(f"{code_version}\0{ds.query_protocol}\0".encode())
    h.update(hashlib.sha1(_groundtruth_bytes(ds)).digest())
    try:
        gt = load_groundtruth(ds, sorted(rows))
        for q in gt.queries:
            h.update(f"{q.image_id}\0{rows.get(q.image_id, 'missing')}\n".encode())
    except (OSError, ValueError) as exc:
        h.update(f"error\0{exc}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- consistency


def _stored_ids(store: FeatureStore, rel: str) -> list[str]:
    return store.read_table(rel, ["image_id"]).column("image_id").to_pylist()


def evaluation_input_problems(
    config: ProjectConfig, store: FeatureStore, ev: EvaluationConfig, shards: dict[str, list[str]]
) -> list[str]:
    """Why the stored inputs of ``<ev>/rankings`` do not describe one state of the data.

    The descriptors must hold exactly the images whose features are stored now (the current
    manifest's readable images), each distractor shard's descriptors exactly that shard's
    features, every query must be a database image with stored features, and the ground
    truth must name only images of the database. An empty list: consistent.
    """
    ds = config.dataset(ev.dataset)
    problems: list[str] = []
    features: set[str] = set()
    manifest: set[str] = set()
    for s in shards[ds.name]:
        rel = features_path(ds.name, s)
        if not store.exists(rel):
            problems.append(f"features of {ds.name} shard {s!r} are not materialized")
            continue
        features.update(_stored_ids(store, rel))
        manifest.update(_stored_ids(store, manifest_path(ds.name, s)))
    for agg in offline_aggregations():
        rel = descriptors_path(ds.name, agg)
        if not store.exists(rel):
            problems.append(f"{ds.name} {agg} descriptors are not materialized")
            continue
        have = set(_stored_ids(store, rel))
        if have != features:
            problems.append(
                f"{ds.name} {agg} descriptors hold {len(have)} images, the stored features "
                f"{len(features)} ({len(features - have)} not described, {len(have - features)} "
                "no longer indexed): the descriptors are out of date"
            )
    database = set(features)
    for dname in ev.distractors:
        for s in shards[dname]:
            frel = features_path(dname, s)
            if not store.exists(frel):
                problems.append(f"features of {dname} shard {s!r} are not materialized")
                continue
            fids = set(_stored_ids(store, frel))
            database |= fids
            drel = distractor_descriptors_path(ev.name, dname, offline_aggregations()[0], s)
            dids = set(_stored_ids(store, drel)) if store.exists(drel) else set()
            if dids != fids:
                problems.append(
                    f"{ev.name}: {dname} shard {s!r} has {len(fids)} images with features but "
                    f"{len(dids)} descriptors: its distractor descriptors are out of date"
                )
    if not ds.grouped:
        rel = query_features_path(ds.name)
        if not store.exists(rel):
            problems.append(f"{ds.name} query features are not materialized")
        else:
            missing = sorted(set(_stored_ids(store, rel)) - manifest)
            if missing:
                problems.append(
                    f"{ds.name}: query image(s) {', '.join(map(repr, missing[:5]))} are no "
                    "longer in the manifest: the query features are out of date"
                )
        try:
            check_groundtruth_images(ds, load_groundtruth(ds, sorted(manifest)), sorted(manifest))
        except ValueError as exc:
            problems.append(str(exc))
    return problems
