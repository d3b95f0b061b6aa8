"""Tests for cw_pipeline.core.extract: configs, per-image records, batching, queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cw_pipeline.core.aggregation import l2_normalize
from cw_pipeline.core.backbones import load_backbone
from cw_pipeline.core.cams import BOX_THRESHOLDS
from cw_pipeline.core.encoding import crow_channel_weights
from cw_pipeline.core.extract import (
    CPU_BATCH_TARGET_PIXELS,
    DEFAULT_BATCH_PIXELS,
    ExtractionConfig,
    FeatureExtractor,
    FeatureMaps,
    ImageFeatures,
    RuntimeConfig,
    crop_cells,
    encode_maps,
)
from cw_pipeline.core.images import ImageLoadError, to_tensor


def _image(w: int, h: int, seed: int) -> Image.Image:
    """Smooth random colour image (a few blobs), so the network sees some structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def _assert_same_record(a: ImageFeatures, b: ImageFeatures) -> None:
    """Bit-identical records."""
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.class_probs, b.class_probs)
    np.testing.assert_array_equal(a.class_vectors, b.class_vectors)
    np.testing.assert_array_equal(a.sum_pooled, b.sum_pooled)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert (a.grid, a.input_size, a.image_size) == (b.grid, b.input_size, b.image_size)


def _assert_close_record(a: ImageFeatures, b: ImageFeatures) -> None:
    """Records equal up to float noise of a different batch composition.

    The convolutions' results differ by ~1e-5 between batch sizes, and class vectors are sums
    over cells of magnitude ~100: they are compared l2-normalised (as they are used), at 1e-5.
    """
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        l2_normalize(a.class_vectors), l2_normalize(b.class_vectors), atol=1e-5, rtol=0
    )
    scale = np.abs(b.class_vectors).max()
    np.testing.assert_allclose(a.class_vectors, b.class_vectors, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(a.sum_pooled, b.sum_pooled, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert (a.grid, a.input_size, a.image_size) == (b.grid, b.input_size, b.image_size)


# --------------------------------------------------------------------------- config


def test_code_version_stable_for_equal_configs():
    a, b = ExtractionConfig(), ExtractionConfig()
    assert a.code_version() == b.code_version()
    assert a.code_version().startswith("efficientnet_lite0-")
    assert len(a.code_version()) == len("efficientnet_lite0-") + 10
    # max_pixels only guards decoding: it does not change stored features.
    assert ExtractionConfig(max_pixels=1000).code_version() == a.code_version()
    # Equivalent spellings of the same resize policy give the same version.
    assert (
        ExtractionConfig(resize="paper").code_version()
        == ExtractionConfig(resize="paper:720:1024").code_version()
        == ExtractionConfig(resize="paper-min720-max1024").code_version()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"backbone": "resnet50"},
        {"resize": "paper"},
        {"resize": "fixed:224x224"},
        {"stored_classes": 32},
        {"box_classes": 3},
        {"layer": "block15"},
        {"weights": "random"},
        {"thresholds": (0.1, 0.2)},
    ],
)
def test_code_version_changes_with_feature_settings(change):
    base = ExtractionConfig()
    assert base.replace(**change).code_version() != base.code_version()


def test_code_version_survives_the_rename_of_n_classes():
    """Renaming ``n_classes`` to ``stored_classes`` does not mark stored features stale: the
    hashes are those computed before the rename."""
    assert ExtractionConfig().code_version() == "efficientnet_lite0-520b625bfc"
    fixed = ExtractionConfig(stored_classes=16, resize="fixed:160x160")
    assert fixed.code_version() == "efficientnet_lite0-996f260ce6"


def test_config_validation():
    with pytest.raises(ValueError, match=r"stored_classes must be in 1\.\.1000, got 0"):
        ExtractionConfig(stored_classes=0)
    with pytest.raises(ValueError, match=r"stored_classes must be in 1\.\.1000"):
        ExtractionConfig(stored_classes=1001)
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        ExtractionConfig(backbone="alexnet")
    with pytest.raises(ValueError, match="stored_classes"):
        ExtractionConfig(stored_classes="8")  # type: ignore[arg-type]  # no silent coercion
    with pytest.raises(ValueError, match="n_classes"):
        ExtractionConfig(n_classes=8)  # type: ignore[call-arg]  # the old name is unknown
    with pytest.raises(ValueError, match="box_classes"):
        ExtractionConfig(stored_classes=4, box_classes=5)
    with pytest.raises(ValueError, match="resize policy"):
        ExtractionConfig(resize="bogus")


