"""Tests for cw_pipeline.core.images (all images are generated in tmp_path)."""

from __future__ import annotations

import io
import os
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cw_pipeline.core.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    ResizePolicy,
    center_crop,
    crop_box,
    image_size,
    load_image,
    load_resized,
    open_regular_file,
    resize,
    scale_box,
    to_rgb,
    to_tensor,
)
from cw_pipeline.core.images import loading as loading_module
from cw_pipeline_tests.badfiles import FifoWatch, fifo, unix_socket

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)  # noise so the JPEG is not trivially small
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    """40x20 grey JPEG with a red 8x8 block in the stored top-left corner."""
    img = Image.new("RGB", (40, 20), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, path, format="JPEG", quality=95, exif=exif)


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def _is_red(pixel: tuple[int, ...]) -> bool:
    r, g, b = pixel[:3]
    return r > 200 and g < 60 and b < 60


# --------------------------------------------------------------------------------------
# load_image: failures
# --------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageLoadError, match="decoding failed") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="unrecognised or unsupported") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_image(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        image_size(path)


def test_directory_is_image_load_error(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"not a regular file \(folder\)"):
        load_image(tmp_path)


def test_image_load_error_is_value_error_and_picklable(tmp_path: Path) -> None:
    err = ImageLoadError(tmp_path / "x.jpg", "broken")
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err)
    assert clone.reason == "broken"


def test_over_pixel_limit_rejected_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Valid PNG header announcing 3000x3000 pixels, pixel data cut off.
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")
    path = tmp_path / "bomb.png"
    path.write_bytes(buf.getvalue()[:100])
    global_limit = Image.MAX_IMAGE_PIXELS

    with pytest.raises(ImageLoadError, match=r"3000x3000 = 9000000 pixels") as info:
        load_image(path, max_pixels=1_000_000)
    assert str(path) in str(info.value)
    assert "limit of 1000000" in str(info.value)

    # Without the limit the same file fails in decoding, so the check ran before it.
    with pytest.raises(ImageLoadError, match="decoding failed"):
        load_image(path, max_pixels=None)

    # And the decoder is never invoked for over-limit images.
    def _no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("decoded despite the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decode)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path, max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == global_limit == DEFAULT_MAX_PIXELS


def test_pixel_limit_is_inclusive(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (10, 10)), tmp_path / "a.png")
    assert load_image(path, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageLoadError):
        load_image(path, max_pixels=99)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_unicode_and_spaces_in_file_name(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (5, 4), (1, 2, 3)), tmp_path / "façade été 東京 1.png")
    img = load_image(good)
    assert img.size == (5, 4)
    assert image_size(good) == (5, 4)

    bad = tmp_path / "Notre Dame – vue ñ 東京.jpg"
    bad.write_bytes(b"GIF89a nonsense")
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    assert "Notre Dame – vue ñ 東京.jpg" in str(info.value)
    missing = tmp_path / "不存在 file.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)


# --------------------------------------------------------------------------------------
# load_image: mode conversion
# --------------------------------------------------------------------------------------


def test_png_alpha_composited_over_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    out = load_image(_save(img, tmp_path / "alpha.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 20, 30)
    half = out.getpixel((2, 0))
    assert all(abs(c - 127) <= 1 for c in half)


def test_la_and_palette_transparency_over_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    out = load_image(_save(la, tmp_path / "la.png"))
    assert _pixels(out) == [(255, 255, 255), (40, 40, 40)]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putdata([0, 1])
    out = load_image(_save(pal, tmp_path / "p.gif", transparency=0))
    assert _pixels(out) == [(255, 255, 255), (200, 10, 10)]


def test_grayscale(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (4, 3), 77), tmp_path / "grey.png"))
    assert out.mode == "RGB"
    assert out.size == (4, 3)
    assert out.getpixel((2, 1)) == (77, 77, 77)


