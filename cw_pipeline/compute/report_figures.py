"""The pictures of an evaluation's report, from its stored rankings (no Dagster).

:func:`write_report_figures` writes, under ``<reports>/<evaluation>/``:

* ``queries/<query>.png`` — the query with its box, then its top results framed green
  (positive), red (negative) or grey (junk), for the best method (highest mAP) or a chosen one;
* ``cams/<image>.png`` — for a few queries, the CAM heatmap of the query's top classes on its
  first result, with the re-ranking boxes (one per threshold of ``RerankConfig``);
* ``pr_curves.png`` — mean interpolated precision–recall curve per method (junk ignored);
* ``ap_per_query.png`` — per-query AP of every method.

It returns the written paths and small PNG data URIs of a few of them, for markdown shown in the
Dagster UI (:func:`cw_pipeline.compute.reports.markdown` takes both as ``images``).

A refresh redraws only the figures whose inputs changed: ``figures.json`` in the report folder
records, per file, a hash of what it was drawn from (ranked image contents by sha1, scores,
labels, box, titles, the query's classes, the drawing code's version) and its embedded data
URI; a file whose hash is unchanged and which is still on disk is kept as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from cw_pipeline import figures
from cw_pipeline.compute import reports
from cw_pipeline.compute.catalog import stored_shards
from cw_pipeline.compute.features import dataset_extractor
from cw_pipeline.compute.manifests import evaluation_manifest_rows
from cw_pipeline.compute.published import rankings_file
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core.datasets import Query
from cw_pipeline.core.evaluation import average_precision, precision_recall_points
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.images import ImageLoadError
from cw_pipeline.core.search_settings import RerankConfig
from cw_pipeline.figures.cams import query_cam_figure
from cw_pipeline.store import (
    CorruptFileError,
    FeatureStore,
    bounded_component,
    features_path,
    query_features_path,
    report_folder,
    report_path,
)

__all__ = [
    "EMBED_BUDGET",
    "FigureOptions",
    "ReportFigures",
    "data_uri",
    "redraw",
    "report_with_figures",
    "write_report_figures",
]

logger = logging.getLogger(__name__)

#: Upper bound of the bytes of all data URIs returned for the UI metadata.
EMBED_BUDGET = 900_000
#: The figures' index in the report folder: file -> hash of its inputs (and data URI).
FIGURE_INDEX = "figures.json"
#: Part of every figure's input hash: change it when the drawing code changes what a figure
#: with the same inputs looks like (every figure is then redrawn once).
FIGURES_VERSION = "1"


@dataclass(frozen=True)
class FigureOptions:
    """What :func:`write_report_figures` draws.

    Attributes:
        max_queries: results sheets for at most this many queries (in ranking order;
            None: every query).
        top: results per sheet.
        cam_samples: CAM overlays, for the first queries that have a sheet (each on its
            first result other than itself).
        thumb: thumbnail side of the sheets, in pixels (at least 32).
        method: the method of the sheets and CAM samples (None: the highest mAP).
        embed_sheets: how many query sheets are embedded in the UI markdown.
    """

    max_queries: int | None = 100
    top: int = 10
    cam_samples: int = 3
    thumb: int = 160
    method: str | None = None
    embed_sheets: int = 2

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        if self.thumb < 32:
            raise ValueError(f"thumb must be >= 32 pixels, got {self.thumb}")
        for name in ("cam_samples", "embed_sheets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_queries is not None and self.max_queries < 0:
            raise ValueError(f"max_queries must be >= 0 or None, got {self.max_queries}")


@dataclass
class ReportFigures:
    """What :func:`write_report_figures` wrote (paths relative to ``folder``)."""

    folder: Path
    method: str
    queries: list[str] = field(default_factory=list)
    cams: list[str] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)
    #: (alt text, ``data:image/png;base64,…``) of the images embedded in the UI markdown.
    embedded: list[tuple[str, str]] = field(default_factory=list)
    redrawn: int = 0  #: files drawn by this run
    kept: int = 0  #: files kept as they were (their inputs did not change)

    @property
    def files(self) -> list[str]:
        """Every written file, relative to ``folder``."""
        return [*self.charts, *self.queries, *self.cams]

    def links(self) -> list[tuple[str, str]]:
        """(alt text, relative path) of the charts, the first sheets and the CAM overlays."""
        out = [(f"cw-figure {Path(p).stem.replace('_', '-')}", p) for p in self.charts]
        out += [(f"cw-figure query {Path(p).stem}", p) for p in self.queries[:3]]
        out += [(f"cw-figure cam {Path(p).stem}", p) for p in self.cams]
        return out

    def as_metadata(self) -> dict[str, Any]:
        """Counts for the materialization metadata."""
        return {
            "figures_method": self.method,
            "figures_queries": len(self.queries),
            "figures_cams": len(self.cams),
            "figures_redrawn": self.redrawn,
            "figures_kept": self.kept,
        }


# ------------------------------------------------------------------------------ data


def _inputs_hash(*parts: Any) -> str:
    """The hash of a figure's inputs (JSON-able parts; arrays by their bytes)."""
    h = hashlib.sha1(FIGURES_VERSION.encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _label(q: Query, image_id: str) -> str:
    if image_id in q.junk:
        return "junk"
    return "positive" if image_id in q.positives else "negative"


def _query_classes(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str], wanted: set[str]
) -> dict[str, np.ndarray]:
    """Top class ids of the wanted queries (from query_features, or cam_features for grouped
    datasets, whose queries are database images)."""
    if ds.grouped:
        rels = [features_path(ds.name, s) for s in shards]
    else:
        rels = [query_features_path(ds.name)]
    out: dict[str, np.ndarray] = {}
    for rel in rels:
        if not store.exists(rel):
            continue
        t = store.read_table(rel, ["image_id", "class_ids"])
        for i, ids in zip(
            t.column("image_id").to_pylist(), t.column("class_ids").to_pylist(), strict=True
        ):
            if i in wanted:
                out[i] = np.asarray(ids, dtype=np.int64)
    return out