def test_batch_size_must_be_positive(lite0):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FeatureExtractor(backbone=lite0, batch_size=0)


# --------------------------------------------------------------------------- encode_maps


def test_encode_maps_top_classes_and_given_classes():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 2, 3, generator=gen)
    weight = torch.randn(5, 3, generator=gen)
    bias = torch.randn(5, generator=gen)
    logits = x.mean(dim=(2, 3)) @ weight.T + bias
    probs = torch.softmax(logits, dim=1)
    ids, p, cv = encode_maps(x, x, weight, bias, n_classes=2)
    order = torch.argsort(probs, dim=1, descending=True)[:, :2]
    assert torch.equal(ids, order)
    torch.testing.assert_close(p, torch.gather(probs, 1, order))
    assert cv.shape == (2, 2, 3)
    # Given (shared) classes: their probabilities, in the given order.
    ids2, p2, cv2 = encode_maps(x, x, weight, bias, n_classes=2, class_ids=torch.tensor([4, 0]))
    assert ids2.tolist() == [[4, 0], [4, 0]]
    torch.testing.assert_close(p2, probs[:, [4, 0]])
    # Class vector of image 0, class 4, by loops.
    cam = sum(float(weight[4, k]) * x[0, k] for k in range(3))
    cam = (cam / cam.max()).clamp(min=0) if cam.max() > 0 else torch.zeros_like(cam)
    cw = crow_channel_weights(x)[0]
    ref = torch.stack([cw[k] * (x[0, k] * cam).sum() for k in range(3)])
    torch.testing.assert_close(cv2[0, 0], ref, atol=1e-5, rtol=0)


def test_crop_cells_by_hand():
    t = torch.arange(24.0).reshape(1, 1, 4, 6)
    out = crop_cells(t, (1, 2, 4, 4))  # x1, y1, x2, y2
    assert out.tolist() == [[[[13.0, 14.0, 15.0], [19.0, 20.0, 21.0]]]]


# --------------------------------------------------------------------------- images


def test_equal_images_give_identical_records(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=8), backbone=lite0)
    img = _image(96, 64, seed=1)
    a, b = extractor.extract_images([img, img.copy()])
    _assert_same_record(a, b)
    assert a.class_ids.dtype == np.int16 and len(a.class_ids) == 8
    assert a.class_vectors.shape == (8, 1280) and a.class_vectors.dtype == np.float32
    assert a.sum_pooled.shape == (1280,)
    assert a.boxes.shape == (len(BOX_THRESHOLDS), 4)
    assert a.grid == (2, 3) and a.input_size == (96, 64) and a.image_size == (96, 64)
    assert a.maps is None
    assert (np.diff(a.class_probs) <= 0).all()


