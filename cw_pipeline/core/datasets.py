"""Retrieval datasets: ground-truth readers (Oxford/Paris text files, ``gnd_*.pkl``, UKBench,
INRIA Holidays) and a deterministic image-folder scanner.

Image ids are file names without extension (``"all_souls_000013"``); the scanner keeps
sub-folders in the id (``"shard1/img"``) unless asked for flat ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "MAX_GND_PICKLE_BYTES",
    "MAX_GND_PICKLE_DEPTH",
    "FolderScan",
    "GroundTruth",
    "PickleLimitError",
    "Query",
    "QueryProtocol",
    "ScannedFile",
    "SkippedFile",
    "TextDecodeError",
    "UnsafePickleError",
    "check_image_id",
    "check_query_protocol",
    "decode_text",
    "file_kind",
    "holidays_groundtruth",
    "image_path",
    "load_gnd_pickle",
    "name_problem",
    "read_oxford_groundtruth",
    "read_text_lines",
    "scan_folder",
    "scan_image_folder",
    "shown_name",
    "skipped_summary",
    "ukbench_groundtruth",
    "ukbench_labels",
    "validate_groundtruth",
]

logger = logging.getLogger(__name__)

QueryProtocol = Literal["paper", "crop"]
"""How a query with a bounding box is searched.

* ``"paper"``: the original code's protocol — the full query image goes through the network
  and the box is applied on its feature map (box / stride, context leaks in through receptive
  fields); the query image stays in the database (classic Oxford/Paris count it as positive).
* ``"crop"``: the image is cropped to the box before the forward pass (the Revisited
  Oxford/Paris protocol).

For the revisited datasets the query images are never part of the database, whatever the
protocol.
"""

DEFAULT_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)

_OXFORD_QUERY_PREFIX = "oxc1_"


def check_query_protocol(value: str) -> QueryProtocol:
    """Return ``value`` as a :data:`QueryProtocol`, or raise ValueError naming it."""
    allowed = get_args(QueryProtocol)
    if value not in allowed:
        raise ValueError(f"unknown query protocol {value!r}; expected one of {allowed}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One query of a retrieval benchmark.

    ``positives`` is good ∪ ok (classic) or easy ∪ hard (revisited, the Medium positives);
    ``bbox`` is (x1, y1, x2, y2) in original-image pixels, or None for whole-image queries.
    """

    image_id: str
    bbox: tuple[float, float, float, float] | None
    positives: frozenset[str]
    junk: frozenset[str]
    easy: frozenset[str] = frozenset()
    hard: frozenset[str] = frozenset()
    name: str = ""


@dataclass(frozen=True)
class GroundTruth:
    """A benchmark's database order and queries.

    ``queries_in_database`` is True for classic Oxford/Paris, UKBench and Holidays, False for
    the revisited sets (their query images are not in ``image_ids``). ``grouped`` is True for
    UKBench and Holidays (images in object groups, queries drawn from the database itself).
    """

    dataset: str
    image_ids: tuple[str, ...]
    queries: tuple[Query, ...]
    revisited: bool
    queries_in_database: bool
    grouped: bool = False

    def to_index_gnd(self, strict: bool = True) -> list[dict[str, np.ndarray]]:
        """Per-query dicts of sorted int64 index arrays into ``image_ids`` for evaluation.

        Keys: ``'ok'`` (positives) and ``'junk'``, plus ``'easy'`` and ``'hard'`` when
        revisited. With ``strict`` a ground-truth name missing from ``image_ids`` raises
        ValueError; otherwise it is dropped (see :func:`validate_groundtruth`).
        """
        index = {name: i for i, name in enumerate(self.image_ids)}

        def to_idx(names: frozenset[str], query: Query, field: str) -> np.ndarray:
            idx = []
            for name in sorted(names):
                i = index.get(name)
                if i is None:
                    if strict:
                        raise ValueError(
                            f"{self.dataset}: {field} image {name!r} of query "
                            f"{query.name or query.image_id!r} is not in image_ids"
                        )
                    continue
                idx.append(i)
            return np.array(sorted(idx), dtype=np.int64)

        out: list[dict[str, np.ndarray]] = []
        for q in self.queries:
            entry = {"ok": to_idx(q.positives, q, "positive"), "junk": to_idx(q.junk, q, "junk")}
            if self.revisited:
                entry["easy"] = to_idx(q.easy, q, "easy")
                entry["hard"] = to_idx(q.hard, q, "hard")
            out.append(entry)
        return out


