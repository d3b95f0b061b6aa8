"""Incremental indexing, independent of Dagster: shards, manifests, and feature shards.

* ``scan_dataset``: the files of a dataset by ``stat`` only (no hashing), grouped into shards.
* ``build_manifest``: per shard, image id, relative path, bytes, mtime, sha1, width, height;
  sha1 and size are reused from the previous manifest when a file's size and mtime match, so a
  rescan hashes only new or changed files.
* ``update_features``: per shard, reuse stored feature rows by sha1 and run the network only
  on new or changed images; unreadable images go to a ``rejected`` table with their reason.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core import images as imgs
from cw_pipeline.core.datasets import (
    SkippedFile,
    image_path,
    scan_folder,
    shown_name,
)
from cw_pipeline.core.experiment import FeatureSet
from cw_pipeline.core.extract import FeatureExtractor, ImageFeatures
from cw_pipeline.store import (
    FeatureStore,
    encode_component,
    features_path,
    manifest_path,
    plan_path,
)

logger = logging.getLogger(__name__)

ROOT_SHARD = "_root"
FLAT_ID_LAYOUTS = ("oxford", "paris", "gnd", "revisited")


# --------------------------------------------------------------------------- scanning


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


def dataset_extractor(ds: DatasetConfig) -> FeatureExtractor:
    """A feature extractor with all of the dataset's settings (device, threads, batch size).

    Outside Dagster runs; inside them ``PipelineResource.extractor`` adds the deployment's
    overrides and shares one network per settings."""
    r = ds.runtime
    return FeatureExtractor(
        ds.extraction,
        device=r.device,
        num_threads=r.num_threads,
        batch_size=r.batch_size,
        batch_pixels=r.batch_pixels,
    )


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


#: Receivers of every :func:`progress_logger` report, see :func:`progress_listener`.
_PROGRESS_LISTENERS: list[Callable[[str, int, int], None]] = []


@contextmanager
def progress_listener(listener: Callable[[str, int, int], None]) -> Iterator[None]:
    """Call ``listener(label, done, total)`` on every image reported by any
    :func:`progress_logger` of this process while the context is active (in-process Dagster
    runs included: the CLI draws its progress bars from the assets' reports this way)."""
    _PROGRESS_LISTENERS.append(listener)
    try:
        yield
    finally:
        _PROGRESS_LISTENERS.remove(listener)


def progress_logger(
    log: logging.Logger,
    label: str,
    *,
    every_images: int | None = None,
    every_seconds: float | None = None,
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback logging images/s and ETA, every N images or seconds
    (and at the end); every report also goes to the listeners of :func:`progress_listener`."""
    start = time.perf_counter()
    last = [start]

    def report(done: int, total: int) -> None:
        for listener in tuple(_PROGRESS_LISTENERS):
            listener(label, done, total)
        now = time.perf_counter()
        due = done == total
        if every_images is not None and done % every_images == 0:
            due = True
        if every_seconds is not None and now - last[0] > every_seconds:
            due = True
        if not due:
            return
        last[0] = now
        rate = done / (now - start) if now > start else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d images, %.1f img/s, ETA %.0f s", label, done, total, rate, eta)

    return report


# --------------------------------------------------------------------------- manifests

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("relpath", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
)


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


def sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-1 of a regular file (anything else is refused before it is opened)."""
    h = hashlib.sha1()
    with imgs.open_regular_file(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_row(
    f: FileStat, sha1: str | None, error: str | None, size: tuple[int, int] = (-1, -1)
) -> dict:
    return {
        "image_id": shown_name(f.image_id),
        "relpath": shown_name(f.relpath),
        "bytes": f.size,
        "mtime_ns": f.mtime_ns,
        "sha1": sha1,
        "width": size[0],
        "height": size[1],
        "error": error,
    }


def build_manifest(
    ds: DatasetConfig, files: Sequence[FileStat], previous: pa.Table | None = None
) -> tuple[pa.Table, int]:
    """Manifest rows of a shard; returns the table and how many files were hashed.

    A file that cannot be indexed gets a row with its ``error`` (the features step puts it in
    the rejected table) and the rest proceed: one refused by the scan (``FileStat.error``,
    never opened), one that vanished or became unreadable since the scan, one whose header
    does not parse. Only regular files are opened.
    """
    prev: dict[str, dict] = {}
    if previous is not None and previous.num_rows:
        for row in previous.to_pylist():
            prev[row["relpath"]] = row
    rows, hashed = [], 0
    for f in files:
        if f.error is not None:
            rows.append(_manifest_row(f, None, f.error))
            continue
        old = prev.get(f.relpath)
        if old and old["sha1"] and old["bytes"] == f.size and old["mtime_ns"] == f.mtime_ns:
            rows.append({**old, "image_id": f.image_id})
            continue
        path = image_path(ds.images, f.relpath)
        hashed += 1
        try:
            sha1 = sha1_file(path)
        except FileNotFoundError as exc:
            why = os.strerror(exc.errno or errno.ENOENT)
            error = f"cannot load image '{path}': it vanished after the scan ({why})"
            rows.append(_manifest_row(f, None, error))
            continue
        except (OSError, ValueError) as exc:  # ImageLoadError names the file
            rows.append(_manifest_row(f, None, str(exc)))
            continue
        error, width, height = None, -1, -1
        try:
            width, height = imgs.image_size(path)
        except Exception as exc:  # recorded; the features step quarantines it
            error = str(exc)
        rows.append(_manifest_row(f, sha1, error, (width, height)))
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), hashed


def manifest_version(manifest: pa.Table) -> str:
    """Data version of a manifest shard: hash of its (id, sha1) pairs."""
    h = hashlib.sha1()
    ids = manifest.column("image_id").to_pylist()
    shas = manifest.column("sha1").to_pylist()
    for i, s in sorted(zip(ids, shas, strict=True)):
        h.update(f"{i}\0{s}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- feature shards


#: How class vectors are stored: ``int8`` (per-vector symmetric scale; measured mAP change on
#: UKBench ≤ 0.002 against float32, see benchmarks/storage_precision.py) or ``float16``.
CLASS_VECTOR_STORAGE = "int8"
STORAGE_FORMATS = ("int8", "float16")


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8: ``v ≈ q * scale`` with ``scale = max|v| / 127``.

    ``vectors`` is (..., K); returns int8 codes of the same shape and float32 scales (...).
    """
    v = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(v).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(v / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def feature_code_version(ds: DatasetConfig) -> str:
    """Code version of a dataset's stored features: extraction settings + storage format."""
    return f"{ds.extraction.code_version()}-{CLASS_VECTOR_STORAGE}"


def feature_schema(
    n_classes: int, dim: int, n_boxes: int, storage: str = CLASS_VECTOR_STORAGE
) -> pa.Schema:
    """Arrow schema of a feature shard (class vectors int8 + scales or float16)."""
    if storage == "int8":
        vec_fields = [
            ("class_vectors", pa.list_(pa.int8(), n_classes * dim)),
            ("class_vector_scales", pa.list_(pa.float32(), n_classes)),
        ]
    elif storage == "float16":
        vec_fields = [("class_vectors", pa.list_(pa.float16(), n_classes * dim))]
    else:
        raise ValueError(f"unknown class-vector storage {storage!r}; use one of {STORAGE_FORMATS}")
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("sha1", pa.string()),
            ("class_ids", pa.list_(pa.int16(), n_classes)),
            ("class_probs", pa.list_(pa.float32(), n_classes)),
            *vec_fields,
            ("sum_pooled", pa.list_(pa.float32(), dim)),
            ("boxes", pa.list_(pa.float32(), n_boxes * 4)),
            ("grid_h", pa.int16()),
            ("grid_w", pa.int16()),
            ("input_w", pa.int32()),
            ("input_h", pa.int32()),
        ]
    )


REJECTED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("relpath", pa.string()),
        ("sha1", pa.string()),
        ("reason", pa.string()),
    ]
)


