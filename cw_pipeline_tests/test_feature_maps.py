"""Kept feature maps (compute/feature_maps.py): one file per image content, within a budget,
written by the features step, read instead of a second forward pass."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cw_pipeline.compute.feature_maps import (
    WarehouseMaps,
    decode_maps_file,
    encode_maps_file,
    maps_wanted_at_indexing,
)
from cw_pipeline.compute.features import update_features
from cw_pipeline.compute.manifests import build_manifest
from cw_pipeline.compute.rankings import load_pair_cache, save_pair_cache
from cw_pipeline.compute.shards import scan_files
from cw_pipeline.config import DatasetConfig, load_config
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, FeatureMaps
from cw_pipeline.core.retrieval import ComputedMaps, PairCache
from cw_pipeline.store import FEATURE_MAPS, FeatureStore, feature_maps_path


def _maps(seed: int, k: int = 6, with_a: bool = False) -> FeatureMaps:
    rng = np.random.default_rng(seed)
    x = rng.random((k, 3, 4)).astype(np.float16)
    a = rng.random((2, 3, 4)).astype(np.float16) if with_a else None
    return FeatureMaps(features=x, cam_maps=a, input_size=(128, 96), image_size=(640, 480))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.mark.parametrize("with_a", [False, True])
def test_maps_file_round_trip_is_exact(with_a: bool) -> None:
    m = _maps(1, with_a=with_a)
    back = decode_maps_file(encode_maps_file(m))
    np.testing.assert_array_equal(back.features, m.features)
    assert back.features.dtype == np.float16
    if with_a:
        np.testing.assert_array_equal(back.cam_maps, m.cam_maps)
    else:
        assert back.cam_maps is None
    assert (back.input_size, back.image_size) == (m.input_size, m.image_size)


def test_damaged_or_foreign_maps_files_are_refused_with_a_reason() -> None:
    data = encode_maps_file(_maps(2))
    with pytest.raises(ValueError, match="not a feature maps file"):
        decode_maps_file(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a feature maps file"):
        decode_maps_file(b"hello")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the array: the zip CRC catches it
    with pytest.raises(ValueError, match="not a feature maps file"):
        decode_maps_file(bytes(flipped))


def test_kept_maps_by_content_and_settings(tmp_path: Path, caplog) -> None:
    store = FeatureStore(tmp_path / "wh")
    kept = WarehouseMaps(store, "v1", budget_bytes=None)
    assert kept.get(_sha("a")) is None
    kept.put(_sha("a"), _maps(3))
    np.testing.assert_array_equal(kept.get(_sha("a")).features, _maps(3).features)
    assert kept.get(_sha("b")) is None  # other content
    assert WarehouseMaps(store, "v2", None).get(_sha("a")) is None  # other settings
    assert kept.statistics()["maps_written"] == 1
    kept.put(_sha("a"), _maps(3))  # the same content again: nothing written
    assert kept.statistics()["maps_written"] == 1
    # A damaged file is a miss (recomputed by the caller), logged, never an error.
    path = Path(store.path(feature_maps_path("v1", _sha("a"))))
    path.write_bytes(path.read_bytes()[:40])
    assert kept.get(_sha("a")) is None and kept.damaged == 1
    assert "recomputing these maps" in caplog.text
    with pytest.raises(ValueError, match="not a sha1"):
        feature_maps_path("v1", "../../etc/passwd")


def test_maps_over_the_budget_are_not_kept_and_recomputed(tmp_path: Path, caplog) -> None:
    store = FeatureStore(tmp_path / "wh")
    one = len(encode_maps_file(_maps(0)))
    kept = WarehouseMaps(store, "v1", budget_bytes=int(2.5 * one))
    for i in range(4):
        kept.put(_sha(str(i)), _maps(i))
    assert kept.statistics() == {
        "maps_written": 2,
        "maps_written_bytes": 2 * one,
        "maps_over_budget": 2,
    }
    assert [kept.get(_sha(str(i))) is not None for i in range(4)] == [True, True, False, False]
    assert "maps over it are not kept" in caplog.text
    # The budget counts what is on disk already (another run's maps).
    again = WarehouseMaps(store, "v2", budget_bytes=int(2.5 * one))
    again.put(_sha("x"), _maps(9))
    assert again.over_budget == 1
    assert len(store.list(FEATURE_MAPS, suffix=".npz")) == 2


def _images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = root / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_the_features_step_keeps_maps_and_the_search_reads_them(tmp_path: Path) -> None:
    """Maps written by the forward pass of indexing are what a search would compute, and a
    search reads them instead of running the network (no forward pass)."""
    paths = _images(tmp_path / "img", 3)
    ds = DatasetConfig(
        name="t",
        layout="folder",
        images=tmp_path / "img",
        extraction=ExtractionConfig(resize="native", stored_classes=4),
    )
    store = FeatureStore(tmp_path / "wh")
    kept = WarehouseMaps(store, ds.extraction.code_version(), None)
    extractor = FeatureExtractor(ds.extraction, num_threads=1)
    manifest, _ = build_manifest(ds, scan_files(ds))
    up = update_features(ds, manifest, None, extractor, maps=kept)
    assert up.forward_passes == 3 and kept.written == 3
    assert extractor.keep_maps is False  # restored
    shas = {r["relpath"]: r["sha1"] for r in manifest.to_pylist()}
    keys = [shas[p.name] for p in paths]
    fresh = FeatureExtractor(ds.extraction, num_threads=1)
    source = ComputedMaps(fresh, paths, keys=keys, store=kept)
    source.prefetch(range(3))
    assert (source.forward_passes, source.stored_reused) == (0, 3)
    recomputed = ComputedMaps(fresh, paths)
    for i in range(3):
        got, want = source.get(i), recomputed.get(i)
        np.testing.assert_allclose(
            got.features.astype(np.float32), want.features.astype(np.float32), atol=2e-3
        )
    assert recomputed.forward_passes == 3
    # A changed image (new sha1) is never served the old maps: computed, then kept.
    Image.new("RGB", (128, 96), (200, 10, 10)).save(paths[1])
    changed, _ = build_manifest(ds, scan_files(ds), manifest)
    new_key = {r["relpath"]: r["sha1"] for r in changed.to_pylist()}["img1.jpg"]
    assert new_key != keys[1]
    source = ComputedMaps(fresh, paths, keys=[keys[0], new_key, keys[2]], store=kept)
    source.prefetch(range(3))
    assert (source.forward_passes, source.stored_reused) == (1, 2)
    assert kept.get(new_key) is not None


def test_which_datasets_keep_maps_at_indexing() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "data" / "datasets.yaml")
    # The demo evaluates demo-a and demo-b with OnA and re-ranking; its distractors with OnA.
    assert all(maps_wanted_at_indexing(config, d) for d in config.datasets.values())
    off = config.feature_maps.model_copy(update={"budget_gb": 0})
    object.__setattr__(config, "feature_maps", off)
    assert not any(maps_wanted_at_indexing(config, d) for d in config.datasets.values())


def test_evaluations_of_one_dataset_share_their_pair_values(tmp_path: Path) -> None:
    """Pair values are keyed by their context, query and image content: an evaluation reads
    its siblings' (those of the same dataset) besides its own, its own winning, and keeps in
    its own cache only those it used."""
    store = FeatureStore(tmp_path / "wh")
    base, with_d = SimpleNamespace(name="demo-b"), SimpleNamespace(name="demo-b-distractors")
    kept = PairCache(extraction="x")
    kept.store("region", ("ctx", "q", "img1"), 0.25)
    kept.store("region", ("ctx", "q", "img2"), 0.5)
    kept.store("ona", ("ctx", "q", "img1"), np.arange(4, dtype=np.float32))
    save_pair_cache(store, base, kept)
    own = PairCache(extraction="x")
    own.store("region", ("ctx", "q", "img2"), 0.75)
    save_pair_cache(store, with_d, own)

    alone = load_pair_cache(store, with_d, "x")
    assert alone.lookup("region", ("ctx", "q", "img1")) is None
    pairs = load_pair_cache(store, with_d, "x", siblings=[base])
    assert pairs.lookup("region", ("ctx", "q", "img1")) == 0.25
    assert pairs.lookup("region", ("ctx", "q", "img2")) == 0.75  # its own value wins
    np.testing.assert_array_equal(
        pairs.lookup("ona", ("ctx", "q", "img1")), np.arange(4, dtype=np.float32)
    )
    assert pairs.reused == {"region": 2, "ona": 1}
    save_pair_cache(store, with_d, pairs)
    reread = load_pair_cache(store, with_d, "x")
    assert reread.region == {("ctx", "q", "img1"): 0.25, ("ctx", "q", "img2"): 0.75}
    assert load_pair_cache(store, base, "x").region == kept.region  # the sibling's untouched
