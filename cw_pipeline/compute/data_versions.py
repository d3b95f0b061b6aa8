"""Content hashes of computed tables and arrays, used as the assets' Dagster data versions:
equal data gives an equal version, so downstream assets rerun only when a result changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def table_version(tables: dict[str, pa.Table]) -> str:
    """Content hash of named Arrow tables (Arrow IPC bytes: equal data, equal hash)."""
    h = hashlib.sha1()
    for name in sorted(tables):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, tables[name].schema.remove_metadata()) as writer:
            writer.write_table(tables[name].replace_schema_metadata(None))
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha1(sink.getvalue().to_pybytes()).digest())
    return h.hexdigest()[:16]


def array_version(arrays: dict[str, np.ndarray], ids: Sequence[str] = ()) -> str:
    """Content hash of named arrays (dtype, shape, bytes) and an id list."""
    h = hashlib.sha1()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    for i in ids:
        h.update(f"{i}\n".encode())
    return h.hexdigest()[:16]