def test_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    out = load_image(_save(img, tmp_path / "bw.png"))
    assert _pixels(out) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # C=0, M=128, Y=255, K=64  ->  R=255*(1-0)*(1-64/255)=191, G=(127)*(191)/255=95, B=0
    path = _save(Image.new("CMYK", (16, 16), (0, 128, 255, 64)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert abs(r - 191) <= 4
    assert abs(g - 95) <= 4
    assert b <= 4


def test_16bit_png(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535, 255, 256]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 128, 255, 0, 1]
    assert (out[..., 0] == out[..., 1]).all()
    assert (out[..., 0] == out[..., 2]).all()


def test_to_rgb_int32_and_float_modes() -> None:
    i32 = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 128, 255, 255, 0]

    f32 = Image.fromarray(np.array([[0.0, 127.6, 300.0, -3.0, np.nan]], dtype=np.float32))
    assert f32.mode == "F"
    assert np.asarray(to_rgb(f32))[0, :, 0].tolist() == [0, 128, 255, 0, 0]

    big_endian = Image.frombytes("I;16B", (2, 1), bytes([0x80, 0x00, 0xFF, 0xFF]))
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [128, 255]

    rgb = Image.new("RGB", (1, 1))
    assert to_rgb(rgb) is rgb


def test_exif_rotated_photo(tmp_path: Path) -> None:
    path = _oriented_jpeg(tmp_path / "rot6.jpg", 6)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    out = load_image(path)
    # Orientation 6 = rotate 90° clockwise for display: stored top-left -> top-right.
    assert out.size == (20, 40)
    assert image_size(path) == (20, 40)
    assert _is_red(out.getpixel((17, 2)))
    assert not _is_red(out.getpixel((2, 2)))
    assert not _is_red(out.getpixel((17, 37)))
    # The orientation tag is consumed: re-applying it downstream is a no-op.
    assert out.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize(
    ("orientation", "size", "marker"),
    [
        (1, (40, 20), (2, 2)),
        (3, (40, 20), (37, 17)),
        (8, (20, 40), (2, 37)),
    ],
)
def test_other_orientations(
    tmp_path: Path, orientation: int, size: tuple[int, int], marker: tuple[int, int]
) -> None:
    path = _oriented_jpeg(tmp_path / f"rot{orientation}.jpg", orientation)
    out = load_image(path)
    assert out.size == size == image_size(path)
    assert _is_red(out.getpixel(marker))


