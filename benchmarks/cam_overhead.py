"""Cost of CAMs + weighting + pooling + CroW relative to the forward pass.

Usage: python benchmarks/cam_overhead.py [--images DIR] [--repeats N] [--threads T]

Target: encoding the stored top-N_C classes (CAMs of N_C classes, CroW channel weights, class
vectors, sum-pooling, heatmap boxes; N_C = 64, also 1, 8 and 1000) costs <= 3 % of the forward
pass. Default backbone (efficientnet_lite0), UKBench images at their native 320x240, batch 16;
then the paper's resolution (1024x768, a batch of 4 UKBench images upscaled).

``backbone.forward`` and the encoding part of ``FeatureExtractor.encode_batch`` (mirrored here
step by step, checked against ``encode_batch`` itself) run alternately on the same batch; the
figures are medians over the repeats, so load from other jobs hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _machine import machine_info, ukbench_images
from PIL import Image

from cw_pipeline.core import images as imgs
from cw_pipeline.core.backbones import ForwardOutput
from cw_pipeline.core.cams import boxes_to_pixels, class_activation_maps, heatmap_boxes
from cw_pipeline.core.encoding import sum_pool
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, encode_maps

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.03
N_CLASSES = (64, 1, 8, 1000)


def encode_part(
    fe: FeatureExtractor, out: ForwardOutput, original_sizes: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``encode_batch`` does after ``backbone.forward`` (without keep_maps)."""
    bb, cfg = fe.backbone, fe.config
    x = out.features
    a = fe._maps_on_grid(x, out.cam_maps)
    with torch.inference_mode():
        ids, probs, cv = encode_maps(
            x, a, bb.classifier_weight, bb.classifier_bias, n_classes=cfg.stored_classes
        )
        sp = sum_pool(x)
        heat = class_activation_maps(
            a, bb.classifier_weight, ids[:, : cfg.box_classes], size=x.shape[-2:]
        ).mean(dim=1)
    grid = (int(x.shape[-2]), int(x.shape[-1]))
    ids_np, probs_np = ids.cpu().numpy(), probs.cpu().numpy()
    cv_np, sp_np, heat_np = cv.cpu().numpy(), sp.cpu().numpy(), heat.cpu().numpy()
    boxes = []
    for i, orig in enumerate(original_sizes):
        boxes.append(boxes_to_pixels(heatmap_boxes(heat_np[i], cfg.thresholds), grid, orig))
        ids_np[i].astype(np.int16)
        probs_np[i].astype(np.float32)
        cv_np[i].astype(np.float32)
        sp_np[i].astype(np.float32)
    return ids_np, cv_np, np.stack(boxes)


