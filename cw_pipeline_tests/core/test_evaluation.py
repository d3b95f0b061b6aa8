"""Tests for cw_pipeline.core.evaluation (hand-computed cases and a loop reference)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from cw_pipeline.core.datasets import ukbench_groundtruth
from cw_pipeline.core.evaluation import (
    MapResult,
    average_precision,
    average_precision_at,
    compute_ap,
    compute_map,
    compute_map_revisited,
    precision_recall_points,
    ukbench_map,
    ukbench_ns_score,
)
from cw_pipeline.core.ranking import FullOrder

# Hand derivation for 4 positives at 1-based ranks 1, 2, 4, 7 (0-based 0, 1, 3, 6), nres = 4:
#   j=0 r=0: p0 = 1,   p1 = 1/1 -> 2
#   j=1 r=1: p0 = 1/1, p1 = 2/2 -> 2
#   j=2 r=3: p0 = 2/3, p1 = 3/4 -> 17/12
#   j=3 r=6: p0 = 3/6, p1 = 4/7 -> 15/14
#   AP = (4 + 17/12 + 15/14) / (2 * 4) = (545/84) / 8 = 545/672
AP_EXAMPLE = Fraction(545, 672)


def f(x: Fraction) -> float:
    return float(x)


# --------------------------------------------------------------------------------------------
# compute_ap
# --------------------------------------------------------------------------------------------


def test_compute_ap_paper_example() -> None:
    ap = compute_ap(np.array([0, 1, 3, 6]), 4)
    assert abs(ap - 0.8107) < 1e-3
    assert ap == pytest.approx(f(AP_EXAMPLE), abs=1e-15)
    # step-wise (sklearn-style) AP would be mean(1, 1, 3/4, 4/7) = 0.830: not what we compute
    stepwise = (1 + 1 + 3 / 4 + 4 / 7) / 4
    assert abs(stepwise - 0.830) < 1e-3
    assert abs(ap - stepwise) > 0.01


@pytest.mark.parametrize(
    ("ranks", "nres", "expected"),
    [
        ([0], 1, Fraction(1)),
        ([1], 1, Fraction(1, 4)),  # p0 = 0/1, p1 = 1/2 -> (1/2) / 2
        ([0], 2, Fraction(1, 2)),  # the second positive never retrieved
        ([0, 2], 2, Fraction(19, 24)),  # 2 + (1/2 + 2/3) = 19/6, / 4
        ([2, 3], 2, Fraction(7, 24)),  # (0 + 1/3) + (1/3 + 2/4) = 7/6, / 4
        ([], 3, Fraction(0)),
    ],
)
def test_compute_ap_small_cases(ranks: list[int], nres: int, expected: Fraction) -> None:
    assert compute_ap(np.array(ranks, dtype=np.int64), nres) == pytest.approx(f(expected))


@pytest.mark.parametrize(
    ("ranks", "nres", "match"),
    [
        ([0, 1], 0, "nres"),
        ([0, 1], 1, "nres is only 1"),
        ([3, 1], 2, "strictly increasing"),
        ([1, 1], 2, "strictly increasing"),
        ([-1], 1, "-1"),
        ([0.5], 1, "integer"),
    ],
)
def test_compute_ap_rejects_bad_input(ranks: list[float], nres: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_ap(np.array(ranks), nres)


# --------------------------------------------------------------------------------------------
# average_precision and junk
# --------------------------------------------------------------------------------------------

POS = {10, 11, 12, 13}
#            r0  r1  r2  r3  r4  r5  r6
RANKING = [10, 11, 20, 12, 21, 22, 13]


def test_average_precision_example() -> None:
    assert average_precision(np.array(RANKING), POS) == pytest.approx(f(AP_EXAMPLE))


def test_junk_in_front_gives_the_same_value() -> None:
    ranking = np.array([99, *RANKING])
    assert average_precision(ranking, POS, junk={99}) == pytest.approx(f(AP_EXAMPLE))
    # not declared junk, 99 is a negative and every rank shifts down
    assert average_precision(ranking, POS) < f(AP_EXAMPLE) - 0.05


def test_junk_between_positives() -> None:
    ranking = np.array([10, 20, 99, 11])
    # junk removed -> [10, 20, 11]: ranks 0, 2 -> 19/24
    assert average_precision(ranking, [10, 11], junk=[99]) == pytest.approx(19 / 24)
    # as a negative -> ranks 0, 3: 2 + (1/3 + 2/4) = 17/6, / 4 = 17/24
    assert average_precision(ranking, [10, 11]) == pytest.approx(17 / 24)


def test_junk_not_in_ranking_and_missing_positives() -> None:
    # truncated list: 11 never retrieved, junk 98 never retrieved
    assert average_precision([10, 20], {10, 11}, junk={98}) == pytest.approx(0.5)


def test_average_precision_no_positives_is_nan() -> None:
    assert math.isnan(average_precision([1, 2, 3], set()))


def test_average_precision_validation() -> None:
    with pytest.raises(ValueError, match="both positive and junk"):
        average_precision([1, 2], {1}, junk={1})
    with pytest.raises(ValueError, match="more than once"):
        average_precision([1, 2, 1], {1})
    with pytest.raises(ValueError, match="-3"):
        average_precision([1, -3], {1})
    with pytest.raises(ValueError, match="-2"):
        average_precision([1, 2], {-2})


# --------------------------------------------------------------------------------------------
# precision / recall points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_fast_ap_equals_the_ap_of_the_sorted_database(seed: int) -> None:
    """The search page's AP (positions of the positives and junk in a ``FullOrder``, no sort
    of the database) equals ``average_precision`` of the whole ranking built by sorting."""
    rng = np.random.default_rng(seed)
    n = 3000
    scores = rng.standard_normal(n).astype(np.float32)
    if seed % 2:  # ties: a few distinct values, broken by row
        scores = np.round(scores * 2) / 2
    head = np.argsort(-scores, kind="stable")[: [0, 1, 25][seed % 3]]
    head = head[rng.permutation(len(head))]  # a re-ranked head, scored apart
    order = FullOrder(head, rng.random(len(head)).astype(np.float32), scores)
    rest = np.setdiff1d(np.arange(n), head)
    ranking = np.concatenate([head, rest[np.argsort(-scores[rest], kind="stable")]])
    marked = rng.choice(n, size=60, replace=False)
    positives, junk = marked[: [1, 10, 40][seed % 3]], marked[45:]
    want = average_precision(ranking, positives, junk)
    got = average_precision_at(order.positions(positives), order.positions(junk))
    assert got == pytest.approx(want, rel=1e-12)
    assert average_precision_at(order.positions(positives)) == pytest.approx(
        average_precision(ranking, positives), rel=1e-12
    )


def test_average_precision_at_by_hand() -> None:
    assert average_precision_at([0, 1, 3, 6]) == pytest.approx(float(AP_EXAMPLE))
    # junk at positions 2 and 6 shifts the later positives up: 0, 1, 3, 7 → 0, 1, 2, 5
    want = compute_ap([0, 1, 2, 5], 4)
    assert average_precision_at([7, 1, 3, 0], [6, 2]) == pytest.approx(want, rel=1e-12)
    ranking = [0, 1, 9, 2, 5, 6, 7, 3]  # positives 0-3, junk 9 and 7
    assert average_precision(ranking, [0, 1, 2, 3], [9, 7]) == pytest.approx(want, rel=1e-12)
    assert math.isnan(average_precision_at([]))
    with pytest.raises(ValueError, match="more than once"):
        average_precision_at([0, 3], [3])


def test_precision_recall_points() -> None:
    precision, recall = precision_recall_points([10, 20, 99, 11], {10, 11}, junk={99})
    # kept list [10, 20, 11]
    np.testing.assert_allclose(precision, [1.0, 1 / 2, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])


def test_precision_recall_points_without_junk() -> None:
    precision, recall = precision_recall_points(np.array(RANKING), POS)
    assert precision.shape == recall.shape == (7,)
    np.testing.assert_allclose(recall, [0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4, 3 / 5, 3 / 6, 4 / 7])


def test_precision_recall_points_needs_positives() -> None:
    with pytest.raises(ValueError, match="positive"):
        precision_recall_points([1, 2], [])


# --------------------------------------------------------------------------------------------
# compute_map
# --------------------------------------------------------------------------------------------


def _reference_compute_map(
    ranks: np.ndarray, gnd: list[dict[str, list[int]]], kappas: tuple[int, ...] = ()
) -> tuple[float, np.ndarray, np.ndarray]:
    """Loop-based port of revisitop's compute_map (the published algorithm, step by step)."""

    def ref_ap(pos: np.ndarray, nres: int) -> float:
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) * (1.0 / nres) / 2.0
        return ap

    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return total / (nq - nempty), aps, pr / (nq - nempty)


