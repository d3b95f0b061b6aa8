"""Demo method table: mAP and seconds per method, each half with PCA from the other half.

Usage: python benchmarks/demo_methods.py [--root DIR] [--only NAMES]

The demo (``cw_pipeline.core.demo``, generated into ``--root`` or a temporary folder) is read
like Oxford: box queries (crop protocol, as in ``data/datasets.yaml``), good+ok positive, junk
ignored. Features are extracted once per half (native size, efficientnet_lite0); demo-a is
evaluated with PCA learned on demo-b and vice versa, and the two mAPs are averaged. The grid is
UKBench's (``ukbench_methods.py``) with QE5 (six positives per query) and re-ranking of the top 10.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ukbench_methods import CONFIGS as UKBENCH_CONFIGS  # benchmarks/ is on sys.path
from ukbench_methods import grid

from cw_pipeline.core.demo import generate_demo
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.runner import (
    evaluate_methods,
    extract_features,
    extract_queries,
    load_benchmark,
)

# UKBench's grid, with QE over the top 5 (an instance has six positives, UKBench four).
CONFIGS = [(name.replace("qe2", "qe5"), *rest) for name, *rest in UKBENCH_CONFIGS]
HALVES = ("demo-a", "demo-b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="demo folder (default: temporary)")
    ap.add_argument("--only", default="", help="comma-separated method names to run")
    args = ap.parse_args()
    only = {m for m in args.only.split(",") if m}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        info = generate_demo(root)
        fe = FeatureExtractor(ExtractionConfig(resize="native"), keep_maps=True)
        benches, db, queries = {}, {}, {}
        t0 = time.perf_counter()
        for half in HALVES:
            d = info.datasets[half]
            bench = load_benchmark("oxford", d.images, d.groundtruth)
            benches[half] = bench
            db[half] = extract_features(fe, bench.ids, bench.paths)
            queries[half] = extract_queries(fe, bench, "crop")
        n = sum(len(b.ids) for b in benches.values())
        print(f"features: {n} images in {time.perf_counter() - t0:.1f} s (both halves)")
        print()
        print("| method | N_C | N_pca | dims | mAP demo-a | mAP demo-b | mean | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for row in grid(CONFIGS, only):
            t = time.perf_counter()
            maps = []
            for half, other in zip(HALVES, reversed(HALVES), strict=True):
                (score,) = evaluate_methods(
                    [row.method],
                    db[half],
                    queries[half],
                    db[other],
                    row.params,
                    fe,
                    groundtruth=benches[half].groundtruth,
                )
                maps.append(score.map)
            print(
                f"{row.cells()} | {maps[0]:.4f} | {maps[1]:.4f} | {np.mean(maps):.4f} | "
                f"{time.perf_counter() - t:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
