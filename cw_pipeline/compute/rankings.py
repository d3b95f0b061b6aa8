"""Rankings of an evaluation: every method's ranked database per query, and their scores.

The database is the evaluated dataset's descriptors plus those of its distractor shards;
``evaluation_input_problems`` says when those stored inputs do not describe one state of the
data (the rankings would mix images of different times).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cw_pipeline.compute.descriptors import (
    descriptor_sets,
    offline_aggregations,
    read_descriptors,
    table_descriptors,
)
from cw_pipeline.compute.feature_maps import warehouse_maps
from cw_pipeline.compute.features import load_features, stored_image_count, table_to_featureset
from cw_pipeline.compute.manifests import evaluation_manifest_rows
from cw_pipeline.compute.pca import method_pca, pca_groups_of, pca_models_for, pca_version
from cw_pipeline.compute.published import current_index, descriptors_file
from cw_pipeline.compute.queries import check_groundtruth_images, load_groundtruth
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core.datasets import GroundTruth
from cw_pipeline.core.evaluation import score
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method
from cw_pipeline.core.ranking import Ranking
from cw_pipeline.core.retrieval import ComputedMaps, PairCache, SubsetMaps, search
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.store import (
    FeatureStore,
    distractor_descriptors_path,
    features_path,
    manifest_path,
    pair_cache_path,
    query_features_path,
)
from cw_pipeline.store.commits import Commit

logger = logging.getLogger(__name__)

#: Rankings keep the full list up to this many database images, then the top this many.
MAX_RANKING_LENGTH = 10_000


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
    ds: DatasetConfig, gt: GroundTruth, db_ids: Sequence[str], table: pa.Table
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


#: One group of queries ranked against one set of database rows: the query ids, their
#: FeatureSet, their stored descriptors by aggregation, the database rows, the PCA models.
QueryGroup = tuple[list[str], FeatureSet, dict[str, np.ndarray], np.ndarray, dict[str, Any]]


def projects_distractors(store: FeatureStore, ev: EvaluationConfig, dname: str) -> bool:
    """Whether ``<ev>/rankings`` projects the out-of-date shards of distractor set ``dname``
    itself (with the dataset's current PCA, exactly as ``<ev>/<dname>_descriptors`` will): a
    set of at most ``reproject_at_once`` images, so an evaluation with distractors follows a
    new PCA in the same refresh as its dataset. A larger set is ranked only once its stored
    descriptors are current (re-projected at the evaluation's cron)."""
    return stored_image_count(store, dname) <= ev.reproject_at_once


def _current_distractor_tables(
    store: FeatureStore,
    ev: EvaluationConfig,
    dname: str,
    shard: str,
    pca: str | None,
    ids_only: bool = False,
) -> dict[str, pa.Table] | str:
    """The stored descriptor tables of a distractor shard (by aggregation) when they describe
    exactly its stored features, projected with the PCA of version ``pca``; else why not.
    Each table is read once, with its metadata (a concurrent re-projection replaces whole
    files: each one read is either the old or the new one, and is checked as read);
    ``ids_only``: only their ``image_id`` column (a check, not a read of the descriptors)."""
    frel = features_path(dname, shard)
    if not store.exists(frel):
        return f"features of {dname} shard {shard!r} are not materialized"
    fids = _stored_ids(store, frel)
    tables: dict[str, pa.Table] = {}
    for agg in offline_aggregations():
        rel = distractor_descriptors_path(ev.name, dname, agg, shard)
        columns = ["image_id"] if ids_only else None
        t = store.read_table(rel, columns) if store.exists(rel) else None
        dids = [] if t is None else t.column("image_id").to_pylist()
        if set(dids) != set(fids):
            return (
                f"{ev.name}: {dname} shard {shard!r} has {len(fids)} images with features but "
                f"{len(dids)} descriptors: its distractor descriptors are out of date"
            )
        meta = (t.schema.metadata or {}) if t is not None else {}
        recorded = meta.get(b"pca")
        if fids and _other_pca(pca, None if recorded is None else recorded.decode()):
            return (
                f"{ev.name}: the descriptors of {dname} shard {shard!r} were projected with "
                f"another PCA than the evaluation's: they are out of date "
                "(re-projected at once for a small set, else at the evaluation's cron)"
            )
        if t is not None:
            tables[agg] = t
    return tables


def _distractor_shard(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    dname: str,
    shard: str,
    pcas: dict[str, Any],
    projects: bool,
) -> tuple[dict[str, tuple[list[str], np.ndarray]], bool]:
    """A distractor shard's descriptors by aggregation: the stored ones when current, else
    (``projects``) computed here from its features with ``pcas``, exactly as its asset
    computes them. The flag says whether they were projected here."""
    stored = _current_distractor_tables(store, ev, dname, shard, pca_version(pcas))
    if isinstance(stored, dict):
        return {agg: table_descriptors(t) for agg, t in stored.items()}, False
    if not projects:
        raise ValueError(stored)
    if not _stored_ids(store, features_path(dname, shard)):
        return {}, True  # a shard without images has no descriptors
    feats = load_features(store, dname, [shard])
    desc = descriptor_sets(feats, pcas, config.search)
    return {
        agg: (list(feats.ids), np.ascontiguousarray(m, dtype=np.float32)) for agg, m in desc.items()
    }, True


def _database(
    config: ProjectConfig,
    store: FeatureStore,
    ds: DatasetConfig,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    index: Commit,
    stats: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Image ids and descriptors (by aggregation) of the evaluated dataset, then of each
    distractor set's shards: stored ones, or for a small set's out-of-date shards projected
    here (:func:`projects_distractors`; counted in ``stats["distractors_projected"]``)."""
    aggs = offline_aggregations()
    db_ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for agg in aggs:
        db_ids, m = read_descriptors(store, descriptors_file(index, agg))
        parts[agg] = [m]
    pcas = pca_models_for(store, ds, None, index) if ev.distractors else {}
    projected = 0
    counts = {ds.name: len(db_ids)}
    for dname in ev.distractors:
        projects = projects_distractors(store, ev, dname)
        for s in shards[dname]:
            desc, here = _distractor_shard(config, store, ev, dname, s, pcas, projects)
            if not desc:
                continue
            ids = desc[aggs[0]][0]
            for agg in aggs:
                if desc[agg][0] != ids:
                    raise ValueError(
                        f"evaluation {ev.name}: {dname} shard {s!r} holds its images in "
                        "different orders in its descriptor tables"
                    )
                parts[agg].append(desc[agg][1])
            db_ids.extend(ids)
            counts[dname] = counts.get(dname, 0) + len(ids)
            projected += len(ids) if here else 0
    db = {agg: np.concatenate(p) if len(p) > 1 else p[0] for agg, p in parts.items()}
    if len(set(db_ids)) != len(db_ids):
        raise ValueError(f"evaluation {ev.name}: image ids are not unique across its datasets")
    if stats is not None:
        stats["distractors_projected"] = projected
        stats["database_parts"] = list(counts.items())
    return db_ids, db


def _database_maps(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    db_ids: Sequence[str],
    extractor: FeatureExtractor | None,
) -> ComputedMaps:
    """The database images' maps (for OnA and re-ranking): kept ones by sha1 from the
    warehouse (:mod:`cw_pipeline.compute.feature_maps`), the others computed by ``extractor``
    and kept."""
    if extractor is None:
        raise ValueError(f"evaluation {ev.name}: OnA/re-ranking need a feature extractor")
    ds = config.dataset(ev.dataset)
    rows = evaluation_manifest_rows(config, store, ev, shards)
    unknown = [i for i in db_ids if i not in rows]
    if unknown:
        raise ValueError(
            f"evaluation {ev.name}: {len(unknown)} described image(s) are not in the current "
            f"manifests (first: {unknown[0]!r}): the descriptors are out of date"
        )
    return ComputedMaps(
        extractor,
        [rows[i][0] for i in db_ids],
        keys=[rows[i][1] for i in db_ids],
        store=warehouse_maps(config, store, ds),
    )


#: Pair values an evaluation keeps (``pair_cache_path`` kinds), and the most bytes of OnA
#: descriptors it writes (n queries × n images × d floats; beyond it they are recomputed).
PAIR_KINDS = ("region", "ona")
MAX_ONA_CACHE_BYTES = 2 * 10**9


def load_pair_cache(
    store: FeatureStore,
    ev: EvaluationConfig,
    extraction: str,
    siblings: Sequence[EvaluationConfig] = (),
) -> PairCache:
    """The pair values an evaluation's rankings kept (empty when none or unreadable), and
    those of ``siblings``, evaluations of the same dataset (read only: every value is keyed by
    its context, query and image content, so a sibling's value of a pair is this one's; the
    values this evaluation uses are kept in its own cache)."""
    pairs = PairCache(extraction=extraction)
    for owner in (*siblings, ev):  # its own values last (they win)
        for kind in PAIR_KINDS:
            _read_pair_values(store, pair_cache_path(owner.name, kind), kind, pairs)
    return pairs


def _read_pair_values(store: FeatureStore, rel: str, kind: str, pairs: PairCache) -> None:
    if not store.exists(rel):
        return
    try:
        t = store.read_table(rel)
    except (OSError, ValueError, KeyError) as exc:  # a damaged cache is recomputed
        logger.warning("%s: %s; recomputing its pairs", store.url(rel), exc)
        return
    keys = zip(
        t.column("context").to_pylist(),
        t.column("query").to_pylist(),
        t.column("image").to_pylist(),
        strict=True,
    )
    if kind == "region":
        pairs.region.update(zip(keys, t.column("value").to_numpy().tolist(), strict=True))
    else:
        for key, raw in zip(keys, t.column("value").to_pylist(), strict=True):
            pairs.ona[key] = np.frombuffer(raw, dtype=np.float32)


def save_pair_cache(store: FeatureStore, ev: EvaluationConfig, pairs: PairCache) -> None:
    """Write the pair values this run read or computed (the others are of images, queries or
    settings no longer current: dropped)."""
    for kind in PAIR_KINDS:
        rel = pair_cache_path(ev.name, kind)
        keys = sorted(pairs.touched[kind])
        if kind == "region":
            values = pa.array([pairs.region[k] for k in keys], pa.float32())
        else:
            if sum(pairs.ona[k].nbytes for k in keys) > MAX_ONA_CACHE_BYTES:
                logger.info("%s: over %d bytes, not kept", ev.name, MAX_ONA_CACHE_BYTES)
                keys = []
            values = pa.array(
                [pairs.ona[k].astype(np.float32).tobytes() for k in keys], pa.binary()
            )
        if not keys:
            store.delete(rel)
            continue
        cols = list(zip(*keys, strict=True))
        table = pa.table(
            {
                "context": pa.array(cols[0], pa.string()).dictionary_encode(),
                "query": pa.array(cols[1], pa.string()).dictionary_encode(),
                "image": pa.array(cols[2], pa.string()),
                "value": values,
            }
        )
        store.write_table(rel, table)


def _query_groups(
    config: ProjectConfig,
    store: FeatureStore,
    ds: DatasetConfig,
    shards: Sequence[str],
    db_ids: Sequence[str],
    db: dict[str, np.ndarray],
    index: Commit,
) -> list[QueryGroup]:
    """The queries of ``ds`` by the PCA they rank with: a grouped dataset's queries are its
    own images (each self-split half against its half plus the distractors), the others'
    come from the stored query features."""
    if not ds.grouped:
        qt = store.read_table(query_features_path(ds.name))
        qfeats = table_to_featureset(qt.drop_columns(["bbox", "query_name"]))
        pcas = pca_models_for(store, ds, None, index)
        qd = descriptor_sets(qfeats, pcas, config.search)
        return [(qfeats.ids, qfeats, qd, np.arange(len(db_ids)), pcas)]
    groups: list[QueryGroup] = []
    feats = load_features(store, ds.name, shards)
    is_query = {q.image_id for q in load_groundtruth(ds, feats.ids).queries}
    pos = {i: k for k, i in enumerate(db_ids)}
    n_ds = len(feats)
    for group in pca_groups_of(ds, feats.ids):
        sub = feats.subset(group.rows)
        rows = np.array([pos[i] for i in sub.ids])
        rows = np.concatenate([rows, np.arange(n_ds, len(db_ids))])  # + distractors
        keep = np.array([j for j, i in enumerate(sub.ids) if i in is_query], dtype=np.int64)
        qfs = sub.subset(keep)
        qd = {agg: m[rows[keep]] for agg, m in db.items()}
        groups.append((qfs.ids, qfs, qd, rows, pca_models_for(store, ds, group.half, index)))
    return groups


def _rank_method(
    method: Method,
    groups: Sequence[QueryGroup],
    db: dict[str, np.ndarray],
    maps: ComputedMaps | None,
    params: SearchParams,
    pairs: PairCache | None = None,
) -> tuple[list[str], Ranking]:
    """One method's ranking of every query group, as one Ranking over all the queries."""
    qids_all: list[str] = []
    rows_all, scores_all = [], []
    agg = method.stored_aggregation
    for qids, qfs, qd, rows, pcas in groups:
        r = search(
            method,
            qfs,
            db[agg][rows],
            method_pca(method, pcas),
            None if maps is None else SubsetMaps(maps, rows),
            params,
            top_k=min(len(rows), MAX_RANKING_LENGTH),
            query_descriptors=qd[agg],
            pairs=pairs,
        )
        qids_all.extend(qids)
        rows_all.append(rows[r.indices])
        scores_all.append(r.scores)
    width = min(x.shape[1] for x in rows_all)
    ranking = Ranking(
        np.concatenate([x[:, :width] for x in rows_all]),
        np.concatenate([x[:, :width] for x in scores_all]),
    )
    return qids_all, ranking


def evaluation_rankings(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    extractor: FeatureExtractor | None = None,
    index: Commit | None = None,
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Rankings of every method of an evaluation, and run statistics.

    ``shards`` lists the current shards of the evaluated dataset and each distractor set.
    ``extractor`` is needed only by OnA and re-ranking methods: it computes the maps the
    warehouse does not keep. The region scores and OnA descriptors of (query, image) pairs are
    kept per evaluation (:func:`save_pair_cache`) and shared between the evaluations of one
    dataset: a refresh computes only the pairs none of them has seen. The statistics say how
    many forward passes, region scores and OnA descriptors were computed and how many reused,
    and how many distractor images were projected here (:func:`projects_distractors`).

    The dataset's descriptors and PCA come from one published index (``index``: default the
    current one, :func:`~cw_pipeline.compute.published.current_index`), never from two.
    """
    ds = config.dataset(ev.dataset)
    index = index or _index(store, ds)
    methods = list(ev.methods)
    stats: dict[str, Any] = {"database": 0, "queries": 0, "seconds": {}}
    db_ids, db = _database(config, store, ds, ev, shards, index, stats)
    stats["database"] = len(db_ids)
    stats["database_ids"] = db_ids
    maps = pairs = None
    if any(m.needs_maps for m in methods):
        maps = _database_maps(config, store, ev, shards, db_ids, extractor)
        siblings = [
            e for e in config.evaluations.values() if e.dataset == ev.dataset and e.name != ev.name
        ]
        pairs = load_pair_cache(store, ev, ds.extraction.code_version(), siblings)
    groups = _query_groups(config, store, ds, shards[ds.name], db_ids, db, index)
    tables: dict[str, pa.Table] = {}
    for method in methods:
        t0 = time.perf_counter()
        qids, ranking = _rank_method(method, groups, db, maps, config.search, pairs)
        tables[method.name] = ranking_table(qids, db_ids, ranking)
        stats["seconds"][method.name] = round(time.perf_counter() - t0, 3)
        stats["queries"] = len(qids)
    stats["map_forward_passes"] = 0 if maps is None else maps.forward_passes
    if maps is not None and pairs is not None:
        save_pair_cache(store, ev, pairs)
        stats["maps_reused"] = maps.stored_reused
        stats.update(maps.store.statistics() if maps.store is not None else {})  # type: ignore[attr-defined]
        stats.update(pairs.statistics())
    return tables, stats


def _index(store: FeatureStore, ds: DatasetConfig) -> Commit:
    index = current_index(store, ds)
    if index is None:
        raise FileNotFoundError(f"dataset {ds.name!r} has no descriptors in the feature store")
    return index


def _stored_ids(store: FeatureStore, rel: str) -> list[str]:
    return store.read_table(rel, ["image_id"]).column("image_id").to_pylist()


def _other_pca(dataset_pca: str | None, distractor_pca: str | None) -> bool:
    """Whether distractor descriptors were projected with another PCA than the dataset's.
    Tables written before descriptors recorded their PCA say nothing: not a mismatch (they are
    re-projected at their next change of inputs, like any other)."""
    return dataset_pca is not None and distractor_pca is not None and dataset_pca != distractor_pca


def evaluation_input_problems(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    index: Commit | None = None,
) -> list[str]:
    """Why the stored inputs of ``<ev>/rankings`` do not describe one state of the data
    (``index``: the dataset's published index they are checked against, default the current).

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
    index = index or current_index(store, ds)
    for agg in offline_aggregations():
        if index is None or not store.exists(rel := descriptors_file(index, agg)):
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
    with_pca = ev.distractors and index is not None
    pca = pca_version(pca_models_for(store, ds, None, index)) if with_pca else None
    for dname in ev.distractors:
        projects = projects_distractors(store, ev, dname)
        for s in shards[dname]:
            frel = features_path(dname, s)
            if not store.exists(frel):
                problems.append(f"features of {dname} shard {s!r} are not materialized")
                continue
            database |= set(_stored_ids(store, frel))
            stored = _current_distractor_tables(store, ev, dname, s, pca, ids_only=True)
            if isinstance(stored, str) and not projects:
                problems.append(stored)
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
