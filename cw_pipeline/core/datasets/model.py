"""The ground-truth data model shared by every dataset layout: :class:`Query`,
:class:`GroundTruth`, the query protocols, image-id safety checks and
:func:`validate_groundtruth` (ground truth against the images actually present).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

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


def check_unique_ids(ids: Sequence[str], source: str) -> tuple[str, ...]:
    """Return ``ids`` as a tuple, raising ValueError on the first repeated id."""
    seen: set[str] = set()
    for image_id in ids:
        if not isinstance(image_id, str):
            raise ValueError(f"{source}: image ids must be strings, got {image_id!r}")
        if image_id in seen:
            raise ValueError(f"{source}: duplicate image id {image_id!r}")
        seen.add(image_id)
    return tuple(ids)


def basename_stem(image_id: str) -> str:
    """Last path component of an id, without a known image extension."""
    base = image_id.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and f".{ext.lower()}" in DEFAULT_IMAGE_EXTENSIONS:
        return stem
    return base


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
