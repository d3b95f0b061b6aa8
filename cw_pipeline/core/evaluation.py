"""Retrieval evaluation: Oxford/Paris mAP (classic and revisited protocols) and UKBench scores.

All AP values use the official Oxford ``compute_ap`` (trapezoidal rule with an initial
precision of 1), as in the ``revisitop`` / ``cirtorch`` Python ports. Junk images are removed
from a ranked list before AP is computed: they count neither as positives nor as negatives and
the ranks of the images after them shift up.

Conventions
-----------
* A *ranking* is a 1-D integer array of database indices, best match first. It may be
  truncated (top-k); positives it does not contain contribute nothing to the AP.
* ``compute_map`` / ``compute_map_revisited`` accept either a 2-D array of shape
  ``(n_db, n_queries)`` (one column per query, the ``revisitop`` layout) or a sequence of 1-D
  rankings, one per query.
* The UKBench functions take a 2-D array of shape ``(n_queries, k)`` (one row per query).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from cw_pipeline.core.datasets import GroundTruth

__all__ = [
    "MapResult",
    "average_precision",
    "average_precision_at",
    "compute_ap",
    "compute_map",
    "compute_map_revisited",
    "precision_recall_points",
    "ukbench_map",
    "ukbench_ns_score",
]

IndexCollection = Collection[int] | np.ndarray
Rankings = np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]]


class MapResult(NamedTuple):
    """Result of :func:`compute_map`.

    ``aps`` and ``prs`` hold NaN for queries without positives; those queries are excluded from
    ``map`` and ``pr``, and ``n_evaluated`` counts the queries that were averaged.
    """

    map: float
    aps: np.ndarray  # (n_queries,)
    pr: np.ndarray  # (len(kappas),) mean precision at each kappa
    prs: np.ndarray  # (n_queries, len(kappas))
    n_evaluated: int


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_index_array(values: Any, what: str, n_db: int | None = None) -> np.ndarray:
    """Convert ``values`` to a 1-D int64 array of non-negative indices (``< n_db`` if given)."""
    arr = np.asarray(list(values) if isinstance(values, (set, frozenset)) else values)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    low = int(arr.min())
    if low < 0:
        raise ValueError(f"{what} contains the negative index {low}")
    if n_db is not None:
        high = int(arr.max())
        if high >= n_db:
            raise ValueError(f"{what} contains the index {high}, out of range for {n_db} images")
    return arr


def _check_unique(arr: np.ndarray, what: str) -> None:
    """Raise if a 1-D index array holds a repeated value."""
    if arr.size < 2:
        return
    s = np.sort(arr)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        raise ValueError(f"{what} lists the index {int(s[dup[0]])} more than once")


def _positive_ranks(
    ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray, what: str
) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once junk images are removed."""
    _check_unique(ranking, what)
    if positives.size and junk.size:
        both = np.intersect1d(positives, junk)
        if both.size:
            raise ValueError(f"{what}: index {int(both[0])} is both positive and junk")
    is_pos = np.isin(ranking, positives)
    if junk.size:
        is_junk = np.isin(ranking, junk)
        kept_rank = np.cumsum(~is_junk) - 1
        return kept_rank[is_pos]
    return np.flatnonzero(is_pos)


def _iter_rankings(ranks: Rankings, n_queries: int, n_db: int | None) -> list[np.ndarray]:
    """Split ``ranks`` into one validated 1-D ranking per query."""
    if isinstance(ranks, np.ndarray):
        if ranks.ndim != 2:
            raise ValueError(
                f"ranks must be a 2-D array (n_db, n_queries), got shape {ranks.shape}"
            )
        if ranks.shape[1] != n_queries:
            raise ValueError(
                f"ranks has shape {ranks.shape} but there are {n_queries} queries; expected one "
                "column per query (n_db, n_queries) — transpose a (n_queries, n_db) array"
            )
        columns: Iterable[Any] = ranks.T
    else:
        columns = list(ranks)
        if len(columns) != n_queries:
            raise ValueError(f"got {len(columns)} rankings for {n_queries} queries")
    return [_as_index_array(col, f"ranking of query {i}", n_db) for i, col in enumerate(columns)]


