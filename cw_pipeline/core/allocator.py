"""Keeping the forward pass's freed memory: glibc malloc tuned for CNN activations on the CPU.

glibc's malloc serves an allocation over ``M_MMAP_THRESHOLD`` (128 KiB, rising to at most 32 MiB)
with its own ``mmap`` and hands it back with ``munmap`` when it is freed, and returns the free
top of the heap to the kernel once it exceeds ``M_TRIM_THRESHOLD``. A forward pass allocates and
frees activation buffers of tens to hundreds of MiB at every layer, so every batch faulted in
and zeroed fresh pages again: on 2 cores the kernel's share of the forward pass was as large as
the network's (``benchmarks/indexing_throughput.py``: 75–80 ms of system CPU per UKBench image,
≈ 35,000 minor page faults).

:func:`keep_freed_memory` (called by every :class:`~cw_pipeline.core.extract.FeatureExtractor`,
so by every process of the project that runs the CNN) sets, with ``mallopt``:

* ``M_MMAP_THRESHOLD`` to twice the largest activation buffer a forward pass of the extractor's
  pixel budget holds (measured per backbone): those buffers come from the heap and are reused
  by the next layer and the next batch; anything larger is still mapped and unmapped directly;
* ``M_TRIM_THRESHOLD`` to "never": freed memory stays with the process.

Those two hold for the main heap, where the forward passes of the CLI, of run workers and of
Celery or Kubernetes step workers run (their main thread). A thread other than the main one gets
an arena of its own, whose heaps hold at most 64 MiB, so a larger buffer is mapped and unmapped
whatever the thresholds: a process that runs the CNN on other threads (``cw-pipeline serve``,
whose searches run on a thread pool) asks for ``one_arena``, which makes threads started
afterwards share the main heap (``M_ARENA_MAX`` 1).

The footprint stays bounded by what the batches need: :func:`after_forward` (called by
:meth:`Backbone.forward <cw_pipeline.core.backbones.Backbone.forward>`) hands the freed memory
back (``malloc_trim``) once the last :data:`RELEASE_WINDOW` forward passes all held at most
1/:data:`RELEASE_RATIO` of the input pixels of the largest one since the last release, so an
unusually large batch does not pin its memory for the rest of the process; an indexing run
(a features shard, ``cw-pipeline evaluate``) and the search page's database reload call
:func:`release` when they are done with it. The search page keeps its buffers between queries.

``CW_PIPELINE_MALLOC=off`` in the environment keeps glibc's defaults (nothing is set); a user's
own ``GLIBC_TUNABLES`` malloc thresholds or ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
are left in force as well. Elsewhere than on glibc (macOS, musl) this module does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Environment variable switching the tuning off (``off``) or on (``keep``, the default).
ENV_VAR = "CW_PIPELINE_MALLOC"
#: ``mallopt`` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: The lowest mmap threshold set (glibc's own dynamic threshold tops out at 32 MiB).
MIN_MMAP_THRESHOLD = 64 * 2**20
#: ``mallopt`` takes an int; the largest threshold it can be given short of "never".
_INT_MAX = 2**31 - 1
#: Forward passes looked back on before freed memory is handed back.
RELEASE_WINDOW = 8
#: Freed memory is handed back when recent passes needed at most 1/RELEASE_RATIO of the largest.
RELEASE_RATIO = 1.5
#: User settings that take precedence over ours.
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@dataclass
class AllocatorState:
    """What this process's malloc was told (see :func:`state`).

    ``mode`` is ``keep`` (tuned here), ``off`` (``CW_PIPELINE_MALLOC=off``), ``user`` (the user's
    own glibc settings), ``unsupported`` (not glibc) or ``untouched`` (no extractor built yet).
    Thresholds are in bytes; ``None`` means glibc's default, ``-1`` "never".
    """

    mode: str = "untouched"
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    arena_max: int | None = None
    releases: int = 0
    window: deque = field(default_factory=lambda: deque(maxlen=RELEASE_WINDOW))
    held_pixels: int = 0

    def describe(self) -> str:
        """One line for logs and asset metadata."""
        if self.mode != "keep":
            return {
                "off": f"glibc defaults ({ENV_VAR}=off)",
                "user": "the user's own glibc malloc settings",
                "unsupported": "allocator defaults (not glibc)",
            }.get(self.mode, "untouched")
        mmap = "never" if self.mmap_threshold == -1 else f"{self.mmap_threshold / 2**20:.0f} MiB"
        arenas = "; threads share the main heap" if self.arena_max == 1 else ""
        return (
            f"keep freed memory (mmap threshold {mmap}, trim never{arenas}; "
            f"{self.releases} release(s))"
        )

    def as_metadata(self) -> dict:
        """JSON-safe fields for asset metadata and tests."""
        return {
            "mode": self.mode,
            "mmap_threshold": self.mmap_threshold,
            "trim_threshold": self.trim_threshold,
            "arena_max": self.arena_max,
            "releases": self.releases,
        }


_lock = threading.Lock()
_state = AllocatorState()


def _requested_mode() -> str:
    value = os.environ.get(ENV_VAR, "keep").strip().lower()
    if value in ("off", "0", "false", "no", "default"):
        return "off"
    if value not in ("keep", "on", "1", "true", "yes", ""):
        raise ValueError(f"{ENV_VAR}={value!r} is not a setting; use 'keep' (default) or 'off'")
    if any(os.environ.get(v) for v in _USER_ENV) or any(
        t in os.environ.get("GLIBC_TUNABLES", "") for t in _USER_TUNABLES
    ):
        return "user"
    return "keep"


def _set(libc: ctypes.CDLL, param: int, value: int) -> bool:
    return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))


def keep_freed_memory(largest_buffer: int = 0, *, one_arena: bool = False) -> AllocatorState:
    """Tune this process's malloc so that buffers up to ``2 * largest_buffer`` bytes are kept
    and reused instead of being mapped and unmapped at every layer (see the module docstring);
    with ``one_arena``, threads started afterwards allocate from the main heap too.

    Idempotent; a later call with a larger ``largest_buffer`` raises the mmap threshold, a
    smaller one leaves it. Returns the state in force.
    """
    with _lock:
        mode = _requested_mode()
        libc = _glibc()
        if libc is None:
            mode = "unsupported"
        if mode != "keep":
            if _state.mode == "untouched":
                _state.mode = mode
                logger.info("malloc: %s", _state.describe())
            return _state
        if one_arena and _state.arena_max != 1 and _set(libc, M_ARENA_MAX, 1):
            _state.arena_max = 1
        wanted = max(MIN_MMAP_THRESHOLD, 2 * int(largest_buffer))
        if _state.mode == "keep" and (
            _state.mmap_threshold == -1 or (_state.mmap_threshold or 0) >= wanted
        ):
            return _state
        mmap = wanted if wanted <= _INT_MAX else -1
        if not _set(libc, M_MMAP_THRESHOLD, mmap):
            # Older glibc refuses thresholds over HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
            mmap = 32 * 2**20
            _set(libc, M_MMAP_THRESHOLD, mmap)
        if _state.mode != "keep":
            _set(libc, M_TRIM_THRESHOLD, -1)
            _state.trim_threshold = -1
        _state.mode = "keep"
        _state.mmap_threshold = mmap
        logger.info("malloc: %s", _state.describe())
        return _state


def after_forward(pixels: int) -> bool:
    """Record a forward pass of ``pixels`` input pixels; hand freed memory back to the kernel
    (``malloc_trim``) when the recent passes need much less than what the heap grew for.
    Returns whether memory was handed back. Does nothing unless the tuning is in force."""
    if _state.mode != "keep":
        return False
    with _lock:
        _state.window.append(int(pixels))
        _state.held_pixels = max(_state.held_pixels, int(pixels))
        if len(_state.window) < RELEASE_WINDOW:
            return False
        recent = max(_state.window)
        if recent * RELEASE_RATIO > _state.held_pixels:
            return False
        _trim()
        _state.held_pixels = recent
        return True


def release() -> None:
    """Hand every whole free page of every malloc arena back to the kernel (``malloc_trim``),
    e.g. after dropping a large index. Does nothing unless the tuning is in force."""
    with _lock:
        _trim()


def _trim() -> None:
    libc = _glibc()
    if libc is None or _state.mode != "keep":
        return
    libc.malloc_trim(ctypes.c_size_t(0))
    _state.releases += 1


def state() -> AllocatorState:
    """This process's allocator state (what :func:`keep_freed_memory` set, releases so far)."""
    return _state
