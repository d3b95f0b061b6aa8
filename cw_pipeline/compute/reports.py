"""mAP reports: scores of stored rankings, markdown tables beside the paper's numbers."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cw_pipeline.compute.descriptors import read_descriptors
from cw_pipeline.compute.pca import pca_output_dims
from cw_pipeline.compute.published import (
    current_index,
    current_rankings,
    descriptors_file,
    has_rankings,
    ranked_database,
    rankings_file,
)
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.compute.rankings import score_rankings
from cw_pipeline.config import EvaluationConfig, ProjectConfig
from cw_pipeline.core.settings_record import settings_record
from cw_pipeline.store import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_PER_QUERY,
    FeatureStore,
    features_path,
    report_folder,
    report_path,
)
from cw_pipeline.store.commits import Commit

#: The paper's Table 2 (VGG16-CAM, 512-d) and Table 1a baselines, by benchmark and method.
PAPER_MAP: dict[str, dict[str, float]] = {
    "oxford5k": {
        "raw": 0.396,
        "raw+pca": 0.589,
        "ona": 0.736,
        "ofa": 0.712,
        "ona+qe10": 0.760,
        "ofa+qe10": 0.730,
        "ofa+r100+qe10": 0.773,
        "ofa+r1000+qe5": 0.801,
    },
    "paris6k": {
        "raw": 0.526,
        "raw+pca": 0.662,
        "ona": 0.855,
        "ofa": 0.805,
        "ona+qe10": 0.873,
        "ofa+qe10": 0.836,
        "ofa+r100+qe10": 0.838,
        "ofa+r1000+qe5": 0.855,
    },
    "oxford105k": {"ofa": 0.672, "ofa+qe10": 0.712, "ofa+r100+qe10": 0.750, "ofa+r1000+qe5": 0.769},
    "paris106k": {"ofa": 0.733, "ofa+qe10": 0.791, "ofa+r100+qe10": 0.780, "ofa+r1000+qe5": 0.800},
}

#: Minimum OfA mAP the demo evaluations must reach (asset check ``map_above_floor``).
MAP_FLOORS: dict[str, float] = {
    "demo-a": 0.60,
    "demo-b": 0.60,
    "demo-a-distractors": 0.55,
    "demo-b-distractors": 0.55,
}


def published_rankings(store: FeatureStore, ev: EvaluationConfig) -> Commit:
    """The published rankings of ``ev`` (FileNotFoundError naming what is missing)."""
    methods = [m.name for m in ev.methods]
    rankings = current_rankings(store, ev.name, methods)
    missing = [m for m in methods if not has_rankings(rankings, m)]
    if missing:
        raise FileNotFoundError(
            f"evaluation {ev.name} has no stored rankings for {', '.join(missing)} in "
            f"{store.url()}: materialize {ev.name}/rankings first"
        )
    assert rankings is not None
    return rankings


def evaluation_image_ids(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    rankings: Commit | None = None,
) -> list[str]:
    """Database image ids of an evaluation in the order its rankings were computed over: as
    kept with the published rankings (``rankings``: default the current ones), or for older
    stores its dataset's descriptors, then each distractor shard's stored features."""
    return database_ids(config, store, ev, shards, rankings)[1]


def database_ids(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    rankings: Commit | None = None,
) -> tuple[list[str], list[str]]:
    """(the dataset's image ids, every database image id) of the rankings ``rankings``."""
    ds = config.dataset(ev.dataset)
    if rankings is None:
        rankings = current_rankings(store, ev.name)
    database = None if rankings is None else ranked_database(store, rankings)
    if database is not None:
        ids = database.column("image_id").to_pylist()
        names = database.column("dataset").to_pylist()
        return [i for i, d in zip(ids, names, strict=True) if d == ds.name], ids
    index = current_index(store, ds)
    if index is None:
        raise FileNotFoundError(f"dataset {ds.name!r} has no descriptors in the feature store")
    db_ids, _ = read_descriptors(store, descriptors_file(index, "raw"))
    all_ids = list(db_ids)
    for dname in ev.distractors:
        for shard in shards.get(dname, []):
            rel = features_path(dname, shard)
            if store.exists(rel):
                all_ids += store.read_table(rel, ["image_id"]).column("image_id").to_pylist()
    return list(db_ids), all_ids


def build_report(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
) -> dict[str, Any]:
    """Scores of every method's stored rankings for one evaluation.

    ``queries`` counts every query, ``evaluated_queries`` those in the mAP; each query left out
    (no positive among the database images) is listed in ``excluded_queries`` with the reason,
    and its AP in ``per_query`` is None.
    """
    ds = config.dataset(ev.dataset)
    rankings = published_rankings(store, ev)  # read once: tables and database of one run
    db_ids, all_ids = database_ids(config, store, ev, shards, rankings)
    gt = load_groundtruth(ds, db_ids)
    paper = PAPER_MAP.get(ev.name, {})
    results, per_query = [], {}
    for m in ev.methods:
        table = store.read_table(rankings_file(rankings, m.name))
        score = score_rankings(ds, gt, all_ids, table)
        entry = {"method": m.name, "map": score["map"]}
        for key in ("ns_score", "revisited"):
            if key in score:
                entry[key] = score[key]
        if m.name in paper:
            entry["paper"] = paper[m.name]
        results.append(entry)
        per_query[m.name] = score.get("aps", {})
    queries = sorted({q for aps in per_query.values() for q in aps})
    # A query without positives among the database images has no AP: compute_map leaves it
    # out of the mean; the report says which and why, and stores null for its AP.
    excluded = [
        {"query": q, "reason": EXCLUDED_NO_POSITIVES}
        for q in queries
        if any(_undefined(aps.get(q)) for aps in per_query.values())
    ]
    return {
        "evaluation": ev.name,
        "dataset": ds.name,
        "distractors": list(ev.distractors),
        "database_images": len(all_ids),
        "queries": len(queries) or None,
        "evaluated_queries": (len(queries) - len(excluded)) if queries else None,
        "excluded_queries": excluded,
        "backbone": ds.extraction.backbone,
        "settings": {
            **settings_record(ds.extraction, config.search, ev.methods),
            "pca_from": ds.pca_from,
            "pca_output_dims": rankings.meta.get("pca_output_dims") or pca_output_dims(store, ds),
        },
        "results": results,
        "per_query": {
            m: {q: None if _undefined(ap) else ap for q, ap in aps.items()}
            for m, aps in per_query.items()
        },
    }


def _settings_lines(settings: dict[str, Any] | None) -> list[str]:
    """One markdown line with the settings a report was computed with (none for old reports)."""
    if not settings:
        return []
    dims = settings.get("pca_output_dims") or {}
    return [
        "",
        f"Computed with layer {settings['layer']}, resize {settings['resize']}, "
        f"N_C {settings['stored_classes']} stored / {settings['aggregated_classes']} "
        f"aggregated, N_pca {settings['n_pca']}, PCA dims {settings['pca_dims'] or 'all'} "
        f"({', '.join(f'{k}: {v}' for k, v in dims.items()) or 'none'}), PCA from "
        f"{settings.get('pca_from')}; methods {', '.join(settings['methods'])}.",
    ]


#: Why a query is left out of the mAP.
EXCLUDED_NO_POSITIVES = "no positive image in the database (AP undefined)"


def _undefined(ap: Any) -> bool:
    return ap is None or (isinstance(ap, float) and not math.isfinite(ap))


def markdown(report: dict[str, Any], images: Sequence[tuple[str, str]] = ()) -> str:
    """The report as a markdown table (mAP beside the paper's VGG16 numbers where they exist),
    then ``images`` — (alt text, URL or relative path) pairs — under "Figures"."""
    rows = report["results"]
    has_ns = any("ns_score" in r for r in rows)
    has_rev = any("revisited" in r for r in rows)
    head = ["method", "mAP"]
    if has_ns:
        head.append("N-S")
    if has_rev:
        head += ["Easy", "Medium", "Hard"]
    head.append("paper (VGG16)")
    lines = [
        f"### {report['evaluation']}",
        "",
        f"{report['database_images']} database images"
        + (f" (with {', '.join(report['distractors'])})" if report["distractors"] else "")
        + f", backbone {report['backbone']}.",
        *_settings_lines(report.get("settings")),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["method"], f"{r['map']:.4f}"]
        if has_ns:
            cells.append(f"{r['ns_score']:.3f}" if "ns_score" in r else "")
        if has_rev:
            rev = r.get("revisited") or {}
            cells += [f"{rev[k]:.4f}" if k in rev else "" for k in ("easy", "medium", "hard")]
        cells.append(f"{r['paper']:.3f}" if "paper" in r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    excluded = report.get("excluded_queries") or []
    if excluded:
        lines += [
            "",
            f"{report.get('evaluated_queries')} of {report.get('queries')} queries in the mAP; "
            f"{len(excluded)} excluded:",
            "",
        ]
        lines += [f"* `{e['query']}`: {e['reason']}" for e in excluded]
    if images:
        lines += ["", "#### Figures", ""]
        for alt, src in images:
            lines += [f"![{alt}]({src})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(
    reports_root: str, report: dict[str, Any], images: Sequence[tuple[str, str]] = ()
) -> Path:
    """Write ``<reports>/<evaluation>/report.{md,json}`` and ``per_query_ap.csv`` atomically;
    ``report.md`` links ``images`` (alt text, path relative to the evaluation's folder). The
    JSON is strict (an undefined AP is ``null``), the CSV leaves its cell empty."""
    store = FeatureStore(reports_root)
    ev = report["evaluation"]
    store.write_bytes(report_path(ev, REPORT_MARKDOWN), markdown(report, images).encode())
    store.write_json(report_path(ev, REPORT_JSON), report)
    buf = io.StringIO()
    writer = csv.writer(buf)
    methods = list(report["per_query"])
    writer.writerow(["query", *methods])
    queries = sorted({q for aps in report["per_query"].values() for q in aps})
    for q in queries:
        cells = [report["per_query"][m].get(q) for m in methods]
        writer.writerow([q, *("" if _undefined(ap) else f"{ap:.4f}" for ap in cells)])
    store.write_bytes(report_path(ev, REPORT_PER_QUERY), buf.getvalue().encode())
    return Path(store.path(report_folder(ev)))


__all__ = [
    "EXCLUDED_NO_POSITIVES",
    "MAP_FLOORS",
    "PAPER_MAP",
    "build_report",
    "database_ids",
    "evaluation_image_ids",
    "json",
    "markdown",
    "published_rankings",
    "write_report",
]