def test_record_matches_a_direct_forward_pass(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(64, 96, seed=2)
    rec = extractor.extract_images([img])[0]
    out = lite0.forward(to_tensor([img], lite0.mean, lite0.std))
    top = torch.topk(out.probs[0], 4)
    assert rec.class_ids.tolist() == top.indices.tolist()
    np.testing.assert_allclose(rec.class_probs, top.values.numpy(), atol=1e-6)
    np.testing.assert_allclose(rec.sum_pooled, out.features[0].sum(dim=(1, 2)).numpy(), rtol=1e-5)


def test_batching_does_not_change_records(lite0):
    images = [_image(64, 64, seed=s) for s in range(4)]
    config = ExtractionConfig(stored_classes=8)
    one = FeatureExtractor(config, backbone=lite0, batch_size=1)
    four = FeatureExtractor(config, backbone=lite0, batch_size=4)
    a, b = one.extract_images(images), four.extract_images(images)
    assert one.stats.batches == 4 and four.stats.batches == 1
    assert one.stats.images == four.stats.images == 4
    for ra, rb in zip(a, b, strict=True):
        _assert_close_record(ra, rb)
    # The four images differ, so their records do.
    assert not np.allclose(a[0].class_vectors, a[1].class_vectors)


def test_mixed_sizes_keep_input_order(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0, batch_size=8)
    images = [_image(64, 64, 3), _image(96, 64, 4), _image(64, 64, 5)]
    together = extractor.extract_images(images)
    assert extractor.stats.batches == 2  # one per size
    for img, rec in zip(images, together, strict=True):
        alone = extractor.extract_images([img])[0]
        _assert_close_record(rec, alone)


def test_boxes_are_in_original_image_pixels(lite0):
    # 128×96 image resized to 64×64: a 2×2 grid, so cells are 64 × 48 original pixels.
    extractor = FeatureExtractor(ExtractionConfig(resize="fixed:64x64"), backbone=lite0)
    rec = extractor.extract_images([_image(128, 96, 6)])[0]
    assert rec.grid == (2, 2) and rec.input_size == (64, 64) and rec.image_size == (128, 96)
    boxes = rec.boxes[~np.isnan(rec.boxes).any(axis=1)]
    assert len(boxes) > 0
    np.testing.assert_array_equal(boxes[:, [0, 2]] % 64, 0)
    np.testing.assert_array_equal(boxes[:, [1, 3]] % 48, 0)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes[:, [0, 2]].max() <= 128 and boxes[:, [1, 3]].max() <= 96


def test_image_smaller_than_stride_raises_naming_the_size(lite0, tmp_path):
    extractor = FeatureExtractor(backbone=lite0)
    with pytest.raises(ValueError, match=r"40×16 px is smaller than the network stride \(32 px\)"):
        extractor.extract_images([_image(40, 16, 7)])
    path = tmp_path / "tiny.png"
    _image(16, 40, 8).save(path)
    with pytest.raises(ImageLoadError, match=r"tiny\.png.*16×40"):
        extractor.load(path)


def test_keep_maps_stores_float16_maps(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0, keep_maps=True)
    img = _image(96, 64, 9)
    rec = extractor.extract_images([img])[0]
    maps = rec.maps
    assert isinstance(maps, FeatureMaps)
    assert maps.features.dtype == np.float16
    assert maps.features.shape == (1280, 2, 3)
    assert maps.cam_maps is None  # A is X for the default layer
    assert maps.input_size == (96, 64) and maps.image_size == (96, 64)
    assert maps.nbytes == 1280 * 6 * 2
    out = lite0.forward(to_tensor([img], lite0.mean, lite0.std))
    np.testing.assert_array_equal(maps.features, out.features[0].numpy().astype(np.float16))
    x, a = maps.tensors()
    assert x.dtype == torch.float32 and x.shape == (1, 1280, 2, 3)
    assert a is x


def test_keep_maps_resamples_a_onto_x_grid():
    # ResNet-50 with X = layer3 (stride 16) and A = layer4 (stride 32).
    bb = load_backbone("resnet50", layer="layer3", weights="random")
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=3), backbone=bb, keep_maps=True)
    rec = extractor.extract_images([_image(64, 64, 10)])[0]
    assert rec.grid == (4, 4)
    assert rec.maps.features.shape == (1024, 4, 4)
    assert rec.maps.cam_maps is not None
    assert rec.maps.cam_maps.shape == (2048, 4, 4) and rec.maps.cam_maps.dtype == np.float16
    assert rec.class_vectors.shape == (3, 1024)
    x, a = rec.maps.tensors()
    assert x.shape == (1, 1024, 4, 4) and a.shape == (1, 2048, 4, 4)


# --------------------------------------------------------------------------- files


def test_extract_files_yields_errors_and_records(lite0, tmp_path):
    images = {f"img{i}": _image(64, 64 + 32 * (i % 2), 20 + i) for i in range(3)}
    items = []
    for key, img in images.items():
        path = tmp_path / f"{key}.png"
        img.save(path)
        items.append((key, path))
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    items.insert(1, ("bad", bad))

    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0, batch_size=2)
    results = dict(extractor.extract_files(items, workers=2, on_error="yield"))
    assert set(results) == {"img0", "img1", "img2", "bad"}
    assert isinstance(results["bad"], ImageLoadError)
    assert "corrupt.jpg" in str(results["bad"])
    assert extractor.stats.failed == 1
    assert extractor.stats.errors[0][0] == "bad"
    reference = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    for key, img in images.items():
        assert isinstance(results[key], ImageFeatures)
        _assert_close_record(results[key], reference.extract_images([img])[0])


def test_extract_files_raise_names_the_file(lite0, tmp_path):
    good = tmp_path / "good.png"
    _image(64, 64, 30).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    extractor = FeatureExtractor(backbone=lite0)
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        list(extractor.extract_files([("g", good), ("b", bad)], on_error="raise"))


# --------------------------------------------------------------------------- memory bounds