def _safe_name(image_id: str) -> str:
    """A file name for an image id: percent-encoded, bounded (long ids get a hash)."""
    return bounded_component(image_id)


# ------------------------------------------------------------------------------ embedding


def data_uri(image: Image.Image, max_width: int = 720, colours: int = 128) -> str:
    """A small ``data:image/png;base64,…`` copy of ``image``: at most ``max_width`` wide,
    quantized to ``colours`` colours (PNG palette, fast octree: 3 ms for a 720×400 chart
    where median cut takes 180 ms), for markdown metadata."""
    small = image.convert("RGB")
    if small.width > max_width:
        h = max(1, round(small.height * max_width / small.width))
        small = small.resize((max_width, h), Image.Resampling.LANCZOS)
    small = small.quantize(colors=colours, method=Image.Quantize.FASTOCTREE)
    return "data:image/png;base64," + base64.b64encode(figures.png_bytes(small)).decode("ascii")


# ------------------------------------------------------------------------------ figures


def _best_method(report: dict[str, Any], methods: Sequence[str]) -> str:
    scored = [r for r in report.get("results", []) if r["method"] in methods]
    if not scored:
        return methods[0]
    return max(scored, key=lambda r: (r["map"], -methods.index(r["method"])))["method"]


@dataclass
class _Canvas:
    """Where one run's figures go: the evaluation, the options, the result being filled, and
    the figures' index (``previous``: read from the folder; ``index``: this run's)."""

    ev: EvaluationConfig
    out_store: FeatureStore
    options: FigureOptions
    result: ReportFigures
    previous: dict[str, dict[str, str]] = field(default_factory=dict)
    index: dict[str, dict[str, str]] = field(default_factory=dict)

    def write(self, rel: str, image: Image.Image, key: str = "") -> str:
        """Write ``image`` as PNG at ``rel`` under the evaluation's report folder; ``key``:
        the hash of its inputs, recorded in the index."""
        self.out_store.write_bytes(report_path(self.ev.name, rel), figures.png_bytes(image))
        self.result.redrawn += 1
        if key:
            self.index[rel] = {"key": key}
        return rel

    def kept(self, rel: str, key: str, embed: bool) -> str | None:
        """``rel`` when the file drawn from inputs ``key`` is still there (nothing to draw),
        with its data URI when it is to be ``embed``-ded; None: draw it."""
        entry = self.previous.get(rel)
        if entry is None or entry.get("key") != key:
            return None
        if embed and not entry.get("uri"):
            return None
        if not self.out_store.exists(report_path(self.ev.name, rel)):
            return None
        self.index[rel] = dict(entry)
        self.result.kept += 1
        return rel

    def embed(self, rel: str, alt: str, image: Image.Image | None, max_width: int) -> None:
        """Embed ``rel`` in the UI markdown: its fresh ``image``, or (None) its kept URI."""
        if image is None:
            uri = self.index[rel]["uri"]
        else:
            uri = data_uri(image, max_width)
            self.index.setdefault(rel, {})["uri"] = uri
        self.result.embedded.append((alt, uri))

    def load_index(self) -> None:
        rel = report_path(self.ev.name, FIGURE_INDEX)
        if not self.out_store.exists(rel):
            return
        try:
            data = self.out_store.read_json(rel)
        except (CorruptFileError, OSError) as exc:  # redraw everything
            logger.warning("%s: %s; redrawing every figure", self.ev.name, exc)
            return
        if isinstance(data, dict):
            self.previous = {
                k: v for k, v in data.items() if isinstance(v, dict) and isinstance(k, str)
            }

    def save_index(self) -> None:
        self.out_store.write_json(report_path(self.ev.name, FIGURE_INDEX), self.index, indent=None)


