"""Peak RSS of indexing for 600 vs 3,000 images: it should not grow with the number of images.

Usage: python benchmarks/memory_scaling.py [--images DIR] [--small N] [--large N]
           [--shard-size S] [--resize POLICY]

Target: peak RSS (``ru_maxrss``) of a fresh process that extracts features of ``--large``
images is <= 1.2x that of one that extracts ``--small`` images. Each process runs
``FeatureExtractor.extract_files`` shard by shard (``--shard-size`` images per shard), turns each
shard's records into a table with ``records_to_table``, writes it with
``pyarrow.parquet.write_table`` to a temp dir and drops it, like the ``cam_features`` asset.

The 3,000 images are the 600 UKBench images (read in place) plus 4 variants of each written to a
temp dir before the measured processes start (horizontal flip at JPEG quality 95, re-encoded at
quality 80, flip at 70, re-encoded at 60). The small run uses the first ``--small`` of the same
list, so both runs see the same kind of images and the same shard size.

Both runs are made twice: with the allocator tuning (``cw_pipeline/core/allocator.py``, freed
memory kept; the target applies to it) and with ``CW_PIPELINE_MALLOC=off`` (glibc's defaults),
so the peak and the RSS after each shard can be compared.

Run time is dominated by the forward passes (``--small`` + ``--large`` of them): on 2 cores at
the default native 320x240 this takes several minutes; ``--small 120 --large 600 --shard-size
60`` (the same 5x ratio) is a quick check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_info, ukbench_images

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.2
VARIANTS = (("flip_q95", True, 95), ("q80", False, 80), ("flip_q70", True, 70), ("q60", False, 60))


def vm_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for ln in fh:
                if ln.startswith(("VmRSS:", "VmHWM:")):
                    out[ln.split(":")[0]] = int(ln.split()[1])
    except OSError:
        pass
    return out


def child(list_file: Path, out_dir: Path, shard_size: int, resize: str) -> None:
    """One measured indexing run; prints a JSON line with its figures."""
    import pyarrow.parquet as pq

    from cw_pipeline.compute.features import records_to_table
    from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor

    paths = [Path(p) for p in list_file.read_text().splitlines() if p]
    t0 = time.perf_counter()
    fe = FeatureExtractor(ExtractionConfig(resize=resize))
    after_model = vm_status()
    hwm_per_shard = []
    rss_per_shard = []
    n = 0
    for s, start in enumerate(range(0, len(paths), shard_size)):
        chunk = paths[start : start + shard_size]
        ids = [f"{p.parent.name}/{p.stem}" for p in chunk]
        recs = dict(fe.extract_files(zip(ids, chunk, strict=True), on_error="raise"))
        keys = sorted(recs)
        sha = [hashlib.sha1(k.encode()).hexdigest() for k in keys]  # placeholder sha1s
        table = records_to_table(keys, sha, [recs[k] for k in keys])
        pq.write_table(table, out_dir / f"shard{s:03d}.parquet")
        n += table.num_rows
        del recs, table, keys, sha
        st = vm_status()
        hwm_per_shard.append(st.get("VmHWM", 0))
        rss_per_shard.append(st.get("VmRSS", 0))
    print(
        json.dumps(
            {
                "images": n,
                "shards": len(hwm_per_shard),
                "seconds": time.perf_counter() - t0,
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_after_model_kib": after_model.get("VmRSS", 0),
                "hwm_per_shard_kib": hwm_per_shard,
                "rss_per_shard_kib": rss_per_shard,
            }
        ),
        flush=True,
    )


def make_variants(paths: list[Path], dest: Path) -> list[Path]:
    from PIL import Image, ImageOps

    out = []
    for name, flip, quality in VARIANTS:
        folder = dest / name
        folder.mkdir(parents=True)
        for p in paths:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if flip:
                    im = ImageOps.mirror(im)
                target = folder / p.name
                im.save(target, format="JPEG", quality=quality)
                out.append(target)
    return out


def run_child(
    paths: list[Path], tmp: Path, tag: str, args: argparse.Namespace, mode: str = "keep"
) -> dict:
    list_file = tmp / f"{tag}.txt"
    list_file.write_text("\n".join(str(p) for p in paths))
    out_dir = tmp / f"out_{tag}"
    out_dir.mkdir()
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(list_file),
        "--out",
        str(out_dir),
        "--shard-size",
        str(args.shard_size),
        "--resize",
        args.resize,
    ]
    env = {**os.environ, "CW_PIPELINE_MALLOC": mode}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child run {tag} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["parquet_mib"] = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    shutil.rmtree(out_dir)
    return res


def report(tag: str, res: dict) -> None:
    mib = 1 / 1024
    hwm = " ".join(f"{v * mib:.0f}" for v in res["hwm_per_shard_kib"])
    rss = " ".join(f"{v * mib:.0f}" for v in res["rss_per_shard_kib"])
    print(
        f"  {tag:>5}: {res['images']:5d} images in {res['shards']} shards, "
        f"{res['seconds']:.0f} s ({res['images'] / res['seconds']:.1f} img/s), "
        f"parquet {res['parquet_mib']:.0f} MiB; peak RSS {res['maxrss_kib'] * mib:.0f} MiB "
        f"(RSS after model load {res['rss_after_model_kib'] * mib:.0f} MiB)"
    )
    print(f"         VmHWM after each shard (MiB): {hwm}")
    print(f"         VmRSS after each shard (MiB): {rss}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ukbench_images())
    ap.add_argument("--small", type=int, default=600)
    ap.add_argument("--large", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=300)
    ap.add_argument("--resize", default="native")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.out, args.shard_size, args.resize)
        return
    t_start = time.perf_counter()
    print(machine_info())
    originals = sorted(args.images.glob("*.jpg"))
    per_round = len(originals)
    needed_rounds = -(-args.large // per_round)
    if needed_rounds > 1 + len(VARIANTS):
        raise SystemExit(f"--large {args.large} needs more than {1 + len(VARIANTS)} variants")
    tmp = Path(tempfile.mkdtemp(prefix="cw_memory_bench_"))
    try:
        t = time.perf_counter()
        variants = make_variants(originals, tmp / "variants") if needed_rounds > 1 else []
        everything = (originals + variants)[: args.large]
        print(
            f"{len(originals)} UKBench images (in place), {len(variants)} variants written to "
            f"{tmp} in {time.perf_counter() - t:.0f} s; shard size {args.shard_size}, resize "
            f"{args.resize}"
        )
        results = {}
        for mode in ("keep", "off"):
            print(f"malloc {mode}:")
            for tag, n in (("small", args.small), ("large", args.large)):
                res = run_child(everything[:n], tmp, f"{tag}_{mode}", args, mode)
                report(tag, res)
                if mode == "keep":
                    results[tag] = res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = results["large"]["maxrss_kib"] / results["small"]["maxrss_kib"]
    print(
        f"\npeak RSS {args.large} images / {args.small} images: "
        f"{results['large']['maxrss_kib'] / 1024:.0f} / "
        f"{results['small']['maxrss_kib'] / 1024:.0f} MiB = {ratio:.2f}  target <= 1.2: "
        f"{'MET' if ratio <= TARGET else 'MISSED'}"
    )
    print(f"temp files removed: {not tmp.exists()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