def test_default_resize_caps_the_long_side_at_1024():
    assert ExtractionConfig().resize == "max:1024"
    assert ExtractionConfig().resize_policy.target_size(4000, 3000) == (1024, 768)
    # A new default policy is new stored features (the demo's are recomputed, identical).
    assert ExtractionConfig().code_version() != ExtractionConfig(resize="native").code_version()


def test_a_policy_that_keeps_the_size_gives_bit_identical_features(lite0, tmp_path):
    # The demo's images (<= 320 px) are within the 1024 cap: the default policy reads them
    # exactly as `native` did, so their features are bit for bit the same.
    items = []
    for i, size in enumerate([(320, 240), (240, 320), (320, 240), (300, 200)]):
        path = tmp_path / f"d{i}.jpg"
        _image(*size, seed=60 + i).save(path, quality=90)
        items.append((f"d{i}", path))
    capped = FeatureExtractor(ExtractionConfig(stored_classes=8), backbone=lite0, batch_size=2)
    native = FeatureExtractor(
        ExtractionConfig(stored_classes=8, resize="native"), backbone=lite0, batch_size=2
    )
    a = dict(capped.extract_files(items, workers=1))
    b = dict(native.extract_files(items, workers=1))
    assert set(a) == set(b) == {key for key, _ in items}
    for key in a:
        _assert_same_record(a[key], b[key])


def test_batches_are_formed_by_a_pixel_budget(lite0, tmp_path):
    items = []
    for i in range(7):
        path = tmp_path / f"p{i}.png"
        _image(64, 64, seed=70 + i).save(path)
        items.append((f"p{i}", path))
    extractor = FeatureExtractor(
        ExtractionConfig(stored_classes=4), backbone=lite0, batch_size=16, batch_pixels=3 * 64 * 64
    )
    assert extractor.batch_capacity((64, 64)) == 3
    assert extractor.batch_capacity((640, 640)) == 1  # at least one
    batches = list(extractor.extract_batches(items, workers=1))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(k for b in batches for k, _ in b) == sorted(k for k, _ in items)
    # In-memory images are batched the same way.
    extractor.stats.batches = 0
    extractor.extract_images([_image(64, 64, seed=70 + i) for i in range(7)])
    assert extractor.stats.batches == 3
    assert FeatureExtractor(backbone=lite0).batch_pixels == DEFAULT_BATCH_PIXELS
    with pytest.raises(ValueError, match="batch_pixels must be >= 1"):
        FeatureExtractor(backbone=lite0, batch_pixels=0)


def test_cpu_batches_are_grouped_up_to_the_target_pixels(lite0, tmp_path):
    # On the CPU, batches of ~1 Mpx are as fast as larger ones with a third of the memory
    # (core/extract/config.py); a larger image still runs alone, up to batch_pixels.
    default = FeatureExtractor(backbone=lite0)
    assert default.batch_target_pixels == CPU_BATCH_TARGET_PIXELS
    assert default.batch_capacity((320, 240)) == CPU_BATCH_TARGET_PIXELS // (320 * 240) == 13
    assert default.batch_capacity((640, 480)) == 3
    assert default.batch_capacity((2048, 2048)) == 1
    items = []
    for i in range(7):
        path = tmp_path / f"t{i}.png"
        _image(64, 64, seed=90 + i).save(path)
        items.append((f"t{i}", path))
    config = ExtractionConfig(stored_classes=4)
    targeted = FeatureExtractor(config, backbone=lite0, batch_target_pixels=2 * 64 * 64)
    batches = list(targeted.extract_batches(items, workers=1))
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    one_batch = dict(
        FeatureExtractor(config, backbone=lite0, batch_target_pixels=10**6).extract_files(items)
    )
    for key, rec in (kv for b in batches for kv in b):
        _assert_close_record(rec, one_batch[key])
    # Never above the budget of one forward pass; must be positive.
    assert (
        FeatureExtractor(
            backbone=lite0, batch_pixels=1000, batch_target_pixels=10**6
        ).batch_target_pixels
        == 1000
    )
    with pytest.raises(ValueError, match="batch_target_pixels must be >= 1"):
        FeatureExtractor(backbone=lite0, batch_target_pixels=0)
    assert RuntimeConfig(batch_target_pixels=4096).batch_target_pixels == 4096