def _per_query_scores(
    tables: dict[str, pa.Table],
    by_query: dict[str, Query],
    pos: dict[str, int],
    report: dict[str, Any],
) -> tuple[dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], dict[str, dict[str, float]]]:
    """Per method and query: PR points and AP (Oxford protocol: junk removed from the list);
    the report's stored AP is used where it has one."""
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    aps: dict[str, dict[str, float]] = {}
    for m, table in tables.items():
        curves[m], aps[m] = {}, {}
        stored_aps = report.get("per_query", {}).get(m) or {}
        for qid, ranked in zip(
            table.column("query_id").to_pylist(),
            table.column("ranked_ids").to_pylist(),
            strict=True,
        ):
            q = by_query.get(qid)
            if q is None:
                continue
            ranking = np.fromiter((pos[i] for i in ranked), dtype=np.int64, count=len(ranked))
            positives = [pos[i] for i in q.positives if i in pos]
            junk = [pos[i] for i in q.junk if i in pos]
            if positives:
                curves[m][qid] = precision_recall_points(ranking, positives, junk)
            ap = stored_aps.get(qid)
            if ap is None:
                ap = average_precision(ranking, positives, junk) if positives else math.nan
            aps[m][qid] = float(ap)
    return curves, aps


def _draw_charts(
    canvas: _Canvas,
    report: dict[str, Any],
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    aps: dict[str, dict[str, float]],
) -> None:
    """The PR curves (with the chosen method's hardest query) and the AP-per-query bars."""
    ev, method, result = canvas.ev, canvas.result.method, canvas.result
    maps = {r["method"]: r["map"] for r in report.get("results", [])}
    if any(curves.values()):
        evaluated = {m: list(c.values()) for m, c in curves.items() if c}
        chosen = {q: a for q, a in aps[method].items() if not math.isnan(a)}
        selected = {}
        if chosen and method in evaluated:
            worst = min(chosen, key=lambda q: (chosen[q], q))
            if worst in curves[method]:
                selected = {method: {f"hardest query {worst}": curves[method][worst]}}
        n = max(len(c) for c in evaluated.values())
        title = f"{ev.name}: precision–recall, mean over {n} queries (junk ignored)"
        points = [
            (m, q, *[np.asarray(a) for a in c])
            for m, per in sorted(curves.items())
            for q, c in sorted(per.items())
        ]
        key = _inputs_hash(
            "pr", title, maps, sorted(selected.get(method, {})), *[x for row in points for x in row]
        )
        rel = "pr_curves.png"
        if canvas.kept(rel, key, embed=True) is None:
            img = figures.pr_curves(evaluated, title=title, maps=maps, queries=selected)
            canvas.write(rel, img, key)
            canvas.embed(rel, "cw-figure pr-curves", img, 560)
        else:
            canvas.embed(rel, "cw-figure pr-curves", None, 560)
        result.charts.append(rel)
    if any(aps.values()):
        title = f"{ev.name}: average precision per query"
        key = _inputs_hash("ap", title, {m: sorted(a.items()) for m, a in aps.items()})
        rel = "ap_per_query.png"
        if canvas.kept(rel, key, embed=True) is None:
            img = figures.ap_bars(aps, title=title)
            canvas.write(rel, img, key)
            canvas.embed(rel, "cw-figure ap-per-query", img, 720)
        else:
            canvas.embed(rel, "cw-figure ap-per-query", None, 720)
        result.charts.append(rel)


