"""Safe image loading: only regular files are opened (non-blocking, ``fstat``-checked), the
decompression-bomb limit is checked from the header, EXIF orientation is applied, any colour
mode becomes RGB, and files are decoded already reduced for a resize policy.

Deterministic and free of global state: the Pillow decompression-bomb limit and
``ImageFile.LOAD_TRUNCATED_IMAGES`` are never touched.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cw_pipeline.core.datasets.folder import file_kind
from cw_pipeline.core.images.resizing import ResizePolicy, resize_to

#: Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 89_478_485

PathLike = str | os.PathLike[str]

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_KEYED_MODES = frozenset({"1", "L", "P", "RGB"})  # may carry a transparency key
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Resized before the RGB conversion: R = G = B, and resampling works per channel, so the
# result is bit-identical to converting first, at a third of the memory.
_GREY_MODES = frozenset({"1", "L"})


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
                return resize_to(grey, target).convert("RGB"), original
            return resize_to(to_rgb(img), target), original
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