# --------------------------------------------------------------------------------------------
# AP
# --------------------------------------------------------------------------------------------


def compute_ap(ranks: np.ndarray | Sequence[int], nres: int) -> float:
    """Official Oxford AP from the 0-based ranks of the retrieved positives.

    ``ranks`` are the strictly increasing positions of the positives in the ranked list after
    junk removal; ``nres`` is the total number of positives (those missing from the list count
    as never retrieved). For positive ``j`` at rank ``r``: ``p0 = 1 if r == 0 else j / r``,
    ``p1 = (j + 1) / (r + 1)`` and ``ap += (p0 + p1) / (2 * nres)``.
    """
    if isinstance(nres, bool) or not isinstance(nres, (int, np.integer)) or nres <= 0:
        raise ValueError(f"nres must be a positive integer, got {nres!r}")
    r = _as_index_array(ranks, "ranks")
    if r.size > nres:
        raise ValueError(f"{r.size} ranks given but nres is only {nres}")
    if r.size > 1 and np.any(np.diff(r) <= 0):
        raise ValueError(f"ranks must be strictly increasing, got {r.tolist()}")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    rf = r.astype(np.float64)
    p0 = np.divide(j, rf, out=np.ones_like(j), where=r != 0)
    p1 = (j + 1.0) / (rf + 1.0)
    return float(np.sum(p0 + p1) / (2.0 * nres))


def average_precision(
    ranking: np.ndarray | Sequence[int],
    positives: IndexCollection,
    junk: IndexCollection = (),
) -> float:
    """AP of one ranked list of database indices (best first) with Oxford junk handling.

    Returns NaN when ``positives`` is empty (such queries are skipped by :func:`compute_map`,
    as in the revisited protocol).
    """
    pos = np.unique(_as_index_array(positives, "positives"))
    jnk = np.unique(_as_index_array(junk, "junk"))
    rk = _as_index_array(ranking, "ranking")
    if pos.size == 0:
        return math.nan
    return compute_ap(_positive_ranks(rk, pos, jnk, "ranking"), int(pos.size))


def average_precision_at(
    positive_positions: np.ndarray | Sequence[int],
    junk_positions: np.ndarray | Sequence[int] = (),
) -> float:
    """AP (Oxford, junk ignored) from where each positive and junk image stands in a ranking
    of the whole database (0-based positions, e.g. ``FullOrder.positions``): the same value
    as :func:`average_precision` of that ranking, without the ranking itself.

    Returns NaN without positives.
    """
    pos = np.sort(_as_index_array(positive_positions, "positive positions"))
    jnk = np.sort(_as_index_array(junk_positions, "junk positions"))
    if pos.size == 0:
        return math.nan
    _check_unique(np.concatenate([pos, jnk]), "positive and junk positions")
    # A positive's rank once junk is removed: its position less the junk images before it.
    return compute_ap(pos - np.searchsorted(jnk, pos), int(pos.size))


