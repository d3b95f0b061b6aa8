"""GPU throughput at the paper's resolution (shorter side 720) and the CAM overhead there.

Usage: python benchmarks/gpu_throughput.py [--seconds 20]

Optional: needs a CUDA device (prints a line and exits 0 without one). For efficientnet_lite0
(packaged weights) and vgg16_cam (random weights: speed does not depend on the values), times
the forward pass and the encoding step (top-64 CAMs + CroW + class vectors + sum-pooling +
boxes) on synthetic 720×960 batches, with CUDA events.
"""

from __future__ import annotations

import argparse
import time

import torch

from cw_pipeline.core.backbones import load_backbone
from cw_pipeline.core.cams import class_activation_maps, top_classes
from cw_pipeline.core.encoding import class_vectors, crow_channel_weights, sum_pool


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True
    for name, weights in (("efficientnet_lite0", None), ("vgg16_cam", "random")):
        bench(name, weights, args.batch, args.repeats)
        torch.cuda.empty_cache()


def bench(name: str, weights: str | None, batch: int, repeats: int) -> None:
    bb = load_backbone(name, weights=weights, device="cuda")
    x = torch.randn(batch, 3, 720, 960, device="cuda")
    with torch.inference_mode():
        for _ in range(3):  # warm-up (cudnn autotuning)
            out = bb.forward(x)
        torch.cuda.synchronize()

        def forward() -> None:
            bb.forward(x)

        def encode() -> None:
            ids, _ = top_classes(out.probs, 64)
            cams = class_activation_maps(
                out.cam_maps, bb.classifier_weight, ids, size=tuple(out.features.shape[-2:])
            )
            class_vectors(out.features, cams, crow_channel_weights(out.features))
            sum_pool(out.features)
            cams[:, :2].mean(1).cpu()  # heatmaps for the boxes go to the CPU

        t0 = time.perf_counter()
        f_ms = timed(forward, repeats)
        e_ms = timed(encode, repeats)
    grid = tuple(out.features.shape[-2:])
    print(
        f"{name:<20} batch {batch} at 720x960 (grid {grid[0]}x{grid[1]}): "
        f"forward {f_ms / batch:.2f} ms/img = {1000 * batch / f_ms:.0f} img/s; "
        f"CAMs+CroW+pooling {e_ms / batch:.3f} ms/img = {100 * e_ms / f_ms:.1f} % "
        f"of the forward pass ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
