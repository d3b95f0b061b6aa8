"""Peak RSS of extracting one huge-but-legal image, before and after the memory bound.

Usage: python benchmarks/memory_bound.py [--cap-gib G] [--skip-before]

Each figure is a fresh child process: it loads efficientnet_lite0, extracts a 320x240 warm-up
image, then runs ``FeatureExtractor.extract_files`` on the input; the figure is its peak RSS
(``ru_maxrss``) above the peak after the warm-up. Inputs (written to a temp dir):

* a 4000x4000 JPEG (16 Mpx, smooth noise, quality 90);
* a 9400x9400 one-bit PNG (88 Mpx, stripes and discs, ~50 KB: under Pillow's bomb limit);
* 16 phone-sized 4000x3000 JPEGs (12 Mpx each), one ``extract_files`` call.

"before" is the old default: ``resize: native`` and batches by count only (``batch_pixels``
unlimited). "after" is the new default: ``max:1024`` and ``batch_pixels`` 8,388,608. Before-runs
get an address-space limit (``RLIMIT_AS``, ``--cap-gib`` above the warm process) so that one
that would need more fails fast instead of swapping the machine; it is reported as "over the
cap". ``native`` with the default budget is also shown: the image is refused from its header.

Target: every "after" figure within 400 bytes per pixel of ``batch_pixels`` (3.1 GiB by default)
above the warm baseline, whatever the input: a single huge image takes one forward pass of at most
1024x1024, a batch of large photos at most ``batch_pixels`` input pixels.

The "after" runs are made twice, with the allocator tuning (``cw_pipeline/core/allocator.py``,
freed memory kept) and with ``CW_PIPELINE_MALLOC=off`` (glibc's defaults). After the huge input
each of them goes on with 160 ordinary 640x480 JPEGs (10 batches of 16); the RSS that stays while
the last of them run (``VmRSS`` after each of the last 5 batches, the largest) is compared with
that of a process that extracted only the ordinary images: what the next batches need. Target:
with the tuning, RSS after the huge input stays within 1.25x of that. The RSS once the extraction
is over (freed memory handed back) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_PIXEL = 400
UNLIMITED = 10**12
STEADY_TARGET = 1.25
MODES = ("keep", "off")


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        return int(next(ln for ln in fh if ln.startswith("VmSize:")).split()[1]) * 1024


def _vm_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return int(next(ln for ln in fh if ln.startswith("VmRSS:")).split()[1])


def child(
    paths: list[str], resize: str, batch_pixels: int, cap: int, warmup: str, ordinary: list[str]
) -> None:
    """One measured extraction, then the ordinary images; prints a JSON line."""
    from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor

    fe = FeatureExtractor(ExtractionConfig(resize=resize), batch_pixels=batch_pixels)
    list(fe.extract_files([("warmup", warmup)]))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm_batches = fe.stats.batches
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + cap, resource.RLIM_INFINITY))
    t0 = time.perf_counter()
    out: dict = {"base_kib": base}
    try:
        res = list(fe.extract_files([(p, p) for p in paths], on_error="yield"))
        errors = [str(r) for _, r in res if isinstance(r, Exception)]
        out.update(
            images=len(res) - len(errors), errors=errors, batches=fe.stats.batches - warm_batches
        )
    except (MemoryError, RuntimeError) as exc:  # torch: "can't allocate memory"
        out["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    out["seconds"] = time.perf_counter() - t0
    out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if ordinary and "failed" not in out:
        rss = [_vm_rss_kib() for _ in fe.extract_batches([(p, p) for p in ordinary])]
        out["steady_kib"] = max(rss[-5:])  # while the last ordinary batches run
        from cw_pipeline.core import allocator

        allocator.release()  # as an indexing run does when its forward passes are over
        out["idle_kib"] = _vm_rss_kib()
    from cw_pipeline.core import allocator

    out["malloc"] = allocator.state().describe()
    out["final_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out), flush=True)


def make_inputs(tmp: Path) -> dict[str, list[Path]]:
    import numpy as np
    from PIL import Image, ImageDraw

    def noise(size: tuple[int, int], seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)

    big = tmp / "4000x4000.jpg"
    noise((4000, 4000), 0).save(big, quality=90)
    png = tmp / "9400x9400_1bit.png"
    img = Image.new("1", (9400, 9400), 0)
    draw = ImageDraw.Draw(img)
    for i in range(0, 9400, 400):
        draw.rectangle((i, i, i + 3000, i + 200), fill=1)
        draw.ellipse((i, 9400 - i - 600, i + 600, 9400 - i), fill=1)
    img.save(png, optimize=True)
    phones = []
    for i in range(16):
        p = tmp / f"phone{i:02d}.jpg"
        noise((4000, 3000), 10 + i).save(p, quality=90)
        phones.append(p)
    Image.new("RGB", (320, 240), (90, 140, 200)).save(tmp / "warmup.jpg")
    for i in range(160):
        noise((640, 480), 100 + i).save(tmp / f"ordinary{i:03d}.jpg", quality=90)
    return {"4000x4000 JPEG": [big], "9400x9400 1-bit PNG": [png], "16 x 12 Mpx JPEGs": phones}


def run(
    paths: list[Path],
    tmp: Path,
    resize: str,
    batch_pixels: int,
    cap: int,
    mode: str = "keep",
    ordinary: bool = False,
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps([str(p) for p in paths]),
        resize,
        str(batch_pixels),
        str(cap),
        str(tmp / "warmup.jpg"),
        json.dumps([str(p) for p in sorted(tmp.glob("ordinary*.jpg"))] if ordinary else []),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MALLOC_ARENA_MAX": "2",
        "CW_PIPELINE_MALLOC": mode,
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit code {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def resource_peak(res: dict) -> int:
    """Peak RSS of the whole child (KiB), ordinary images included."""
    return res.get("final_peak_kib", res["peak_kib"])


def describe(res: dict, cap_gib: float) -> str:
    if "failed" in res:
        return f"over the {cap_gib:g} GiB cap ({res['failed']})"
    above = (res["peak_kib"] - res["base_kib"]) / 1024
    text = f"{above:,.0f} MiB above the warm baseline ({res['base_kib'] / 1024:,.0f} MiB)"
    text += f", {res['images']} image(s) in {res['batches']} batch(es), {res['seconds']:.1f} s"
    if res["errors"]:
        text += f"; refused: {res['errors'][0]}"
    if "steady_kib" in res:
        text += (
            f"; then 160 ordinary images: RSS {res['steady_kib'] / 1024:,.0f} MiB while they "
            f"run, {res['idle_kib'] / 1024:,.0f} MiB after"
        )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap-gib", type=float, default=6.0)
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        paths, resize, bp, cap, warmup, ordinary = args.child
        child(json.loads(paths), resize, int(bp), int(cap), warmup, json.loads(ordinary))
        return
    from cw_pipeline.core.extract import DEFAULT_BATCH_PIXELS, DEFAULT_RESIZE

    target_mib = BYTES_PER_PIXEL * DEFAULT_BATCH_PIXELS / 2**20
    print(machine_info())
    cap = int(args.cap_gib * 2**30)
    tmp = Path(tempfile.mkdtemp(prefix="cw_memory_bound_"))
    worst = 0.0
    worst_steady = 0.0
    try:
        inputs = make_inputs(tmp)
        need = {}
        print("\nonly the 160 ordinary 640x480 JPEGs (what the next batches need):")
        for mode in MODES:
            res = run([], tmp, DEFAULT_RESIZE, DEFAULT_BATCH_PIXELS, 0, mode, ordinary=True)
            need[mode] = res["steady_kib"]
            print(
                f"  malloc {mode:>4}: RSS {res['steady_kib'] / 1024:,.0f} MiB while they run, "
                f"{res['idle_kib'] / 1024:,.0f} MiB after; peak "
                f"{resource_peak(res) / 1024:,.0f} MiB ({res['malloc']})"
            )
        for name, paths in inputs.items():
            print(f"\n{name}:")
            if not args.skip_before:
                res = run(paths, tmp, "native", UNLIMITED, cap)
                print(f"  before (native, batches by count):   {describe(res, args.cap_gib)}")
            for mode in MODES:
                res = run(paths, tmp, DEFAULT_RESIZE, DEFAULT_BATCH_PIXELS, 0, mode, True)
                print(
                    f"  after  ({DEFAULT_RESIZE}, {DEFAULT_BATCH_PIXELS} px), malloc {mode}: "
                    f"{describe(res, 0)}"
                )
                if "failed" not in res:
                    worst = max(worst, (res["peak_kib"] - res["base_kib"]) / 1024)
                    if mode == "keep":
                        worst_steady = max(worst_steady, res["steady_kib"] / need[mode])
            res = run(paths[:1], tmp, "native", DEFAULT_BATCH_PIXELS, 0)
            print(f"  native with the budget (1 image):    {describe(res, 0)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verdict = "MET" if worst <= target_mib else "MISSED"
    print(f"\nworst 'after' peak: {worst:,.0f} MiB above the baseline; ", end="")
    print(f"target <= {target_mib:,.0f}: {verdict}")
    verdict = "MET" if worst_steady <= STEADY_TARGET else "MISSED"
    print(
        f"worst RSS after the huge input and 160 ordinary images, malloc keep: {worst_steady:.2f}x "
        f"that of the ordinary images alone; target <= {STEADY_TARGET}: {verdict}"
    )


if __name__ == "__main__":
    main()