def precision_recall_points(
    ranking: np.ndarray | Sequence[int],
    positives: IndexCollection,
    junk: IndexCollection = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each rank of the junk-free list (one point per kept rank)."""
    pos = np.unique(_as_index_array(positives, "positives"))
    jnk = np.unique(_as_index_array(junk, "junk"))
    rk = _as_index_array(ranking, "ranking")
    if pos.size == 0:
        raise ValueError("precision_recall_points needs at least one positive (recall undefined)")
    pos_ranks = _positive_ranks(rk, pos, jnk, "ranking")
    n_kept = int(rk.size - np.count_nonzero(np.isin(rk, jnk))) if jnk.size else int(rk.size)
    hits = np.zeros(n_kept, dtype=np.float64)
    hits[pos_ranks] = 1.0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, n_kept + 1, dtype=np.float64)
    recall = tp / float(pos.size)
    return precision, recall


def _precision_at(pos_ranks: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """revisitop's mP@k for one query: ``k' = min(max rank (1-based), k)``, ``|pos <= k'| / k'``."""
    out = np.zeros(len(kappas), dtype=np.float64)
    if pos_ranks.size == 0:
        return out
    one_based = pos_ranks + 1
    last = int(one_based.max())
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(one_based <= kq) / kq
    return out


def compute_map(
    ranks: Rankings,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (),
    n_db: int | None = None,
) -> MapResult:
    """mAP over queries, as ``revisitop``'s ``compute_map``.

    ``gnd[i]`` holds ``'ok'`` (positive indices) and optionally ``'junk'``. Queries with no
    positives get AP NaN and are excluded from the mean. ``kappas`` adds mP@k (revisitop's
    definition: precision at ``min(k, rank of the last retrieved positive)``). ``n_db`` bounds
    the indices; for a 2-D ``ranks`` it defaults to the number of rows.
    """
    kappas = [int(k) for k in kappas]
    for k in kappas:
        if k <= 0:
            raise ValueError(f"kappas must be positive, got {k}")
    n_queries = len(gnd)
    if n_queries == 0:
        raise ValueError("gnd is empty: no queries to evaluate")
    if n_db is None and isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        n_db = ranks.shape[0]
    rankings = _iter_rankings(ranks, n_queries, n_db)

    aps = np.full(n_queries, np.nan)
    prs = np.full((n_queries, len(kappas)), np.nan)
    for i, (ranking, qgnd) in enumerate(zip(rankings, gnd, strict=True)):
        if "ok" not in qgnd:
            raise ValueError(f"gnd[{i}] has no 'ok' entry (keys: {sorted(qgnd)})")
        pos = np.unique(_as_index_array(qgnd["ok"], f"gnd[{i}]['ok']", n_db))
        if pos.size == 0:
            continue
        junk = np.unique(_as_index_array(qgnd.get("junk", ()), f"gnd[{i}]['junk']", n_db))
        pos_ranks = _positive_ranks(ranking, pos, junk, f"ranking of query {i}")
        aps[i] = compute_ap(pos_ranks, int(pos.size))
        prs[i] = _precision_at(pos_ranks, kappas)

    evaluated = ~np.isnan(aps)
    n_evaluated = int(np.count_nonzero(evaluated))
    if n_evaluated == 0:
        raise ValueError(f"none of the {n_queries} queries has a positive: mAP is undefined")
    mean_ap = float(np.mean(aps[evaluated]))
    pr = prs[evaluated].mean(axis=0) if kappas else np.zeros(0)
    return MapResult(mean_ap, aps, pr, prs, n_evaluated)


def compute_map_revisited(
    ranks: Rankings,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    n_db: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Revisited Oxford/Paris evaluation (Radenović et al., CVPR 2018).

    ``gnd[i]`` holds ``'easy'``, ``'hard'`` and ``'junk'``. Easy: positives = easy, junk =
    junk ∪ hard. Medium: positives = easy ∪ hard, junk = junk. Hard: positives = hard, junk =
    junk ∪ easy. Returns ``{"easy"|"medium"|"hard": {"map", "aps", "mp", "n_evaluated"}}``
    where ``mp`` maps each kappa to its mP@k.
    """
    protocols: dict[str, list[dict[str, np.ndarray]]] = {"easy": [], "medium": [], "hard": []}
    for i, q in enumerate(gnd):
        missing = {"easy", "hard"} - set(q)
        if missing:
            raise ValueError(f"gnd[{i}] lacks {sorted(missing)} (keys: {sorted(q)})")
        easy = _as_index_array(q["easy"], f"gnd[{i}]['easy']")
        hard = _as_index_array(q["hard"], f"gnd[{i}]['hard']")
        junk = _as_index_array(q.get("junk", ()), f"gnd[{i}]['junk']")
        protocols["easy"].append({"ok": easy, "junk": np.union1d(junk, hard)})
        protocols["medium"].append({"ok": np.union1d(easy, hard), "junk": junk})
        protocols["hard"].append({"ok": hard, "junk": np.union1d(junk, easy)})
    out: dict[str, dict[str, Any]] = {}
    for name, pgnd in protocols.items():
        res = compute_map(ranks, pgnd, kappas=kappas, n_db=n_db)
        out[name] = {
            "map": res.map,
            "aps": res.aps,
            "mp": {int(k): float(v) for k, v in zip(kappas, res.pr, strict=True)},
            "n_evaluated": res.n_evaluated,
        }
    return out


# --------------------------------------------------------------------------------------------
# UKBench
# --------------------------------------------------------------------------------------------


def _ukbench_inputs(
    rankings: np.ndarray | Sequence[Sequence[int]],
    labels: np.ndarray | Sequence[int],
    query_indices: np.ndarray | Sequence[int] | None,
    min_k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate UKBench inputs; return (rankings, labels, query labels)."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    n_db = lab.size
    rk = np.asarray(rankings)
    if rk.ndim != 2:
        raise ValueError(f"rankings must be 2-D (n_queries, k), got shape {rk.shape}")
    if rk.shape[1] < min_k:
        raise ValueError(f"rankings need at least {min_k} columns, got shape {rk.shape}")
    if rk.dtype.kind not in "iu":
        raise ValueError(f"rankings must hold integer indices, got dtype {rk.dtype}")
    if rk.size:
        low, high = int(rk.min()), int(rk.max())
        if low < 0:
            raise ValueError(f"rankings contain the negative index {low}")
        if high >= n_db:
            raise ValueError(f"rankings contain the index {high}, out of range for {n_db} images")
        s = np.sort(rk, axis=1)
        dup_rows = np.flatnonzero(np.any(s[:, 1:] == s[:, :-1], axis=1))
        if dup_rows.size:
            raise ValueError(f"ranking of query {int(dup_rows[0])} repeats a database index")
    n_q = rk.shape[0]
    if query_indices is None:
        if n_q > n_db:
            raise ValueError(f"{n_q} rankings but only {n_db} labels; pass query_indices")
        qi = np.arange(n_q)
    else:
        qi = _as_index_array(query_indices, "query_indices", n_db)
        if qi.size != n_q:
            raise ValueError(f"{qi.size} query_indices for {n_q} rankings")
    return rk.astype(np.int64, copy=False), lab, lab[qi]


def ukbench_ns_score(
    rankings: np.ndarray | Sequence[Sequence[int]],
    labels: np.ndarray | Sequence[int],
    query_indices: np.ndarray | Sequence[int] | None = None,
) -> float:
    """UKBench N-S score: mean number of same-label images in the top 4 (4.0 is perfect).

    ``rankings[i]`` ranks the whole database (query included) for the query image
    ``query_indices[i]`` (default: ``i``); only the first four columns are used.
    """
    rk, lab, qlab = _ukbench_inputs(rankings, labels, query_indices, min_k=4)
    if rk.shape[0] == 0:
        raise ValueError("rankings has no queries")
    hits = lab[rk[:, :4]] == qlab[:, None]
    return float(hits.sum(axis=1).mean())


def ukbench_map(
    rankings: np.ndarray | Sequence[Sequence[int]],
    labels: np.ndarray | Sequence[int],
    query_indices: np.ndarray | Sequence[int] | None = None,
) -> float:
    """UKBench mAP with the Oxford ``compute_ap``: positives = all images with the query's label
    (the query itself included), no junk. Rankings may be truncated to any ``k >= 1``."""
    rk, lab, qlab = _ukbench_inputs(rankings, labels, query_indices, min_k=1)
    if rk.shape[0] == 0:
        raise ValueError("rankings has no queries")
    uniq, counts = np.unique(lab, return_counts=True)
    nres = counts[np.searchsorted(uniq, qlab)].astype(np.float64)
    hits = lab[rk] == qlab[:, None]  # (n_q, k)
    j = np.cumsum(hits, axis=1) - 1.0  # index among retrieved positives
    r = np.broadcast_to(np.arange(rk.shape[1], dtype=np.float64), hits.shape)
    p0 = np.divide(j, r, out=np.ones(hits.shape), where=r != 0)
    p1 = (j + 1.0) / (r + 1.0)
    aps = np.where(hits, p0 + p1, 0.0).sum(axis=1) / (2.0 * nres)
    return float(aps.mean())


# --------------------------------------------------------------------------------------------
# one scoring path
# --------------------------------------------------------------------------------------------


class Scores(NamedTuple):
    """Scores of rankings: mAP (revisited: Medium), N-S (UKBench-style groups), revisited
    E/M/H mAPs, and the per-query APs by query id."""

    map: float
    ns_score: float | None
    revisited: dict[str, float] | None
    aps: dict[str, float]


def score(
    rankings: np.ndarray | Sequence[np.ndarray],
    groundtruth: GroundTruth,
    db_ids: Sequence[str],
    query_ids: Sequence[str] | None = None,
    strict: bool = True,
) -> Scores:
    """Score rankings (rows of indices into ``db_ids``, best first, possibly truncated).

    ``query_ids`` names each row's query (default: the ground truth's queries in order); each
    must be a query of ``groundtruth``. Positives and junk come from the ground truth (Holidays:
    the query is junk in its own ranking; UKBench: the query is a positive), and every image
    they name must be in ``db_ids``: ground truth naming missing images is refused
    (ValueError); ``strict=False`` drops them (for callers that validated the ground truth
    against the image folder already, as the pipeline does). Grouped ground truth without
    junk (UKBench) also gets the N-S score (mean positives in the top 4).
    """
    qids = [q.image_id for q in groundtruth.queries] if query_ids is None else list(query_ids)
    rows = [np.asarray(r, dtype=np.int64) for r in rankings]
    if len(rows) != len(qids):
        raise ValueError(f"{len(rows)} rankings for {len(qids)} queries")
    pos = {i: k for k, i in enumerate(db_ids)}
    by_query = {q.image_id: q for q in groundtruth.queries}
    unknown = [q for q in qids if q not in by_query]
    if unknown:
        raise ValueError(
            f"{groundtruth.dataset}: {len(unknown)} ranked queries are not queries of the "
            f"ground truth, e.g. {unknown[0]!r}"
        )
    queries = [by_query[q] for q in qids]
    named = set().union(*(q.positives | q.junk | q.easy | q.hard for q in queries))
    missing = sorted(named - pos.keys())
    if missing and strict:
        shown = ", ".join(repr(i) for i in missing[:5])
        raise ValueError(
            f"{groundtruth.dataset}: the ground truth names {len(missing)} image(s) that are not "
            f"in the database: {shown}{' …' if len(missing) > 5 else ''}"
        )

    def idx(names: frozenset[str]) -> np.ndarray:
        return np.array(sorted(pos[i] for i in names if i in pos), dtype=np.int64)

    gnd = []
    for q in queries:
        entry = {"ok": idx(q.positives), "junk": idx(q.junk)}
        if groundtruth.revisited:
            entry["easy"], entry["hard"] = idx(q.easy), idx(q.hard)
        gnd.append(entry)
    n_db = len(db_ids)
    if groundtruth.revisited:
        res = compute_map_revisited(rows, gnd, n_db=n_db)
        rev = {p: float(res[p]["map"]) for p in ("easy", "medium", "hard")}
        aps = dict(zip(qids, map(float, res["medium"]["aps"]), strict=True))
        return Scores(rev["medium"], None, rev, aps)
    res = compute_map(rows, gnd, n_db=n_db)
    ns = None
    if groundtruth.grouped and not any(q.junk for q in queries):
        if min(len(r) for r in rows) < 4:
            raise ValueError("the N-S score needs rankings of at least 4 images")
        ns = float(np.mean([np.isin(r[:4], g["ok"]).sum() for r, g in zip(rows, gnd, strict=True)]))
    return Scores(float(res.map), ns, None, dict(zip(qids, map(float, res.aps), strict=True)))
