"""Feature shards: CAM feature rows per image, computed only for images not stored yet.

``update_features`` reuses stored rows (and rows checkpointed by an interrupted run, see
:mod:`cw_pipeline.compute.checkpoints`) by sha1 and runs the network only on new or changed
images; unreadable images go to a ``rejected`` table with their reason. Also the Arrow
layout of feature rows (class vectors stored as int8 or float16), its code version, loading a
dataset's stored features back as a :class:`~cw_pipeline.core.feature_set.FeatureSet`, and the
progress reports of extraction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core import allocator
from cw_pipeline.core.datasets import (
    image_path,
)
from cw_pipeline.core.extract import FeatureExtractor, ImageFeatures
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.retrieval import MapStore
from cw_pipeline.store import (
    FEATURES,
    FeatureStore,
    features_path,
    rejected_path,
    shard_folder,
)


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
        batch_target_pixels=r.batch_target_pixels,
    )


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
    """Arrow schema of a feature shard (class vectors int8 + scales or float16).

    int8 class vectors are one fixed-size binary value per image (N_C × K bytes, row-major),
    not a list of int8: Parquet has no 8-bit integer type and would widen each code to 32 bits
    before compressing. Measured on 128 UKBench rows (64 × 1280), zstd: writes 2.40 → 0.61
    ms/row, reads 1.48 → 0.18 ms/row, 73 → 45 kB/row. Shards written with the older list layout
    are read as well (:func:`current_layout`).
    """
    if storage == "int8":
        vec_fields = [
            ("class_vectors", pa.binary(n_classes * dim)),
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


def _int8_rows(codes: np.ndarray) -> pa.Array:
    """Fixed-size binary rows of an (N, ...) int8 array, zero-copy."""
    flat = np.ascontiguousarray(codes, dtype=np.int8).reshape(len(codes), -1)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat)]
    )


def current_layout(table: pa.Table) -> pa.Table:
    """Feature rows in the current layout: int8 class vectors stored as a list of int8 (shards
    written before the fixed-size binary layout) become fixed-size binary, values unchanged."""
    i = table.schema.get_field_index("class_vectors")
    typ = table.schema.field(i).type if i >= 0 else None
    if not (pa.types.is_fixed_size_list(typ) and pa.types.is_int8(typ.value_type)):
        return table
    width = typ.list_size
    col = table.column(i).combine_chunks()
    codes = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    return table.set_column(i, pa.field("class_vectors", pa.binary(width)), _int8_rows(codes))


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
            _int8_rows(q),
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
        col = current_layout(table.select(["class_vectors"])).column(0).combine_chunks()
        width = n_c * dim
        start = col.offset * width
        q = np.frombuffer(col.buffers()[1], dtype=np.int8)[start : start + len(col) * width]
        q = q.reshape(len(col), n_c, dim)
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
    typ = table.schema.field("class_vectors").type
    width = typ.byte_width if pa.types.is_fixed_size_binary(typ) else typ.list_size
    return n_c, width // n_c


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
    parts = [
        current_layout(t.replace_schema_metadata(None))
        for t in (previous, resumed)
        if t is not None
    ]
    parts = [t for t in parts if t.num_rows]
    if not parts:
        return None
    if len(parts) == 2 and parts[0].schema != parts[1].schema:
        raise ValueError(_LAYOUT_CHANGED)
    return pa.concat_tables(parts)


def _reject(r: dict, reason: str) -> dict[str, str]:
    """A ``rejected`` row of manifest row ``r``."""
    return {"image_id": r["image_id"], "relpath": r["relpath"], "sha1": r["sha1"], "reason": reason}


def _extract_new(
    ds: DatasetConfig,
    todo: dict[str, dict],
    extractor: FeatureExtractor,
    rejected: list[dict[str, str]],
    progress: Callable[[int, int], None] | None,
    checkpoint: Callable[[pa.Table], None] | None,
    maps: MapStore | None = None,
) -> list[pa.Table]:
    """Feature rows of the manifest rows ``todo`` (by image id), one table per batch; images
    that cannot be read are appended to ``rejected``. With ``maps``, each image's feature maps
    are put there by sha1 (the forward pass computes them anyway)."""
    fresh: list[pa.Table] = []
    items = [(key, image_path(ds.images, r["relpath"])) for key, r in todo.items()]
    n = 0
    keep_maps = getattr(extractor, "keep_maps", False)
    if maps is not None:
        extractor.keep_maps = True
    try:
        for batch in extractor.extract_batches(items, on_error="yield"):
            ids, shas, recs = [], [], []
            for key, rec in batch:
                r = todo[key]
                if isinstance(rec, Exception):
                    rejected.append(_reject(r, str(rec)))
                    continue
                if maps is not None and rec.maps is not None:
                    maps.put(r["sha1"], rec.maps)
                    if not keep_maps:
                        rec.maps = None
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
    finally:
        if maps is not None:
            extractor.keep_maps = keep_maps
    # The shard's forward passes are over: what they kept for each other goes back.
    allocator.release()
    return fresh


def _shard_table(
    rows: list[dict],
    stored: pa.Table | None,
    reuse: dict[str, int],
    fresh: list[pa.Table],
    extractor: FeatureExtractor,
) -> tuple[pa.Table, list[int]]:
    """The shard's feature table (stored rows still in the manifest, under their current
    image ids, plus the fresh ones, by image id) and the stored rows it took."""
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
    if not parts:
        e = extractor
        schema = feature_schema(
            e.config.stored_classes, e.backbone.feature_dim, len(e.config.thresholds)
        )
        return schema.empty_table(), take
    if any(t.schema != parts[0].schema for t in parts[1:]):
        raise ValueError(_LAYOUT_CHANGED)
    return pa.concat_tables(parts).sort_by("image_id"), take


def update_features(
    ds: DatasetConfig,
    manifest: pa.Table,
    previous: pa.Table | None,
    extractor: FeatureExtractor,
    progress: Callable[[int, int], None] | None = None,
    *,
    resumed: pa.Table | None = None,
    checkpoint: Callable[[pa.Table], None] | None = None,
    maps: MapStore | None = None,
) -> ShardUpdate:
    """Feature rows for a manifest shard, reusing ``previous`` and ``resumed`` rows by sha1.

    Only images whose sha1 has no stored row get a forward pass; rows of images no longer in the
    manifest are dropped. Unreadable images are recorded in ``rejected`` and skipped.

    ``checkpoint`` receives the feature rows of every batch as soon as its forward pass is done,
    before the next batch starts; ``resumed`` holds such rows left by an interrupted run (see
    :class:`cw_pipeline.compute.checkpoints.ShardCheckpoints`). Both are optional. ``maps``
    (optional) receives the feature maps of the images the network runs on, by sha1
    (:mod:`cw_pipeline.compute.feature_maps`).
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
    rejected = [_reject(r, r["error"]) for r in rows if r["error"] and r["sha1"] not in reuse]
    fresh = _extract_new(ds, todo, extractor, rejected, progress, checkpoint, maps)
    table, take = _shard_table(rows, stored, reuse, fresh, extractor)
    return ShardUpdate(
        table=table,
        rejected=pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
        forward_passes=sum(t.num_rows for t in fresh),
        reused=len(take),
        seconds=time.perf_counter() - t0,
        errors=[(r["image_id"], r["reason"]) for r in rejected],
        resumed=sum(1 for i in take if i >= n_previous),
    )