def breakdown(fe: FeatureExtractor, out: ForwardOutput, repeats: int) -> dict[str, float]:
    """Median seconds of each encoding step (N_C of ``fe.config``)."""
    bb, cfg = fe.backbone, fe.config
    x, a = out.features, out.cam_maps
    w, b = bb.classifier_weight, bb.classifier_bias
    state: dict = {}

    def probs() -> None:
        from cw_pipeline.core.cams import top_classes

        p = torch.softmax(a.mean(dim=(2, 3)) @ w.T + b, dim=1)
        state["ids"] = top_classes(p, cfg.stored_classes)[0]

    def cams() -> None:
        state["cams"] = class_activation_maps(a, w, state["ids"], size=tuple(x.shape[-2:]))

    def crow() -> None:
        from cw_pipeline.core.encoding import crow_channel_weights

        state["cw"] = crow_channel_weights(x)

    def vectors() -> None:
        from cw_pipeline.core.encoding import class_vectors

        class_vectors(x, state["cams"], state["cw"]).numpy()

    def pool() -> None:
        sum_pool(x).numpy()

    def heat() -> None:
        ids = state["ids"][:, : cfg.box_classes]
        state["heat"] = class_activation_maps(a, w, ids, size=x.shape[-2:]).mean(1).numpy()

    def boxes() -> None:
        for hm in state["heat"]:
            heatmap_boxes(hm, cfg.thresholds)

    steps: list[tuple[str, Callable[[], None]]] = [
        ("logits+softmax+top_classes", probs),
        ("class_activation_maps", cams),
        ("crow_channel_weights", crow),
        ("class_vectors", vectors),
        ("sum_pool", pool),
        ("heatmap CAMs (box classes)", heat),
        ("heatmap_boxes (scipy label)", boxes),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in steps:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(
    fe: FeatureExtractor,
    images: list[Image.Image],
    sizes: list[tuple[int, int]],
    n_classes: tuple[int, ...],
    repeats: int,
    label: str,
    check: bool = False,
) -> dict[int, float]:
    base = fe.config
    configs = {
        n: base.replace(stored_classes=n, box_classes=min(base.box_classes, n)) for n in n_classes
    }
    batch = imgs.to_tensor(images, fe.backbone.mean, fe.backbone.std)
    n_img = len(images)
    # Warm-up (allocator, oneDNN primitive cache).
    out = fe.backbone.forward(batch)
    for cfg in configs.values():
        fe.config = cfg
        encode_part(fe, out, sizes)
    if check:  # the mirror must compute what encode_batch computes (one extra forward pass)
        fe.config = base
        ids, cv, boxes = encode_part(fe, out, sizes)
        ref = fe.encode_batch(images, sizes)
        same = (
            np.array_equal(ids, np.stack([r.class_ids for r in ref]))
            and np.allclose(cv, np.stack([r.class_vectors for r in ref]), rtol=1e-4, atol=1e-3)
            and np.array_equal(boxes, np.stack([r.boxes for r in ref]), equal_nan=True)
        )
        print(f"  mirrored encoding == encode_batch (N_C={base.stored_classes}): {same}")
    fwd: list[float] = []
    fwd_cpu: list[float] = []
    enc_cpu: dict[int, list[float]] = {n: [] for n in n_classes}
    enc: dict[int, list[float]] = {n: [] for n in n_classes}
    tens: list[float] = []
    enc_1t: list[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        imgs.to_tensor(images, fe.backbone.mean, fe.backbone.std)
        tens.append(time.perf_counter() - t)
        c, t = time.process_time(), time.perf_counter()
        out = fe.backbone.forward(batch)
        fwd.append(time.perf_counter() - t)
        fwd_cpu.append(time.process_time() - c)
        for n, cfg in configs.items():
            fe.config = cfg
            c, t = time.process_time(), time.perf_counter()
            encode_part(fe, out, sizes)
            enc[n].append(time.perf_counter() - t)
            enc_cpu[n].append(time.process_time() - c)
        # The same encoding (N_C of the base config) with one torch thread.
        fe.config = base
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t = time.perf_counter()
        encode_part(fe, out, sizes)
        enc_1t.append(time.perf_counter() - t)
        torch.set_num_threads(threads)
    fe.config = base
    f_med = statistics.median(fwd)
    h, w = out.features.shape[-2:]
    print(
        f"\n[{label}] batch {n_img} of {images[0].size[0]}x{images[0].size[1]}, grid {h}x{w}, "
        f"K={out.features.shape[1]}, {repeats} alternating repeats"
    )
    print(
        f"  forward      : {1000 * f_med / n_img:8.2f} ms/image  (median {f_med:.3f} s/batch, "
        f"min {min(fwd):.3f}, max {max(fwd):.3f}; CPU {statistics.median(fwd_cpu):.3f} s)"
    )
    print(
        f"  to_tensor    : {1000 * statistics.median(tens) / n_img:8.2f} ms/image  (input "
        "preparation in encode_batch, not part of the target)"
    )
    ratios = {}
    for n in n_classes:
        e_med = statistics.median(enc[n])
        ratio = e_med / f_med
        # Ratio per repeat (same forward, encoding right after it) as a spread indicator.
        per = sorted(e / f for e, f in zip(enc[n], fwd, strict=True))
        ok = ratio <= TARGET
        ratios[n] = ratio
        # Less sensitive to other jobs: process CPU time, and best case (min over min).
        cpu_ratio = statistics.median(enc_cpu[n]) / statistics.median(fwd_cpu)
        min_ratio = min(enc[n]) / min(fwd)
        print(
            f"  encode N_C={n:<4}: {1000 * e_med / n_img:8.2f} ms/image  "
            f"ratio {100 * ratio:6.2f} % "
            f"(per-repeat {100 * per[0]:.2f}-{100 * per[-1]:.2f} %, CPU-time "
            f"{100 * cpu_ratio:.2f} %, min/min {100 * min_ratio:.2f} %)  target <= 3 %: "
            f"{'MET' if ok else 'MISSED'}"
        )
    e1 = statistics.median(enc_1t)
    print(
        f"  encode N_C={base.stored_classes:<4} with 1 torch thread (forward keeps "
        f"{torch.get_num_threads()}): {1000 * e1 / n_img:.2f} ms/image, ratio "
        f"{100 * e1 / f_med:.2f} %"
    )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ukbench_images())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    t_start = time.perf_counter()
    fe = FeatureExtractor(ExtractionConfig(resize="native"), num_threads=args.threads)
    print(machine_info())
    print(f"backbone {fe.backbone.describe()}, resize {fe.config.resize}")
    paths = sorted(args.images.glob("*.jpg"))[:16]
    loaded = [fe.load(p) for p in paths]
    native = [im for im, _ in loaded]
    sizes = [orig for _, orig in loaded]
    native_ratios = measure(
        fe, native, sizes, N_CLASSES, args.repeats, "native 320x240", check=True
    )

    # One torch thread: on a shared machine a 2-thread parallel region of a tiny op can wait a
    # scheduler slice (~8 ms) for the second core, which swamps the op's own cost.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("\n  step breakdown, 1 torch thread (median ms per batch of 16):")
    out = fe.backbone.forward(imgs.to_tensor(native, fe.backbone.mean, fe.backbone.std))
    base = fe.config
    for n in (64, 1000):
        fe.config = base.replace(stored_classes=n)
        parts = breakdown(fe, out, args.repeats)
        print(f"   N_C={n}: " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in parts.items()))
    fe.config = base
    torch.set_num_threads(threads)

    big = [im.resize((1024, 768), Image.Resampling.BICUBIC) for im in native[:4]]
    paper_ratios = measure(
        fe, big, [(1024, 768)] * 4, N_CLASSES, args.repeats, "paper resolution 1024x768"
    )
    print("\nsummary (encoding / forward, target <= 3 %):")
    for label, ratios in (("native 320x240", native_ratios), ("1024x768", paper_ratios)):
        print(
            f"  {label:>14}: "
            + ", ".join(
                f"N_C={n} {100 * r:.2f} % {'MET' if r <= TARGET else 'MISSED'}"
                for n, r in ratios.items()
            )
        )
    print(f"  total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
