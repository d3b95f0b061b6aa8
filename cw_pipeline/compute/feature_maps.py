"""Kept feature maps: what OnA and CAM-box re-ranking read from an image, computed once per
image content.

Each image's float16 maps (X, and A when it differs: exactly what a forward pass gives the
search, :class:`~cw_pipeline.core.extract.FeatureMaps`) are one ``.npz`` in the warehouse at
:func:`~cw_pipeline.store.feature_maps_path`: keyed by the image file's sha1 and the code
version of the extraction settings, so a changed image (new sha1) or changed settings never
reuse them, and the same content in two datasets is kept once.

The features step writes them for the images it runs the network on when an evaluation will
read them (:func:`maps_wanted_at_indexing`), so those images never get a second forward pass;
the rankings step writes those it had to compute (an image of another extraction, maps kept
before this existed, or over the budget then). The store stops taking maps once the folder
holds ``feature_maps.budget_gb``: maps over the budget are recomputed when needed, never an
error (``cw-pipeline`` counts them as ``maps_over_budget``).
"""

from __future__ import annotations

import io
import logging
import zipfile

import numpy as np

from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.methods import Method
from cw_pipeline.store import FEATURE_MAPS, FeatureStore, feature_maps_path

logger = logging.getLogger(__name__)

_GB = 1e9


def encode_maps_file(maps: FeatureMaps) -> bytes:
    """The ``.npz`` bytes of one image's maps (no pickles; zip CRCs checked on read)."""
    arrays = {
        "features": np.ascontiguousarray(maps.features, dtype=np.float16),
        "sizes": np.array([*maps.input_size, *maps.image_size], dtype=np.int32),
    }
    if maps.cam_maps is not None:
        arrays["cam_maps"] = np.ascontiguousarray(maps.cam_maps, dtype=np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_maps_file(data: bytes) -> FeatureMaps:
    """The maps :func:`encode_maps_file` wrote; ValueError saying what is wrong otherwise."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a feature maps file ({exc})") from None
    x, sizes, a = arrays.get("features"), arrays.get("sizes"), arrays.get("cam_maps")
    if x is None or sizes is None or x.ndim != 3 or x.dtype != np.float16 or sizes.shape != (4,):
        raise ValueError(f"not a feature maps file (arrays {sorted(arrays)})")
    if a is not None and (a.ndim != 3 or a.shape[1:] != x.shape[1:]):
        raise ValueError(f"cam maps {a.shape} are not on the grid of the features {x.shape}")
    s = [int(v) for v in sizes]
    return FeatureMaps(features=x, cam_maps=a, input_size=(s[0], s[1]), image_size=(s[2], s[3]))


class WarehouseMaps:
    """The kept maps of one extraction's settings (a :class:`~cw_pipeline.core.retrieval.
    MapStore`): ``get``/``put`` by image sha1.

    ``budget_bytes`` bounds the whole ``feature_maps`` folder (None: unbounded); a ``put`` that
    would exceed it is skipped and counted in ``over_budget``. A damaged file is a miss (the
    maps are recomputed and written again), logged once.
    """

    def __init__(self, store: FeatureStore, extraction: str, budget_bytes: int | None) -> None:
        self.store = store
        self.extraction = extraction
        self.budget_bytes = budget_bytes
        self.written = 0
        self.written_bytes = 0
        self.over_budget = 0
        self.damaged = 0
        self._used: int | None = None

    def __repr__(self) -> str:
        return f"WarehouseMaps({self.store.url(FEATURE_MAPS)}, extraction={self.extraction})"

    def get(self, key: str) -> FeatureMaps | None:
        rel = feature_maps_path(self.extraction, key)
        try:
            return decode_maps_file(self.store.read_bytes(rel))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.damaged += 1
            logger.warning("%s: %s; recomputing these maps", self.store.url(rel), exc)
            return None

    def used_bytes(self) -> int:
        """Bytes held by the whole ``feature_maps`` folder (measured once, then counted)."""
        if self._used is None:
            try:
                self._used = int(self.store.fs.du(self.store.path(FEATURE_MAPS)))
            except FileNotFoundError:
                self._used = 0
        return self._used

    def put(self, key: str, maps: FeatureMaps) -> None:
        rel = feature_maps_path(self.extraction, key)
        if self.store.exists(rel):  # content-addressed: the same content is there already
            return
        data = encode_maps_file(maps)
        if self.budget_bytes is not None and self.used_bytes() + len(data) > self.budget_bytes:
            self.over_budget += 1
            if self.over_budget == 1:
                logger.warning(
                    "%s holds %.2f GB, the budget is %.2f GB (feature_maps.budget_gb): maps "
                    "over it are not kept, they are recomputed when a search needs them",
                    self.store.url(FEATURE_MAPS),
                    self.used_bytes() / _GB,
                    self.budget_bytes / _GB,
                )
            return
        self.store.write_bytes(rel, data)
        self._used = self.used_bytes() + len(data)
        self.written += 1
        self.written_bytes += len(data)

    def statistics(self) -> dict[str, int]:
        return {
            "maps_written": self.written,
            "maps_written_bytes": self.written_bytes,
            "maps_over_budget": self.over_budget,
        }


def warehouse_maps(config: ProjectConfig, store: FeatureStore, ds: DatasetConfig) -> WarehouseMaps:
    """The kept maps of ``ds``'s extraction settings, under the project's budget."""
    budget = config.feature_maps.budget_bytes
    return WarehouseMaps(store, ds.extraction.code_version(), budget)


def _needs_every_image(methods: tuple[Method, ...]) -> bool:
    return any(m.spec.online for m in methods)


def maps_wanted_at_indexing(config: ProjectConfig, ds: DatasetConfig) -> bool:
    """Whether the features step keeps the maps of the images it runs the network on: ``ds`` is
    evaluated by a method that reads maps (OnA reads every image's, re-ranking those of each
    query's top R), or is the distractor set of an evaluation with OnA (every image).
    Distractor sets evaluated with re-ranking only keep the maps of their images that enter a
    top R, when the rankings compute them."""
    if not config.feature_maps.at_indexing or config.feature_maps.budget_bytes == 0:
        return False
    for ev in config.evaluations.values():
        if ev.dataset == ds.name and any(m.needs_maps for m in ev.methods):
            return True
        if ds.name in ev.distractors and _needs_every_image(ev.methods):
            return True
    return False
