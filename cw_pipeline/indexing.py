"""Incremental indexing, independent of Dagster: shards, manifests, and feature shards.

* ``scan_dataset``: the files of a dataset by ``stat`` only (no hashing), grouped into shards.
* ``build_manifest``: per shard, image id, relative path, bytes, mtime, sha1, width, height;
  sha1 and size are reused from the previous manifest when a file's size and mtime match, so a
  rescan hashes only new or changed files.
* ``update_features``: per shard, reuse stored feature rows by sha1 and run the network only
  on new or changed images; unreadable images go to a ``rejected`` table with their reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core import images as imgs
from cw_pipeline.core.datasets import scan_image_folder
from cw_pipeline.core.experiment import FeatureSet
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, ImageFeatures
from cw_pipeline.store import FeatureStore

logger = logging.getLogger(__name__)

ROOT_SHARD = "_root"
FLAT_ID_LAYOUTS = ("oxford", "paris", "gnd", "revisited")


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class FileStat:
    """A file of a dataset as seen by ``stat``."""

    image_id: str
    relpath: str
    size: int
    mtime_ns: int


def extraction_config(ds: DatasetConfig) -> ExtractionConfig:
    """The core extraction settings of a dataset."""
    e = ds.extraction
    return ExtractionConfig(
        backbone=e.backbone,
        layer=e.layer,
        weights=e.weights,
        resize=e.resize,
        n_classes=e.n_classes,
    )


def scan_files(ds: DatasetConfig) -> list[FileStat]:
    """All images of a dataset with size and mtime (sorted by relative path)."""
    flat = ds.layout in FLAT_ID_LAYOUTS
    found = scan_image_folder(ds.images, flat=flat)
    out = []
    for image_id, rel in found:
        st = os.stat(ds.images / rel)
        out.append(FileStat(image_id, rel, int(st.st_size), int(st.st_mtime_ns)))
    return out


def _bucket(relpath: str, n_buckets: int) -> int:
    return zlib.crc32(relpath.encode("utf-8")) % n_buckets


def shard_count(store: FeatureStore, ds: DatasetConfig, n_files: int) -> int:
    """Number of hash buckets of a ``batch``-sharded dataset, fixed at its first scan.

    The count is stored (``plans/<dataset>.json``) so that adding files never moves existing
    files to another shard; it is ceil(files / shard_size) of the first scan.
    """
    rel = f"plans/{ds.name}.json"
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
    shards: dict[str, list[FileStat]] = {}
    if ds.shard_by == "folder":
        for f in files:
            top = f.relpath.split("/", 1)[0] if "/" in f.relpath else ROOT_SHARD
            shards.setdefault(top, []).append(f)
    else:
        n = shard_count(store, ds, len(files))
        width = max(3, len(str(n - 1)))
        for f in files:
            shards.setdefault(f"b{_bucket(f.relpath, n):0{width}d}", []).append(f)
    return dict(sorted(shards.items()))


def fingerprint(files: Iterable[FileStat]) -> str:
    """Stat fingerprint of a shard: changes when a file is added, removed or modified."""
    h = hashlib.sha1()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def scan_dataset(ds: DatasetConfig, store: FeatureStore) -> dict[str, list[FileStat]]:
    """Files of a dataset grouped by shard (stat only)."""
    return shard_files(ds, scan_files(ds), store)


def progress_logger(
    log: logging.Logger,
    label: str,
    *,
    every_images: int | None = None,
    every_seconds: float | None = None,
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback logging images/s and ETA, every N images or seconds
    (and at the end)."""
    start = time.perf_counter()
    last = [start]

    def report(done: int, total: int) -> None:
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


def sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(
    ds: DatasetConfig, files: Sequence[FileStat], previous: pa.Table | None = None
) -> tuple[pa.Table, int]:
    """Manifest rows of a shard; returns the table and how many files were hashed."""
    prev: dict[str, dict] = {}
    if previous is not None and previous.num_rows:
        for row in previous.to_pylist():
            prev[row["relpath"]] = row
    rows, hashed = [], 0
    for f in files:
        old = prev.get(f.relpath)
        if old and old["bytes"] == f.size and old["mtime_ns"] == f.mtime_ns:
            rows.append({**old, "image_id": f.image_id})
            continue
        path = ds.images / f.relpath
        hashed += 1
        sha1, error, width, height = sha1_file(path), None, -1, -1
        try:
            width, height = imgs.image_size(path)
        except Exception as exc:  # recorded; the features step quarantines it
            error = str(exc)
        rows.append(
            {
                "image_id": f.image_id,
                "relpath": f.relpath,
                "bytes": f.size,
                "mtime_ns": f.mtime_ns,
                "sha1": sha1,
                "width": width,
                "height": height,
                "error": error,
            }
        )
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
    return f"{extraction_config(ds).code_version()}-{CLASS_VECTOR_STORAGE}"


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


@dataclass
class ShardUpdate:
    """Result of updating one feature shard."""

    table: pa.Table
    rejected: pa.Table
    forward_passes: int = 0
    reused: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.forward_passes / self.seconds if self.seconds > 0 else 0.0


def update_features(
    ds: DatasetConfig,
    manifest: pa.Table,
    previous: pa.Table | None,
    extractor: FeatureExtractor,
    progress: Callable[[int, int], None] | None = None,
) -> ShardUpdate:
    """Feature rows for a manifest shard, reusing ``previous`` rows by sha1.

    Only images whose sha1 has no stored row get a forward pass; rows of images no longer in the
    manifest are dropped. Unreadable images are recorded in ``rejected`` and skipped.
    """
    t0 = time.perf_counter()
    reuse: dict[str, int] = {}
    if previous is not None and previous.num_rows:
        for i, s in enumerate(previous.column("sha1").to_pylist()):
            reuse.setdefault(s, i)
    rows = manifest.to_pylist()
    todo = [r for r in rows if r["sha1"] not in reuse and not r["error"]]
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
    new: dict[str, ImageFeatures] = {}
    items = [(r["image_id"], ds.images / r["relpath"]) for r in todo]
    for n, (key, rec) in enumerate(extractor.extract_files(items, on_error="yield"), 1):
        if isinstance(rec, Exception):
            r = next(x for x in todo if x["image_id"] == key)
            rejected.append(
                {"image_id": key, "relpath": r["relpath"], "sha1": r["sha1"], "reason": str(rec)}
            )
        else:
            new[key] = rec
        if progress is not None:
            progress(n, len(items))
    parts = []
    kept_ids, kept_sha, take = [], [], []
    new_ids, new_sha, new_recs = [], [], []
    for r in rows:
        if r["sha1"] in reuse:
            take.append(reuse[r["sha1"]])
            kept_ids.append(r["image_id"])
            kept_sha.append(r["sha1"])
        elif r["image_id"] in new:
            new_ids.append(r["image_id"])
            new_sha.append(r["sha1"])
            new_recs.append(new[r["image_id"]])
    if take:
        old = previous.take(pa.array(take, pa.int64()))  # type: ignore[union-attr]
        old = old.set_column(0, "image_id", pa.array(kept_ids, pa.string()))
        parts.append(old)
    if new_recs:
        parts.append(records_to_table(new_ids, new_sha, new_recs))
    if parts:
        if len(parts) == 2 and parts[0].schema != parts[1].schema:
            raise ValueError(
                "stored features have a different layout than new ones (N_C, K or boxes "
                "changed): re-materialize the whole dataset"
            )
        table = pa.concat_tables(parts).sort_by("image_id")
    else:
        e = extractor
        table = feature_schema(e.config.n_classes, e.backbone.feature_dim, len(e.config.thresholds))
        table = table.empty_table()
    return ShardUpdate(
        table=table,
        rejected=pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
        forward_passes=len(new_recs),
        reused=len(take),
        seconds=time.perf_counter() - t0,
        errors=[(r["image_id"], r["reason"]) for r in rejected],
    )