def _two_query_case() -> tuple[np.ndarray, list[dict[str, list[int]]]]:
    # n_db = 8, columns are queries
    q0 = [0, 1, 5, 2, 6, 7, 3, 4]  # positives {0,1,2,3} at ranks 0,1,3,6 -> 545/672
    q1 = [4, 5, 6, 7, 0, 1, 2, 3]
    ranks = np.array([q0, q1]).T
    gnd = [{"ok": [0, 1, 2, 3], "junk": []}, {"ok": [], "junk": [4]}]
    return ranks, gnd


def test_compute_map_skips_queries_without_positives() -> None:
    ranks, gnd = _two_query_case()
    res = compute_map(ranks, gnd, kappas=(1, 5, 10))
    assert isinstance(res, MapResult)
    assert res.n_evaluated == 1
    assert math.isnan(res.aps[1])
    assert res.aps[0] == pytest.approx(f(AP_EXAMPLE))
    assert res.map == pytest.approx(f(AP_EXAMPLE))
    # P@1 = 1; P@5 = 3/5; P@10: revisitop uses min(10, last positive rank 7) -> 4/7
    np.testing.assert_allclose(res.pr, [1.0, 3 / 5, 4 / 7])
    assert np.isnan(res.prs[1]).all()


def test_compute_map_accepts_a_list_of_rankings() -> None:
    ranks, gnd = _two_query_case()
    res2d = compute_map(ranks, gnd)
    res_list = compute_map([ranks[:, 0], ranks[:, 1][:3]], gnd)  # truncation is allowed
    assert res2d.map == res_list.map
    assert res2d.pr.shape == (0,)