def test_image_size_reads_header_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    png = _save(Image.new("RGB", (40, 20)), tmp_path / "rot.png", exif=exif)
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[:100])

    def _no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("image_size decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decode)
    assert image_size(png) == (20, 40)
    assert image_size(cut) == (3000, 2000)


def test_image_size_errors(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(b"junk")
    with pytest.raises(ImageLoadError, match=re.escape(str(path))):
        image_size(path)


def test_loaded_image_is_usable_after_file_closed(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    path.write_bytes(_jpeg_bytes((32, 24)))
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.asarray(img).shape == (24, 32, 3)
    path.unlink()
    assert img.copy().size == (32, 24)


# --------------------------------------------------------------------------------------
# ResizePolicy
# --------------------------------------------------------------------------------------


def test_paper_upscale_only_when_allowed() -> None:
    up = ResizePolicy("paper", min_side=720, max_side=None, upscale=True)
    assert up.target_size(1000, 500) == (1440, 720)
    keep = ResizePolicy("paper", min_side=720, max_side=None)
    assert keep.target_size(1000, 500) == (1000, 500)
    # Default cap 1024 still implies enlarging 1000 -> 1024: native without upscale.
    assert ResizePolicy("paper").target_size(1000, 500) == (1000, 500)
    assert ResizePolicy("paper", upscale=True).target_size(1000, 500) == (1024, 512)


def test_paper_downscale_with_max_side() -> None:
    policy = ResizePolicy("paper", min_side=720, max_side=1024)
    assert policy.target_size(2000, 1000) == (1024, 512)
    assert policy.target_size(1000, 2000) == (512, 1024)
    # min_side governs when the cap is not hit.
    assert policy.target_size(1200, 1000) == (864, 720)
    # Extreme aspect ratios never produce a side below 1.
    assert policy.target_size(100_000, 2) == (1024, 1)


def test_native_mode() -> None:
    assert ResizePolicy().target_size(4000, 3) == (4000, 3)
    img = Image.new("RGB", (30, 20))
    assert resize(img, ResizePolicy()) is img


def test_fixed_mode() -> None:
    policy = ResizePolicy("fixed", size=(224, 160))
    assert policy.target_size(1000, 500) == (224, 160)
    assert policy.target_size(10, 5) == (224, 160)  # fixed sizes are explicit
    out = resize(Image.new("RGB", (1000, 500), (9, 9, 9)), policy)
    assert out.size == (224, 160)
    assert out.getpixel((100, 80)) == (9, 9, 9)


def test_paper_fixed_orientation() -> None:
    policy = ResizePolicy("paper_fixed")
    assert policy.target_size(1600, 900) == (1024, 720)
    assert policy.target_size(300, 900) == (720, 1024)
    assert policy.target_size(500, 500) == (1024, 720)  # square counts as landscape


def test_resize_returns_same_object_when_unchanged_and_uses_target() -> None:
    img = Image.new("RGB", (600, 400))
    assert resize(img, ResizePolicy("paper")) is img  # would upscale -> native
    big = Image.new("RGB", (4000, 2000), (50, 100, 150))
    out = resize(big, ResizePolicy("paper"))  # >= 2x shrink: LANCZOS path
    assert out.size == (1024, 512)
    assert out.getpixel((500, 250)) == (50, 100, 150)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("native", ResizePolicy()),
        ("paper", ResizePolicy("paper")),
        ("paper:720", ResizePolicy("paper", min_side=720)),
        ("paper:800:1333", ResizePolicy("paper", min_side=800, max_side=1333)),
        ("paper:720:none", ResizePolicy("paper", max_side=None)),
        ("paper:720:1024:upscale", ResizePolicy("paper", upscale=True)),
        (" Paper:600 ", ResizePolicy("paper", min_side=600)),
        ("fixed:224x224", ResizePolicy("fixed", size=(224, 224))),
        ("fixed:300x200", ResizePolicy("fixed", size=(300, 200))),
        ("fixed:256", ResizePolicy("fixed", size=(256, 256))),
        ("paper_fixed", ResizePolicy("paper_fixed")),
        ("paper_fixed:600:800", ResizePolicy("paper_fixed", min_side=600, max_side=800)),
        ("paper-min720-nomax-upscale", ResizePolicy("paper", max_side=None, upscale=True)),
        ("max", ResizePolicy("max")),
        ("max:1024", ResizePolicy("max")),
        ("MAX:1600", ResizePolicy("max", max_side=1600)),
        ("max-800", ResizePolicy("max", max_side=800)),
    ],
)
def test_parse(text: str, expected: ResizePolicy) -> None:
    assert ResizePolicy.parse(text) == expected


@pytest.mark.parametrize(
    "policy",
    [
        ResizePolicy(),
        ResizePolicy("paper"),
        ResizePolicy("paper", min_side=512, max_side=None),
        ResizePolicy("paper", min_side=800, max_side=1333, upscale=True),
        ResizePolicy("fixed", size=(224, 160)),
        ResizePolicy("paper_fixed"),
        ResizePolicy("paper_fixed", min_side=600, max_side=900),
        ResizePolicy("max"),
        ResizePolicy("max", max_side=1600),
    ],
)
def test_parse_describe_round_trip(policy: ResizePolicy) -> None:
    text = policy.describe()
    assert ResizePolicy.parse(text) == policy
    assert ResizePolicy.parse(text).describe() == text
    assert hash(ResizePolicy.parse(text)) == hash(policy)


def test_describe_strings() -> None:
    assert ResizePolicy().describe() == "native"
    assert ResizePolicy("paper").describe() == "paper-min720-max1024"
    assert ResizePolicy("paper", max_side=None, upscale=True).describe() == (
        "paper-min720-nomax-upscale"
    )
    assert ResizePolicy("fixed", size=(224, 224)).describe() == "fixed-224x224"
    assert ResizePolicy("paper_fixed").describe() == "paper_fixed-min720-max1024"
    # Irrelevant fields do not leak into the cache key.
    assert ResizePolicy("native", min_side=5, upscale=True).describe() == "native"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bogus",
        "native:3",
        "paper:abc",
        "paper:720:1024:900",
        "paper:-5",
        "paper:0",
        "fixed",
        "fixed:",
        "fixed:0x5",
        "fixed:224x",
        "fixed:224x224:upscale",
        "paper_fixed:720:none",
        "paper_fixed:1024:720",
        "paper-min720-min800",
        "paper-wide",
        "max:0",
        "max:abc",
        "max:1024:768",
        "max:none",
    ],
)
def test_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="invalid resize policy") as info:
        ResizePolicy.parse(text)
    assert repr(text) in str(info.value)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="requires size"):
        ResizePolicy("fixed")
    with pytest.raises(ValueError, match="only used by mode 'fixed'"):
        ResizePolicy("paper", size=(10, 10))
    with pytest.raises(ValueError, match="unknown resize mode"):
        ResizePolicy("square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_side"):
        ResizePolicy("paper", min_side=0)
    with pytest.raises(ValueError, match="positive"):
        ResizePolicy().target_size(0, 10)


