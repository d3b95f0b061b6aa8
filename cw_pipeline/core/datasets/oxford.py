"""The official Oxford/Paris ground-truth folders (``<name>_<n>_{query,good,ok,junk}.txt``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cw_pipeline.core.datasets.model import GroundTruth, Query, check_image_id, check_unique_ids
from cw_pipeline.core.datasets.text import read_text_lines

_OXFORD_QUERY_PREFIX = "oxc1_"


def _query_sort_key(name: str) -> tuple[str, int, str]:
    """Natural order of query names: ``all_souls_2`` before ``all_souls_10``."""
    stem, _, number = name.rpartition("_")
    if stem and number.isdigit():
        return (stem, int(number), name)
    return (name, -1, name)


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
        db = check_unique_ids(list(image_ids), "image_ids")
    return GroundTruth(
        dataset=dataset or folder.name,
        image_ids=db,
        queries=tuple(queries),
        revisited=False,
        queries_in_database=True,
    )
