"""Manifests, shards, feature tables and sha1 reuse (indexing.py, without Dagster)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cw_pipeline.compute.features import (
    current_layout,
    dequantize_int8,
    load_features,
    quantize_int8,
    records_to_table,
    stored_class_shape,
    stored_finite,
    table_to_featureset,
    update_features,
)
from cw_pipeline.compute.manifests import build_manifest
from cw_pipeline.compute.shards import fingerprint, scan_files, shard_files
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, ImageFeatures
from cw_pipeline.store import FeatureStore, features_path


def _dataset(root: Path, shard_by: str = "batch", shard_size: int = 3) -> DatasetConfig:
    return DatasetConfig(
        name="t",
        layout="folder",
        images=root,
        shard_by=shard_by,
        shard_size=shard_size,
        extraction=ExtractionConfig(resize="native"),
    )


def _jpeg(path: Path, colour: tuple[int, int, int], size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


def _record(rng: np.random.Generator, n_c: int = 4, dim: int = 6) -> ImageFeatures:
    return ImageFeatures(
        class_ids=rng.permutation(1000)[:n_c].astype(np.int16),
        class_probs=rng.random(n_c).astype(np.float32),
        class_vectors=(rng.standard_normal((n_c, dim)) * 10).astype(np.float32),
        sum_pooled=rng.random(dim).astype(np.float32),
        boxes=rng.random((5, 4)).astype(np.float32),
        grid=(3, 4),
        input_size=(128, 96),
        image_size=(256, 192),
    )


def test_int8_quantization_error_is_bounded_by_half_a_step() -> None:
    v = np.array([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    q, scale = quantize_int8(v)
    assert q.dtype == np.int8 and scale.shape == (2,)
    assert scale[0] == pytest.approx(2.0 / 127)
    assert q[0].tolist() == [64, -127, 32, 0]  # 1/(2/127) = 63.5 rounds to even 64
    back = dequantize_int8(q, scale)
    assert np.abs(back - v).max() <= scale[0] / 2 + 1e-7
    assert np.all(back[1] == 0)  # an all-zero vector stays zero (no division by zero)


@pytest.mark.parametrize("storage", ["int8", "float16"])
def test_feature_table_round_trip(storage: str) -> None:
    rng = np.random.default_rng(0)
    recs = [_record(rng) for _ in range(3)]
    table = records_to_table(["a", "b", "c"], ["s1", "s2", "s3"], recs, storage=storage)
    fs = table_to_featureset(table)
    assert fs.ids == ["a", "b", "c"]
    want = np.stack([r.class_vectors for r in recs])
    tol = np.abs(want).max(axis=-1, keepdims=True) / 127 if storage == "int8" else 0.01
    assert np.all(np.abs(fs.class_vectors - want) <= tol)
    np.testing.assert_array_equal(fs.class_ids, np.stack([r.class_ids for r in recs]))
    np.testing.assert_array_equal(fs.sum_pooled, np.stack([r.sum_pooled for r in recs]))
    np.testing.assert_array_equal(fs.boxes, np.stack([r.boxes for r in recs]))


@pytest.mark.parametrize("storage", ["int8", "float16"])
@pytest.mark.parametrize("bad", ["class_vectors", "sum_pooled"])
def test_stored_finite_and_shape_without_dequantising(storage: str, bad: str) -> None:
    rng = np.random.default_rng(1)
    recs = [_record(rng) for _ in range(3)]
    table = records_to_table(["a", "b", "c"], ["s1", "s2", "s3"], recs, storage=storage)
    assert stored_finite(table) and stored_class_shape(table) == (4, 6)
    getattr(recs[1], bad)[0] = np.nan  # a NaN class vector gives a NaN int8 scale
    table = records_to_table(["a", "b", "c"], ["s1", "s2", "s3"], recs, storage=storage)
    assert not stored_finite(table)


def test_int8_rows_are_smaller_than_float16() -> None:
    rng = np.random.default_rng(1)
    recs = [_record(rng, n_c=64, dim=1280) for _ in range(2)]
    int8 = records_to_table(["a", "b"], ["1", "2"], recs, storage="int8")
    half = records_to_table(["a", "b"], ["1", "2"], recs, storage="float16")
    assert int8.column("class_vectors").nbytes * 2 == half.column("class_vectors").nbytes


def _list_layout(table: pa.Table) -> pa.Table:
    """``table`` with its int8 class vectors as a list of int8, the layout of older shards."""
    i = table.schema.get_field_index("class_vectors")
    col = table.column(i).combine_chunks()
    codes = np.frombuffer(col.buffers()[1], dtype=np.int8)
    width = col.type.byte_width
    old = pa.FixedSizeListArray.from_arrays(pa.array(codes, pa.int8()), width)
    return table.set_column(i, pa.field("class_vectors", pa.list_(pa.int8(), width)), old)


def test_int8_class_vectors_take_one_byte_per_value_in_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    recs = [_record(rng, n_c=8, dim=640) for _ in range(5)]
    table = records_to_table(list("abcde"), list("12345"), recs)
    store = FeatureStore(tmp_path / "wh")
    rel = features_path("t", "s")
    store.write_table(rel, table)
    meta = pq.ParquetFile(store.path(rel)).metadata.row_group(0)
    [col] = [
        meta.column(j)
        for j in range(meta.num_columns)
        if "class_vectors" in meta.column(j).path_in_schema
    ]
    # One FIXED_LEN_BYTE_ARRAY per image; a list of int8 is widened to INT32 (4 bytes a code).
    assert col.physical_type == "FIXED_LEN_BYTE_ARRAY"
    assert col.total_uncompressed_size < 1.1 * 5 * 8 * 640
    back = table_to_featureset(store.read_table(rel))
    q, scale = quantize_int8(np.stack([r.class_vectors for r in recs]))
    np.testing.assert_array_equal(back.class_vectors, dequantize_int8(q, scale))


def test_shards_of_the_list_layout_are_read_and_reused_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "img"
    for i in range(3):
        _jpeg(root / f"img{i}.jpg", (i * 70, 30, 200 - i * 50))
    ds = _dataset(root, shard_size=10)
    ds = ds.model_copy(update={"extraction": ExtractionConfig(resize="native", stored_classes=4)})
    manifest, _ = build_manifest(ds, scan_files(ds))
    extractor = FeatureExtractor(ds.extraction, num_threads=1)
    new = update_features(ds, manifest, None, extractor).table
    old = _list_layout(new)
    assert old.schema != new.schema and current_layout(old).equals(new)
    store = FeatureStore(tmp_path / "wh")
    store.write_table(features_path("t", "old"), old)
    fs_old = load_features(store, "t", ["old"])
    fs_new = table_to_featureset(new)
    np.testing.assert_array_equal(fs_old.class_vectors, fs_new.class_vectors)
    assert stored_class_shape(old) == stored_class_shape(new) == (4, 1280)
    # An old shard plus one new image: the old rows are reused beside the fresh one.
    _jpeg(root / "img9.jpg", (9, 99, 199))
    grown, _ = build_manifest(ds, scan_files(ds), manifest)
    up = update_features(ds, grown, old, extractor)
    assert (up.forward_passes, up.reused, up.table.num_rows) == (1, 3, 4)
    assert up.table.schema == new.schema
    np.testing.assert_array_equal(
        table_to_featureset(up.table.slice(0, 3)).class_vectors, fs_new.class_vectors
    )


def test_batch_shards_are_stable_when_files_are_added(tmp_path: Path) -> None:
    root = tmp_path / "img"
    for i in range(9):
        _jpeg(root / f"img{i:03d}.jpg", (i * 20, 0, 0))
    store = FeatureStore(tmp_path / "wh")
    ds = _dataset(root)
    before = shard_files(ds, scan_files(ds), store)
    assert len(before) == 3  # ceil(9 / 3), fixed at the first scan
    _jpeg(root / "img100.jpg", (1, 2, 3))
    _jpeg(root / "aaa.jpg", (3, 2, 1))
    after = shard_files(ds, scan_files(ds), store)
    assert len(after) == 3
    where = {f.relpath: s for s, files in after.items() for f in files}
    for shard, files in before.items():
        for f in files:
            assert where[f.relpath] == shard  # no existing file moved
    changed = [s for s in after if fingerprint(after[s]) != fingerprint(before.get(s, []))]
    assert 1 <= len(changed) <= 2  # only the shards that received a new file


def test_folder_shards_and_root_files(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _jpeg(root / "x" / "a.jpg", (1, 1, 1))
    _jpeg(root / "y" / "b.jpg", (2, 2, 2))
    _jpeg(root / "c.jpg", (3, 3, 3))
    ds = _dataset(root, shard_by="folder")
    shards = shard_files(ds, scan_files(ds), FeatureStore(tmp_path / "wh"))
    assert {s: [f.relpath for f in fs] for s, fs in shards.items()} == {
        "_root": ["c.jpg"],
        "x": ["x/a.jpg"],
        "y": ["y/b.jpg"],
    }


def test_manifest_rehashes_only_new_or_changed_files(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _jpeg(root / "a.jpg", (10, 20, 30))
    _jpeg(root / "b.jpg", (40, 50, 60))
    (root / "bad.jpg").write_bytes(b"not an image")
    ds = _dataset(root)
    first, hashed = build_manifest(ds, scan_files(ds))
    assert hashed == 3
    rows = {r["image_id"]: r for r in first.to_pylist()}
    assert rows["a"]["width"] == 48 and rows["a"]["height"] == 40 and rows["a"]["error"] is None
    assert rows["bad"]["width"] == -1 and "bad.jpg" in rows["bad"]["error"]
    again, hashed = build_manifest(ds, scan_files(ds), first)
    assert hashed == 0 and again.equals(first)
    _jpeg(root / "b.jpg", (41, 50, 60), size=(50, 40))
    st = os.stat(root / "b.jpg")
    os.utime(root / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, hashed = build_manifest(ds, scan_files(ds), again)
    assert hashed == 1
    assert {r["image_id"]: r["width"] for r in third.to_pylist()}["b"] == 50
