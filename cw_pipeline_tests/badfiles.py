"""A generated corpus of bad and awkward image files (for the reliability tests).

Every file is written by the functions below into a test's temporary folder; nothing is
stored in the repository. :data:`CORPUS` lists the corpus with what the pipeline must do with
each file: index it (``rejected`` and ``skipped`` None), quarantine it with a reason matching
``rejected``, or skip it with the reason ``skipped`` (not an image candidate: counted and
named in the manifest's metadata and by ``cw-pipeline datasets``). Readable files are 64×48
(EXIF-rotated: 48×64 upright) so that they clear the network stride under ``resize: native``.

Colours of the four quadrants of :func:`quadrants` (stored orientation):

    red   | green
    ------+-------
    blue  | yellow
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cw_pipeline.core.datasets import shown_name

SIZE = (64, 48)  #: (width, height) of the readable files
RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 200, 20), (20, 20, 230), (230, 230, 20)
#: Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), which the loader enforces.
PIL_LIMIT = 89_478_485


def quadrants(size: tuple[int, int] = SIZE) -> Image.Image:
    """An RGB image with a red, green, blue and yellow quadrant (see the module docstring)."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = RED
    arr[: h // 2, w // 2 :] = GREEN
    arr[h // 2 :, : w // 2] = BLUE
    arr[h // 2 :, w // 2 :] = YELLOW
    return Image.fromarray(arr)


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- unreadable


def zero_byte(path: Path) -> Path:
    _parent(path).write_bytes(b"")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A noisy JPEG cut in half: the header parses, the pixels do not decode."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(_parent(path), "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_as_jpeg(path: Path) -> Path:
    _parent(path).write_text("these are notes, not a photograph\n" * 20, encoding="utf-8")
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A *valid* 1-bit PNG of ``width``×``height`` black pixels, a few KB on disk.

    Decoded as RGB it would take ``3·width·height`` bytes (300 MB for the default
    100 Mpx, over Pillow's limit of 89.5 Mpx); written row by row without holding it.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
    _parent(path).write_bytes(png + _png_chunk(b"IEND", b""))
    return path


def tiny_png(path: Path, side: int = 16) -> Path:
    """A readable image smaller than the network stride (32 px for efficientnet_lite0)."""
    quadrants((side, side)).save(_parent(path), "PNG")
    return path


# --------------------------------------------------------------------------- readable, awkward


def png_alpha(path: Path) -> Path:
    """RGBA: left half fully transparent (black underneath), right half opaque blue."""
    w, h = SIZE
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, w // 2 :] = (*BLUE, 255)
    Image.fromarray(arr, "RGBA").save(_parent(path), "PNG")
    return path


def grayscale_jpeg(path: Path) -> Path:
    """Mode L: left half 40, right half 200."""
    w, h = SIZE
    arr = np.full((h, w), 40, dtype=np.uint8)
    arr[:, w // 2 :] = 200
    Image.fromarray(arr, "L").save(_parent(path), "JPEG", quality=95)
    return path


#: CMYK ink of :func:`cmyk_jpeg` and the RGB it stands for:
#: R = 255·(1−C)·(1−K), G = 255·(1−M)·(1−K), B = 255·(1−Y)·(1−K) with K = 64/255.
CMYK_INK, CMYK_RGB = (0, 128, 255, 64), (191, 95, 0)


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", SIZE, CMYK_INK).save(_parent(path), "JPEG", quality=95)
    return path


def png_16bit(path: Path) -> Path:
    """16-bit greyscale: left half 0, right half 65535, one column of 32768 in the middle."""
    w, h = SIZE
    arr = np.zeros((h, w), dtype=np.uint16)
    arr[:, w // 2 :] = 65535
    arr[:, w // 2] = 32768
    Image.fromarray(arr).save(_parent(path), "PNG")
    return path


def exif_rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """:func:`quadrants` stored as is, with EXIF orientation 6 (display rotated 90° clockwise:
    upright the image is 48×64 with blue top-left, red top-right, yellow bottom-left, green
    bottom-right)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    quadrants().save(_parent(path), "JPEG", quality=95, exif=exif)
    return path


def plain_jpeg(path: Path) -> Path:
    quadrants().save(_parent(path), "JPEG", quality=90)
    return path


# --------------------------------------------------------------------------- folders


def symlink_loops(folder: Path) -> list[Path]:
    """A link from ``folder`` back to its parent (the dataset root: a loop) and a file link to
    itself (unresolvable)."""
    folder.mkdir(parents=True, exist_ok=True)
    loop_dir = folder / "loop"
    loop_dir.symlink_to("..", target_is_directory=True)
    self_link = folder / "self.jpg"
    self_link.symlink_to("self.jpg")
    return [loop_dir, self_link]


# --------------------------------------------------------------------------- not regular files


def fifo(path: Path) -> Path:
    """A named pipe: opening it for reading blocks until a writer comes."""
    os.mkfifo(_parent(path))
    return path


def unix_socket(path: Path) -> Path:
    """A Unix socket file (left behind by a bound, closed socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:
        os.chdir(_parent(path).parent)  # socket paths are limited to ~100 bytes: bind relative
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
        sock.close()
    return path


def link_to(target: str, make_target: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """A maker of a symlink to ``target`` (a path relative to the link's folder), which
    ``make_target`` creates first."""

    def make(path: Path) -> Path:
        make_target(_parent(path).parent / target)
        path.symlink_to(target)
        return path

    return make


def gif(path: Path) -> Path:
    """A real GIF (Pillow reads it, but ``.gif`` is not a scanned extension)."""
    quadrants().save(_parent(path), "GIF")
    return path


def text_file(path: Path) -> Path:
    _parent(path).write_text("not an image\n", encoding="utf-8")
    return path


class FifoWatch:
    """Catches any reader opening the given FIFOs, and lets it go.

    A thread tries to open each FIFO for writing without blocking, which succeeds only while
    a reader has it open; it then closes it (the reader sees end of file instead of hanging)
    and records the FIFO in :attr:`opened`. Use as a context manager.
    """

    def __init__(self, fifos: list[Path], interval: float = 0.02) -> None:
        self.fifos = list(fifos)
        self.interval = interval
        self.opened: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.fifos:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader
                    continue
                os.close(fd)
                self.opened.append(path)
            time.sleep(self.interval)

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class BadFile:
    """One file of the corpus: where it goes, how it is made, what the pipeline must do."""

    name: str
    relpath: str
    make: Callable[[Path], Path]
    rejected: str | None = None  #: regex the quarantine reason must match; None: indexed
    skipped: str | None = None  #: the reason it is skipped (not an image candidate)
    unread: bool = False  #: refused before it is opened (no sha1 in its rejected row)

    @property
    def image_id(self) -> str:
        """Its id in a ``folder``-layout dataset (the relative path without extension), as
        stored: bytes that are not UTF-8 shown as ``\\xNN``."""
        return shown_name(self.relpath.rsplit(".", 1)[0])


CORPUS: tuple[BadFile, ...] = (
    BadFile("zero_byte", "corpus/empty.jpg", zero_byte, r"file is empty \(0 bytes\)"),
    BadFile("truncated_jpeg", "corpus/truncated.jpg", truncated_jpeg, r"decoding failed"),
    BadFile("text_as_jpeg", "corpus/notes.jpg", text_as_jpeg, r"unrecognised or unsupported"),
    BadFile(
        "bomb",
        "corpus/bomb.png",
        bomb_png,
        rf"10000x10000 = 100000000 pixels, over the limit of {PIL_LIMIT} pixels",
    ),
    BadFile(
        "bomb_hard",
        "corpus/bomb_hard.png",
        lambda p: bomb_png(p, 20_000, 10_000),
        r"exceeds Pillow's hard pixel limit",
    ),
    BadFile(
        "tiny",
        "corpus/tiny.png",
        tiny_png,
        r"16×16 px is smaller than the network stride \(32 px\)",
    ),
    BadFile("png_alpha", "corpus/alpha.png", png_alpha),
    BadFile("grayscale", "corpus/grey.jpg", grayscale_jpeg),
    BadFile("cmyk", "corpus/cmyk.jpg", cmyk_jpeg),
    BadFile("png_16bit", "corpus/deep.png", png_16bit),
    BadFile("exif_rotated", "corpus/rotated.jpg", exif_rotated_jpeg),
    BadFile("plain", "corpus/plain.jpg", plain_jpeg),
    BadFile("unicode", "été 2024/façade 東京 n°1.jpg", plain_jpeg),
    # Not regular files: refused from ``stat``, never opened (a FIFO would block the reader).
    BadFile("fifo", "corpus/pipe.jpg", fifo, r"not a regular file \(FIFO\)", unread=True),
    BadFile(
        "fifo_link",
        "corpus/pipe-link.jpg",
        link_to("pipe-target", fifo),
        r"not a regular file \(FIFO, through a symlink\)",
        unread=True,
    ),
    BadFile(
        "socket", "corpus/sock.png", unix_socket, r"not a regular file \(socket\)", unread=True
    ),
    BadFile(
        "socket_link",
        "corpus/sock-link.webp",
        link_to("sock-target", unix_socket),
        r"not a regular file \(socket, through a symlink\)",
        unread=True,
    ),
    # Names no image id can hold: readable files, quarantined by name, never opened.
    BadFile(
        "backslash", "corpus/back\\slash.jpg", plain_jpeg, r"contains a backslash", unread=True
    ),
    BadFile(
        "newline",
        "corpus/line\nbreak.jpg",
        plain_jpeg,
        r"contains the control character U\+000A",
        unread=True,
    ),
    BadFile(
        "not_utf8", "corpus/caf\udce9.jpg", plain_jpeg, r"not valid UTF-8", unread=True
    ),  # the Latin-1 byte 0xE9
    # Folders whose names are no valid shard (partition, store file) name as they are: their
    # images are indexed in a shard named <readable prefix>~<16 hex digits>.
    BadFile("long_folder", f"{'a long folder name ' * 13}/x.jpg", plain_jpeg),
    BadFile("long_multibyte_folder", f"{'東京' * 40}/x.jpg", plain_jpeg),
    BadFile("dots_folder", "wait... what/x.jpg", plain_jpeg),
    BadFile("root_folder", "_root/x.jpg", plain_jpeg),
    BadFile("hashlike_folder", "a~0123456789abcdef/x.jpg", plain_jpeg),
    BadFile("top_level", "top.jpg", plain_jpeg),
    BadFile(
        "control_folder", "tab\there/x.jpg", plain_jpeg, r"control character U\+0009", unread=True
    ),
    BadFile(
        "not_utf8_folder", "k\udcf6ln/x.jpg", plain_jpeg, r"not valid UTF-8", unread=True
    ),  # 0xF6
    # Skipped, counted and named: not image candidates.
    BadFile("gif", "corpus/anim.gif", gif, skipped="unsupported extension .gif"),
    BadFile("gif_upper", "corpus/STILL.GIF", gif, skipped="unsupported extension .gif"),
    BadFile("text", "corpus/readme.txt", text_file, skipped="unsupported extension .txt"),
    BadFile("no_extension", "corpus/LICENSE", text_file, skipped="no extension"),
    BadFile("hidden", "corpus/.DS_Store", text_file, skipped="hidden name"),
)
#: The targets of the links above: skipped themselves (not regular, no image extension).
LINK_TARGETS = {
    "corpus/pipe-target": "not a regular file (FIFO)",
    "corpus/sock-target": "not a regular file (socket)",
}
BY_NAME = {f.name: f for f in CORPUS}


def write_corpus(root: Path, *, loops: bool = True) -> dict[str, Path]:
    """Write every file of :data:`CORPUS` under ``root`` (and, with ``loops``, the symlink
    loops of :func:`symlink_loops` into ``root/corpus``); returns name → path."""
    out = {f.name: f.make(root / f.relpath) for f in CORPUS}
    if loops:
        symlink_loops(root / "corpus")
    return out


# --------------------------------------------------------------------------- hostile pickles
# Raw pickle opcodes (protocol 2, as old numpy pickles), built by hand: each file is small and
# asks an *allowed* callable, or the unpickler itself, for a huge allocation.

_BIG = 10**10  #: elements or bytes asked for (10 GB and more)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _long(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def _as_imlist(value_ops: bytes) -> bytes:
    """``{"imlist": <value>}`` around the opcodes building ``value``."""
    return b"\x80\x02}" + _text("imlist") + value_ops + b"s."


def _reconstruct(shape: int, dtype: str) -> bytes:
    """``numpy.core.multiarray._reconstruct(ndarray, (shape,), dtype)``."""
    return (
        _global("numpy.core.multiarray", "_reconstruct")
        + _global("numpy", "ndarray")
        + _long(shape)
        + b"\x85"  # TUPLE1
        + _text(dtype)
        + b"\x87R"  # TUPLE3, REDUCE
    )


def pickle_bytearray_count(path: Path) -> Path:
    """``bytearray(10**10)``: 10 GB from a 60-byte file."""
    ops = _global("builtins", "bytearray") + _long(_BIG) + b"\x85R"
    _parent(path).write_bytes(_as_imlist(ops))
    return path


def pickle_bytes_count(path: Path) -> Path:
    """``bytes(10**10)`` (Python 2's ``__builtin__``)."""
    ops = _global("__builtin__", "bytes") + _long(_BIG) + b"\x85R"
    _parent(path).write_bytes(_as_imlist(ops))
    return path


def pickle_numpy_huge_shape(path: Path) -> Path:
    """A numpy object array of 10**10 elements (80 GB of pointers, each set to None)."""
    _parent(path).write_bytes(_as_imlist(_reconstruct(_BIG, "O")))
    return path


def pickle_numpy_huge_state(path: Path) -> Path:
    """A legitimate empty array, then ``__setstate__`` with a shape of 10**10 objects."""
    dtype = _global("numpy", "dtype") + _text("O8") + b"\x89\x88\x87R"  # dtype('O8', 0, 1)
    state = b"(" + _long(1) + _long(_BIG) + b"\x85" + dtype + b"\x89]t"  # MARK ... TUPLE
    _parent(path).write_bytes(_as_imlist(_reconstruct(0, "b") + state + b"b"))  # BUILD
    return path


def pickle_ndarray_call(path: Path) -> Path:
    """``numpy.ndarray((10**10,))`` called directly: 80 GB of float64."""
    ops = _global("numpy", "ndarray") + _long(_BIG) + b"\x85\x85R"
    _parent(path).write_bytes(_as_imlist(ops))
    return path


def pickle_deep_nesting(path: Path, depth: int = 100_000) -> Path:
    """Lists nested 100,000 deep (``[[[…]]]``): printing or walking them recursively fails."""
    _parent(path).write_bytes(_as_imlist(b"]" * depth + b"a" * (depth - 1)))
    return path


def pickle_huge_repeat(path: Path, size: int = 1 << 20, times: int = 10_000) -> Path:
    """``[bytearray(s) for _ in range(10_000)]`` of one memoized 1 MiB ``s``: 10 GiB from a
    1 MiB file (each 7-byte repeat copies the whole buffer)."""
    head = _global("builtins", "bytearray") + b"q\x00"  # BINPUT 0
    data = b"B" + struct.pack("<I", size) + b"\0" * size + b"q\x01"  # BINBYTES, BINPUT 1
    repeat = b"h\x00h\x01\x85R" * times  # BINGET 0, BINGET 1, TUPLE1, REDUCE
    _parent(path).write_bytes(_as_imlist(head + data + b"](" + repeat + b"e"))  # APPENDS
    return path


def pickle_repr_amplification(path: Path, size: int = 1 << 20, times: int = 2_000) -> Path:
    """``str([s] * 2000)`` of a 1 MiB string ``s``: a 2 GB repr from a 1 MiB file."""
    s = _text("x" * size) + b"q\x00" + b"0"  # BINPUT 0, POP: s stays in the memo only
    items = b"](" + b"h\x00" * times + b"e"  # [s, s, ...]
    ops = _global("builtins", "str") + s + items + b"\x85R"
    _parent(path).write_bytes(_as_imlist(ops))
    return path


@dataclass(frozen=True)
class HostilePickle:
    """A small ground-truth pickle that asks for a huge allocation; loading must refuse it
    with an error matching ``refused`` (and naming the file), fast and in little memory."""

    name: str
    make: Callable[[Path], Path]
    refused: str


HOSTILE_PICKLES: tuple[HostilePickle, ...] = (
    HostilePickle("bytearray_count", pickle_bytearray_count, r"builtins\.bytearray\(int\)"),
    HostilePickle("bytes_count", pickle_bytes_count, r"builtins\.bytes\(int\)"),
    HostilePickle("numpy_huge_shape", pickle_numpy_huge_shape, r"over \d+ bytes.*shape"),
    HostilePickle("numpy_huge_state", pickle_numpy_huge_state, r"over \d+ bytes.*shape"),
    HostilePickle("ndarray_call", pickle_ndarray_call, r"numpy\.ndarray\(\.\.\.\) called"),
    HostilePickle("deep_nesting", pickle_deep_nesting, r"deeper than 32 levels"),
    HostilePickle("huge_repeat", pickle_huge_repeat, r"over \d+ bytes.*bytearray"),
    HostilePickle("repr_amplification", pickle_repr_amplification, r"builtins\.str of a list"),
)