def load_features(
    store: FeatureStore,
    dataset: str,
    shards: Sequence[str],
    images: Path | str | None = None,
) -> FeatureSet:
    """All feature rows of the given shards of a dataset (missing shards are an error).

    An image id stored in two shards (a stale shard left by a changed shard plan, a copied
    shard file) is an error naming the id and both shards: the index is never silently
    deduplicated. ``images`` (the dataset's folder) only makes the messages more precise.
    """
    where = f" under {images}" if images is not None else ""
    tables = []
    owner: dict[str, str] = {}
    for shard in shards:
        rel = features_path(dataset, shard)
        if not store.exists(rel):
            raise FileNotFoundError(f"features of {dataset} shard {shard} are not materialized")
        t = current_layout(store.read_table(rel))
        for image_id in t.column("image_id").to_pylist():
            first = owner.setdefault(image_id, shard)
            if first != shard:
                raise ValueError(
                    f"dataset {dataset!r}: image id {image_id!r} is stored in shards {first!r} "
                    f"and {shard!r} (a stale or duplicated feature shard); re-index the dataset "
                    f"(cw-pipeline index --dataset {dataset} --force)"
                )
        if t.num_rows:
            tables.append(t)
    if not tables:
        if not shards:
            raise ValueError(f"dataset {dataset!r} has no images{where} (no shards indexed)")
        rejected = 0
        for shard in shards:
            rej = rejected_path(dataset, shard)
            if store.exists(rej):
                rejected += store.read_table(rej, ["image_id"]).num_rows
        raise ValueError(
            f"dataset {dataset!r} has no feature rows: no readable images{where} "
            f"({len(shards)} shard(s), {rejected} image(s) rejected as unreadable)"
        )
    return table_to_featureset(pa.concat_tables(tables).sort_by("image_id"))


def stored_image_count(store: FeatureStore, dataset: str) -> int:
    """How many images a dataset's stored feature shards hold (read from their footers)."""
    return sum(store.row_count(rel) for rel in store.list(shard_folder(FEATURES, dataset)))
