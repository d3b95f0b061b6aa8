"""``gnd_<dataset>.pkl`` ground truth (cirtorch / revisitop format, classic and revisited),
loaded through :mod:`cw_pipeline.core.datasets.safe_pickle`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cw_pipeline.core.datasets.model import GroundTruth, Query, check_image_id, check_unique_ids
from cw_pipeline.core.datasets.safe_pickle import (
    MAX_GND_PICKLE_BYTES,
    PickleLimitError,
    UnsafePickleError,
    _check_depth,
    _RestrictedUnpickler,
)


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
    return check_unique_ids(names, f"{path} [{key}]")


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
