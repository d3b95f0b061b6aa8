"""Which files a dataset has and how they fall into shards, by ``stat`` only (no hashing).

* ``scan_dataset`` / ``shard_files``: the files of a dataset grouped into shards (a shard key
  per folder, or a stored batch plan), with a stat fingerprint per shard;
* ``plan_shards``: the shards that are new, changed (fingerprint or extraction code version
  differs from what the store holds) or removed — the one answer every caller (sensor,
  schedule, CLI) uses to decide what to index.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.datasets import (
    SkippedFile,
    scan_folder,
)
from cw_pipeline.core.datasets.layouts import FLAT_ID_LAYOUTS
from cw_pipeline.store import (
    FeatureStore,
    encode_component,
    features_path,
    manifest_path,
    plan_path,
)

ROOT_SHARD = "_root"


@dataclass(frozen=True)
class FileStat:
    """A file of a dataset as seen by ``stat``.

    ``relpath`` and ``image_id`` are names as Python decodes them (bytes that are not UTF-8 as
    surrogate escapes); ``error`` says why the file cannot be indexed (it is never opened and
    becomes a rejected row): not a regular file, vanished, a name no image id can hold.
    """

    image_id: str
    relpath: str
    size: int
    mtime_ns: int
    error: str | None = None


@dataclass
class DatasetScan:
    """The files of a dataset (image candidates) and the entries skipped, with reasons."""

    files: list[FileStat]
    skipped: list[SkippedFile]


def scan(ds: DatasetConfig) -> DatasetScan:
    """All image candidates of a dataset with size and mtime (sorted by relative path), and
    what was skipped (see :func:`cw_pipeline.core.datasets.scan_folder`); ``stat`` only."""
    found = scan_folder(ds.images, flat=ds.layout in FLAT_ID_LAYOUTS)
    files = [FileStat(f.image_id, f.relpath, f.size, f.mtime_ns, f.error) for f in found.files]
    return DatasetScan(files, found.skipped)


def scan_files(ds: DatasetConfig) -> list[FileStat]:
    """All image candidates of a dataset with size and mtime (sorted by relative path)."""
    return scan(ds).files


def _raw(name: str) -> bytes:
    """The bytes of a name as Python decodes it (surrogate escapes back to their bytes)."""
    return name.encode("utf-8", "surrogateescape")


def _bucket(relpath: str, n_buckets: int) -> int:
    return zlib.crc32(_raw(relpath)) % n_buckets


#: Shard keys longer than this once percent-encoded for the store get the hashed form (the
#: longest whose store files fit in 255 bytes, see ``FeatureStore.MAX_SHARD_COMPONENT``).
MAX_SHARD_KEY = FeatureStore.MAX_SHARD_COMPONENT


_PREFIX_CHARS = 48  #: encoded length of the readable prefix of a hashed shard key


_HASHED_KEY_RE = re.compile(r".*~[0-9a-f]{16}")


#: Substrings Dagster refuses in partition keys ("..." marks key ranges).
_INVALID_KEY_PARTS = ("...",)


def _printable(ch: str) -> bool:
    code = ord(ch)
    return code >= 32 and code != 127 and not 0xD800 <= code <= 0xDFFF


def _key_ok(name: str) -> bool:
    if not all(_printable(ch) for ch in name):
        return False  # not UTF-8 (surrogate escapes), or a control character (Dagster)
    if any(part in name for part in _INVALID_KEY_PARTS) or name == ROOT_SHARD:
        return False
    if _HASHED_KEY_RE.fullmatch(name):
        return False  # could be taken for the hashed key of another name
    return len(encode_component(name)) <= MAX_SHARD_KEY


def shard_key(name: str) -> str:
    """The shard (Dagster partition) key of a top-level folder ``name``.

    ``name`` itself when it is a valid partition key and its store file name is short enough
    (so existing shards keep their names); otherwise a readable prefix of it, ``~`` and 16 hex
    digits of the SHA-1 of its bytes (``<prefix>~<hash>``): for names too long for the store
    (``MAX_SHARD_KEY`` percent-encoded characters), names that are not UTF-8 or hold control
    characters or ``...`` (refused by Dagster), a folder named ``_root`` (the key of the files
    at the top level) and names that look like a hashed key. Keys are distinct for distinct
    names and their store file names are at most ``MAX_SHARD_KEY`` characters.
    """
    if _key_ok(name):
        return name
    digest = hashlib.sha1(_raw(name)).hexdigest()[:16]
    readable = "".join(ch if _printable(ch) else "_" for ch in name).replace("...", "_")
    prefix = ""
    for ch in readable:
        if len(encode_component(prefix + ch)) > _PREFIX_CHARS:
            break
        prefix += ch
    return f"{prefix}~{digest}"


def shard_of(ds: DatasetConfig, relpath: str, n_buckets: int = 1) -> str:
    """The shard of a relative path: its top-level folder's :func:`shard_key`
    (``shard_by: folder``), else its hash bucket among ``n_buckets``."""
    if ds.shard_by == "folder":
        return shard_key(relpath.split("/", 1)[0]) if "/" in relpath else ROOT_SHARD
    width = max(3, len(str(n_buckets - 1)))
    return f"b{_bucket(relpath, n_buckets):0{width}d}"


def shard_count(store: FeatureStore, ds: DatasetConfig, n_files: int) -> int:
    """Number of hash buckets of a ``batch``-sharded dataset, fixed at its first scan.

    The count is stored (``plans/<dataset>.json``) so that adding files never moves existing
    files to another shard; it is ceil(files / shard_size) of the first scan.
    """
    rel = plan_path(ds.name)
    if store.exists(rel):
        plan = store.read_json(rel)
        if plan.get("shard_size") == ds.shard_size:
            return int(plan["shards"])
    n = max(1, math.ceil(n_files / ds.shard_size))
    store.write_json(rel, {"shards": n, "shard_size": ds.shard_size, "files_at_plan": n_files})
    return n


def shard_files(
    ds: DatasetConfig, files: Sequence[FileStat], store: FeatureStore
) -> dict[str, list[FileStat]]:
    """Group files into shards: top-level sub-folders, or stable hash buckets of the path."""
    n = shard_count(store, ds, len(files)) if ds.shard_by != "folder" else 1
    shards: dict[str, list[FileStat]] = {}
    for f in files:
        shards.setdefault(shard_of(ds, f.relpath, n), []).append(f)
    return dict(sorted(shards.items()))


def shard_skipped(
    ds: DatasetConfig, skipped: Sequence[SkippedFile], store: FeatureStore, n_files: int
) -> dict[str, list[SkippedFile]]:
    """The skipped entries of a dataset by the shard their path falls in (``n_files``: the
    number of image candidates, for a ``batch`` plan not made yet)."""
    n = shard_count(store, ds, n_files) if ds.shard_by != "folder" else 1
    out: dict[str, list[SkippedFile]] = {}
    for s in skipped:
        out.setdefault(shard_of(ds, s.relpath, n), []).append(s)
    return out


def fingerprint(files: Iterable[FileStat]) -> str:
    """Stat fingerprint of a shard: changes when a file is added, removed or modified."""
    h = hashlib.sha1()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(_raw(f"{f.relpath}\0{f.size}\0{f.mtime_ns}\n"))
    return h.hexdigest()


def scan_dataset(ds: DatasetConfig, store: FeatureStore) -> dict[str, list[FileStat]]:
    """Files of a dataset grouped by shard (stat only)."""
    return shard_files(ds, scan_files(ds), store)


def _stored_metadata(store: FeatureStore, rel: str, key: str) -> str | None:
    """One key of a stored Parquet file's metadata; None when the file is absent or unreadable."""
    if not store.exists(rel):
        return None
    try:
        return store.read_metadata(rel).get(key)
    except Exception:
        return None