def _fixed_list(values: np.ndarray, typ: pa.DataType, width: int) -> pa.Array:
    flat = pa.array(values.reshape(-1), type=typ)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def records_to_table(
    ids: Sequence[str],
    sha1s: Sequence[str],
    records: Sequence[ImageFeatures],
    storage: str = CLASS_VECTOR_STORAGE,
) -> pa.Table:
    """Feature rows for records of equal N_C, K and box count."""
    if not records:
        raise ValueError("no records to write")
    n_c, dim = records[0].class_vectors.shape
    n_boxes = records[0].boxes.shape[0]
    schema = feature_schema(n_c, dim, n_boxes, storage)
    vectors = np.stack([r.class_vectors for r in records])
    if storage == "int8":
        q, scale = quantize_int8(vectors)
        vec_cols = [
            _fixed_list(q, pa.int8(), n_c * dim),
            _fixed_list(scale, pa.float32(), n_c),
        ]
    else:
        vec_cols = [_fixed_list(vectors.astype(np.float16), pa.float16(), n_c * dim)]
    cols = [
        pa.array(list(ids), pa.string()),
        pa.array(list(sha1s), pa.string()),
        _fixed_list(np.stack([r.class_ids for r in records]).astype(np.int16), pa.int16(), n_c),
        _fixed_list(np.stack([r.class_probs for r in records]), pa.float32(), n_c),
        *vec_cols,
        _fixed_list(np.stack([r.sum_pooled for r in records]), pa.float32(), dim),
        _fixed_list(np.stack([r.boxes for r in records]), pa.float32(), n_boxes * 4),
        pa.array([r.grid[0] for r in records], pa.int16()),
        pa.array([r.grid[1] for r in records], pa.int16()),
        pa.array([r.input_size[0] for r in records], pa.int32()),
        pa.array([r.input_size[1] for r in records], pa.int32()),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _column_matrix(table: pa.Table, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    col = table.column(name).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.astype(dtype, copy=False).reshape((table.num_rows, *shape))


def table_to_featureset(table: pa.Table) -> FeatureSet:
    """A FeatureSet (float32) from feature rows."""
    if table.num_rows == 0:
        raise ValueError("no feature rows")
    n_c = table.schema.field("class_ids").type.list_size
    dim = table.schema.field("sum_pooled").type.list_size
    n_boxes = table.schema.field("boxes").type.list_size // 4
    return FeatureSet(
        ids=table.column("image_id").to_pylist(),
        class_ids=_column_matrix(table, "class_ids", np.int16, (n_c,)),
        class_probs=_column_matrix(table, "class_probs", np.float32, (n_c,)),
        class_vectors=_class_vectors(table, n_c, dim),
        sum_pooled=_column_matrix(table, "sum_pooled", np.float32, (dim,)),
        boxes=_column_matrix(table, "boxes", np.float32, (n_boxes, 4)),
    )


def _class_vectors(table: pa.Table, n_c: int, dim: int) -> np.ndarray:
    if "class_vector_scales" in table.schema.names:
        q = _column_matrix(table, "class_vectors", np.int8, (n_c, dim))
        scale = _column_matrix(table, "class_vector_scales", np.float32, (n_c,))
        return dequantize_int8(q, scale)
    return _column_matrix(table, "class_vectors", np.float32, (n_c, dim))


def stored_finite(table: pa.Table) -> bool:
    """Whether a feature shard's numbers are all finite, read without dequantising: int8 class
    vectors are finite by construction, so their scales (or float16 vectors) and the
    sum-pooled vectors are what is checked."""
    vectors = (
        "class_vector_scales" if "class_vector_scales" in table.schema.names else "class_vectors"
    )
    for name in (vectors, "sum_pooled"):
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if not np.isfinite(values.astype(np.float32, copy=False)).all():
            return False
    return True


def stored_class_shape(table: pa.Table) -> tuple[int, int]:
    """(N_C, K) of a feature shard's class vectors, from its schema."""
    n_c = table.schema.field("class_ids").type.list_size
    return n_c, table.schema.field("class_vectors").type.list_size // n_c


@dataclass
class ShardUpdate:
    """Result of updating one feature shard.

    ``reused`` counts every row taken over by sha1; ``resumed`` the part of them that came
    from the checkpoints of an interrupted run.
    """

    table: pa.Table
    rejected: pa.Table
    forward_passes: int = 0
    reused: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    resumed: int = 0

    @property
    def images_per_second(self) -> float:
        return self.forward_passes / self.seconds if self.seconds > 0 else 0.0


_LAYOUT_CHANGED = (
    "stored features have a different layout than new ones (N_C, K or boxes "
    "changed): re-materialize the whole dataset"
)


def _stored_rows(previous: pa.Table | None, resumed: pa.Table | None) -> pa.Table | None:
    """``previous`` then ``resumed`` rows in one table (schema metadata dropped)."""
    parts = [t.replace_schema_metadata(None) for t in (previous, resumed) if t is not None]
    parts = [t for t in parts if t.num_rows]
    if not parts:
        return None
    if len(parts) == 2 and parts[0].schema != parts[1].schema:
        raise ValueError(_LAYOUT_CHANGED)
    return pa.concat_tables(parts)


def update_features(
    ds: DatasetConfig,
    manifest: pa.Table,
    previous: pa.Table | None,
    extractor: FeatureExtractor,
    progress: Callable[[int, int], None] | None = None,
    *,
    resumed: pa.Table | None = None,
    checkpoint: Callable[[pa.Table], None] | None = None,
) -> ShardUpdate:
    """Feature rows for a manifest shard, reusing ``previous`` and ``resumed`` rows by sha1.

    Only images whose sha1 has no stored row get a forward pass; rows of images no longer in the
    manifest are dropped. Unreadable images are recorded in ``rejected`` and skipped.

    ``checkpoint`` receives the feature rows of every batch as soon as its forward pass is done,
    before the next batch starts; ``resumed`` holds such rows left by an interrupted run (see
    :class:`cw_pipeline.checkpoints.ShardCheckpoints`). Both are optional.
    """
    t0 = time.perf_counter()
    stored = _stored_rows(previous, resumed)
    n_previous = previous.num_rows if previous is not None else 0
    reuse: dict[str, int] = {}
    if stored is not None:
        for i, s in enumerate(stored.column("sha1").to_pylist()):
            reuse.setdefault(s, i)
    rows = manifest.to_pylist()
    todo = {r["image_id"]: r for r in rows if r["sha1"] not in reuse and not r["error"]}
    rejected = [
        {
            "image_id": r["image_id"],
            "relpath": r["relpath"],
            "sha1": r["sha1"],
            "reason": r["error"],
        }
        for r in rows
        if r["error"] and r["sha1"] not in reuse
    ]
    fresh: list[pa.Table] = []
    items = [(key, image_path(ds.images, r["relpath"])) for key, r in todo.items()]
    n = 0
    for batch in extractor.extract_batches(items, on_error="yield"):
        ids, shas, recs = [], [], []
        for key, rec in batch:
            r = todo[key]
            if isinstance(rec, Exception):
                reason = str(rec)
                rejected.append(
                    {"image_id": key, "relpath": r["relpath"], "sha1": r["sha1"], "reason": reason}
                )
            else:
                ids.append(key)
                shas.append(r["sha1"])
                recs.append(rec)
        if recs:
            table = records_to_table(ids, shas, recs)
            if checkpoint is not None:
                checkpoint(table)
            fresh.append(table)
        for _ in batch:
            n += 1
            if progress is not None:
                progress(n, len(items))
    parts = []
    kept_ids, take = [], []
    for r in rows:
        if r["sha1"] in reuse:
            take.append(reuse[r["sha1"]])
            kept_ids.append(r["image_id"])
    if take:
        old = stored.take(pa.array(take, pa.int64()))  # type: ignore[union-attr]
        old = old.set_column(0, "image_id", pa.array(kept_ids, pa.string()))
        parts.append(old)
    parts += fresh
    if parts:
        if any(t.schema != parts[0].schema for t in parts[1:]):
            raise ValueError(_LAYOUT_CHANGED)
        table = pa.concat_tables(parts).sort_by("image_id")
    else:
        e = extractor
        table = feature_schema(
            e.config.stored_classes, e.backbone.feature_dim, len(e.config.thresholds)
        )
        table = table.empty_table()
    return ShardUpdate(
        table=table,
        rejected=pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
        forward_passes=sum(t.num_rows for t in fresh),
        reused=len(take),
        seconds=time.perf_counter() - t0,
        errors=[(r["image_id"], r["reason"]) for r in rejected],
        resumed=sum(1 for i in take if i >= n_previous),
    )
