"""The sub-commands that read the materialized index without a Dagster instance: ``search``
(rank a dataset's images for a query image), ``datasets`` (the state of every configured
dataset), ``serve`` (the search page and its JSON API, :mod:`cw_pipeline.web`) and
``report-figures`` (redraw the reports of materialized evaluations)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cw_pipeline.cli.common import DEFAULT_METHOD, DEFAULT_UI_HOST, CLIError, is_loopback
from cw_pipeline.compute.catalog import format_table, list_datasets
from cw_pipeline.compute.report_figures import FigureOptions, redraw
from cw_pipeline.config import load_config
from cw_pipeline.core.methods import AGGREGATIONS, Method
from cw_pipeline.figures import SheetItem, results_sheet, save_png
from cw_pipeline.query import format_results, search_dataset
from cw_pipeline.web import DEFAULT_PORT, serve
from cw_pipeline.web.engine import (
    DEFAULT_MAP_CACHE_BYTES,
    DEFAULT_MAX_SEARCHES,
    DEFAULT_MAX_UPLOAD_BYTES,
    WebError,
)


def add_serve_parser(sub: Any) -> None:
    """The ``serve`` sub-command."""
    sv = sub.add_parser("serve", help="serve the search page over the materialized index")
    sv.add_argument("--config", type=Path, default=None, help="datasets YAML")
    sv.add_argument(
        "--host",
        default=DEFAULT_UI_HOST,
        help="address to bind (default: 127.0.0.1, loopback only; the page has no authentication)",
    )
    sv.add_argument("--port", type=int, default=DEFAULT_PORT)
    sv.add_argument(
        "--dagster-url",
        default="http://127.0.0.1:3000",
        help="the Dagster UI that result pages link to (default: http://127.0.0.1:3000)",
    )
    sv.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest query image accepted (default: %(default)g MiB)",
    )
    sv.add_argument(
        "--map-cache-mb",
        type=float,
        default=DEFAULT_MAP_CACHE_BYTES / 2**20,
        help="database feature maps (OnA, +r) kept across searches, least recently used "
        "dropped first; 0 keeps none (default: %(default)g MiB)",
    )
    sv.add_argument(
        "--max-searches",
        type=int,
        default=DEFAULT_MAX_SEARCHES,
        help="searches (and CAM views) running at once, the others waiting for a slot; the "
        "list of datasets, images and thumbnails never wait (default: %(default)d)",
    )
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the search page on ``--host:--port`` until interrupted."""
    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}")
    if args.map_cache_mb < 0:
        raise CLIError(f"--map-cache-mb must be >= 0, got {args.map_cache_mb:g}")
    if args.max_searches < 1:
        raise CLIError(f"--max-searches must be >= 1, got {args.max_searches}")
    print(f"serving the search page on http://{args.host}:{args.port}", flush=True)
    if not is_loopback(args.host):
        print(
            f"warning: the search page has no authentication and {args.host} is not a "
            "loopback address; expose it through an SSH tunnel or a reverse proxy with "
            "authentication",
            file=sys.stderr,
            flush=True,
        )
    try:
        serve(
            args.config,
            args.host,
            args.port,
            dagster_url=args.dagster_url,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            map_cache_bytes=int(args.map_cache_mb * 2**20),
            max_searches=args.max_searches,
        )
    except WebError as exc:
        raise CLIError(exc.message) from exc


def add_query_parsers(sub: Any) -> None:
    """``search`` and ``datasets``: read the materialized index (no Dagster instance)."""
    se = sub.add_parser(
        "search", help="rank a configured dataset's indexed images for a query image"
    )
    se.add_argument("image", type=Path, help="query image file")
    se.add_argument("--dataset", required=True, help="a name from the datasets YAML")
    se.add_argument(
        "--box",
        nargs=4,
        type=float,
        metavar=("X1", "Y1", "X2", "Y2"),
        help="query region in the (upright) image's pixels",
    )
    se.add_argument("--top", type=int, default=10, help="results to print (default 10)")
    se.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"{' | '.join(AGGREGATIONS)}, optionally +r<R>/+qe<K> (default: ofa)",
    )
    se.add_argument("--qe", type=int, default=None, help="query expansion with the top K")
    se.add_argument("--rerank", type=int, default=None, help="CAM-box re-ranking of the top R")
    se.add_argument(
        "--protocol",
        choices=("crop", "paper"),
        default=None,
        help="how a box is applied (default: the dataset's query_protocol)",
    )
    se.add_argument("--sheet", type=Path, default=None, help="write a results sheet (PNG)")
    se.add_argument("--config", type=Path, default=None, help="datasets YAML")
    se.add_argument("--json", action="store_true", help="print one JSON object")
    se.set_defaults(func=cmd_search)

    da = sub.add_parser("datasets", help="configured datasets and the state of their index")
    da.add_argument("--config", type=Path, default=None, help="datasets YAML")
    da.add_argument("--json", action="store_true", help="print one JSON object")
    da.set_defaults(func=cmd_datasets)


