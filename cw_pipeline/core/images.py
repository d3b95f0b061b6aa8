"""Image loading and geometric preprocessing (pure: Pillow + numpy, torch for tensors).

Everything here is deterministic and free of global state: the Pillow decompression-bomb
limit and ``ImageFile.LOAD_TRUNCATED_IMAGES`` are never touched.

* :func:`load_image` decodes a file fully, applies EXIF orientation and returns an RGB image.
* :func:`load_resized` loads a file already resized by a policy, never holding more than the
  decoded file at once (JPEGs are reduced while decoding), refusing outputs over a pixel budget.
* :func:`image_size` reads (width, height) after EXIF orientation from the header only.
* :class:`ResizePolicy` / :func:`resize` implement the resizing schemes of the paper.
* :func:`center_crop`, :func:`crop_box`, :func:`scale_box` handle crops and query boxes.
* :func:`to_tensor` stacks equally sized RGB images into a normalised ``N×3×H×W`` tensor.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cw_pipeline.core.datasets.folder import file_kind

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ResizeMode",
    "ResizePolicy",
    "center_crop",
    "crop_box",
    "image_size",
    "load_image",
    "load_resized",
    "open_regular_file",
    "resize",
    "scale_box",
    "to_rgb",
    "to_tensor",
]

#: Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 89_478_485

PathLike = str | os.PathLike[str]
Box = tuple[float, float, float, float]
ResizeMode = Literal["paper", "native", "fixed", "paper_fixed", "max"]

_MODES: tuple[str, ...] = get_args(ResizeMode)
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_KEYED_MODES = frozenset({"1", "L", "P", "RGB"})  # may carry a transparency key
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Resized before the RGB conversion: R = G = B, and resampling works per channel, so the
# result is bit-identical to converting first, at a third of the memory.
_GREY_MODES = frozenset({"1", "L"})
# Downscaling by at least this factor switches from BICUBIC to LANCZOS + reducing_gap.
_BIG_DOWNSCALE = 2.0
_REDUCING_GAP = 3.0


class ImageLoadError(ValueError):
    """An image file exists but cannot be read, decoded or accepted.

    ``str(err)`` always names the file and the reason; both are also available as
    ``err.path`` and ``err.reason``. A *missing* file raises :class:`FileNotFoundError`
    instead (it is not a bad image, it is a bad path).
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(path, reason)  # keeps the exception picklable
        self.path = os.fsdecode(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image '{self.path}': {self.reason}"


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _not_regular(path: PathLike, mode: int) -> ImageLoadError:
    kind = file_kind(mode)
    return ImageLoadError(path, f"not a regular file ({kind}); only regular files are read")


def open_regular_file(path: PathLike) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (after symlinks).

    The type is checked with ``stat`` *before* the open, so a FIFO, device or socket is never
    opened (opening a FIFO blocks until a writer comes; opening a device may act on it), and
    again on the open descriptor (opened non-blocking), in case the file was swapped between.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ImageLoadError: not a regular file, or cannot be opened (names the file and kind).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "image file not found", os.fsdecode(path)) from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot stat file ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "image file not found", os.fsdecode(path)) from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open file ({exc.strerror or exc})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_file(path: PathLike) -> IO[bytes]:
    """Open ``path`` for binary reading, mapping OS errors to our exception types."""
    return open_regular_file(path)


def _open_image(path: PathLike, fh: IO[bytes]) -> Image.Image:
    """Parse the image header from ``fh`` (no pixel decoding)."""
    if os.fstat(fh.fileno()).st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        return Image.open(fh)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "unrecognised or unsupported image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"exceeds Pillow's hard pixel limit ({exc})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise a zoo of exception types
        raise ImageLoadError(path, f"invalid image header ({type(exc).__name__}: {exc})") from exc


def _orientation(img: Image.Image, *, header_only: bool) -> int:
    """EXIF (or XMP) orientation tag, 1 when absent or unreadable.

    With ``header_only`` the metadata is read without decoding pixels (for PNG, Pillow's
    own ``getexif`` would decode the image to look for an ``eXIf`` chunk after the data).
    """
    try:
        exif = Image.Image.getexif(img) if header_only else img.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # malformed EXIF is treated as "no orientation"
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(img: Image.Image, orientation: int) -> None:
    """Transpose ``img`` in place per its EXIF orientation and drop the tag from its info."""
    if orientation != 1:
        ImageOps.exif_transpose(img, in_place=True)


