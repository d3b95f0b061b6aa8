"""The kept feature maps' precision: mAP with float16 maps (what is kept and searched) against
float32 maps, on UKBench-600 and the demo; and their size per image.

Usage: python benchmarks/map_precision.py [--ukbench DIR] [--methods ona,ona+qe10,ofa+r100+qe10]

One forward pass per image gives float32 maps; the float16 ones are their cast (exactly what
the extractor keeps). Every method that reads maps is scored with both: UKBench-600 split by
object (each half ranked with the PCA learned on the other half, its queries its own images),
the demo's demo-a with demo-b's PCA and its cropped queries. Target (issue 20): |ΔmAP| <= 0.002
per method. Also prints the bytes of one kept ``.npz`` at the demo's and at Oxford's resolution.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine_info, ukbench_images  # noqa: E402
from cw_pipeline.compute.feature_maps import encode_maps_file  # noqa: E402
from cw_pipeline.core.demo import generate_demo  # noqa: E402
from cw_pipeline.core.evaluation import score  # noqa: E402
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, FeatureMaps  # noqa: E402
from cw_pipeline.core.feature_set import FeatureSet  # noqa: E402
from cw_pipeline.core.methods import Method, fit_pca  # noqa: E402
from cw_pipeline.core.pca_split import group_labels, pca_groups  # noqa: E402
from cw_pipeline.core.runner import (  # noqa: E402
    evaluate_search,
    extract_features,
    extract_queries,
    grouped_groundtruth,
    load_benchmark,
)
from cw_pipeline.core.search_settings import SearchParams  # noqa: E402

TOLERANCE = 0.002
PARAMS = SearchParams(aggregated_classes=64, n_pca=8)


def _as(feats: FeatureSet, dtype) -> FeatureSet:
    """``feats`` with its maps cast to ``dtype``."""
    maps = [
        FeatureMaps(
            features=m.features.astype(dtype),
            cam_maps=None if m.cam_maps is None else m.cam_maps.astype(dtype),
            input_size=m.input_size,
            image_size=m.image_size,
        )
        for m in feats.maps
    ]
    return FeatureSet(
        ids=feats.ids,
        class_ids=feats.class_ids,
        class_probs=feats.class_probs,
        class_vectors=feats.class_vectors,
        sum_pooled=feats.sum_pooled,
        boxes=feats.boxes,
        maps=maps,
    )


def _extractor() -> FeatureExtractor:
    fe = FeatureExtractor(ExtractionConfig(), keep_maps=True)
    fe.maps_dtype = np.float32
    return fe


def ukbench(folder: Path, methods: list[Method]) -> dict[str, dict[str, float]]:
    bench = load_benchmark("ukbench", folder)
    fe = _extractor()
    feats = extract_features(fe, bench.ids, bench.paths)
    clf = (fe.backbone.classifier_weight, fe.backbone.classifier_bias)
    labels = group_labels("ukbench", bench.ids)
    out: dict[str, dict[str, float]] = {}
    for dtype in (np.float32, np.float16):
        kept = _as(feats, dtype)
        for method in methods:
            aps = []
            for group in pca_groups(len(bench.ids), labels):
                db = kept.subset(group.rows)
                pca = fit_pca(method, kept.subset(group.training), PARAMS)
                res = evaluate_search(method, db, None, pca, PARAMS, clf)
                gt = grouped_groundtruth("ukbench", db.ids)
                s = score(res.indices, gt, db.ids, db.ids)
                aps += list(s.aps.values())
            out.setdefault(method.name, {})[np.dtype(dtype).name] = float(np.mean(aps))
    return out


def demo(methods: list[Method]) -> tuple[dict[str, dict[str, float]], FeatureSet]:
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(Path(tmp))
        a = load_benchmark("oxford", Path(tmp) / "demo-a/jpg", Path(tmp) / "demo-a/gt")
        b = load_benchmark("oxford", Path(tmp) / "demo-b/jpg", Path(tmp) / "demo-b/gt")
        fe = _extractor()
        feats = extract_features(fe, a.ids, a.paths)
        train = extract_features(fe, b.ids, b.paths)
        queries = extract_queries(fe, a, "crop")
    clf = (fe.backbone.classifier_weight, fe.backbone.classifier_bias)
    out: dict[str, dict[str, float]] = {}
    for dtype in (np.float32, np.float16):
        kept = _as(feats, dtype)
        for method in methods:
            pca = fit_pca(method, train, PARAMS)
            res = evaluate_search(method, kept, queries, pca, PARAMS, clf)
            s = score(res.indices, a.groundtruth, kept.ids, queries.ids)
            out.setdefault(method.name, {})[np.dtype(dtype).name] = s.map
    return out, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ukbench", type=Path, default=ukbench_images())
    ap.add_argument("--methods", default="ona,ona+qe10,ofa+r100+qe10")
    args = ap.parse_args()
    methods = [Method.parse(m) for m in args.methods.split(",")]
    print(machine_info())
    results = {}
    if args.ukbench.is_dir():
        results["UKBench-600"] = ukbench(args.ukbench, methods)
    else:
        print(f"UKBench not found at {args.ukbench}: skipped")
    results["demo (demo-a, PCA of demo-b)"], feats = demo(methods)
    worst = 0.0
    for name, table in results.items():
        print(f"\n{name}: mAP with float32 maps -> float16 maps (kept)")
        for method, m in table.items():
            delta = m["float16"] - m["float32"]
            worst = max(worst, abs(delta))
            print(f"  {method:>14}: {m['float32']:.4f} -> {m['float16']:.4f} ({delta:+.4f})")
    ok = "MET" if worst <= TOLERANCE else "MISSED"
    print(f"\nlargest |ΔmAP| {worst:.4f} (target <= {TOLERANCE}: {ok})")
    sizes = [len(encode_maps_file(m)) for m in feats.maps]
    grid = feats.maps[0].features.shape
    oxford = FeatureMaps(features=np.zeros((grid[0], 24, 32), np.float16))  # 1024×768 / 32
    print(
        f"kept .npz per image: demo (inputs up to 1024 px, grid e.g. {grid[1]}×{grid[2]}) "
        f"{np.mean(sizes) / 1e3:.0f} kB on average; Oxford at 1024×768 (grid 24×32): "
        f"{len(encode_maps_file(oxford)) / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
