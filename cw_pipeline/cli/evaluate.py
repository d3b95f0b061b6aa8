"""``cw-pipeline evaluate``: the retrieval library end to end on an image folder with a known
layout, without Dagster — its arguments, the checks made before the first forward pass, the
PCA training set (``--pca-from`` or ``--pca-split``) and the human summary."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from cw_pipeline.cli.common import DEFAULT_METHOD, DEFAULT_N_PCA, CLIError, logger
from cw_pipeline.cli.progress import ImageBar, bars_enabled
from cw_pipeline.compute.features import progress_logger
from cw_pipeline.core.backbones import BACKBONES, DEFAULT_BACKBONE, check_device
from cw_pipeline.core.datasets import scan_image_folder
from cw_pipeline.core.datasets.layouts import EVALUATE_LAYOUTS
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import AGGREGATIONS, Method
from cw_pipeline.core.pca_split import pca_groups
from cw_pipeline.core.runner import (
    evaluate_methods,
    extract_features,
    extract_queries,
    grouped_groundtruth,
    load_benchmark,
)
from cw_pipeline.core.search_settings import RerankConfig, SearchParams
from cw_pipeline.core.settings_record import settings_record
from cw_pipeline.core.validation import error_message


def add_parser(sub: Any) -> None:
    """The ``evaluate`` sub-command."""
    ev = sub.add_parser("evaluate", help="evaluate methods on an image folder with ground truth")
    ev.add_argument("--layout", required=True, choices=EVALUATE_LAYOUTS)
    ev.add_argument("--images", required=True, type=Path, help="image folder")
    ev.add_argument("--groundtruth", type=Path, default=None, help="gt folder or gnd_*.pkl")
    ev.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"{' | '.join(AGGREGATIONS)}, with +r<R> and/or +qe<K> (repeatable; default: ofa, "
        "with --qe/--rerank applied)",
    )
    pca = ev.add_mutually_exclusive_group()
    pca.add_argument("--pca-from", type=Path, default=None, help="image folder to learn PCA on")
    pca.add_argument(
        "--pca-split",
        action="store_true",
        help="split the objects in two halves; evaluate each with PCA learned on the other",
    )
    ev.add_argument("--protocol", choices=("paper", "crop"), default="crop")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_extraction_args(ev)
    _add_search_args(ev)
    ev.set_defaults(func=cmd_evaluate)


def _add_extraction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    g.add_argument("--layer", default=None, help="layer giving X (default: the CAM layer)")
    g.add_argument("--weights", default=None, help="packaged | imagenet | random | FILE")
    g.add_argument(
        "--resize",
        default=None,
        help="native | paper[:MIN[:MAX]] | fixed:WxH | paper_fixed "
        "(default: native for ukbench/holidays, paper:720:1024 otherwise)",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=16)


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("aggregation and search")
    g.add_argument(
        "--aggregated-classes",
        "--n-classes",
        dest="aggregated_classes",
        type=int,
        default=64,
        help="N_C, classes aggregated per descriptor (the images store as many classes as "
        "the search settings read)",
    )
    g.add_argument(
        "--n-pca", type=int, default=DEFAULT_N_PCA, help="class vectors per image for PCA"
    )
    g.add_argument("--pca-dims", type=int, default=None, help="keep this many PCA dimensions")
    g.add_argument(
        "--qe", type=int, default=None, help="query expansion with the top K (every method)"
    )
    g.add_argument(
        "--rerank", type=int, default=None, help="CAM-box re-ranking of the top R (every method)"
    )
    g.add_argument(
        "--rerank-query-classes",
        "--rerank-classes",
        dest="rerank_query_classes",
        type=int,
        default=6,
        help="query classes whose CAMs re-rank the top R (default: 6)",
    )


def _methods(args: argparse.Namespace) -> list[Method]:
    """The evaluated methods: ``--qe``/``--rerank`` apply to each ``--method`` (as in
    ``search``), never silently ignored."""
    for name in ("qe", "rerank"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CLIError(f"--{name} must be >= 0, got {value}")
    texts = args.method or [DEFAULT_METHOD]
    out = []
    for text in texts:
        m = Method.parse(text)
        out.append(
            Method(
                m.aggregation,
                rerank=m.rerank if args.rerank is None else args.rerank,
                qe=m.qe if args.qe is None else args.qe,
            )
        )
    return out


def _search_params(args: argparse.Namespace) -> SearchParams:
    """The search settings of the command line (CLIError naming the first invalid one)."""
    try:
        return SearchParams(
            aggregated_classes=args.aggregated_classes,
            n_pca=args.n_pca,
            pca_dims=args.pca_dims,
            rerank=RerankConfig(query_classes=args.rerank_query_classes),
        )
    except ValidationError as exc:
        raise CLIError(error_message(exc.errors()[0])) from None


def _extractor(
    args: argparse.Namespace, resize: str, params: SearchParams, keep_maps: bool
) -> FeatureExtractor:
    """The extractor of ``evaluate``: images store the classes ``params`` read, no more."""
    try:
        config = ExtractionConfig(
            backbone=args.backbone,
            layer=args.layer,
            weights=args.weights,
            resize=resize,
            stored_classes=params.classes_needed,
        )
    except ValidationError as exc:
        raise CLIError(error_message(exc.errors()[0])) from None
    return FeatureExtractor(
        config,
        device=args.device,
        num_threads=args.threads,
        batch_size=args.batch_size,
        keep_maps=keep_maps,
    )


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``--method`` on ``--images``: the result record (mAP per method)."""
    t0 = time.perf_counter()
    # Everything that can be checked is checked before the first forward pass: methods, device,
    # the PCA folder, the image folder and its ground truth.
    methods = _methods(args)
    needs_pca = any(m.uses_pca for m in methods)
    if needs_pca and not (args.pca_from or args.pca_split):
        raise CLIError(
            "methods with PCA need a training set: --pca-from DIR or --pca-split "
            "(the evaluated images are never used to fit PCA)"
        )
    check_device(args.device)
    pca_images = _pca_images(args.pca_from)
    bench = load_benchmark(args.layout, args.images, args.groundtruth)
    if args.pca_split and not bench.grouped:
        raise CLIError(f"--pca-split needs a grouped layout (ukbench, holidays), not {args.layout}")
    resize = args.resize or ("native" if bench.grouped else "paper:720:1024")
    params = _search_params(args)
    extractor = _extractor(args, resize, params, keep_maps=any(m.needs_maps for m in methods))
    with _progress(args, "features") as progress:
        feats = extract_features(extractor, bench.ids, bench.paths, progress)
    result: dict[str, Any] = {
        "dataset": bench.name,
        "images": len(bench.ids),
        **settings_record(extractor.config, params, methods),
    }
    if args.pca_split:
        per_half = []
        for group in pca_groups(len(feats), bench.labels):
            db, train = feats.subset(group.rows), feats.subset(group.training)
            scores = evaluate_methods(
                methods,
                db,
                None,
                train,
                params,
                extractor,
                groundtruth=grouped_groundtruth(args.layout, db.ids),
                pca_metadata={"training_set": f"{bench.name}-half{group.training_half}"},
            )
            per_half.append([s.as_dict() for s in scores])
        merged = []
        for i, m in enumerate(methods):
            entry: dict[str, Any] = {"method": m.name}
            for key in ("map", "ns_score"):
                vals = [half[i][key] for half in per_half if key in half[i]]
                if vals:
                    entry[key] = round(float(np.mean(vals)), 4)
            entry["halves"] = [half[i] for half in per_half]
            merged.append(entry)
        result["pca"] = "split"
        result["results"] = merged
    else:
        train = _training_features(args, extractor, pca_images)
        queries = None
        if not bench.grouped:
            queries = extract_queries(extractor, bench, args.protocol)
        scores = evaluate_methods(
            methods,
            feats,
            queries,
            train,
            params,
            extractor,
            groundtruth=bench.groundtruth,
            pca_metadata={"training_set": str(args.pca_from)},
        )
        result["pca"] = str(args.pca_from) if args.pca_from else None
        result["protocol"] = None if bench.grouped else args.protocol
        result["results"] = [s.as_dict() for s in scores]
    first = result["results"][0]
    result["method"] = first["method"]
    result["map"] = first["map"]
    if "ns_score" in first:
        result["ns_score"] = first["ns_score"]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _pca_images(folder: Path | None) -> list[tuple[str, Path]]:
    """(id, path) of the images under ``--pca-from`` (empty without it); CLIError naming the
    folder when it is missing, not a folder or holds no images."""
    if folder is None:
        return []
    root = Path(folder)
    if not root.exists():
        raise CLIError(f"--pca-from folder not found: {root}")
    if not root.is_dir():
        raise CLIError(f"--pca-from is not a folder: {root}")
    found = scan_image_folder(root)
    if not found:
        raise CLIError(f"no images under --pca-from {root}")
    return [(i, root / r) for i, r in found]