def test_compute_map_mean_over_queries() -> None:
    ranks = np.array([[0, 1, 2], [2, 1, 0]]).T  # (n_db=3, 2 queries)
    gnd = [{"ok": [1]}, {"ok": [2], "junk": [1]}]
    res = compute_map(ranks, gnd)
    # q0: 1 at rank 1 -> 1/4; q1: [2, (1 junk), 0] -> rank 0 -> 1
    np.testing.assert_allclose(res.aps, [0.25, 1.0])
    assert res.map == pytest.approx(0.625)
    assert res.n_evaluated == 2


def test_compute_map_matches_reference_on_random_data() -> None:
    rng = np.random.default_rng(1234)
    n_db, n_q = 200, 12
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for i in range(n_q):
        chosen = rng.permutation(n_db)
        n_pos = 0 if i == 3 else int(rng.integers(1, 25))
        n_junk = int(rng.integers(0, 15))
        gnd.append({"ok": sorted(chosen[:n_pos]), "junk": sorted(chosen[n_pos : n_pos + n_junk])})
    kappas = (1, 5, 10)
    ref_map, ref_aps, ref_pr = _reference_compute_map(ranks, gnd, kappas)
    res = compute_map(ranks, gnd, kappas=kappas)
    assert res.map == pytest.approx(ref_map, abs=1e-12)
    np.testing.assert_allclose(res.aps, ref_aps, atol=1e-12)
    np.testing.assert_allclose(res.pr, ref_pr, atol=1e-12)
    assert res.n_evaluated == n_q - 1


def test_compute_map_validation() -> None:
    ranks, gnd = _two_query_case()
    with pytest.raises(ValueError, match=r"shape \(2, 8\).*transpose"):
        compute_map(ranks.T, gnd)
    with pytest.raises(ValueError, match="3 rankings for 2 queries"):
        compute_map([ranks[:, 0]] * 3, gnd)
    bad = ranks.copy()
    bad[0, 0] = 8
    with pytest.raises(ValueError, match="index 8, out of range for 8"):
        compute_map(bad, gnd)
    with pytest.raises(ValueError, match="index 9, out of range"):
        compute_map(ranks, [{"ok": [9]}, {"ok": [1]}])
    with pytest.raises(ValueError, match="'ok'"):
        compute_map(ranks, [{"easy": [1]}, {"ok": [1]}])
    with pytest.raises(ValueError, match="none of the 2 queries"):
        compute_map(ranks, [{"ok": []}, {"ok": []}])
    with pytest.raises(ValueError, match="kappas"):
        compute_map(ranks, gnd, kappas=(0,))
    with pytest.raises(ValueError, match=r"2-D"):
        compute_map(np.arange(8), [{"ok": [1]}])


# --------------------------------------------------------------------------------------------
# revisited protocol
# --------------------------------------------------------------------------------------------