def _draw_sheets(
    canvas: _Canvas,
    table: pa.Table,
    by_query: dict[str, Query],
    images: dict[str, tuple[Path, str]],
    aps: dict[str, float],
) -> list[tuple[str, list[str]]]:
    """The results sheets of the chosen method (its rankings ``table``, its ``aps``;
    ``images``: id -> (path, sha1)); returns (query id, ranked ids) of each sheet."""
    ev, method, result, options = canvas.ev, canvas.result.method, canvas.result, canvas.options
    rows = list(
        zip(
            table.column("query_id").to_pylist(),
            table.column("ranked_ids").to_pylist(),
            table.column("scores").to_pylist(),
            strict=True,
        )
    )
    if options.max_queries is not None:
        rows = rows[: options.max_queries]
    sheet_rows = []
    for qid, ranked, scores in rows:
        q = by_query.get(qid)
        if q is None or qid not in images:
            logger.warning("%s: no image for query %s, no results sheet", ev.name, qid)
            continue
        top = list(zip(ranked[: options.top], scores[: options.top], strict=True))
        ap = aps.get(qid, math.nan)
        title = f"{ev.name} · {method} · query {q.name or qid}" + (
            "" if math.isnan(ap) else f" · AP {ap:.3f}"
        )
        rel = f"queries/{_safe_name(qid)}.png"
        embed = len(sheet_rows) < options.embed_sheets
        alt = f"cw-figure query {qid}"
        key = _inputs_hash(
            "sheet",
            title,
            images[qid][1],
            q.bbox,
            options.thumb,
            [(i, images[i][1] if i in images else i, float(sc), _label(q, i)) for i, sc in top],
        )
        if canvas.kept(rel, key, embed) is None:
            items = [
                figures.SheetItem(
                    images[i][0] if i in images else Path(i), float(sc), _label(q, i), caption=i
                )
                for i, sc in top
            ]
            sheet = figures.results_sheet(images[qid][0], q.bbox, items, title, options.thumb)
            canvas.write(rel, sheet, key)
            if embed:
                canvas.embed(rel, alt, sheet, 960)
        elif embed:
            canvas.embed(rel, alt, None, 960)
        result.queries.append(rel)
        sheet_rows.append((qid, ranked))
    return sheet_rows


def _draw_cams(
    canvas: _Canvas,
    store: FeatureStore,
    ds: DatasetConfig,
    shards: Sequence[str],
    sheet_rows: list[tuple[str, list[str]]],
    images: dict[str, tuple[Path, str]],
    extractor: FeatureExtractor,
) -> None:
    """CAM overlays: the query's classes on its first result (what re-ranking boxes)."""
    ev, result, options = canvas.ev, canvas.result, canvas.options
    samples: list[tuple[str, str]] = []
    for qid, ranked in sheet_rows:
        first = next((i for i in ranked if i != qid and i in images), None)
        if first is not None and first not in {s for _, s in samples}:
            samples.append((qid, first))
        if len(samples) == options.cam_samples:
            break
    classes = _query_classes(store, ds, shards, {q for q, _ in samples})
    rerank = RerankConfig()
    for qid, image_id in samples:
        if qid not in classes:
            continue
        text = (
            f"{image_id}: CAM of query {qid}'s top {rerank.box_classes} classes; "
            f"boxes at {', '.join(f'{t:.0%}' for t in rerank.thresholds)} of the max"
        )
        rel = f"cams/{_safe_name(image_id)}.png"
        embed = not result.cams
        key = _inputs_hash(
            "cam",
            text,
            images[image_id][1],
            classes[qid][: rerank.box_classes].tolist(),
            ds.extraction.code_version(),
            extractor.config.max_pixels,
        )
        if canvas.kept(rel, key, embed) is not None:
            if embed:
                canvas.embed(rel, f"cw-figure cam {image_id}", None, 480)
            result.cams.append(rel)
            continue
        try:
            overlay = query_cam_figure(extractor, images[image_id][0], classes[qid], rerank)
        except (OSError, ImageLoadError, ValueError) as exc:
            logger.warning("%s: no CAM overlay of %s: %s", ev.name, image_id, exc)
            continue
        overlay = figures.with_caption(overlay, text)
        canvas.write(rel, overlay, key)
        if embed:
            canvas.embed(rel, f"cw-figure cam {image_id}", overlay, 480)
        result.cams.append(rel)


def _prune(canvas: _Canvas) -> None:
    """Delete figures of earlier runs that this one did not write (queries or samples that
    changed), and drop embedded images (the last ones first) until they fit the budget."""
    out_store, ev, result = canvas.out_store, canvas.ev, canvas.result
    written = {report_path(ev.name, p) for p in result.files}
    for sub in ("queries", "cams"):
        for rel in out_store.list(report_path(ev.name, sub), suffix=".png"):
            if rel not in written:
                out_store.delete(rel)
    while result.embedded and sum(len(u) for _, u in result.embedded) > EMBED_BUDGET:
        result.embedded.pop()