def check_image_id(image_id: str, source: str) -> str:
    """Return ``image_id`` if it is a safe relative name, else raise ValueError naming it.

    Image ids come from ground truth and manifests and name files under a dataset's root, so
    an id may not be empty, absolute, contain ``.``/``..`` components, backslashes or NUL: no
    id can point outside the dataset folder. ``source`` (file, line or entry) starts the
    message.
    """
    if not isinstance(image_id, str):
        raise ValueError(f"{source}: image ids must be strings, got {image_id!r}")
    parts = image_id.split("/")
    if (
        not image_id
        or image_id.startswith("/")
        or "\\" in image_id
        or "\0" in image_id
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(
            f"{source}: image id {image_id!r} is not a relative name inside the dataset "
            "folder (no absolute paths, '.', '..', empty parts, backslashes or NUL)"
        )
    return image_id


def image_path(root: Path | str, relpath: str) -> Path:
    """``root / relpath`` for a relative image path read from a manifest or ground truth.

    Refuses (ValueError naming both) a path that could leave ``root``: absolute, with ``.``
    or ``..`` components, backslashes or NUL. The check is lexical; symlinks are vetted by
    :func:`scan_image_folder`, which is where relative paths come from.
    """
    check_image_id(relpath, f"image folder {root}")
    return Path(root) / relpath


def _check_unique_ids(ids: Sequence[str], source: str) -> tuple[str, ...]:
    """Return ``ids`` as a tuple, raising ValueError on the first repeated id."""
    seen: set[str] = set()
    for image_id in ids:
        if not isinstance(image_id, str):
            raise ValueError(f"{source}: image ids must be strings, got {image_id!r}")
        if image_id in seen:
            raise ValueError(f"{source}: duplicate image id {image_id!r}")
        seen.add(image_id)
    return tuple(ids)


# --------------------------------------------------------------------------------------------
# Oxford / Paris text files
# --------------------------------------------------------------------------------------------


def _query_sort_key(name: str) -> tuple[str, int, str]:
    """Natural order of query names: ``all_souls_2`` before ``all_souls_10``."""
    stem, _, number = name.rpartition("_")
    if stem and number.isdigit():
        return (stem, int(number), name)
    return (name, -1, name)


class TextDecodeError(ValueError):
    """A text file that is not UTF-8; ``str()`` is ``<source>:<line>: <reason>``."""

    def __init__(self, source: Path | str, line: int, reason: str) -> None:
        self.source, self.line, self.reason = str(source), line, reason
        super().__init__(f"{source}:{line}: {reason}")


def decode_text(data: bytes, source: Path | str) -> str:
    """``data`` decoded as UTF-8, or :class:`TextDecodeError`
    ``<source>:<line>: not UTF-8 text: byte 0xe9 at column 7 (invalid continuation byte)…``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise TextDecodeError(
            source,
            line,
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at column {column} ({exc.reason}); "
            "save the file as UTF-8",
        ) from None


def read_text_lines(path: Path | str) -> list[str]:
    """The lines of a UTF-8 text file (universal newlines, ends stripped), or
    :class:`TextDecodeError` naming the file and line."""
    import io

    text = decode_text(Path(path).read_bytes(), path)
    return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]


def _read_name_list(path: Path) -> set[str]:
    """Read a ``_good/_ok/_junk.txt`` list (one image name a line; blank lines ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file missing: {path}")
    names: set[str] = set()
    for lineno, line in enumerate(read_text_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 1:
            raise ValueError(f"{path}:{lineno}: expected one image name, got {line.strip()!r}")
        names.add(check_image_id(tokens[0], f"{path}:{lineno}"))
    return names


def _read_query_file(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    """Parse ``<image> x1 y1 x2 y2`` (image may carry the ``oxc1_`` prefix)."""
    numbered = enumerate(read_text_lines(path), start=1)
    lines = [(n, line.split()) for n, line in numbered if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"{path}: expected exactly one query line, found {len(lines)}")
    lineno, tokens = lines[0]
    if len(tokens) != 5:
        raise ValueError(f"{path}:{lineno}: expected '<image> x1 y1 x2 y2', got {tokens!r}")
    try:
        x1, y1, x2, y2 = (float(t) for t in tokens[1:])
    except ValueError:
        raise ValueError(
            f"{path}:{lineno}: box coordinates are not numbers: {tokens[1:]!r}"
        ) from None
    if not all(np.isfinite((x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"{path}:{lineno}: invalid box {(x1, y1, x2, y2)!r} (zero area, inverted or "
            "not finite; expected x1 < x2 and y1 < y2)"
        )
    name = tokens[0].removeprefix(_OXFORD_QUERY_PREFIX)
    return check_image_id(name, f"{path}:{lineno}"), (x1, y1, x2, y2)


def read_oxford_groundtruth(
    folder: Path | str,
    image_ids: Sequence[str] | None = None,
    dataset: str | None = None,
) -> GroundTruth:
    """Read the official Oxford/Paris ground-truth folder (``<name>_<n>_{query,good,ok,junk}.txt``).

    The ``oxc1_`` prefix of Oxford query lines is stripped; positives = good ∪ ok; duplicate
    lines are merged. Queries come in natural name order (the ``gnd_*.pkl`` ``qimlist`` order).
    ``image_ids`` is the database order — the real database is the image folder, which the
    pipeline passes; when None, it is the sorted union of every name in the files (queries
    included), which misses images that appear in no list. ``dataset`` defaults to the folder
    name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {folder}")
    query_files = sorted(folder.glob("*_query.txt"))
    if not query_files:
        raise ValueError(f"{folder}: no '*_query.txt' files")
    names = sorted((p.name[: -len("_query.txt")] for p in query_files), key=_query_sort_key)

    queries: list[Query] = []
    all_names: set[str] = set()
    for name in names:
        image_id, bbox = _read_query_file(folder / f"{name}_query.txt")
        good = _read_name_list(folder / f"{name}_good.txt")
        ok = _read_name_list(folder / f"{name}_ok.txt")
        junk = _read_name_list(folder / f"{name}_junk.txt")
        positives = good | ok
        both = sorted(positives & junk)
        if both:
            raise ValueError(f"{folder / f'{name}_junk.txt'}: {both[0]!r} is also a positive")
        all_names |= positives | junk | {image_id}
        queries.append(Query(image_id, bbox, frozenset(positives), frozenset(junk), name=name))

    if image_ids is None:
        db = tuple(sorted(all_names))
    else:
        db = _check_unique_ids(list(image_ids), "image_ids")
    return GroundTruth(
        dataset=dataset or folder.name,
        image_ids=db,
        queries=tuple(queries),
        revisited=False,
        queries_in_database=True,
    )


# --------------------------------------------------------------------------------------------
# gnd_*.pkl
# --------------------------------------------------------------------------------------------


class UnsafePickleError(ValueError):
    """A pickle asked for a global outside the ground-truth allow-list, or to build more than a
    ground-truth file may (see :class:`PickleLimitError`)."""


class PickleLimitError(UnsafePickleError):
    """Loading a pickle would allocate more than :data:`MAX_GND_PICKLE_BYTES`, nest deeper
    than :data:`MAX_GND_PICKLE_DEPTH`, or build an object from a count (``bytearray(n)``)."""


#: What loading one ground-truth pickle may allocate (file, objects and arrays, estimated
#: before each allocation); the official ``gnd_*.pkl`` files need under 10 MB.
MAX_GND_PICKLE_BYTES = 256 * 1024 * 1024
#: How deep a ground-truth pickle's containers may nest (the official files: 4 levels).
MAX_GND_PICKLE_DEPTH = 32
#: Bytes charged per pickle opcode: the most one opcode adds besides its data (an object
#: header or a reference).
_OPCODE_COST = 64
#: Longest text a pickle may hand to ``int``/``float``/``complex``.
_MAX_NUMBER_TEXT = 4300


def _numpy_attr(module: str, name: str) -> Any:
    """Resolve an allowed numpy global without importing the deprecated ``numpy.core``."""
    import importlib

    sub = module.split(".", 2)[-1] if module.startswith(("numpy.core.", "numpy._core.")) else ""
    if module == "numpy":
        return getattr(np, name)
    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{sub}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name}")


_SAFE_BUILTINS = frozenset(
    {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
     "bytearray", "bool"}
)  # fmt: skip
_NUMPY_MODULES = ("numpy.core", "numpy._core")
_SAFE_NUMPY = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (f"{base}.{mod}", name)
            for base in _NUMPY_MODULES
            for mod, name in (
                ("multiarray", "_reconstruct"),
                ("multiarray", "scalar"),
                ("numeric", "_frombuffer"),  # protocol-5 arrays
            )
        ),
    }
)
_SIZED = (list, tuple, set, frozenset, dict, str, bytes, bytearray)


class _NdarrayType:
    """What ``numpy.ndarray`` resolves to: only :func:`numpy.core.multiarray._reconstruct`
    accepts it; calling it (``ndarray(shape)`` allocates from a count) is refused."""

    def __init__(self, unpickler: _RestrictedUnpickler) -> None:
        self._unpickler = unpickler

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unpickler.limit("numpy.ndarray(...) called directly (allocates from a shape)")


def _nbytes(shape: Any, dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (exact integers; ValueError when odd)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"invalid array shape {shape!r}")
    n = np.dtype(dtype).itemsize
    for d in dims:
        n *= d
    return n


_PY_UNPICKLER: Any = pickle._Unpickler  # type: ignore[attr-defined]


class _RestrictedUnpickler(_PY_UNPICKLER):
    """The pure-Python unpickler, restricted for ground truth.

    Only builtin containers/scalars and what rebuilds numpy arrays may be loaded, and each
    through a wrapper that checks its arguments and charges what it will allocate *before* it
    runs: ``bytearray(n)``, ``ndarray(shape)`` and other allocations from a count are refused,
    and the total (the file, ``_OPCODE_COST`` per opcode, every copy and array) is capped at
    ``max_bytes``. NEWOBJ and BUILD on anything but numpy arrays and dtypes are refused.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(_PY_UNPICKLER.dispatch)

    def __init__(self, data: bytes, path: Path, max_bytes: int) -> None:
        import io

        super().__init__(io.BytesIO(data), encoding="latin1")  # latin1: Python-2 numpy pickles
        self._path = path
        self._max_bytes = max_bytes
        self._used = 0
        self.charge(len(data), "the file itself")

    # ---- accounting ----------------------------------------------------------------------

    def limit(self, what: str) -> PickleLimitError:
        return PickleLimitError(
            f"{self._path}: refused to load this ground-truth pickle: {what}; a ground-truth "
            f"file may allocate at most {self._max_bytes} bytes and nest "
            f"{MAX_GND_PICKLE_DEPTH} levels, and may not build objects from a count"
        )

    def charge(self, n: int, what: str) -> None:
        """Count ``n`` bytes about to be allocated; refuse past the cap."""
        self._used += n
        if self._used > self._max_bytes:
            raise self.limit(f"it would allocate over {self._max_bytes} bytes ({what})")

    # ---- globals ---------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return self._builtin(name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles
            return self._encode
        if (module, name) in _SAFE_NUMPY:
            if name == "ndarray":
                return _NdarrayType(self)
            return getattr(self, f"_np{name}")
        raise UnsafePickleError(f"{self._path}: refused to load global {module}.{name}")

    def _builtin(self, name: str) -> Any:
        import builtins

        func = getattr(builtins, name)

        def call(*args: Any) -> Any:
            label = f"builtins.{name}"
            if len(args) > 3:
                raise self.limit(f"{label} with {len(args)} arguments")
            if name in ("int", "float", "complex", "bool"):
                for a in args:
                    if isinstance(a, (str, bytes, bytearray)) and len(a) > _MAX_NUMBER_TEXT:
                        raise self.limit(f"{label} of a {len(a)}-character text")
                    if not isinstance(a, (str, bytes, bytearray, int, float, complex)):
                        raise self.limit(f"{label} of a {type(a).__name__}")
                self.charge(_OPCODE_COST, label)
                return func(*args)
            if args and not isinstance(args[0], _SIZED):
                # bytearray(n), bytes(n) allocate n bytes; str(x)/list(x) of anything but a
                # sized builtin could run arbitrary code or copy without bound.
                raise self.limit(
                    f"{label}({type(args[0]).__name__}) builds an object from a count or an "
                    "unsized value"
                )
            if name == "str" and args and not isinstance(args[0], (str, bytes, bytearray)):
                raise self.limit(f"{label} of a {type(args[0]).__name__} (its repr is unbounded)")
            size = len(args[0]) if args else 0
            per_item = 1 if name in ("str", "bytes", "bytearray") else 16
            self.charge(_OPCODE_COST + per_item * size, f"{label} of {size} items")
            return func(*args)

        return call

    def _encode(self, obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        import codecs

        if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in (
            "latin1",
            "latin-1",
        ):
            raise self.limit(f"_codecs.encode({type(obj).__name__}, {encoding!r})")
        self.charge(_OPCODE_COST + len(obj), "_codecs.encode")
        return codecs.encode(obj, encoding, errors)

    def _npdtype(self, *args: Any) -> np.dtype:
        if not args or not all(isinstance(a, (str, bytes, bool, int)) for a in args[:3]):
            raise self.limit("numpy.dtype of anything but a type code")
        self.charge(_OPCODE_COST, "numpy.dtype")
        dt = np.dtype(*args)
        if dt.itemsize > self._max_bytes:
            raise self.limit(f"numpy.dtype of {dt.itemsize} bytes")
        return dt

    def _np_reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if not isinstance(subtype, _NdarrayType):
            raise self.limit(f"numpy _reconstruct of {subtype!r}, not numpy.ndarray")
        self.charge(_OPCODE_COST + _nbytes(shape, dtype), f"a numpy array of shape {shape!r}")
        return _numpy_attr("numpy._core.multiarray", "_reconstruct")(np.ndarray, shape, dtype)

    def _npscalar(self, dtype: Any, data: Any = None) -> Any:
        if not isinstance(dtype, np.dtype):
            raise self.limit("numpy scalar of anything but a dtype")
        self.charge(_OPCODE_COST + dtype.itemsize, f"a numpy scalar of {dtype}")
        scalar = _numpy_attr("numpy._core.multiarray", "scalar")
        return scalar(dtype) if data is None else scalar(dtype, data)

    def _np_frombuffer(self, buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
        self.charge(_OPCODE_COST + _nbytes(shape, dtype), f"a numpy array of shape {shape!r}")
        return _numpy_attr("numpy._core.numeric", "_frombuffer")(buf, dtype, shape, order)

    # ---- opcodes ---------------------------------------------------------------------------

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray) and isinstance(state, tuple) and len(state) in (4, 5):
            shape, dtype = state[-4], state[-3]
            self.charge(_nbytes(shape, dtype), f"a numpy array of shape {shape!r}")
        elif not isinstance(inst, np.dtype):
            raise self.limit(f"BUILD on a {type(inst).__name__} (sets the state of an object)")
        super().load_build()

    def load_newobj(self) -> None:
        raise self.limit("NEWOBJ (builds an instance of a class)")

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj


def _charging(op: Any) -> Any:
    def run(self: _RestrictedUnpickler) -> None:
        self.charge(_OPCODE_COST, "pickle opcodes")
        op(self)

    return run


_RestrictedUnpickler.dispatch = {k: _charging(v) for k, v in _RestrictedUnpickler.dispatch.items()}


def _check_depth(obj: Any, path: Path, limit: int = MAX_GND_PICKLE_DEPTH) -> None:
    """Refuse containers nested deeper than ``limit`` or holding themselves (iterative: no
    recursion, each shared object visited once)."""

    def children(o: Any) -> list[Any]:
        if isinstance(o, dict):
            return [*o.keys(), *o.values()]
        if isinstance(o, (list, tuple, set, frozenset)):
            return list(o)
        if isinstance(o, np.ndarray) and o.dtype == object:
            return list(o.reshape(-1))
        return []

    height: dict[int, int] = {}  # finished containers
    on_path: set[int] = set()
    stack: list[tuple[Any, list[Any]]] = []

    def enter(o: Any) -> None:
        kids = children(o)
        if not kids:
            height[id(o)] = 1
            return
        if id(o) in on_path:
            raise PickleLimitError(f"{path}: refused: a container of the pickle holds itself")
        on_path.add(id(o))
        stack.append((o, kids))

    enter(obj)
    while stack:
        o, kids = stack[-1]
        while kids and id(kids[-1]) in height:
            kids.pop()
        if kids:
            enter(kids.pop())
            continue
        stack.pop()
        on_path.discard(id(o))
        h = 1 + max((height[id(c)] for c in children(o)), default=0)
        if h > limit:
            raise PickleLimitError(
                f"{path}: refused: the pickle nests containers deeper than {limit} levels"
            )
        height[id(o)] = h


@contextlib.contextmanager
def _pkl_field(path: Path, where: str) -> Iterator[None]:
    """Re-raise a conversion error (TypeError, ValueError, OverflowError) of one pickle field
    as ValueError ``<file>: <where>: <error>``, unless it already names the file."""
    try:
        yield
    except (TypeError, ValueError, OverflowError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {where}: {exc}") from None


def _pkl_names(data: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    values = data.get(key)
    if values is None:
        raise ValueError(f"{path}: missing key {key!r} (keys: {sorted(data, key=repr)})")
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: [{key!r}] must be a list of names, not {type(values).__name__}")
    names = [v.item() if isinstance(v, np.generic) else v for v in list(values)]
    for i, name in enumerate(names):
        check_image_id(name, f"{path} [{key}][{i}]")
    return _check_unique_ids(names, f"{path} [{key}]")


def _pkl_indices(value: Any, n_db: int, path: Path, where: str) -> list[int]:
    with _pkl_field(path, where):
        arr = np.asarray(value).reshape(-1) if value is not None else np.empty(0)
        if arr.size and arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise ValueError(f"holds non-integer indices (dtype {arr.dtype})")
        idx = [int(i) for i in arr]
    bad = [i for i in idx if not 0 <= i < n_db]
    if bad:
        raise ValueError(f"{path}: {where} index {bad[0]} out of range for {n_db} images")
    return idx


def _pkl_bbox(bbx: Any, path: Path, where: str) -> tuple[float, float, float, float]:
    with _pkl_field(path, where):
        coords = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
        if len(coords) != 4:
            raise ValueError(f"must hold 4 numbers, got {bbx!r}")
    bbox = (coords[0], coords[1], coords[2], coords[3])
    if not all(np.isfinite(bbox)) or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        raise ValueError(
            f"{path}: {where} is {bbox!r}: zero area, inverted or not finite (expected x1 < x2 "
            "and y1 < y2)"
        )
    return bbox


def load_gnd_pickle(path: Path | str, max_bytes: int = MAX_GND_PICKLE_BYTES) -> GroundTruth:
    """Load a ``gnd_<dataset>.pkl`` (cirtorch / revisitop format) with a restricted unpickler.

    Classic files have per-query ``bbx``, ``ok``, ``junk``; revisited ones (detected by
    ``'easy'``) have ``bbx``, ``easy``, ``hard``, ``junk`` and their queries are not in the
    database. Query names are not stored in the pickle and are left empty. A pickle that needs
    any other global raises :class:`UnsafePickleError`; one that would allocate over
    ``max_bytes``, build an object from a count or nest deeper than
    :data:`MAX_GND_PICKLE_DEPTH` raises :class:`PickleLimitError`, before allocating.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth pickle not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise PickleLimitError(
            f"{path}: refused to load this ground-truth pickle: the file has {size} bytes, "
            f"over the limit of {max_bytes}"
        )
    raw = path.read_bytes()
    try:
        data = _RestrictedUnpickler(raw, path, max_bytes).load()
    except UnsafePickleError:
        raise
    except RecursionError:
        raise PickleLimitError(f"{path}: refused: the pickle nests too deeply") from None
    except Exception as exc:  # corrupt or truncated file
        raise ValueError(f"{path}: cannot unpickle ground truth: {exc}") from exc
    _check_depth(data, path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    imlist = _pkl_names(data, "imlist", path)
    qimlist = _pkl_names(data, "qimlist", path)
    gnd = data.get("gnd")
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        raise ValueError(
            f"{path}: 'gnd' must be a list with one entry per qimlist name ({len(qimlist)})"
        )
    flags = {isinstance(g, dict) and "easy" in g for g in gnd}
    if len(flags) > 1:
        raise ValueError(f"{path}: some gnd entries have 'easy' and others do not")
    revisited = flags == {True}
    fields = ("easy", "hard", "junk") if revisited else ("ok", "junk")

    n_db = len(imlist)
    queries = []
    for i, (qname, g) in enumerate(zip(qimlist, gnd, strict=True)):
        if not isinstance(g, dict):
            raise ValueError(f"{path}: gnd[{i}] is a {type(g).__name__}, not a dict")
        for f in fields:
            if f not in g:
                raise ValueError(f"{path}: gnd[{i}] lacks {f!r} (keys: {sorted(g)})")
        entry = f"gnd[{i}] (query {qname!r})"
        sets = {
            f: frozenset(imlist[j] for j in _pkl_indices(g[f], n_db, path, f"{entry} [{f!r}]"))
            for f in fields
        }
        bbx = g.get("bbx")
        bbox = None if bbx is None else _pkl_bbox(bbx, path, f"{entry} ['bbx']")
        if revisited:
            q = Query(
                qname, bbox, sets["easy"] | sets["hard"], sets["junk"], sets["easy"], sets["hard"]
            )
        else:
            q = Query(qname, bbox, sets["ok"], sets["junk"])
        queries.append(q)

    dataset = path.stem.removeprefix("gnd_")
    return GroundTruth(
        dataset=dataset,
        image_ids=imlist,
        queries=tuple(queries),
        revisited=revisited,
        queries_in_database=not revisited,
    )


# --------------------------------------------------------------------------------------------
# UKBench and Holidays
# --------------------------------------------------------------------------------------------

_UKBENCH_RE = re.compile(r"ukbench(\d+)")
_HOLIDAYS_RE = re.compile(r"(\d{4})(\d{2})")


def _basename_stem(image_id: str) -> str:
    """Last path component of an id, without a known image extension."""
    base = image_id.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and f".{ext.lower()}" in DEFAULT_IMAGE_EXTENSIONS:
        return stem
    return base


def ukbench_labels(image_ids: Sequence[str]) -> np.ndarray:
    """Object label (``number // 4``) of each UKBench id (``ukbench00123``, maybe ``jpg/…``)."""
    labels = np.empty(len(image_ids), dtype=np.int64)
    for i, image_id in enumerate(image_ids):
        m = _UKBENCH_RE.fullmatch(_basename_stem(str(image_id)))
        if m is None:
            raise ValueError(f"not a UKBench image id (ukbenchNNNNN): {image_id!r}")
        labels[i] = int(m.group(1)) // 4
    return labels


def ukbench_groundtruth(image_ids: Sequence[str]) -> GroundTruth:
    """Every image queries the whole set; positives = same object, the query included."""
    ids = _check_unique_ids(list(image_ids), "ukbench image_ids")
    labels = ukbench_labels(ids)
    groups: dict[int, list[str]] = {}
    for image_id, label in zip(ids, labels.tolist(), strict=True):
        groups.setdefault(label, []).append(image_id)
    members = {label: frozenset(g) for label, g in groups.items()}
    queries = tuple(
        Query(image_id, None, members[label], frozenset(), name=image_id)
        for image_id, label in zip(ids, labels.tolist(), strict=True)
    )
    return GroundTruth(
        "ukbench", ids, queries, revisited=False, queries_in_database=True, grouped=True
    )


def holidays_groundtruth(image_ids: Sequence[str]) -> GroundTruth:
    """INRIA Holidays (``123400.jpg``): group = first four digits, query = ``xxxx00``.

    Positives are the other images of the group; the query image itself is junk (it stays in
    the database but is ignored in its own ranking). Every group needs its ``xxxx00`` image.
    """
    ids = _check_unique_ids(list(image_ids), "holidays image_ids")
    groups: dict[str, list[tuple[str, str]]] = {}
    for image_id in ids:
        m = _HOLIDAYS_RE.fullmatch(_basename_stem(image_id))
        if m is None:
            raise ValueError(
                f"not an INRIA Holidays image id (six digits, e.g. 123400): {image_id!r}"
            )
        groups.setdefault(m.group(1), []).append((m.group(2), image_id))
    queries = []
    for group in sorted(groups):
        members = groups[group]
        query_ids = [image_id for suffix, image_id in members if suffix == "00"]
        if not query_ids:
            raise ValueError(f"Holidays group {group} has no query image {group}00")
        if len(query_ids) > 1:
            raise ValueError(f"Holidays group {group} has several query images: {query_ids}")
        qid = query_ids[0]
        positives = frozenset(image_id for _, image_id in members if image_id != qid)
        queries.append(Query(qid, None, positives, frozenset({qid}), name=group))
    return GroundTruth(
        "holidays", ids, tuple(queries), revisited=False, queries_in_database=True, grouped=True
    )


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------

#: What ``stat`` says a directory entry is, for messages (regular files and folders aside).
_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "folder"),
    (stat.S_ISLNK, "symlink"),
)


def file_kind(mode: int) -> str:
    """``"regular file"``, ``"folder"``, ``"FIFO"``, ``"socket"``, … for a ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "special file")


def shown_name(name: str) -> str:
    """``name`` as text that can be stored and printed: bytes that are not UTF-8 (decoded by
    Python as surrogate escapes) become ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _message_name(name: str) -> str:
    """:func:`shown_name` with control characters as ``\\xNN`` too (one line in messages)."""
    return "".join(
        ch if ord(ch) >= 32 and ord(ch) != 127 else f"\\x{ord(ch):02x}" for ch in shown_name(name)
    )


def name_problem(relpath: str) -> str | None:
    """Why a relative path cannot be an image id (None when it can).

    Image ids are stored as UTF-8 text, printed in logs and reports and written one per line
    in ground-truth lists, and they may not hold backslashes (see :func:`check_image_id`): so
    names that are not UTF-8, hold a backslash or a control character are refused.
    """
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (image ids are UTF-8 text)"
    if "\\" in relpath:
        return "its name contains a backslash, which image ids may not hold"
    bad = next((ch for ch in relpath if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        return f"its name contains the control character U+{ord(bad):04X}"
    return None


@dataclass(frozen=True)
class ScannedFile:
    """A file of an image folder that has an image extension.

    ``relpath`` and ``image_id`` are the names as Python decodes them (not-UTF-8 bytes as
    surrogate escapes, see :func:`shown_name`). ``error`` says why the file cannot be indexed
    (not a regular file, vanished, unrepresentable name); such a file is never opened.
    """

    image_id: str
    relpath: str
    size: int
    mtime_ns: int
    error: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """An entry of an image folder that is not an image candidate, and why."""

    relpath: str
    reason: str


@dataclass
class FolderScan:
    """The result of :func:`scan_folder`: image candidates (sorted) and skipped entries."""

    files: list[ScannedFile]
    skipped: list[SkippedFile]

    @property
    def images(self) -> list[ScannedFile]:
        """The candidates that can be read (no ``error``)."""
        return [f for f in self.files if f.error is None]


def skipped_summary(skipped: Sequence[SkippedFile], *, names: int = 5) -> str:
    """``"3 files (2 unsupported extension .gif, 1 not a regular file (FIFO)): a.gif, …"``;
    empty when nothing was skipped. ``names`` file names are listed at most."""
    if not skipped:
        return ""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    reasons = ", ".join(
        f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    listed = ", ".join(shown_name(s.relpath) for s in skipped[:names])
    more = f" and {len(skipped) - names} more" if len(skipped) > names else ""
    noun = "file" if len(skipped) == 1 else "files"
    return f"{len(skipped)} {noun} ({reasons}): {listed}{more}"


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan_folder(
    root: Path | str,
    extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
    *,
    flat: bool = False,
) -> FolderScan:
    """Every entry under ``root``: image candidates with ``stat`` data, and what was skipped.

    Nothing is opened: entries are listed and ``stat``-ed only, so no FIFO, device or socket
    can block the scan. A candidate is an entry whose extension is in ``extensions``
    (case-insensitive) and that is not a folder; one that is not a regular file (after
    following a symlink), that vanished between the listing and its ``stat``, or whose name
    cannot be an image id (:func:`name_problem`) carries an ``error`` and is never read. Any
    other entry is skipped with its reason: hidden names (files and folders starting with
    ``.``), broken or looping symlinks, other extensions, non-regular files, a sub-folder that
    vanished before it was listed.

    ``image_id`` is the relative path without extension (``"shard1/img"``), or the bare file
    stem with ``flat=True``. Ids of readable candidates must be unique. Symlinks resolving
    inside ``root`` are followed (each real folder once, so loops end); one to an image or
    folder outside ``root`` raises ValueError naming it.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder not found: {root_path}")
    real_root = root_path.resolve()
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}

    found: list[ScannedFile] = []
    skipped: list[SkippedFile] = []
    visited: set[Path] = {real_root}
    stack: list[tuple[Path, tuple[str, ...]]] = [(root_path, ())]
    while stack:
        folder, rel_parts = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if not rel_parts:
                raise
            logger.warning("skipping folder %s: it vanished after the listing", folder)
            skipped.append(SkippedFile("/".join(rel_parts), "folder vanished after the listing"))
            continue
        for entry in entries:
            parts = (*rel_parts, entry.name)
            rel = "/".join(parts)
            if entry.name.startswith("."):
                skipped.append(SkippedFile(rel, "hidden name"))
                continue
            path = Path(entry.path)
            ext = Path(entry.name).suffix.lower()
            candidate = ext in exts
            shown = root_path / _message_name(rel)
            link = entry.is_symlink()
            if link:
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError) as exc:
                    logger.warning("skipping broken or looping symlink %s (%s)", shown, exc)
                    skipped.append(SkippedFile(rel, "broken or looping symlink"))
                    continue
                if not _is_within(target, real_root) and (candidate or target.is_dir()):
                    raise ValueError(
                        f"symlink {shown} points outside the image folder {root_path}: {target}"
                    )
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if not candidate:
                    skipped.append(SkippedFile(rel, "vanished or unreadable entry"))
                    continue
                what = "cannot stat it"
                if isinstance(exc, FileNotFoundError):
                    what = "it vanished after the listing"
                error = f"cannot load image '{shown}': {what} ({exc.strerror or exc})"
                found.append(_candidate(rel_parts, entry.name, rel, flat, -1, -1, error))
                continue
            if stat.S_ISDIR(st.st_mode):
                real = target if link else path.resolve()
                if real in visited:
                    logger.warning("skipping %s: folder %s already scanned", shown, real)
                    continue
                visited.add(real)
                stack.append((path, parts))
                continue
            kind = file_kind(st.st_mode)
            via = ", through a symlink" if link else ""
            if not candidate:
                reason = (
                    f"not a regular file ({kind})"
                    if kind != "regular file"
                    else f"unsupported extension {ext}"
                    if ext
                    else "no extension"
                )
                skipped.append(SkippedFile(rel, reason))
                continue
            error = None
            if kind != "regular file":
                error = (
                    f"cannot load image '{shown}': not a regular file ({kind}{via}); only "
                    "regular files are read"
                )
            elif (problem := name_problem(rel)) is not None:
                error = f"cannot load image '{shown}': {problem}"
            found.append(
                _candidate(
                    rel_parts, entry.name, rel, flat, int(st.st_size), int(st.st_mtime_ns), error
                )
            )

    found.sort(key=lambda f: f.relpath)
    skipped.sort(key=lambda s: s.relpath)
    by_id: dict[str, str] = {}
    for f in found:
        if f.error is not None:
            continue
        if f.image_id in by_id:
            raise ValueError(
                f"image id {f.image_id!r} is not unique: {by_id[f.image_id]!r} and {f.relpath!r}"
            )
        by_id[f.image_id] = f.relpath
    return FolderScan(found, skipped)


def _candidate(
    rel_parts: tuple[str, ...],
    name: str,
    rel: str,
    flat: bool,
    size: int,
    mtime_ns: int,
    error: str | None,
) -> ScannedFile:
    stem = Path(name).stem
    image_id = stem if flat else "/".join((*rel_parts, stem))
    return ScannedFile(image_id, rel, size, mtime_ns, error)


def scan_image_folder(
    root: Path | str,
    extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
    *,
    flat: bool = False,
) -> list[tuple[str, str]]:
    """The readable images under ``root`` as sorted ``(image_id, relative posix path)`` pairs.

    :func:`scan_folder`'s candidates without an ``error``; the others are logged as warnings
    and left out. A plain folder carries no ground truth (distractors).
    """
    scan = scan_folder(root, extensions, flat=flat)
    for f in scan.files:
        if f.error is not None:
            logger.warning("skipping %s", f.error)
    return [(f.image_id, f.relpath) for f in scan.images]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def validate_groundtruth(gt: GroundTruth, available_ids: Iterable[str]) -> list[str]:
    """Check ``gt`` against the available images; return warnings for missing names.

    A missing query image raises ValueError (it cannot be searched); missing positives, junk
    or database images only produce warnings (the evaluation still counts missing positives in
    ``nres``, so they lower the AP).
    """
    available = set(available_ids)
    for q in gt.queries:
        if q.image_id not in available:
            raise ValueError(
                f"{gt.dataset}: query image {q.image_id!r} (query {q.name or '?'}) is not "
                "among the available images"
            )
    warnings: list[str] = []
    missing_db = [i for i in gt.image_ids if i not in available]
    if missing_db:
        shown = ", ".join(repr(i) for i in missing_db[:5])
        more = f" and {len(missing_db) - 5} more" if len(missing_db) > 5 else ""
        warnings.append(
            f"{gt.dataset}: {len(missing_db)} of {len(gt.image_ids)} database images are "
            f"missing: {shown}{more}"
        )
    for q in gt.queries:
        label = q.name or q.image_id
        for field, names in (("positive", q.positives), ("junk", q.junk)):
            missing = sorted(names - available)
            if missing:
                warnings.append(
                    f"{gt.dataset}: query {label!r}: {len(missing)} of {len(names)} {field} "
                    f"images missing from the database: {', '.join(missing)}"
                )
    return warnings