def test_compute_map_revisited_hand_computed() -> None:
    # q0: easy {0, 3}, hard {1}, junk {4}; ranking [1, 0, 4, 2, 3, 5]
    #   Easy   (pos {0,3}, junk {1,4}): kept [0,2,3,5] -> ranks 0, 2        -> 19/24
    #   Medium (pos {0,1,3}, junk {4}): kept [1,0,2,3,5] -> ranks 0, 1, 3   -> 65/72
    #          (2 + 2 + (2/3 + 3/4) = 65/12, / 6)
    #   Hard   (pos {1}, junk {0,3,4}): kept [1,2,5] -> rank 0              -> 1
    # q1: easy {}, hard {2}, junk {}; ranking [0, 1, 2, 3, 4, 5]
    #   Easy: no positive -> skipped; Medium and Hard: rank 2 -> (0 + 1/3) / 2 = 1/6
    ranks = np.array([[1, 0, 4, 2, 3, 5], [0, 1, 2, 3, 4, 5]]).T
    gnd = [
        {"bbx": [0, 0, 1, 1], "easy": [0, 3], "hard": [1], "junk": [4]},
        {"easy": [], "hard": [2], "junk": []},
    ]
    res = compute_map_revisited(ranks, gnd)
    assert set(res) == {"easy", "medium", "hard"}

    assert res["easy"]["n_evaluated"] == 1
    assert math.isnan(res["easy"]["aps"][1])
    assert res["easy"]["map"] == pytest.approx(19 / 24)

    np.testing.assert_allclose(res["medium"]["aps"], [65 / 72, 1 / 6])
    assert res["medium"]["map"] == pytest.approx(f(Fraction(77, 144)))

    np.testing.assert_allclose(res["hard"]["aps"], [1.0, 1 / 6])
    assert res["hard"]["map"] == pytest.approx(7 / 12)

    # mP@k: Easy q0 positives at 1-based ranks 1, 3 -> P@1 = 1, P@5 = P@min(3,5) = 2/3
    assert res["easy"]["mp"] == pytest.approx({1: 1.0, 5: 2 / 3, 10: 2 / 3})
    # Hard q0 [1] -> 1 everywhere; q1 [3] -> P@1 = 0, P@5 = P@3 = 1/3
    assert res["hard"]["mp"] == pytest.approx({1: 0.5, 5: 2 / 3, 10: 2 / 3})
    # Medium q0 [1, 2, 4] -> 1, 3/4, 3/4; q1 [3] -> 0, 1/3, 1/3
    assert res["medium"]["mp"] == pytest.approx(
        {1: 0.5, 5: (3 / 4 + 1 / 3) / 2, 10: (3 / 4 + 1 / 3) / 2}
    )


def test_compute_map_revisited_requires_easy_and_hard() -> None:
    with pytest.raises(ValueError, match="easy"):
        compute_map_revisited(np.zeros((3, 1), dtype=int), [{"hard": [1], "junk": []}])


# --------------------------------------------------------------------------------------------
# UKBench
# --------------------------------------------------------------------------------------------

UK_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
UK_RANKINGS = np.array(
    [
        [0, 1, 2, 3],  # label 0: 4
        [1, 0, 4, 2],  # label 0: 3
        [2, 5, 6, 7],  # label 0: 1
        [4, 5, 6, 3],  # label 0: 1
        [4, 5, 6, 7],  # label 1: 4
        [5, 4, 0, 6],  # label 1: 3
        [0, 1, 2, 6],  # label 1: 1
        [7, 3, 2, 1],  # label 1: 1
    ]
)


def test_ukbench_ns_score_hand_computed() -> None:
    assert ukbench_ns_score(UK_RANKINGS, UK_LABELS) == pytest.approx(18 / 8)


def test_ukbench_ns_score_uses_only_top4_and_query_indices() -> None:
    wide = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    assert ukbench_ns_score(wide, UK_LABELS, query_indices=[0, 4]) == pytest.approx(4.0)
    assert ukbench_ns_score(wide, UK_LABELS, query_indices=[4, 0]) == pytest.approx(0.0)


def test_ukbench_map_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    rankings = np.array([[0, 2, 1, 3], [1, 0, 2, 3], [0, 1, 2, 3]])
    # q0: ranks 0, 2 -> 19/24; q1: ranks 0, 1 -> 1; q2 (label 1): ranks 2, 3 -> 7/24
    assert ukbench_map(rankings, labels) == pytest.approx(25 / 36)
    # truncated ranking: q0 with top-2 [0, 2] -> 1/2
    assert ukbench_map(np.array([[0, 2]]), labels) == pytest.approx(0.5)