def cmd_search(args: argparse.Namespace) -> dict[str, Any] | None:
    """Rank ``--dataset``'s indexed images for the query image (optionally a results sheet)."""
    method = Method.parse(args.method)
    for name in ("qe", "rerank"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CLIError(f"--{name} must be >= 0, got {value}")
    method = Method(
        method.aggregation,
        rerank=method.rerank if args.rerank is None else args.rerank,
        qe=method.qe if args.qe is None else args.qe,
    )
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    if args.sheet is not None and args.sheet.suffix.lower() != ".png":
        raise CLIError(f"--sheet writes a PNG: give a file ending in .png, not {args.sheet}")
    config = load_config(args.config)
    result = search_dataset(
        config,
        args.dataset,
        args.image,
        box=args.box,
        top=args.top,
        method=method,
        protocol=args.protocol,
    )
    out = result.as_dict()
    if args.sheet is not None:
        items = [SheetItem(h.path, h.score, caption=h.image_id) for h in result.hits]
        title = f"{result.dataset} | {result.method} | {result.query.name}"
        out["sheet"] = str(
            save_png(results_sheet(result.query, result.box, items, title), args.sheet)
        )
    if args.json:
        return out
    print(format_results(result))
    if args.sheet is not None:
        print(f"results sheet: {out['sheet']}")
    return None


def cmd_datasets(args: argparse.Namespace) -> dict[str, Any] | None:
    """The configured datasets and the state of their index."""
    config = load_config(args.config)
    statuses = list_datasets(config)
    if args.json:
        return {"config": str(config.source), "datasets": [s.as_dict() for s in statuses]}
    print(format_table(statuses))
    return None


def add_report_figures_parser(sub: Any) -> None:
    """The ``report-figures`` sub-command."""
    rf = sub.add_parser(
        "report-figures",
        help="redraw the report and pictures of materialized evaluations",
        description="Redraw data/reports/<evaluation>/ (report.md, results sheets, CAM "
        "overlays, precision-recall curves, per-query AP) from the stored rankings.",
    )
    rf.add_argument("evaluation", nargs="*", help="evaluation names (default: every one)")
    rf.add_argument("--config", type=Path, default=None, help="datasets YAML")
    rf.add_argument(
        "--queries", type=int, default=100, help="results sheets per evaluation (default 100)"
    )
    rf.add_argument("--top", type=int, default=10, help="results per sheet (default 10)")
    rf.add_argument("--method", default=None, help="method of the sheets (default: best mAP)")
    rf.add_argument("--cams", type=int, default=3, help="CAM overlays (0: no network needed)")
    rf.add_argument("--json", action="store_true", help="print one JSON object")
    rf.set_defaults(func=cmd_report_figures)


def cmd_report_figures(args: argparse.Namespace) -> dict[str, Any] | None:
    """Redraw the report and pictures of the named (default: every) evaluation."""
    for name, low in (("queries", 0), ("top", 1), ("cams", 0)):
        if getattr(args, name) < low:
            raise CLIError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    options = FigureOptions(
        max_queries=args.queries, top=args.top, cam_samples=args.cams, method=args.method
    )
    config = load_config(args.config)
    names = args.evaluation or sorted(config.evaluations)
    done = [redraw(config, name, options) for name in names]
    if args.json:
        return {"evaluations": done}
    for d in done:
        print(
            f"{d['evaluation']}: {d['queries']} results sheets ({d['method']}), {d['cams']} CAM "
            f"overlays, {len(d['charts'])} charts in {d['folder']}"
        )
    return None
