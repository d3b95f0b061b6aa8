"""``cw-pipeline``: the command line.

Sub-commands:

* ``evaluate`` — run the retrieval library end to end on an image folder with a known layout.
* ``index`` — index a configured dataset through the Dagster pipeline (new or changed shards).
* ``demo`` — generate the demo dataset, materialize the whole graph, print the mAP report and
  (unless ``--no-ui``) serve the Dagster UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cw_pipeline.core.backbones import BACKBONES, DEFAULT_BACKBONE
from cw_pipeline.core.experiment import FeatureSet, Method, SearchParams
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.runner import (
    LAYOUTS,
    evaluate_methods,
    extract_features,
    extract_queries,
    load_benchmark,
    split_by_group,
)
from cw_pipeline.core.search import RerankConfig
from cw_pipeline.indexing import progress_logger

logger = logging.getLogger("cw_pipeline")

#: The measured default (see README, "Results on UKBench").
DEFAULT_METHOD = "ofa"
DEFAULT_N_PCA = 8


class CLIError(Exception):
    """An error the user can act on: printed as one line, exit status 2."""


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
    g.add_argument("--n-classes", type=int, default=64, help="N_C classes aggregated")
    g.add_argument(
        "--n-pca", type=int, default=DEFAULT_N_PCA, help="class vectors per image for PCA"
    )
    g.add_argument("--pca-dims", type=int, default=None, help="keep this many PCA dimensions")
    g.add_argument("--qe", type=int, default=0, help="query expansion with the top K")
    g.add_argument("--rerank", type=int, default=0, help="CAM-box re-ranking of the top R")
    g.add_argument("--rerank-classes", type=int, default=6)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cw-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate methods on an image folder with ground truth")
    ev.add_argument("--layout", required=True, choices=LAYOUTS)
    ev.add_argument("--images", required=True, type=Path, help="image folder")
    ev.add_argument("--groundtruth", type=Path, default=None, help="gt folder or gnd_*.pkl")
    ev.add_argument(
        "--method",
        action="append",
        default=None,
        help="raw | raw+pca | ofa | ona, with +r<R> and/or +qe<K> (repeatable; default: ofa, "
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
    _add_extraction_args(ev)
    _add_search_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    ix = sub.add_parser("index", help="index a configured dataset through the Dagster pipeline")
    ix.add_argument("--dataset", required=True, help="a name from the datasets YAML")
    ix.add_argument("--config", type=Path, default=None, help="datasets YAML")
    ix.add_argument("--no-refresh", action="store_true", help="only manifest and features")
    ix.add_argument("--force", action="store_true", help="re-run every shard")
    ix.add_argument("--json", action="store_true")
    ix.set_defaults(func=cmd_index)

    dm = sub.add_parser("demo", help="build the demo, materialize everything, serve the UI")
    dm.add_argument("--config", type=Path, default=None, help="datasets YAML")
    dm.add_argument("--no-ui", action="store_true", help="print the report and exit")
    dm.add_argument("--host", default="127.0.0.1", help="UI address (default: loopback only)")
    dm.add_argument("--port", type=int, default=3000)
    dm.add_argument("--json", action="store_true")
    dm.set_defaults(func=cmd_demo)
    return parser


def _dagster_home() -> Path:
    """$DAGSTER_HOME, or the project's ``.dagster/`` seeded with its ``dagster.yaml``."""
    import os
    import shutil

    from cw_pipeline.config import project_root

    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    root = project_root()
    path = root / ".dagster"
    path.mkdir(parents=True, exist_ok=True)
    src = root / "dagster.yaml"
    if src.exists() and not (path / "dagster.yaml").exists():
        shutil.copyfile(src, path / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def _pipeline(config_path: Path | None):
    import os

    from cw_pipeline.config import load_config

    if config_path is not None:
        os.environ["CW_PIPELINE_CONFIG"] = str(Path(config_path).resolve())
    config = load_config(config_path)
    from cw_pipeline.defs import build_definitions

    return config, build_definitions(config)


def _generate(config) -> list[str]:
    from cw_pipeline.core.demo import generate_demo

    roots = {ds.generate_root for ds in config.datasets.values() if ds.generate == "demo"}
    made = []
    for root in sorted(r for r in roots if r is not None):
        info = generate_demo(root)
        made += list(info.generated)
    return made


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    import dagster as dg

    from cw_pipeline.runs import index_dataset, refresh
    from cw_pipeline.store import FeatureStore

    _dagster_home()
    config, defs = _pipeline(args.config)
    ds = config.dataset(args.dataset)
    if ds.generate == "demo":
        _generate(config)
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        res = index_dataset(
            defs, instance, config, ds.name, FeatureStore(config.warehouse), force=args.force
        )
        refreshed = [] if args.no_refresh else refresh(defs, instance)
    out = res.as_dict()
    out["refreshed"] = refreshed
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if not args.json:
        print(
            f"{ds.name}: {out['shards']} shards, {out['images']} images; "
            f"{out['forward_passes']} forward passes, {out['reused']} reused, "
            f"{out['rejected']} rejected; refreshed {len(refreshed)} assets "
            f"({out['seconds']:.1f} s)"
        )
        return None  # type: ignore[return-value]
    return out


def cmd_demo(args: argparse.Namespace) -> dict[str, Any] | None:
    import os
    import subprocess

    import dagster as dg

    from cw_pipeline.config import project_root
    from cw_pipeline.runs import index_dataset, refresh
    from cw_pipeline.store import FeatureStore

    home = _dagster_home()
    config, defs = _pipeline(args.config)
    t0 = time.perf_counter()
    _generate(config)
    store = FeatureStore(config.warehouse)
    indexed = {}
    with dg.DagsterInstance.get() as instance:
        for name in config.datasets:
            indexed[name] = index_dataset(defs, instance, config, name, store).as_dict()
        refresh(defs, instance, include_cron=True)
    reports_root = Path(config.reports)
    report_text = []
    for ev in sorted(config.evaluations):
        path = reports_root / ev / "report.md"
        if path.exists():
            report_text.append(path.read_text())
    seconds = round(time.perf_counter() - t0, 2)
    from cw_pipeline.runs import CHECK_LOG

    failed = [f"{k} {c} ({sev})" for k, c, ok, sev in CHECK_LOG if not ok]
    checks = {"evaluated": len(CHECK_LOG), "failed": failed}
    if args.json:
        import json as _json

        out = {"datasets": indexed, "seconds": seconds, "checks": checks, "reports": {}}
        for ev in sorted(config.evaluations):
            p = reports_root / ev / "report.json"
            if p.exists():
                out["reports"][ev] = _json.loads(p.read_text())["results"]
        if args.no_ui:
            return out
        print(_json.dumps(out))
    else:
        print("\n".join(report_text))
        print(f"asset checks: {len(CHECK_LOG) - len(failed)}/{len(CHECK_LOG)} passed")
        for line in failed:
            print(f"  failed: {line}")
        print(f"demo materialized in {seconds:.1f} s; reports in {reports_root}")
    if args.no_ui:
        return None
    print(f"serving the Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})")
    cmd = [
        "dagster",
        "dev",
        "-w",
        str(project_root() / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return_code = subprocess.call(cmd, env=env, cwd=project_root())
    if return_code not in (0, 130, -2):
        raise CLIError(f"dagster dev exited with status {return_code}")
    return None


def _methods(args: argparse.Namespace) -> list[Method]:
    if args.method:
        return [Method.parse(m) for m in args.method]
    base = Method.parse(DEFAULT_METHOD)
    return [Method(base.aggregation, rerank=args.rerank, qe=args.qe)]


def _extractor(args: argparse.Namespace, resize: str, keep_maps: bool) -> FeatureExtractor:
    config = ExtractionConfig(
        backbone=args.backbone,
        layer=args.layer,
        weights=args.weights,
        resize=resize,
        n_classes=max(args.n_classes, args.n_pca, args.rerank_classes),
    )
    return FeatureExtractor(
        config,
        device=args.device,
        num_threads=args.threads,
        batch_size=args.batch_size,
        keep_maps=keep_maps,
    )


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    methods = _methods(args)
    bench = load_benchmark(args.layout, args.images, args.groundtruth)
    needs_pca = any(m.uses_pca for m in methods)
    if needs_pca and not (args.pca_from or args.pca_split):
        raise CLIError(
            "methods with PCA need a training set: --pca-from DIR or --pca-split "
            "(the evaluated images are never used to fit PCA)"
        )
    if args.pca_split and not bench.grouped:
        raise CLIError(f"--pca-split needs a grouped layout (ukbench, holidays), not {args.layout}")
    resize = args.resize or ("native" if bench.grouped else "paper:720:1024")
    extractor = _extractor(args, resize, keep_maps=any(m.needs_maps for m in methods))
    params = SearchParams(
        n_classes=args.n_classes,
        n_pca=args.n_pca,
        pca_dims=args.pca_dims,
        rerank=RerankConfig(n_classes=args.rerank_classes),
    )
    progress = progress_logger(logger, "features", every_seconds=5) if args.verbose else None
    feats = extract_features(extractor, bench.ids, bench.paths, progress)
    result: dict[str, Any] = {
        "dataset": bench.name,
        "images": len(bench.ids),
        "backbone": args.backbone,
        "resize": resize,
        "n_classes": args.n_classes,
        "n_pca": args.n_pca,
        "pca_dims": args.pca_dims,
    }
    if args.pca_split:
        halves = split_by_group(bench.labels)  # type: ignore[arg-type]
        per_half = []
        for h in (0, 1):
            db, train = feats.subset(halves[h]), feats.subset(halves[1 - h])
            scores = evaluate_methods(
                methods,
                db,
                None,
                train,
                params,
                extractor,
                labels=bench.labels[halves[h]],  # type: ignore[index]
                pca_metadata={"training_set": f"{bench.name}-half{2 - h}"},
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
        train = _training_features(args, extractor)
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
            labels=bench.labels,
            groundtruth=None if bench.grouped else bench.groundtruth,
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


def _training_features(args: argparse.Namespace, extractor: FeatureExtractor) -> FeatureSet:
    if args.pca_from is None:
        # No PCA needed (raw only); an empty-but-valid set is never used.
        return FeatureSet(
            [],
            np.zeros((0, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 1)),
            np.zeros((0, 1)),
            np.zeros((0, 1, 4)),
        )
    from cw_pipeline.core.datasets import scan_image_folder

    root = Path(args.pca_from)
    if not root.is_dir():
        raise CLIError(f"--pca-from folder not found: {root}")
    found = scan_image_folder(root)
    if not found:
        raise CLIError(f"no images under --pca-from {root}")
    ids = [i for i, _ in found]
    return extract_features(extractor, ids, [root / r for _, r in found])


def _print_human(result: dict[str, Any]) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
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
    except (CLIError, ValueError, FileNotFoundError, OSError, KeyError) as exc:
        if args.debug:
            raise
        print(f"cw-pipeline: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        if getattr(args, "json", False):
            print(json.dumps(result, sort_keys=False, default=str))
        elif args.command == "evaluate":
            _print_human(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
