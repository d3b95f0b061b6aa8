"""Feature-store size and the mAP cost of storing class vectors as float16 or int8.

Usage: python benchmarks/storage_precision.py [--images DIR]

Targets: ≤ 100 KB per image at default settings (N_C = 64, efficientnet_lite0, K = 1280), and
a UKBench mAP change ≤ 0.002 from the storage precision against float32.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from _machine import ukbench_images

from cw_pipeline.compute.features import records_to_table, table_to_featureset
from cw_pipeline.core.datasets import ukbench_groundtruth, ukbench_labels
from cw_pipeline.core.evaluation import score as score_rankings
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method, fit_pca
from cw_pipeline.core.pca_split import pca_groups
from cw_pipeline.core.runner import evaluate_search
from cw_pipeline.core.search_settings import SearchParams

ROOT = Path(__file__).resolve().parents[1]


def score(fs: FeatureSet, labels: np.ndarray, params: SearchParams) -> tuple[float, float]:
    method = Method.parse("ofa")
    out = []
    for half in pca_groups(len(fs), labels):
        db, train = fs.subset(half.rows), fs.subset(half.training)
        res = evaluate_search(method, db, None, fit_pca(method, train, params), params)
        s = score_rankings(res.indices, ukbench_groundtruth(db.ids), db.ids)
        out.append((s.ns_score, s.map))
    ns, mp = np.mean(out, axis=0)
    return float(ns), float(mp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ukbench_images())
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    paths = sorted(args.images.glob("*.jpg"))
    ids = [p.stem for p in paths]
    fe = FeatureExtractor(ExtractionConfig(resize="native"))
    t0 = time.perf_counter()
    recs = dict(fe.extract_files(zip(ids, paths, strict=True)))
    print(f"features: {len(ids)} images in {time.perf_counter() - t0:.1f} s")
    records = [recs[i] for i in ids]
    labels = ukbench_labels(ids)
    params = SearchParams(aggregated_classes=64, n_pca=8)
    exact = FeatureSet.from_records(ids, records)
    ns32, map32 = score(exact, labels, params)
    print()
    print("| class vectors | bytes/image (Parquet, zstd) | N-S | mAP | ΔmAP vs float32 |")
    print("|---|---|---|---|---|")
    print(f"| float32 (in memory) | – | {ns32:.3f} | {map32:.4f} | – |")
    with tempfile.TemporaryDirectory() as tmp:
        for storage in ("float16", "int8"):
            table = records_to_table(ids, [""] * len(ids), records, storage=storage)
            path = Path(tmp) / f"{storage}.parquet"
            pq.write_table(table, path, compression="zstd")
            per_image = path.stat().st_size / len(ids)
            fs = table_to_featureset(pq.read_table(path))
            ns, mp = score(fs, labels, params)
            print(
                f"| {storage} | {per_image / 1000:.1f} KB | {ns:.3f} | {mp:.4f} | "
                f"{mp - map32:+.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