def _training_features(
    args: argparse.Namespace, extractor: FeatureExtractor, images: list[tuple[str, Path]]
) -> FeatureSet:
    """Features of the ``--pca-from`` images (an empty set, never used, without PCA)."""
    if not images:
        return FeatureSet(
            [],
            np.zeros((0, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 4)),
        )
    with _progress(args, "PCA training features") as progress:
        return extract_features(extractor, [i for i, _ in images], [p for _, p in images], progress)


@contextlib.contextmanager
def _progress(args: argparse.Namespace, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback: a bar on a terminal (unless --quiet), else log lines with -v."""
    if bars_enabled(args.quiet):
        with ImageBar(label) as bar:
            yield bar
    elif args.verbose:
        yield progress_logger(logger, label, every_seconds=5)
    else:
        yield None


def print_human(result: dict[str, Any]) -> None:
    """The summary ``evaluate`` prints without ``--json``: one line per method."""
    print(f"dataset {result['dataset']}: {result['images']} images, backbone {result['backbone']}")
    for r in result["results"]:
        ns = f"  N-S {r['ns_score']:.3f}" if "ns_score" in r else ""
        rev = ""
        if "revisited" in r:
            rev = "  E/M/H " + "/".join(
                f"{r['revisited'][k]:.3f}" for k in ("easy", "medium", "hard")
            )
        print(f"  {r['method']:<16} mAP {r['map']:.4f}{ns}{rev}")
    print(f"  ({result['seconds']:.1f} s)")