def test_max_policy_caps_the_long_side_and_never_enlarges() -> None:
    policy = ResizePolicy.parse("max:1024")
    assert policy.describe() == "max-1024"
    assert policy.target_size(4000, 3000) == (1024, 768)
    assert policy.target_size(3000, 4000) == (768, 1024)
    assert policy.target_size(9400, 9400) == (1024, 1024)
    assert policy.target_size(100_000, 2) == (1024, 1)
    # Within the cap (the demo's 320 px, the cap itself): the size is kept.
    assert policy.target_size(320, 240) == (320, 240)
    assert policy.target_size(1024, 10) == (1024, 10)
    img = Image.new("RGB", (320, 240))
    assert resize(img, policy) is img
    with pytest.raises(ValueError, match="requires max_side"):
        ResizePolicy("max", max_side=None)


def test_max_output_pixels_bounds_every_output() -> None:
    assert ResizePolicy.parse("max:1024").max_output_pixels() == 1024 * 1024
    assert ResizePolicy.parse("paper:720:1024").max_output_pixels() == 1024 * 1024
    assert ResizePolicy.parse("fixed:224x160").max_output_pixels() == 224 * 160
    assert ResizePolicy.parse("paper_fixed").max_output_pixels() == 1024 * 720
    assert ResizePolicy.parse("native").max_output_pixels() is None
    assert ResizePolicy.parse("paper:720:none").max_output_pixels() is None
    for text in ("max:1024", "paper:720:1024", "paper:720:1024:upscale"):
        policy = ResizePolicy.parse(text)
        for size in [(9400, 9400), (100, 5000), (700, 500), (50_000, 3), (1023, 1025)]:
            w, h = policy.target_size(*size)
            assert w * h <= policy.max_output_pixels()


# --------------------------------------------------------------------------------------
# load_resized
# --------------------------------------------------------------------------------------


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour noise: blocks of random colour, upsampled."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, size[1] // 32), max(2, size[0] // 32), 3))
    return Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "RGBA", "I;16", "CMYK"])
@pytest.mark.parametrize("policy", ["native", "max:1024", "paper:720:1024"])
def test_load_resized_keeps_images_within_the_policy_bit_identical(
    tmp_path: Path, mode: str, policy: str
) -> None:
    base = _noise((320, 240))
    img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out, original = load_resized(path, ResizePolicy.parse(policy))
    assert original == (320, 240) and out.size == (320, 240) and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(load_image(path)))


