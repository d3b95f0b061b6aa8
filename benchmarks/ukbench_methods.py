"""UKBench-600 method table: N-S, mAP and seconds per method (PCA from the other half).

Usage: python benchmarks/ukbench_methods.py [--images DIR] [--rerank-queries N]

Features are extracted once (native 320×240, efficientnet_lite0); each half of the objects is
evaluated as its own database with PCA learned on the other half, and the two are averaged.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _machine import ukbench_images

from cw_pipeline.core.datasets import ukbench_groundtruth, ukbench_labels
from cw_pipeline.core.evaluation import score
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method, fit_pca
from cw_pipeline.core.pca_split import pca_groups
from cw_pipeline.core.runner import evaluate_search
from cw_pipeline.core.search_settings import SearchParams

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    ("raw", 64, 1, None),
    ("raw+pca", 64, 1, None),
    ("ofa", 1, 1, None),
    ("ofa", 1, 8, None),
    ("ofa", 8, 1, None),
    ("ofa", 8, 8, None),
    ("ofa", 64, 1, None),
    ("ofa", 64, 8, None),
    ("ofa", 64, 8, 256),
    ("ona", 64, 8, None),
    ("ofa+qe2", 64, 8, None),
    ("ona+qe2", 64, 8, None),
    ("ofa+r10", 64, 8, None),
    ("ofa+r10+qe2", 64, 8, None),
]


@dataclass(frozen=True)
class Row:
    """One configuration of the method grid."""

    name: str
    method: Method
    params: SearchParams

    def cells(self) -> str:
        """The table's first cells: method | N_C | N_pca | dims (– where a setting is unused)."""
        cam = self.method.spec.pca_space == "class"
        n_pca = self.params.n_pca if self.method.uses_pca and cam else "–"
        n_c = self.params.aggregated_classes if cam else "–"
        return f"| {self.name} | {n_c} | {n_pca} | {self.params.pca_dims or 'all'}"


def grid(configs: list[tuple], only: set[str]) -> list[Row]:
    """The configurations to run (all, or those whose method name is in ``only``)."""
    return [
        Row(
            name,
            Method.parse(name),
            SearchParams(aggregated_classes=n_c, n_pca=n_pca, pca_dims=dims),
        )
        for name, n_c, n_pca, dims in configs
        if not only or name in only
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ukbench_images())
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated method names to run")
    args = ap.parse_args()
    only = {m for m in args.only.split(",") if m}
    paths = sorted(args.images.glob("*.jpg"))
    ids = [p.stem for p in paths]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    fe = FeatureExtractor(
        ExtractionConfig(resize="native"), keep_maps=True, num_threads=args.threads
    )
    t0 = time.perf_counter()
    recs = dict(fe.extract_files(zip(ids, paths, strict=True)))
    dt = time.perf_counter() - t0
    print(
        f"features: {len(ids)} images in {dt:.1f} s ({len(ids) / dt:.1f} img/s, "
        f"forward {fe.stats.forward_seconds:.1f} s)"
    )
    fs = FeatureSet.from_records(ids, [recs[i] for i in ids])
    labels = ukbench_labels(ids)
    halves = pca_groups(len(ids), labels)
    clf = (fe.backbone.classifier_weight, fe.backbone.classifier_bias)
    print()
    print("| method | N_C | N_pca | dims | N-S | mAP | seconds |")
    print("|---|---|---|---|---|---|---|")
    for row in grid(CONFIGS, only):
        t = time.perf_counter()
        scores = []
        for half in halves:
            db, train = fs.subset(half.rows), fs.subset(half.training)
            pca = fit_pca(row.method, train, row.params)
            res = evaluate_search(row.method, db, None, pca, row.params, classifier=clf)
            s = score(res.indices, ukbench_groundtruth(db.ids), db.ids)
            scores.append((s.ns_score, s.map))
        ns, mp = np.mean(scores, axis=0)
        print(f"{row.cells()} | {ns:.3f} | {mp:.4f} | {time.perf_counter() - t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