def test_images_waiting_for_a_batch_stay_within_the_pixel_budget(lite0, tmp_path):
    # Six sizes, twice each: without a bound, every half-full batch would wait for the end
    # of the input (all 12 images decoded at once).
    sizes = [(64, 64), (64, 96), (96, 64), (96, 96), (64, 128), (128, 64)] * 2
    items = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"m{i:02d}.png"
        _image(*size, seed=80 + i).save(path)
        items.append((f"m{i:02d}", path))
    budget = 20_000
    extractor = FeatureExtractor(
        ExtractionConfig(stored_classes=4, resize="native"),
        backbone=lite0,
        batch_size=16,
        batch_pixels=budget,
    )
    loaded: list[int] = []
    encoded: list[int] = []
    waiting: list[int] = []
    load, encode = extractor.load, extractor.encode_batch

    def spy_load(path):
        out = load(path)
        loaded.append(out[0].width * out[0].height)
        return out

    def spy_encode(images, sizes):
        waiting.append(sum(loaded) - sum(encoded))
        encoded.extend(im.width * im.height for im in images)
        assert sum(im.width * im.height for im in images) <= budget
        return encode(images, sizes)

    extractor.load, extractor.encode_batch = spy_load, spy_encode
    results = dict(extractor.extract_files(items, workers=1))
    assert len(results) == 12 and sum(encoded) == sum(w * h for w, h in sizes)
    # Decoded but not yet encoded: at most the budget, plus the image that crossed it, plus
    # the 2 images decoded ahead (2 * workers; native has no per-image bound).
    assert max(waiting) <= budget + 3 * 128 * 64 < sum(w * h for w, h in sizes)
    reference = FeatureExtractor(
        ExtractionConfig(stored_classes=4, resize="native"), backbone=lite0
    )
    for (key, _), size in zip(items, sizes, strict=True):
        assert results[key].input_size == size
    _assert_close_record(results["m03"], reference.extract_images([_image(96, 96, seed=83)])[0])


def test_an_image_over_the_pixel_budget_is_refused_naming_file_size_and_budget(lite0, tmp_path):
    big = tmp_path / "big scan.png"
    _image(256, 128, seed=90).save(big)
    ok = tmp_path / "ok.png"
    _image(64, 64, seed=91).save(ok)
    native = FeatureExtractor(
        ExtractionConfig(stored_classes=4, resize="native"), backbone=lite0, batch_pixels=100 * 100
    )
    results = dict(native.extract_files([("big", big), ("ok", ok)], on_error="yield"))
    err = results["big"]
    assert isinstance(err, ImageLoadError)
    msg = str(err)
    assert "big scan.png" in msg and "256x128" in msg and "32768 px" in msg
    assert "10000 px, batch_pixels" in msg
    assert isinstance(results["ok"], ImageFeatures)
    with pytest.raises(ValueError, match=r"256×128 = 32768 px .*\(10000 px, batch_pixels\)"):
        native.extract_images([_image(256, 128, seed=90)])
    # Capping the long side makes it fit.
    capped = FeatureExtractor(
        ExtractionConfig(stored_classes=4, resize="max:128"), backbone=lite0, batch_pixels=100 * 100
    )
    rec = dict(capped.extract_files([("big", big)]))["big"]
    assert rec.input_size == (128, 64) and rec.image_size == (256, 128)


# --------------------------------------------------------------------------- queries