@pytest.mark.parametrize("mode", ["1", "L"])
def test_load_resized_shrinks_grey_images_before_rgb_bit_identically(
    tmp_path: Path, mode: str
) -> None:
    # 1-bit and greyscale images are resized as one channel, then made RGB: R = G = B and
    # Pillow resamples per channel, so this equals resizing the full-size RGB image.
    img = _noise((2100, 1500), seed=1).convert(mode)
    path = _save(img, tmp_path / "grey.png")
    for text in ("max:1024", "max:700", "paper:720:1024", "fixed:300x200"):
        policy = ResizePolicy.parse(text)
        out, original = load_resized(path, policy)
        assert original == (2100, 1500)
        want = resize(load_image(path), policy)
        assert out.mode == "RGB" and out.size == want.size
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("orientation", [1, 6])
def test_load_resized_decodes_a_large_jpeg_reduced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, orientation: int
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_noise((4000, 3000), seed=2), tmp_path / "big.jpg", quality=90, exif=exif)
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        out = real_load(self)
        decoded.append(self.size)
        return out

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    out, original = load_resized(path, ResizePolicy.parse("max:1024"))
    upright = (4000, 3000) if orientation == 1 else (3000, 4000)
    assert original == upright
    assert out.size == ResizePolicy.parse("max:1024").target_size(*upright)
    # libjpeg decoded it at 1/2 scale (the largest that stays >= the 1024x768 target): a
    # quarter of the pixels of the full image were ever decoded.
    assert decoded[0] == (2000, 1500)
    monkeypatch.undo()
    full = resize(load_image(path), ResizePolicy.parse("max:1024"))
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert diff.mean() < 1.0  # the same picture, to resampling differences


def test_load_resized_refuses_an_output_over_the_budget_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(_noise((900, 600)), tmp_path / "wide photo.png")

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError) as info:
        load_resized(path, ResizePolicy("native"), max_output_pixels=500_000)
    msg = str(info.value)
    assert "wide photo.png" in msg and "900x600" in msg and "540000 px" in msg
    assert "500000 px, batch_pixels" in msg and "'native'" in msg and "max:1024" in msg
    # The same file under a capping policy fits the budget.
    monkeypatch.undo()
    out, _ = load_resized(path, ResizePolicy.parse("max:800"), max_output_pixels=500_000)
    assert out.size == (800, 533)


# --------------------------------------------------------------------------------------
# crops and boxes
# --------------------------------------------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    xs = np.arange(width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    ys = np.arange(height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1))


def test_crop_box_inside_and_clipped() -> None:
    img = _gradient(100, 50)
    out = crop_box(img, (10, 5, 30, 25))
    assert out.size == (20, 20)
    assert out.getpixel((0, 0))[:2] == (10, 5)
    clipped = crop_box(img, (-20, -10, 40.0, 500))
    assert clipped.size == (40, 50)
    assert clipped.getpixel((0, 0))[:2] == (0, 0)


def test_crop_box_fractional_expands_to_whole_pixels() -> None:
    img = _gradient(100, 50)
    out = crop_box(img, (10.5, 5.2, 20.5, 9.8))
    assert out.size == (11, 5)  # x 10..21, y 5..10
    assert out.getpixel((0, 0))[:2] == (10, 5)
    assert crop_box(img, (3.2, 3.2, 3.4, 3.4)).size == (1, 1)
    assert crop_box(img, (0, 0, 10.0000000001, 5)).size == (10, 5)


@pytest.mark.parametrize(
    "box",
    [
        (200, 10, 300, 20),  # fully right of the image
        (-50, -50, -1, -1),  # fully above-left
        (100, 0, 120, 10),  # touches the right edge only
        (10, 10, 10, 20),  # zero width
    ],
)
def test_crop_box_zero_area_raises(box: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match="zero area") as info:
        crop_box(_gradient(100, 50), box)
    assert "100x50" in str(info.value)
    assert str(tuple(float(v) for v in box)) in str(info.value)


def test_crop_box_invalid_boxes() -> None:
    img = _gradient(100, 50)
    with pytest.raises(ValueError, match="inverted"):
        crop_box(img, (30, 5, 10, 25))
    with pytest.raises(ValueError, match="4 finite numbers"):
        crop_box(img, (0, 0, float("nan"), 5))
    with pytest.raises(ValueError, match="4 finite numbers"):
        crop_box(img, (0, 0, 5))


