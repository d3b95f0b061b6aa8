"""Geometric preprocessing: the resize policies of the paper (:class:`ResizePolicy`,
:func:`resize`), crops and query boxes (:func:`center_crop`, :func:`crop_box`,
:func:`scale_box`) and :func:`to_tensor` (equally sized RGB images → a normalised
``N×3×H×W`` tensor)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]
ResizeMode = Literal["paper", "native", "fixed", "paper_fixed", "max"]

_MODES: tuple[str, ...] = get_args(ResizeMode)
# Downscaling by at least this factor switches from BICUBIC to LANCZOS + reducing_gap.
_BIG_DOWNSCALE = 2.0
_REDUCING_GAP = 3.0


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
    return resize_to(img, policy.target_size(*img.size))


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
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
    resized = resize_to(img, (_scale_dim(width, size, short), _scale_dim(height, size, short)))
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