def test_ukbench_map_matches_compute_map() -> None:
    ids = [f"ukbench{i:05d}" for i in range(40)]
    gt = ukbench_groundtruth(ids)
    labels = np.arange(40) // 4
    rng = np.random.default_rng(7)
    rankings = np.stack([rng.permutation(40) for _ in range(40)])
    expected = compute_map(rankings.T, gt.to_index_gnd()).map
    assert ukbench_map(rankings, labels) == pytest.approx(expected, abs=1e-12)


def test_ukbench_validation() -> None:
    with pytest.raises(ValueError, match="at least 4 columns"):
        ukbench_ns_score(UK_RANKINGS[:, :3], UK_LABELS)
    bad = UK_RANKINGS.copy()
    bad[2, 1] = 8
    with pytest.raises(ValueError, match="index 8, out of range for 8"):
        ukbench_ns_score(bad, UK_LABELS)
    bad[2, 1] = -1
    with pytest.raises(ValueError, match="-1"):
        ukbench_map(bad, UK_LABELS)
    dup = UK_RANKINGS.copy()
    dup[5] = [5, 5, 0, 6]
    with pytest.raises(ValueError, match="query 5 repeats"):
        ukbench_ns_score(dup, UK_LABELS)
    with pytest.raises(ValueError, match="3 query_indices for 8 rankings"):
        ukbench_ns_score(UK_RANKINGS, UK_LABELS, query_indices=[0, 1, 2])
    with pytest.raises(ValueError, match="index 9"):
        ukbench_ns_score(UK_RANKINGS[:1], UK_LABELS, query_indices=[9])
    with pytest.raises(ValueError, match="2-D"):
        ukbench_ns_score(np.arange(4), UK_LABELS)
    with pytest.raises(ValueError, match="12 rankings but only 8 labels"):
        ukbench_ns_score(np.tile(np.arange(4), (12, 1)), UK_LABELS)


# --------------------------------------------------------------------------- score()


def _oxford_gt(db_ids, positives, junk=()):
    from cw_pipeline.core.datasets import GroundTruth, Query

    q = Query("q", None, frozenset(positives), frozenset(junk), name="q_1")
    return GroundTruth("toy", tuple(db_ids), (q,), revisited=False, queries_in_database=True)


def test_score_oxford_by_hand():
    from cw_pipeline.core.evaluation import score

    ids = [f"i{k}" for k in range(8)]
    gt = _oxford_gt(ids, {"i0", "i1", "i3", "i6"})
    s = score([np.arange(8)], gt, ids, ["q"])
    assert s.map == pytest.approx(0.8110, abs=1e-3)  # NOTES.md: ranks 1, 2, 4, 7
    assert s.ns_score is None and s.aps == {"q": pytest.approx(s.map)}


def test_score_refuses_ground_truth_naming_missing_images():
    """Missing positives are never dropped (that scored a perfect AP 1.0 instead of less)."""
    from cw_pipeline.core.evaluation import score

    ids = ["i0", "i1", "i2"]
    gt = _oxford_gt(ids, {"i0", "gone"})
    with pytest.raises(ValueError, match="1 image\\(s\\) that are not in the database: 'gone'"):
        score([np.arange(3)], gt, ids, ["q"])


def test_score_grouped_ukbench_and_holidays_rules():
    from cw_pipeline.core.datasets import holidays_groundtruth, ukbench_groundtruth
    from cw_pipeline.core.evaluation import score

    uk = [f"ukbench{k:05d}.jpg" for k in range(8)]
    gt = ukbench_groundtruth(uk)
    assert gt.grouped
    perfect = np.array([[*sorted(range(4 * (k // 4), 4 * (k // 4) + 4)), *[]] for k in range(8)])
    rest = np.array([[j for j in range(8) if j not in row] for row in perfect])
    s = score(np.hstack([perfect, rest]), gt, uk)
    assert s.ns_score == 4.0 and s.map == 1.0
    ho = ["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg"]
    hg = holidays_groundtruth(ho)
    assert hg.grouped
    # The query ranks itself first: junk, so it does not count; no N-S for Holidays.
    s = score(np.array([[0, 1, 2, 3], [2, 3, 0, 1]]), hg, ho)
    assert s.map == 1.0 and s.ns_score is None
    s = score(np.array([[0, 2, 1, 3], [2, 3, 0, 1]]), hg, ho)
    assert s.aps["100000.jpg"] == pytest.approx(0.25)  # positive 2nd after junk
