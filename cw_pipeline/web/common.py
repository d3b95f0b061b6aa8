"""What the search page's modules share: limits, errors, the search target, the entries kept
of a loaded database and of a query, and small helpers (image links, ImageNet class names,
boxes, the upload limit's message)."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass

from cw_pipeline.core.extract import ImageFeatures
from cw_pipeline.core.methods import Method
from cw_pipeline.query import SearchIndex

#: Uploads larger than this are refused (``cw-pipeline serve --max-upload-mb``).
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Database feature maps kept across searches (``cw-pipeline serve --map-cache-mb``): about
#: 2 MB per Oxford-size image, so the top 100 of ``+r100`` fit many times over.
DEFAULT_MAP_CACHE_BYTES = 512 * 1024 * 1024
DEFAULT_TOP = 20
MAX_TOP = 500
#: The most images query expansion (+qe) and re-ranking (+r) may take from a ranking; never
#: more than the database holds either.
MAX_EXPANSION = 1000
#: How long the index state of the dataset picker (a stat scan of the folders) is reused.
FRESHNESS_SECONDS = 10.0
#: Queries kept for their result views (CAM, re-ranking box).
QUERY_CACHE = 64
#: Thumbnails kept in memory (encoded JPEG bytes).
THUMB_CACHE_BYTES = 64 * 1024 * 1024
THUMB_SIZES = (64, 2048)  #: smallest and largest ``size`` of /api/image


class WebError(Exception):
    """An error the user can act on: an HTTP status and one readable line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Target:
    """What is searched: a dataset's index, or an evaluation's (its dataset + distractors)."""

    kind: str  #: ``dataset`` or ``evaluation``
    name: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name}


@dataclass
class LoadedIndex:
    """A loaded database and what it was loaded from (kept per target and aggregation)."""

    signature: tuple
    index: SearchIndex
    rows: dict[str, int]  #: image id -> database row (ids are unique in a database)
    checked: float


@dataclass
class KeptQuery:
    """A query kept for its result views (by the token its search answered with)."""

    target: Target
    method: Method
    record: ImageFeatures
    loaded_at: tuple  #: the index signature the results came from


def imagenet_categories(n: int) -> list[str] | None:
    """ImageNet-1k class names for a classifier of ``n`` classes (None unless ``n`` is 1000;
    shipped inside torchvision, nothing is fetched)."""
    if n != 1000:
        return None
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``x1,y1,x2,y2`` → a box; None for an empty value; WebError 400 otherwise."""
    if text is None or not text.strip():
        return None
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise WebError(400, f"box must be 4 finite numbers x1,y1,x2,y2, got {text!r}")
    return values  # type: ignore[return-value]


def image_url(dataset: str, image_id: str) -> str:
    """The page's link to an indexed image (``/api/image``)."""
    return "/api/image?" + urllib.parse.urlencode({"dataset": dataset, "id": image_id})


def upload_too_large(size: int, limit: int) -> str:
    """The message refusing an upload of ``size`` bytes over ``limit`` (HTTP 413)."""
    return (
        f"the upload is {size / 2**20:.1f} MiB, over the limit of {limit / 2**20:.1f} MiB "
        "(cw-pipeline serve --max-upload-mb)"
    )
