"""A restricted, allocation-capped unpickler for ground-truth pickles: only builtin containers
and scalars and what rebuilds numpy arrays may be loaded, every allocation is charged before it
happens, and nesting depth is bounded (see :func:`cw_pipeline.core.datasets.gnd.load_gnd_pickle`).
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


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