def _check_pixels(path: PathLike, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse (from the header) an image of more than ``max_pixels`` pixels."""
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            path,
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels",
        )


def _decode(path: PathLike, img: Image.Image) -> None:
    """Decode the pixels of an opened image completely (a truncated file fails here)."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageLoadError(path, f"decoding failed ({type(exc).__name__}: {exc})") from exc


def load_image(path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file fully as an upright RGB :class:`PIL.Image.Image`.

    Steps: parse the header; reject images with ``width*height > max_pixels`` *before*
    decoding (``None`` disables this check, though Pillow's own hard limit of twice its
    global ``MAX_IMAGE_PIXELS`` still applies inside ``Image.open``); decode completely (a
    truncated file fails here); apply the EXIF orientation; convert to RGB with
    :func:`to_rgb`. Multi-frame files yield their first frame.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ImageLoadError: anything else (not a regular file, empty, not an image, truncated,
            corrupt, too many pixels, unreadable, unsupported pixel mode); message names the
            file and reason. Only regular files are opened (see :func:`open_regular_file`).
    """
    return load_resized(path, ResizePolicy("native"), max_pixels=max_pixels)[0]


def load_resized(
    path: PathLike,
    policy: ResizePolicy,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_output_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Load an image file as :func:`load_image` does, resized by ``policy``.

    Returns the upright RGB image of ``policy.target_size(*original)`` and the ``original``
    upright ``(width, height)``. When the policy keeps the size, the image equals
    :func:`load_image`'s bit for bit. When it shrinks, the full-size image is never held in
    more than its decoded form: a JPEG is decoded reduced by 1/2, 1/4 or 1/8 (libjpeg's DCT
    scaling, never below the target size), 1-bit and greyscale images are resized before
    they become RGB (bit-identical to resizing after), and only the resized image is RGB.

    ``max_output_pixels`` bounds ``width*height`` of the *resized* image: an image over it
    is refused from its header, before decoding, naming its size, the policy and the budget.

    Raises:
        FileNotFoundError, ImageLoadError: as :func:`load_image`.
    """
    with _open_file(path) as fh:
        img = _open_image(path, fh)
        width, height = img.size
        _check_pixels(path, width, height, max_pixels)
        # The target's pixel count does not depend on the orientation (sides swap).
        tw, th = policy.target_size(width, height)
        if max_output_pixels is not None and tw * th > max_output_pixels:
            raise ImageLoadError(
                path,
                f"image is {width}x{height} px; resize policy '{policy.describe()}' makes it "
                f"{tw}x{th} = {tw * th} px, over the pixel budget of one forward pass "
                f"({max_output_pixels} px, batch_pixels); a policy that caps the long side "
                "(e.g. 'max:1024') or a larger batch_pixels would index it",
            )
        if img.format == "JPEG" and (tw, th) != (width, height):
            # Reduce while decoding; the target is in stored orientation here (EXIF is in
            # the header of a JPEG). The sub-pixel extent of the reduced image is ignored.
            swap = _orientation(img, header_only=True) >= 5
            img.draft(None, (th, tw) if swap else (tw, th))
        _decode(path, img)
        try:
            orientation = _orientation(img, header_only=False)
            original = (height, width) if orientation >= 5 else (width, height)
            target = policy.target_size(*original)
            _apply_orientation(img, orientation)
            resizing = target != img.size
            if resizing and img.mode in _GREY_MODES and "transparency" not in img.info:
                grey = img if img.mode == "L" else img.convert("L")
                return _resize_to(grey, target).convert("RGB"), original
            return _resize_to(to_rgb(img), target), original
        except MemoryError:
            raise
        except Exception as exc:
            raise ImageLoadError(path, f"{type(exc).__name__}: {exc}") from exc


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(width, height)`` as :func:`load_image` would, reading the header only.

    Width and height are swapped for EXIF orientations 5-8. Metadata stored after the pixel
    data (e.g. a PNG ``eXIf`` chunk placed after ``IDAT``, which the PNG spec forbids) is
    not seen. Raises like :func:`load_image`, except that no pixel limit is applied.
    """
    with _open_file(path) as fh:
        img = _open_image(path, fh)
        width, height = img.size
        if _orientation(img, header_only=True) >= 5:
            return height, width
        return width, height


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (returns ``img`` itself when already RGB).

    * Alpha (LA/PA/RGBA/RGBa, or a ``transparency`` key on 1/L/P/RGB) is composited over
      white.
    * 16-bit greyscale (``I;16*``) maps by ``value >> 8`` (0, 32768, 65535 -> 0, 128, 255).
    * ``I`` (32-bit int) is taken as 16-bit data: clipped to [0, 65535], then ``>> 8``.
    * ``F`` (float) follows Pillow's convention of a [0, 255] range: NaN -> 0, clipped,
      rounded.
    * CMYK, 1-bit, L, P, YCbCr, LAB, HSV and RGBX use Pillow's conversion.

    Raises:
        ValueError: the mode cannot be converted.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or (mode in _KEYED_MODES and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode in _UINT16_MODES:
        arr = np.asarray(img).astype(np.uint16, copy=False)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L").convert("RGB")
    if mode == "I":
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        arr = np.rint(np.clip(arr, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    try:
        out = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported image mode {mode!r} ({exc})") from exc
    if out.mode != "RGB":  # pragma: no cover - defensive
        raise ValueError(f"unsupported image mode {mode!r}")
    return out


# --------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------


def _scale_dim(dim: int, num: int, den: int) -> int:
    """``round(dim * num / den)`` with exact integer arithmetic (half up), at least 1."""
    return max(1, (2 * dim * num + den) // (2 * den))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")


@dataclass(frozen=True)
class ResizePolicy:
    """How images are resized before feature extraction.

    Modes:

    * ``"max"`` (``max:1024`` is the pipeline's default): shrink (aspect kept) so the longer
      side is at most ``max_side``; never enlarge. An image already within the cap keeps its
      size, and so its features are those of ``"native"``, bit for bit. ``min_side`` is
      ignored.
    * ``"native"``: keep the original size (all other fields ignored). Memory then grows
      with the images' pixels (bounded only by the extractor's ``batch_pixels``).
    * ``"paper"``: scale (aspect kept) so the shorter side becomes ``min_side``, then, if
      ``max_side`` is set, shrink further so the longer side is at most ``max_side``. With
      ``upscale=False`` (default) an image that would be *enlarged* keeps its native size
      (no partial scaling); set ``upscale=True`` to allow enlarging.
    * ``"fixed"``: exactly ``size = (width, height)``, aspect not kept.
    * ``"paper_fixed"``: as the original code: landscape/square images (``w >= h``) become
      ``(max_side, min_side)`` = (1024, 720), portrait ones ``(min_side, max_side)`` =
      (720, 1024); aspect not kept.

    The fixed modes always produce their exact size, so ``upscale`` does not apply to them.
    Sides are rounded to the nearest integer and are never below 1.
    """

    mode: ResizeMode = "native"
    min_side: int = 720
    max_side: int | None = 1024
    size: tuple[int, int] | None = None
    upscale: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown resize mode {self.mode!r}; expected one of {_MODES}")
        if not isinstance(self.min_side, int) or self.min_side < 1:
            raise ValueError(f"min_side must be a positive int, got {self.min_side!r}")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {self.max_side!r}")
        if self.mode == "fixed":
            if self.size is None:
                raise ValueError("resize mode 'fixed' requires size=(width, height)")
            size = tuple(self.size)
            if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
                raise ValueError(f"size must be two positive ints, got {self.size!r}")
            object.__setattr__(self, "size", size)
        elif self.size is not None:
            raise ValueError(f"size is only used by mode 'fixed', not {self.mode!r}")
        if self.mode == "max" and self.max_side is None:
            raise ValueError("resize mode 'max' requires max_side")
        if self.mode == "paper_fixed" and (self.max_side is None or self.max_side < self.min_side):
            raise ValueError(
                "mode 'paper_fixed' requires max_side >= min_side, "
                f"got min_side={self.min_side}, max_side={self.max_side}"
            )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Output ``(width, height)`` for an input of ``width×height`` (pure arithmetic)."""
        _check_size(width, height)
        if self.mode == "native":
            return width, height
        if self.mode == "fixed":
            assert self.size is not None
            return self.size
        if self.mode == "max":
            assert self.max_side is not None
            long = max(width, height)
            if long <= self.max_side:
                return width, height
            return _scale_dim(width, self.max_side, long), _scale_dim(height, self.max_side, long)
        if self.mode == "paper_fixed":
            assert self.max_side is not None
            if width >= height:
                return self.max_side, self.min_side
            return self.min_side, self.max_side
        # "paper": scale factor num/den, the smaller of the min_side and max_side factors.
        short, long = min(width, height), max(width, height)
        num, den = self.min_side, short
        if self.max_side is not None and self.max_side * den < num * long:
            num, den = self.max_side, long
        if num > den and not self.upscale:
            return width, height
        return _scale_dim(width, num, den), _scale_dim(height, num, den)

    def max_output_pixels(self) -> int | None:
        """Upper bound of ``width*height`` of any output; None when unbounded (``native``,
        ``paper`` without ``max_side``)."""
        if self.mode == "fixed":
            assert self.size is not None
            return self.size[0] * self.size[1]
        if self.max_side is None or self.mode == "native":
            return None
        if self.mode == "paper_fixed":
            return self.max_side * self.min_side
        return self.max_side * self.max_side  # max, paper: the long side is <= max_side

    def describe(self) -> str:
        """Stable short string for cache keys, e.g. ``"paper-min720-max1024"``, ``"max-1024"``.

        Only fields that affect the output appear; :meth:`parse` accepts the result.
        """
        if self.mode == "native":
            return "native"
        if self.mode == "max":
            return f"max-{self.max_side}"
        if self.mode == "fixed":
            assert self.size is not None
            return f"fixed-{self.size[0]}x{self.size[1]}"
        max_part = "nomax" if self.max_side is None else f"max{self.max_side}"
        text = f"{self.mode}-min{self.min_side}-{max_part}"
        if self.mode == "paper" and self.upscale:
            text += "-upscale"
        return text

    @classmethod
    def parse(cls, text: str) -> ResizePolicy:
        """Parse a policy from a CLI/config string or from :meth:`describe` output.

        Colon form: ``max`` (= ``max:1024``), ``max:1600``, ``native``, ``paper``,
        ``paper:720``, ``paper:720:1024``, ``paper:720:none``, ``paper:720:1024:upscale``,
        ``fixed:224x224``, ``fixed:224`` (square), ``paper_fixed``, ``paper_fixed:720:1024``.
        Dash form (as produced by :meth:`describe`): ``max-1024``,
        ``paper-min720-max1024[-upscale]``, ``paper-min720-nomax``, ``fixed-224x224``,
        ``paper_fixed-min720-max1024``. Omitted values take the
        dataclass defaults. Case and surrounding whitespace are ignored.

        Raises:
            ValueError: malformed text (the message quotes it).
        """
        try:
            return cls._parse(text.strip().lower())
        except ValueError as exc:
            raise ValueError(
                f"invalid resize policy {text!r}: {exc}. Expected e.g. 'max:1024', 'native', "
                "'paper', "
                "'paper:720:1024', 'fixed:224x224', 'paper_fixed' or a describe() string"
            ) from None

    @classmethod
    def _parse(cls, text: str) -> ResizePolicy:
        sep = ":" if ":" in text else "-"
        mode, *tokens = text.split(sep)
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "native":
            if tokens:
                raise ValueError("'native' takes no parameters")
            return cls("native")
        if mode == "max":
            if len(tokens) > 1 or not all(t.isdigit() for t in tokens):
                raise ValueError("'max' takes one parameter, the longest side in pixels")
            return cls("max", max_side=int(tokens[0])) if tokens else cls("max")
        if mode == "fixed":
            if len(tokens) != 1:
                raise ValueError("'fixed' needs exactly one WIDTHxHEIGHT parameter")
            match = re.fullmatch(r"(\d+)(?:x(\d+))?", tokens[0])
            if match is None:
                raise ValueError(f"bad size {tokens[0]!r}")
            w = int(match[1])
            return cls("fixed", size=(w, int(match[2]) if match[2] else w))

        kwargs: dict[str, int | bool | None] = {}
        if sep == ":":
            values = list(tokens)
            if mode == "paper" and values and values[-1] == "upscale":
                kwargs["upscale"] = True
                values.pop()
            if len(values) > 2:
                raise ValueError("too many parameters")
            for name, value in zip(("min_side", "max_side"), values, strict=False):
                if name == "max_side" and value == "none":
                    kwargs[name] = None
                elif value.isdigit():
                    kwargs[name] = int(value)
                else:
                    raise ValueError(f"bad {name} {value!r}")
        else:
            for token in tokens:
                if (m := re.fullmatch(r"(min|max)(\d+)", token)) is not None:
                    key = f"{m[1]}_side"
                    value: int | bool | None = int(m[2])
                elif token == "nomax":
                    key, value = "max_side", None
                elif token == "upscale" and mode == "paper":
                    key, value = "upscale", True
                else:
                    raise ValueError(f"bad token {token!r}")
                if key in kwargs:
                    raise ValueError(f"duplicate {key}")
                kwargs[key] = value
        return cls(mode, **kwargs)  # type: ignore[arg-type]


def resize(img: Image.Image, policy: ResizePolicy) -> Image.Image:
    """Resize ``img`` per ``policy``; returns ``img`` itself when the size is unchanged.

    Uses BICUBIC, or LANCZOS with ``reducing_gap`` when shrinking by 2× or more.
    """
    return _resize_to(img, policy.target_size(*img.size))


def _resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if size == img.size:
        return img
    factor = max(img.width / size[0], img.height / size[1])
    if factor >= _BIG_DOWNSCALE:
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    return img.resize(size, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (aspect kept) and take the central ``size×size``.

    When the leftover is odd, the extra pixel is dropped on the right/bottom.
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    width, height = img.size
    short = min(width, height)
    resized = _resize_to(img, (_scale_dim(width, size, short), _scale_dim(height, size, short)))
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def crop_box(img: Image.Image, box: Sequence[float]) -> Image.Image:
    """Crop ``box = (x1, y1, x2, y2)`` (pixel coordinates, x2/y2 exclusive) from ``img``.

    The box is clipped to the image, then expanded outward to whole pixels (floor of x1/y1,
    ceil of x2/y2, with a 1e-6 tolerance), so any box overlapping the image by a positive
    area yields at least one pixel.

    Raises:
        ValueError: not 4 finite numbers, inverted (x2 < x1 or y2 < y1), or zero area after
            clipping (including boxes fully outside); the message gives box and image size.
    """
    width, height = img.size
    coords = _as_box(box)
    x1, y1, x2, y2 = coords
    if x2 < x1 or y2 < y1:
        raise ValueError(f"crop box {coords} is inverted (image is {width}x{height})")
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(
            f"crop box {coords} has zero area after clipping to the {width}x{height} image"
        )
    eps = 1e-6
    left = min(math.floor(cx1 + eps), width - 1)
    top = min(math.floor(cy1 + eps), height - 1)
    right = max(math.ceil(cx2 - eps), left + 1)
    bottom = max(math.ceil(cy2 - eps), top + 1)
    return img.crop((left, top, right, bottom))


def scale_box(box: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Map a box ``(x1, y1, x2, y2)`` from an image of ``from_size`` to one of ``to_size``.

    Sizes are ``(width, height)``; x scales by the width ratio, y by the height ratio.
    """
    coords = _as_box(box)
    fw, fh = from_size
    tw, th = to_size
    _check_size(fw, fh)
    _check_size(tw, th)
    sx, sy = tw / fw, th / fh
    x1, y1, x2, y2 = coords
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _as_box(box: Sequence[float]) -> Box:
    values = tuple(float(v) for v in box)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be 4 finite numbers (x1, y1, x2, y2), got {tuple(box)!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------


def to_tensor(
    imgs: Sequence[Image.Image],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """Stack RGB images into a contiguous float32 ``N×3×H×W`` tensor.

    Pixels are scaled to [0, 1] and normalised per channel as ``(x - mean) / std``.

    Raises:
        ValueError: no images, a non-RGB image, images of different sizes (all distinct
            sizes are listed with the index where each first occurs), or a bad mean/std.
    """
    if len(imgs) == 0:
        raise ValueError("to_tensor needs at least one image")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    if any(not math.isfinite(s) or s == 0 for s in std):
        raise ValueError(f"std values must be finite and non-zero, got {std!r}")
    for i, img in enumerate(imgs):
        if img.mode != "RGB":
            raise ValueError(f"image {i} has mode {img.mode!r}; expected 'RGB'")
    first_index: dict[tuple[int, int], int] = {}
    for i, img in enumerate(imgs):
        first_index.setdefault(img.size, i)
    if len(first_index) > 1:
        listed = ", ".join(f"{w}x{h} (first at index {i})" for (w, h), i in first_index.items())
        raise ValueError(f"all images must have the same size; got {listed}")

    batch = np.stack([np.asarray(img, dtype=np.uint8) for img in imgs])  # N×H×W×3
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32)
    tensor = tensor.contiguous().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
