"""``cw-pipeline``: the command line.

Sub-commands:

* ``evaluate`` — run the retrieval library end to end on an image folder with a known layout
  (:mod:`cw_pipeline.cli.evaluate`).
* ``index`` — index a configured dataset through the Dagster pipeline (new or changed shards;
  :mod:`cw_pipeline.cli.index`).
* ``demo`` — generate the demo dataset, materialize the whole graph, print the mAP report and
  (unless ``--no-ui``) serve the Dagster UI (:mod:`cw_pipeline.cli.demo`).
* ``report-figures`` — redraw the report and pictures of materialized evaluations.
* ``download`` — fetch a benchmark from its official sources into the configured layout
  (:mod:`cw_pipeline.download`).
* ``search`` — rank a configured dataset's indexed images for a query image
  (:mod:`cw_pipeline.query`).
* ``datasets`` — the configured datasets and the state of their index
  (:mod:`cw_pipeline.compute.catalog`).
* ``serve`` — the search page and its JSON API (:mod:`cw_pipeline.web`).

``search``, ``datasets``, ``serve`` and ``report-figures`` live in :mod:`cw_pipeline.cli.query`;
this module builds the parser and runs a command (:func:`main`, the console script).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cw_pipeline.cli import demo, download, evaluate, index, query
from cw_pipeline.cli.common import CLIError
from cw_pipeline.core.jsonsafe import dumps as strict_json
from cw_pipeline.runtime.instance import InstanceBusyError, keep_terminable


def build_parser() -> argparse.ArgumentParser:
    """The ``cw-pipeline`` parser: global flags and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="cw-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate.add_parser(sub)
    index.add_parser(sub)
    demo.add_parser(sub)
    download.add_parser(sub)
    query.add_query_parsers(sub)
    query.add_report_figures_parser(sub)
    query.add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cw-pipeline`` with ``argv``: exit status 0, 2 (an error, one line on stderr) or
    130 (interrupted)."""
    keep_terminable()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("cw-pipeline: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError, KeyError, InstanceBusyError) as exc:
        if args.debug:
            raise
        print(f"cw-pipeline: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        if getattr(args, "json", False):
            print(strict_json(result, sort_keys=False, default=str))
        elif args.command == "evaluate":
            evaluate.print_human(result)
    return 0
