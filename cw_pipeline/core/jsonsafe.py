"""Strict JSON: every JSON file and line the project writes parses with strict readers.

Python's :func:`json.dumps` writes ``NaN``/``Infinity`` tokens by default, which are not JSON;
:func:`dumps` writes ``null`` for every non-finite float instead (and refuses, with
``allow_nan=False``, anything that slipped through).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["dumps", "finite"]


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (Python or numpy) replaced by None; numpy
    scalars become Python numbers, arrays lists. Containers are copied, nothing is mutated."""
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` of :func:`finite` ``(obj)`` with ``allow_nan=False``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