def test_extract_query_without_box_is_the_whole_image(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(64, 96, 40)
    _assert_same_record(extractor.extract_query(img), extractor.extract_images([img])[0])


def test_extract_query_crop_protocol(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(160, 128, 41)
    box = (32, 16, 128, 112)
    rec = extractor.extract_query(img, box, protocol="crop")
    crop = extractor.extract_images([img.crop(box)])[0]  # PIL's crop, 96×96
    np.testing.assert_array_equal(rec.class_ids, crop.class_ids)
    np.testing.assert_allclose(rec.class_vectors, crop.class_vectors, atol=1e-6)
    assert rec.grid == (3, 3)
    assert rec.image_size == (160, 128)
    # Boxes in the full image's coordinates: the crop's boxes shifted by the box origin.
    np.testing.assert_array_equal(rec.boxes, crop.boxes + np.array([32, 16, 32, 16]))


def test_extract_query_crop_protocol_box_origin_is_the_crop_origin(lite0):
    # A box with fractional / outside coordinates is clipped and widened to whole pixels by
    # crop_box: the boxes must be shifted by the pixel origin of the actual crop.
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(160, 128, 42)
    for box, origin, pixels in [
        ((32.5, 16.25, 128.0, 112.0), (32, 16), (32, 16, 128, 112)),
        ((-10.0, -20.0, 96.0, 64.0), (0, 0), (0, 0, 96, 64)),
    ]:
        rec = extractor.extract_query(img, box, protocol="crop")
        crop = extractor.extract_images([img.crop(pixels)])[0]
        np.testing.assert_allclose(rec.class_vectors, crop.class_vectors, atol=1e-6)
        shift = np.array([origin[0], origin[1], origin[0], origin[1]], dtype=np.float32)
        np.testing.assert_array_equal(rec.boxes, crop.boxes + shift)
        valid = rec.boxes[~np.isnan(rec.boxes).any(axis=1)]
        assert len(valid) > 0
        assert (valid >= 0).all()


def test_extract_query_paper_protocol(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(128, 96, 43)  # 4×3 grid of 32-px cells
    box = (32, 32, 96, 96)  # cells x 1..3, y 1..3
    rec = extractor.extract_query(img, box, protocol="paper")
    out = lite0.forward(to_tensor([img], lite0.mean, lite0.std))
    x = out.features[..., 1:3, 1:3]
    ids, probs, cv = encode_maps(x, x, lite0.classifier_weight, lite0.classifier_bias, n_classes=4)
    np.testing.assert_allclose(rec.class_probs, probs[0].numpy(), atol=1e-6)
    # The region's classes come from the region's pooled A.
    region_probs = torch.softmax(
        x.mean(dim=(2, 3)) @ lite0.classifier_weight.T + lite0.classifier_bias, dim=1
    )
    assert rec.class_ids.tolist() == torch.topk(region_probs[0], 4).indices.tolist()
    assert rec.class_ids.tolist() == ids[0].tolist()
    np.testing.assert_allclose(rec.class_vectors, cv[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(rec.sum_pooled, x[0].sum(dim=(1, 2)).numpy(), rtol=1e-5)
    assert rec.grid == (2, 2)
    assert rec.input_size == (128, 96) and rec.image_size == (128, 96)
    assert rec.boxes.shape == (len(BOX_THRESHOLDS), 4)
    valid = rec.boxes[~np.isnan(rec.boxes).any(axis=1)]
    assert len(valid) > 0
    np.testing.assert_array_equal(valid % 32, 0)  # whole cells of the full image


def test_extract_query_paper_protocol_uses_configured_thresholds(lite0):
    config = ExtractionConfig(stored_classes=4, thresholds=(0.1, 0.5))
    extractor = FeatureExtractor(config, backbone=lite0)
    img = _image(128, 96, 44)
    paper = extractor.extract_query(img, (32, 32, 96, 96), protocol="paper")
    assert paper.boxes.shape == (2, 4)
    crop = extractor.extract_query(img, (32, 32, 96, 96), protocol="crop")
    assert crop.boxes.shape == (2, 4)


def test_extract_query_errors(lite0):
    extractor = FeatureExtractor(backbone=lite0)
    img = _image(64, 64, 45)
    with pytest.raises(ValueError, match="unknown query protocol 'bogus'"):
        extractor.extract_query(img, (0, 0, 32, 32), protocol="bogus")
    with pytest.raises(ValueError, match="zero area"):
        extractor.extract_query(img, (100, 100, 200, 200), protocol="paper")
    with pytest.raises(ValueError, match="smaller than the network stride"):
        extractor.extract_query(img, (0, 0, 16, 16), protocol="crop")


def test_encode_region_with_given_classes(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(96, 96, 46)
    out = lite0.forward(to_tensor([img], lite0.mean, lite0.std))
    x = out.features
    rec = extractor.encode_region(x, x, cells=(0, 1, 2, 3), class_ids=np.array([698, 1]))
    assert rec.class_ids.tolist() == [698, 1]
    assert rec.grid == (2, 2)
    _, p, cv = encode_maps(
        x[..., 1:3, 0:2],
        x[..., 1:3, 0:2],
        lite0.classifier_weight,
        lite0.classifier_bias,
        n_classes=2,
        class_ids=torch.tensor([698, 1]),
    )
    np.testing.assert_allclose(rec.class_vectors, cv[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(rec.class_probs, p[0].numpy(), atol=1e-7)


def test_extract_with_maps_keeps_them_once_and_restores_the_setting(lite0):
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=4), backbone=lite0)
    img = _image(96, 64, 10)
    rec = extractor.extract_with_maps(img)
    assert rec.maps is not None and rec.maps.features.shape == (1280, 2, 3)
    assert extractor.keep_maps is False
    plain = extractor.extract_images([img])[0]
    assert plain.maps is None
    np.testing.assert_array_equal(rec.class_vectors, plain.class_vectors)
