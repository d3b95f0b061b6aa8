"""End-to-end extraction throughput vs forward-only throughput on pre-decoded tensors.

Usage: python benchmarks/indexing_throughput.py [--images DIR] [--count N] [--rounds R]
           [--workers W] [--threads T]

Target: end-to-end extraction of UKBench images (read, decode, resize, forward, CAMs, records,
``records_to_table`` + ``pyarrow.parquet.write_table`` into a temp dir) reaches >= 80 % of the
forward-only throughput (``backbone.forward`` over the same images, decoded and stacked into
batch tensors beforehand), batch 16.

The two are run alternately (forward-only, end-to-end, forward-only, ...) and compared by their
medians, so load from other jobs hits both alike. File sha1s are computed before timing (that is
the manifest step's work); the image files are read in place and are likely in the page cache
after the first round (as they are after the manifest step hashed them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from _machine import machine_info

from cw_pipeline.compute.features import records_to_table
from cw_pipeline.core import images as imgs
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.80


def cpu_times() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/ukbench/jpg")
    ap.add_argument("--count", type=int, default=64, help="images per round (multiple of 16)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each mode")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="extract_files decode threads")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    t_start = time.perf_counter()
    fe = FeatureExtractor(
        ExtractionConfig(resize="native"), batch_size=args.batch, num_threads=args.threads
    )
    print(machine_info())
    print(
        f"backbone {fe.backbone.describe()}, resize {fe.config.resize}, N_C "
        f"{fe.config.stored_classes}, batch {args.batch}, decode workers {args.workers}, "
        f"{args.count} images per round, {args.rounds} alternating rounds"
    )
    paths = sorted(args.images.glob("*.jpg"))[: args.count]
    ids = [p.stem for p in paths]
    sha1s = {p.stem: hashlib.sha1(p.read_bytes()).hexdigest() for p in paths}

    t = time.perf_counter()
    loaded = [fe.load(p) for p in paths]
    decode_s = time.perf_counter() - t
    bb = fe.backbone
    batches = [
        imgs.to_tensor([im for im, _ in loaded[i : i + args.batch]], bb.mean, bb.std)
        for i in range(0, len(loaded), args.batch)
    ]
    print(
        f"decode+resize alone (1 thread, no forward running): {1000 * decode_s / len(paths):.2f} "
        "ms/image"
    )
    bb.forward(batches[0])  # warm-up

    fwd_rate: list[float] = []
    e2e_rate: list[float] = []
    e2e_inside: list[float] = []
    cpu: dict[str, list[tuple[float, float, float]]] = {"forward": [], "e2e": []}
    with tempfile.TemporaryDirectory(prefix="cw_bench_") as tmp:
        for r in range(args.rounds):
            u0, s0, f0 = cpu_times()
            t = time.perf_counter()
            for b in batches:
                bb.forward(b)
            dt = time.perf_counter() - t
            u1, s1, f1 = cpu_times()
            n = len(paths)
            fwd_rate.append(n / dt)
            cpu["forward"].append(((u1 - u0) / n, (s1 - s0) / n, (f1 - f0) / n))

            fe.stats.forward_seconds = 0.0
            t = time.perf_counter()
            recs = dict(fe.extract_files(zip(ids, paths, strict=True), workers=args.workers))
            keys = sorted(recs)
            table = records_to_table(keys, [sha1s[k] for k in keys], [recs[k] for k in keys])
            pq.write_table(table, os.path.join(tmp, f"round{r}.parquet"))
            dt = time.perf_counter() - t
            u2, s2, f2 = cpu_times()
            e2e_rate.append(n / dt)
            e2e_inside.append(fe.stats.forward_seconds / dt)
            cpu["e2e"].append(((u2 - u1) / n, (s2 - s1) / n, (f2 - f1) / n))
            print(
                f"  round {r}: forward-only {fwd_rate[-1]:6.2f} img/s | end-to-end "
                f"{e2e_rate[-1]:6.2f} img/s ({100 * e2e_inside[-1]:.0f} % of it inside "
                f"forward+encode)",
                flush=True,
            )
        size = os.path.getsize(os.path.join(tmp, "round0.parquet"))
    f_med, e_med = statistics.median(fwd_rate), statistics.median(e2e_rate)
    ratio = e_med / f_med
    # Per-round ratio (each end-to-end round against the forward-only round just before it).
    per = sorted(e / f for e, f in zip(e2e_rate, fwd_rate, strict=True))
    print(f"\nparquet shard: {len(paths)} rows, {size / 1e6:.1f} MB")
    for mode in ("forward", "e2e"):
        u = statistics.median(c[0] for c in cpu[mode])
        s = statistics.median(c[1] for c in cpu[mode])
        f = statistics.median(c[2] for c in cpu[mode])
        print(
            f"per image, {mode:>7}: CPU user {1000 * u:.0f} ms, sys {1000 * s:.0f} ms, "
            f"{f:.0f} minor page faults"
        )
    print(f"forward-only (pre-decoded tensors): {f_med:.2f} images/s (median)")
    print(f"end-to-end (files -> parquet)     : {e_med:.2f} images/s (median)")
    print(
        f"ratio end-to-end / forward-only: {100 * ratio:.1f} % (per-round "
        f"{100 * per[0]:.0f}-{100 * per[-1]:.0f} %)  target >= 80 %: "
        f"{'MET' if ratio >= TARGET else 'MISSED'}"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
