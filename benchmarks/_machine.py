"""The machine line every benchmark prints first."""

from __future__ import annotations

import os
import platform
import sys


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