def test_scale_box() -> None:
    assert scale_box((10, 20, 30, 40), (100, 200), (50, 400)) == (5.0, 40.0, 15.0, 80.0)
    with pytest.raises(ValueError):
        scale_box((0, 0, 1, 1), (0, 10), (10, 10))


def test_center_crop() -> None:
    img = _gradient(300, 200)
    out = center_crop(img, 100)
    assert out.size == (100, 100)
    # Resized to 150x100, crop x in [25, 125): centre pixel maps back to x≈150, y≈100.
    r, g, _ = out.getpixel((50, 50))
    assert abs(r - 150) <= 3
    assert abs(g - 100) <= 3
    with pytest.raises(ValueError):
        center_crop(img, 0)


# --------------------------------------------------------------------------------------
# to_tensor
# --------------------------------------------------------------------------------------


def test_to_tensor_normalisation() -> None:
    black = Image.new("RGB", (4, 3), (0, 0, 0))
    white = Image.new("RGB", (4, 3), (255, 255, 255))
    out = to_tensor([black, white], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 3, 4)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.all(out[0] == -1.0)
    assert torch.all(out[1] == 1.0)


def test_to_tensor_channel_order_and_stats() -> None:
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    out = to_tensor([img], mean=(0.0, 0.0, 0.1), std=(1.0, 2.0, 0.5))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_to_tensor_unequal_sizes() -> None:
    imgs = [Image.new("RGB", (4, 3)), Image.new("RGB", (4, 3)), Image.new("RGB", (5, 3))]
    with pytest.raises(ValueError, match="same size") as info:
        to_tensor(imgs, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert "4x3" in str(info.value)
    assert "5x3 (first at index 2)" in str(info.value)


def test_to_tensor_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        to_tensor([], mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="mode 'L'"):
        to_tensor([Image.new("L", (2, 2))], mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="non-zero"):
        to_tensor([Image.new("RGB", (2, 2))], mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))


# --------------------------------------------------------------------------------------
# only regular files are opened
# --------------------------------------------------------------------------------------


def _special_files(folder: Path) -> dict[Path, str]:
    """A FIFO, a socket, links to both and a character device, with their kinds."""
    fifo_path = fifo(folder / "pipe.jpg")
    sock = unix_socket(folder / "sock.png")
    (folder / "pipe-link.jpg").symlink_to(fifo_path.name)
    (folder / "sock-link.jpg").symlink_to(sock.name)
    return {
        fifo_path: "FIFO",
        sock: "socket",
        folder / "pipe-link.jpg": "FIFO",
        folder / "sock-link.jpg": "socket",
        Path("/dev/null"): "character device",
        folder: "folder",
    }


def test_only_regular_files_are_opened(tmp_path: Path) -> None:
    specials = _special_files(tmp_path)
    with FifoWatch([tmp_path / "pipe.jpg"]) as watch:
        for path, kind in specials.items():
            message = rf"cannot load image '{re.escape(str(path))}': not a regular file \({kind}\)"
            for read in (load_image, image_size, open_regular_file):
                with pytest.raises(ImageLoadError, match=message):
                    read(path)
    assert watch.opened == []  # refused from stat, before any open
    with open_regular_file(_save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")) as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.jpg"))):
        open_regular_file(tmp_path / "gone.jpg")


def test_a_file_swapped_for_a_fifo_after_its_stat_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    pipe = fifo(tmp_path / "pipe.jpg")
    real_stat = os.stat
    # The stat sees a regular file; by the open the path is a FIFO.
    monkeypatch.setattr(
        loading_module.os,
        "stat",
        lambda p, *a, **k: real_stat(regular if p == pipe else p, *a, **k),
    )
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            open_regular_file(pipe)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # let the blocked reader go before failing
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    assert not worker.is_alive(), "opening the FIFO blocked"
    [exc] = outcome
    assert isinstance(exc, ImageLoadError) and "not a regular file (FIFO)" in str(exc)
