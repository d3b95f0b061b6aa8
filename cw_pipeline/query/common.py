"""The query's data types and checks: errors, hits and results, a loaded database
(:class:`SearchIndex`), and reading the query image and its box."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.extract import ImageFeatures
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.core.methods import Method
from cw_pipeline.core.ranking import FullOrder

#: What a source says of its PCA (dropped for a method without PCA).
_PCA_NOTE = re.compile(r" \((?:PCA learned on [^)]*|each half with the PCA of the other)\)")

Box = tuple[float, float, float, float]


class QueryError(ValueError):
    """A query the user can fix: missing or unreadable image, or a bad box."""


class NotIndexedError(ValueError):
    """The dataset's index is not (fully) materialized; the message says what to run."""


class BrokenIndexError(ValueError):
    """A dataset's published index cannot be searched (a damaged file, descriptors and PCA
    of different dimensions); the message names the files and says what to run."""


class InconsistentIndexError(NotIndexedError):
    """The published parts of a database are of two states (distractor descriptors not yet
    re-projected with the dataset's new PCA): a reader that holds an earlier consistent
    database keeps it and tries again later."""


@dataclass(frozen=True)
class Hit:
    """One result: rank (1-based), image id, cosine score and the image's path."""

    rank: int
    image_id: str
    score: float
    path: Path

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.image_id, "score": self.score, "path": str(self.path)}


@dataclass
class QueryResult:
    """The ranked results of one query."""

    dataset: str
    query: Path
    box: Box | None
    method: str
    protocol: str | None
    database: int
    descriptors: str
    hits: list[Hit]
    seconds: float = 0.0
    map_forward_passes: int = 0
    #: seconds of the query's features (decoded image → forward pass) and of the ranking
    timings: dict[str, float] = field(default_factory=dict)
    #: the query's features (classes, class vectors), for CAM views
    record: ImageFeatures | None = field(default=None, repr=False)
    #: the order of every database row (``search_image(full_ranking=True)`` only): where any
    #: row stands (``order.positions(rows)``) without sorting the database
    order: FullOrder | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "query": str(self.query),
            "box": None if self.box is None else list(self.box),
            "method": self.method,
            "protocol": self.protocol,
            "database": self.database,
            "descriptors": self.descriptors,
            "results": [h.as_dict() for h in self.hits],
            "map_forward_passes": self.map_forward_passes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class SearchIndex:
    """Database descriptors of one dataset, by aggregation, and the PCA of each row group.

    ``groups`` lists (rows, PCA models by space ``class``/``raw``, or None without PCA): one
    group, or the two halves of a self-split dataset (each with an evaluation's distractors).
    """

    dataset: DatasetConfig
    ids: list[str]
    paths: list[Path]
    descriptors: dict[str, np.ndarray]
    groups: list[tuple[np.ndarray, dict[str, PCAWhitening] | None]]
    source: str
    #: (first row, dataset) of each dataset's rows; empty: all rows are ``dataset``'s
    owners: tuple[tuple[int, str], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def described(self, method: Method) -> str:
        """:attr:`source`, without what it says of the PCA for a method that uses none."""
        return self.source if method.uses_pca else _PCA_NOTE.sub("", self.source)

    @cached_property
    def group_is_all(self) -> tuple[bool, ...]:
        """Per group: whether its rows are all of the database, in order (no copy needed)."""
        n = len(self.ids)
        return tuple(
            len(rows) == n and (n == 0 or bool(np.array_equal(rows, np.arange(n))))
            for rows, _ in self.groups
        )

    def owner(self, row: int) -> str:
        """The dataset whose image is database row ``row``."""
        name = self.dataset.name
        for first, dataset in self.owners:
            if row >= first:
                name = dataset
        return name


def load_query_image(path: Path):
    """The query as an upright RGB image; QueryError naming the file when it cannot be read."""

    path = Path(path)
    if not path.exists():
        raise QueryError(f"query image not found: {path}")
    if path.is_dir():
        raise QueryError(f"query image is a folder, not a file: {path}")
    try:
        return load_image(path)
    except ImageLoadError as exc:
        raise QueryError(str(exc)) from exc
    except OSError as exc:
        raise QueryError(f"cannot read query image {path}: {exc.strerror or exc}") from exc


def check_box(box: Sequence[float], size: tuple[int, int], path: Path) -> Box:
    """``box`` (x1, y1, x2, y2 in the upright image's pixels) if it has area and lies inside an
    image of ``size``; QueryError otherwise."""
    values = tuple(float(v) for v in box)
    w, h = size
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise QueryError(f"--box needs 4 finite numbers x1 y1 x2 y2, got {list(box)}")
    x1, y1, x2, y2 = values
    shown = " ".join(f"{v:g}" for v in values)
    if x2 <= x1 or y2 <= y1:
        raise QueryError(f"box {shown} has zero area (need x1 < x2 and y1 < y2)")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise QueryError(
            f"box {shown} is outside the {w}x{h} image {path} (need 0 <= x1 < x2 <= {w}, "
            f"0 <= y1 < y2 <= {h})"
        )
    return values  # type: ignore[return-value]
