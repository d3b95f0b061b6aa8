"""The machine line every benchmark prints first, and where the real UKBench images are."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> str:
    """CPU model, cores, load average, and torch's thread counts when torch is loaded."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    text = (
        f"machine: {model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"load average {load}"
    )
    torch = sys.modules.get("torch")
    if torch is not None:
        text += (
            f"; torch {torch.__version__}, {torch.get_num_threads()} intra-op / "
            f"{torch.get_num_interop_threads()} inter-op threads"
        )
    return text


def ukbench_images() -> Path:
    """The real UKBench images, found as the tests find them (``$CW_SHARED_DATA``,
    ``../shared/data``, ``data/test-data/`` from ``make test-data``); where none holds them,
    the ``../shared/data`` path, which the benchmark then names as missing."""
    sys.path.insert(0, str(ROOT))
    try:
        from cw_pipeline_tests.real_data import locate
    finally:
        sys.path.remove(str(ROOT))
    found = locate()
    if found.error:
        raise SystemExit(found.error)
    return (found.path or ROOT.parent / "shared" / "data") / "ukbench" / "jpg"