def write_report_figures(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    report: dict[str, Any],
    reports_root: str,
    extractor: FeatureExtractor | None = None,
    options: FigureOptions = FigureOptions(),
) -> ReportFigures:
    """Draw an evaluation's figures from its stored rankings into ``<reports_root>/<ev>/``.

    ``shards`` lists the current shards of the dataset and of each distractor set (as for
    :func:`cw_pipeline.compute.reports.build_report`, whose result ``report`` supplies the mAP and
    per-query AP). CAM overlays need ``extractor`` (one forward pass per sample); without it
    none are drawn. Files of earlier runs in ``queries/`` and ``cams/`` that this run did not
    write are removed. Every file is written atomically.

    Raises:
        FileNotFoundError: the evaluation's rankings or manifests are not in the store.
        ValueError: ``options.method`` is not one of the evaluation's methods.
    """
    ds = config.dataset(ev.dataset)
    methods = [m.name for m in ev.methods]
    if options.method is not None and options.method not in methods:
        raise ValueError(
            f"evaluation {ev.name} has no method {options.method!r}; it has {', '.join(methods)}"
        )
    method = options.method or _best_method(report, methods)
    out_store = FeatureStore(reports_root)
    result = ReportFigures(folder=Path(out_store.path(report_folder(ev.name))), method=method)

    rankings = reports.published_rankings(store, ev)  # tables and database of one run
    ds_ids, db_ids = reports.database_ids(config, store, ev, shards, rankings)
    pos = {i: k for k, i in enumerate(db_ids)}
    images = evaluation_manifest_rows(config, store, ev, shards)
    by_query = {q.image_id: q for q in load_groundtruth(ds, ds_ids).queries}
    tables: dict[str, pa.Table] = {m: store.read_table(rankings_file(rankings, m)) for m in methods}

    canvas = _Canvas(ev, out_store, options, result)
    canvas.load_index()
    curves, aps = _per_query_scores(tables, by_query, pos, report)
    _draw_charts(canvas, report, curves, aps)
    sheet_rows = _draw_sheets(canvas, tables[method], by_query, images, aps[method])
    if extractor is not None and options.cam_samples:
        _draw_cams(canvas, store, ds, shards[ds.name], sheet_rows, images, extractor)
    _prune(canvas)
    canvas.save_index()
    return result


def report_with_figures(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
    reports_root: str,
    extractor: FeatureExtractor | None = None,
    options: FigureOptions = FigureOptions(),
) -> tuple[dict[str, Any], ReportFigures, Path]:
    """Score an evaluation's stored rankings, draw its figures and write its report folder
    (``report.md`` linking the figures); returns the report, the figures and the folder."""
    reports.published_rankings(store, ev)  # FileNotFoundError naming what is missing
    report = reports.build_report(config, store, ev, shards)
    figs = write_report_figures(config, store, ev, shards, report, reports_root, extractor, options)
    folder = reports.write_report(reports_root, report, figs.links())
    return report, figs, folder


def redraw(
    config: ProjectConfig,
    evaluation: str,
    options: FigureOptions = FigureOptions(),
    cams: bool = True,
) -> dict[str, Any]:
    """Redraw an evaluation's report and figures from what is stored (no Dagster instance):
    shards are those whose manifests are in the warehouse. ``cams=False`` skips the CAM
    overlays (and loading the network). Returns a summary for the command line."""
    ev = config.evaluation(evaluation)
    store = FeatureStore(config.warehouse)
    shards = {n: stored_shards(store, "manifest", n) for n in (ev.dataset, *ev.distractors)}
    if not shards[ev.dataset]:
        raise FileNotFoundError(
            f"evaluation {ev.name}: dataset {ev.dataset} is not indexed in {store.url()} "
            f"(run: cw-pipeline index --dataset {ev.dataset})"
        )
    use_cnn = cams and options.cam_samples
    extractor = dataset_extractor(config.dataset(ev.dataset)) if use_cnn else None
    report, figs, folder = report_with_figures(
        config, store, ev, shards, config.reports, extractor, options
    )
    return {
        "evaluation": ev.name,
        "folder": str(folder),
        "method": figs.method,
        "queries": len(figs.queries),
        "cams": len(figs.cams),
        "charts": figs.charts,
        "map": {r["method"]: r["map"] for r in report["results"]},
    }