def stored_fingerprint(store: FeatureStore, ds: DatasetConfig, shard: str) -> str | None:
    """The stat fingerprint the shard's manifest was built from."""
    rel = manifest_path(ds.name, shard)
    return _stored_metadata(store, rel, "fingerprint")


def stored_code_version(store: FeatureStore, ds: DatasetConfig, shard: str) -> str | None:
    """The extraction code version the shard's stored features were computed with."""
    rel = features_path(ds.name, shard)
    return _stored_metadata(store, rel, "code_version")


def plan_shards(
    ds: DatasetConfig, store: FeatureStore, existing: set[str]
) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """Compare the folder with what the store holds.

    Returns (fingerprints of current shards, new shards, shards to (re)index, removed shards).
    A shard needs indexing when its stat fingerprint differs from the one stored with its
    manifest, or when its stored features were computed with other extraction settings (code
    version) than the current ones. Only the store is consulted (no sensor cursor), so every
    caller — folder sensor, schedule, CLI — sees a shard indexed by any of them as done.
    """
    shards = scan_dataset(ds, store)
    fps = {s: fingerprint(files) for s, files in shards.items()}
    code_version = feature_code_version(ds)
    new = sorted(s for s in fps if s not in existing)

    def needs_indexing(s: str, fp: str) -> bool:
        if fp != stored_fingerprint(store, ds, s):
            return True
        return stored_code_version(store, ds, s) != code_version

    todo = sorted(s for s, fp in fps.items() if needs_indexing(s, fp))
    removed = sorted(s for s in existing if s not in fps)
    return fps, new, todo, removed
