"""Incremental indexing cost through the Dagster pipeline (in-process, ephemeral instance).

Usage: python benchmarks/incremental_cost.py [--images DIR]

UKBench-600 is indexed (3 shards of ~200), then 6 new images (flipped views of one object) are
added. Targets: exactly 6 forward passes; the features step's own time ≤ 5 % of its full-build
time; the fixed cost of one Dagster run for a one-shard update < 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg
from _machine import ukbench_images
from PIL import Image, ImageOps

from cw_pipeline.config import load_config
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.runtime.runs import index_dataset
from cw_pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
warehouse: {root}/warehouse
reports: {root}/reports
defaults:
  resize: native
datasets:
  ukb:
    layout: ukbench
    images: {root}/jpg
    pca_from: self-split
    shard_by: batch
    shard_size: 200
methods: [ofa]
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ukbench_images())
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jpg").mkdir()
        for p in sorted(args.images.glob("*.jpg")):
            shutil.copy(p, root / "jpg" / p.name)
        cfg = root / "datasets.yaml"
        cfg.write_text(CONFIG.format(root=root))
        config = load_config(cfg)
        defs = build_definitions(config)
        store = FeatureStore(config.warehouse)
        with dg.DagsterInstance.ephemeral() as instance:
            full = index_dataset(defs, instance, config, "ukb", store)
            print(
                f"full build: {full.images} images, {full.shards} shards, "
                f"{full.forward_passes} forward passes, features step {full.feature_seconds:.1f} s"
                f", wall {full.seconds:.1f} s"
            )
            for i in range(6):  # object 150: six flipped views of object 149's first image
                src = Image.open(args.images / f"ukbench{596 + i % 4:05d}.jpg")
                ImageOps.mirror(src).save(root / "jpg" / f"ukbench{600 + i:05d}.jpg", quality=90)
            t0 = time.perf_counter()
            inc = index_dataset(defs, instance, config, "ukb", store)
            wall = time.perf_counter() - t0
            runs = len(inc.indexed_shards)
            fixed = (wall - inc.feature_seconds) / max(runs, 1)
            ratio = inc.feature_seconds / full.feature_seconds
            print(
                f"update: {inc.forward_passes} forward passes, {inc.reused} reused, shards "
                f"{inc.indexed_shards}; features step {inc.feature_seconds:.2f} s "
                f"= {100 * ratio:.1f} % of the full build (target ≤ 5 %)"
            )
            print(
                f"Dagster run overhead: {fixed:.2f} s per one-shard run (target < 10 s); "
                f"update wall time {wall:.1f} s"
            )
            print(
                f"targets: exactly 6 forward passes: {inc.forward_passes == 6}; "
                f"≤ 5 %: {ratio <= 0.05}; < 10 s: {fixed < 10}"
            )
            again = index_dataset(defs, instance, config, "ukb", store)
            print(
                f"unchanged rescan: {again.forward_passes} forward passes, "
                f"{len(again.indexed_shards)} shards re-run, {again.seconds:.2f} s"
            )


if __name__ == "__main__":
    main()
