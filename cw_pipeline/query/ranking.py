"""Ranking a database for one query image: the search of ``cw-pipeline search``
(:func:`search_dataset`: an image file against a configured dataset's index) and of the search
page (:func:`search_image`: an image in memory against a loaded index), and the CLI's table of
results."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import ThreadpoolController

from cw_pipeline.compute.features import dataset_extractor
from cw_pipeline.compute.pca import method_pca
from cw_pipeline.config import ProjectConfig
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method, offline_descriptors
from cw_pipeline.core.ranking import FullOrder, stable_top
from cw_pipeline.core.retrieval import ComputedMaps, MapCache, search
from cw_pipeline.query.common import (
    Hit,
    QueryError,
    QueryResult,
    SearchIndex,
    check_box,
    load_query_image,
)
from cw_pipeline.query.loading import load_index
from cw_pipeline.store import FeatureStore

__all__ = ["format_results", "search_dataset", "search_image"]


def search_dataset(
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
    map_cache: MapCache | None = None,
) -> QueryResult:
    """Rank ``index`` for an upright RGB ``query`` image (``name``: its file, for messages).

    The one search of ``cw-pipeline search`` and the search page: the query's features
    through ``extractor`` (cropped to ``box`` by ``protocol``, default the dataset's), then
    :func:`cw_pipeline.core.retrieval.search` per row group of the index (self-split halves
    merged by score; a row in several groups keeps its best score). ``full_ranking`` also
    keeps the whole database's order in :attr:`QueryResult.order` (for the query's AP; the
    search itself still keeps only the top of each group, the rest stays unsorted).
    ``map_cache`` keeps database feature maps (OnA, ``+r``) for later searches.

    Raises:
        QueryError (box, a box too small for the network), ValueError (method).
    """
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
    rows_all, scores_all, orders, passes = _search_groups(
        config, index, extractor, qfs, method, top, full_ranking, map_cache
    )
    hits, full = _merge_groups(index, rows_all, scores_all, orders, top, full_ranking)
    t2 = time.perf_counter()
    return QueryResult(
        dataset=ds.name,
        query=name,
        box=qbox,
        method=method.name,
        protocol=protocol if qbox is not None else None,
        database=len(index),
        descriptors=index.described(method),
        hits=hits,
        seconds=t2 - t0,
        map_forward_passes=passes,
        timings={"features": t1 - t0, "ranking": t2 - t1},
        record=record,
        order=full,
    )


def _search_groups(
    config: ProjectConfig,
    index: SearchIndex,
    extractor: FeatureExtractor,
    qfs: FeatureSet,
    method: Method,
    top: int,
    full_ranking: bool,
    map_cache: MapCache | None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[FullOrder], int]:
    """:func:`cw_pipeline.core.retrieval.search` over each row group of ``index``: per group
    its top rows and scores (database rows), its full order (``full_ranking`` only), and the
    forward passes its database maps took."""

    params = config.search
    agg = method.stored_aggregation
    db = index.descriptors[agg]
    rows_all, scores_all, orders, passes = [], [], [], 0
    for (rows, pcas), is_all in zip(index.groups, index.group_is_all, strict=True):
        maps = None
        if method.needs_maps:
            maps = ComputedMaps(extractor, [index.paths[i] for i in rows], map_cache)
        pca = method_pca(method, pcas)
        with _one_blas_thread():
            q = offline_descriptors(method, qfs, pca, params)
        r = search(
            method,
            qfs,
            db if is_all else db[rows],  # a copy of a 105k database costs more than ranking it
            pca,
            maps,
            params,
            min(top, len(rows)),
            query_descriptors=q,
            full_order=full_ranking,
        )
        rows_all.append(rows[r.indices[0]])
        scores_all.append(r.scores[0])
        if r.orders is not None:
            orders.append(_in_database(r.orders[0], rows, is_all, len(index)))
        passes += 0 if maps is None else maps.forward_passes
    return rows_all, scores_all, orders, passes


def _merge_groups(
    index: SearchIndex,
    rows_all: list[np.ndarray],
    scores_all: list[np.ndarray],
    orders: list[FullOrder],
    top: int,
    full_ranking: bool,
) -> tuple[list[Hit], FullOrder | None]:
    """The hits of a search from each row group's top (and, with ``full_ranking``, each
    group's full order): one group as ranked; self-split halves merged, a row by its best score
    then database order. Returns the hits and the whole database's order (None without one)."""
    rows = np.concatenate(rows_all)
    scores = np.concatenate(scores_all)
    order = np.arange(len(rows))  # one group: the search's order (re-ranked heads included)
    full = orders[0] if len(orders) == 1 else None
    if len(index.groups) > 1 and full_ranking:
        # Self-split halves: every row by its best score, then database order.
        best = np.maximum.reduce([o.row_scores() for o in orders])
        full = FullOrder(np.empty(0, np.int64), np.empty(0, np.float32), best)
        rows = stable_top(best[None], min(top, len(best)))[0]
        scores, order = best[rows], np.arange(len(rows))
    elif len(index.groups) > 1:  # the same merge over each half's top
        order = np.lexsort((rows, -scores))
        _, first = np.unique(rows[order], return_index=True)
        order = order[np.sort(first)]
    hits = [
        Hit(k, index.ids[rows[j]], float(scores[j]), index.paths[rows[j]])
        for k, j in enumerate(order[:top], 1)
    ]
    return hits, full


@cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # a few ms: inspects the loaded libraries once


def _one_blas_thread() -> Any:
    """BLAS on one thread for the query's small products (its PCA): right after the forward
    pass, and on a busy machine, a threaded BLAS waits on its threads several times longer
    than one thread computes (3 vs 30 ms at 64 × 1280 × 1280). OpenBLAS splits a product's
    rows and columns between threads, never the sums: the result is the same."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _in_database(order: FullOrder, rows: np.ndarray, is_all: bool, n_db: int) -> FullOrder:
    """A group's order (over its ``rows``) as an order of the database's rows (those outside
    the group last)."""
    if is_all:
        return order
    scores = np.full(n_db, -np.inf, dtype=np.float32)
    scores[rows] = order.scores
    return FullOrder(rows[order.head], order.head_scores, scores)


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
