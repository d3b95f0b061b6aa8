"""Data versions: the content hashes that the assets report as their Dagster data versions
(``dagster/data_version``) and that their input versions combine. Equal data gives an equal
version, so downstream assets rerun only when a result changed.

Pure: hashlib, NumPy and Arrow only (the Dagster side — the tags that carry the versions,
the input versions read from the instance — is :mod:`cw_pipeline.defs.dependencies`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["array_version", "combine", "manifest_version", "table_version", "version_of"]


def combine(items: Iterable[tuple[str, str]]) -> str:
    """A short stable hash of (name, version) pairs, whatever their order."""
    h = hashlib.sha1()
    for name, version in sorted(items):
        h.update(f"{name}\0{version}\n".encode())
    return h.hexdigest()[:16]


def version_of(payload: bytes | str | Mapping | Iterable) -> str:
    """A data version: hash of bytes, text, or a mapping/iterable of (name, version) pairs."""
    if isinstance(payload, bytes):
        return hashlib.sha1(payload).hexdigest()[:16]
    if isinstance(payload, str):
        return hashlib.sha1(payload.encode()).hexdigest()[:16]
    items = payload.items() if isinstance(payload, Mapping) else payload
    return combine((str(k), str(v)) for k, v in items)


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


def manifest_version(manifest: pa.Table) -> str:
    """Data version of a manifest shard: hash of its (id, sha1) pairs."""
    h = hashlib.sha1()
    ids = manifest.column("image_id").to_pylist()
    shas = manifest.column("sha1").to_pylist()
    for i, s in sorted(zip(ids, shas, strict=True)):
        h.update(f"{i}\0{s}\n".encode())
    return h.hexdigest()[:16]
