"""What the search page does, without HTTP: the state of one ``cw-pipeline serve`` process.

* The configuration is re-read when its file changes.
* One feature extractor (the CNN) per extraction settings, loaded on first use and kept.
* The database of each search target (a dataset, or an evaluation with distractors) is loaded
  once per aggregation and kept; it is reloaded when the stored files it came from change (a
  new materialization), checked at most every :data:`RELOAD_CHECK_SECONDS`.
* Images are found by manifest id only: no path from a request reaches the file system.
* Every search goes through :func:`cw_pipeline.query.search_image`, the function of
  ``cw-pipeline search``.

Errors the user can act on are :class:`WebError` (an HTTP status and one readable line).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import math
import os
import secrets
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cw_pipeline.compute.catalog import dataset_status, stored_shards
from cw_pipeline.config import (
    ConfigError,
    DatasetConfig,
    ProjectConfig,
    UnknownNameError,
    load_config,
)
from cw_pipeline.core import datasets as gtio
from cw_pipeline.core.experiment import Method
from cw_pipeline.core.extract import FeatureExtractor, ImageFeatures
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.query import (
    NotIndexedError,
    QueryError,
    SearchIndex,
    load_evaluation_index,
    load_index,
    load_query_image,
    search_image,
)
from cw_pipeline.store import (
    FEATURES,
    MANIFEST,
    FeatureStore,
    descriptors_folder,
    distractor_descriptors_folder,
    manifest_path,
    pca_folder,
    shard_folder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_TOP",
    "MAX_TOP",
    "SearchEngine",
    "Target",
    "WebError",
]

#: Uploads larger than this are refused (``cw-pipeline serve --max-upload-mb``).
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_TOP = 20
MAX_TOP = 500
#: How often, at most, a request checks whether the stored index changed.
RELOAD_CHECK_SECONDS = 2.0
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
class _Loaded:
    """A loaded database and what it was loaded from."""

    signature: tuple
    index: SearchIndex
    rows: dict[str, int]  #: image id -> database row (ids are unique in a database)
    checked: float


@dataclass
class _Query:
    """A query kept for its result views."""

    target: Target
    method: Method
    record: ImageFeatures
    loaded_at: tuple  #: the index signature the results came from


@dataclass
class _Manifest:
    signature: tuple
    rows: dict[str, dict[str, Any]]  #: image id -> relpath, width, height (readable files)


@dataclass
class _ThumbCache:
    limit: int
    items: OrderedDict = field(default_factory=OrderedDict)
    size: int = 0

    def get(self, key: tuple) -> bytes | None:
        data = self.items.get(key)
        if data is not None:
            self.items.move_to_end(key)
        return data

    def put(self, key: tuple, data: bytes) -> None:
        self.items[key] = data
        self.size += len(data)
        while self.size > self.limit and self.items:
            _, old = self.items.popitem(last=False)
            self.size -= len(old)


def _imagenet_categories(n: int) -> list[str] | None:
    """ImageNet-1k class names (shipped inside torchvision, nothing is fetched)."""
    if n != 1000:
        return None
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds")


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


class SearchEngine:
    """The search page's state: configuration, models, loaded databases (see module doc)."""

    def __init__(
        self,
        config_path: Path | str | None = None,
        *,
        dagster_url: str = "http://127.0.0.1:3000",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self.config_path = config_path
        self.dagster_url = dagster_url.rstrip("/")
        self.max_upload_bytes = int(max_upload_bytes)
        self._config: ProjectConfig | None = None
        self._config_mtime: int | None = None
        self._store: FeatureStore | None = None
        self._extractors: dict[str, FeatureExtractor] = {}
        self._indexes: dict[tuple[Target, str], _Loaded] = {}
        self._manifests: dict[str, _Manifest] = {}
        self._groundtruth: dict[str, tuple[tuple, gtio.GroundTruth | None]] = {}
        self._freshness: dict[str, tuple[float, dict[str, Any]]] = {}
        self._queries: OrderedDict[str, _Query] = OrderedDict()
        self._thumbs = _ThumbCache(THUMB_CACHE_BYTES)
        self._lock = threading.RLock()  # the CNN and the caches: one request at a time
        self.index_loads = 0  #: databases loaded (or reloaded) by this process

    # ------------------------------------------------------------------ configuration
    def config(self) -> ProjectConfig:
        """The configuration, re-read when its file changed (caches dropped then)."""
        from cw_pipeline.config import default_config_path

        path = Path(self.config_path) if self.config_path is not None else default_config_path()
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            raise WebError(500, f"configuration {path}: {exc.strerror or exc}") from exc
        with self._lock:
            if self._config is None or mtime != self._config_mtime:
                try:
                    config = load_config(path)
                except ConfigError as exc:
                    raise WebError(500, str(exc)) from exc
                self._config, self._config_mtime = config, mtime
                self._store = FeatureStore(config.warehouse)
                self._indexes.clear()
                self._manifests.clear()
                self._groundtruth.clear()
                self._freshness.clear()
            return self._config

    @property
    def store(self) -> FeatureStore:
        self.config()
        assert self._store is not None
        return self._store

    def target(self, dataset: str | None, evaluation: str | None) -> Target:
        """The target named by the request (exactly one of ``dataset``/``evaluation``)."""
        if bool(dataset) == bool(evaluation):
            raise WebError(400, "give exactly one of dataset=NAME or evaluation=NAME")
        config = self.config()
        try:
            if dataset:
                config.dataset(dataset)
                return Target("dataset", dataset)
            config.evaluation(evaluation)  # type: ignore[arg-type]
            return Target("evaluation", evaluation)  # type: ignore[arg-type]
        except UnknownNameError as exc:
            raise WebError(404, str(exc)) from exc

    def _datasets_of(self, target: Target) -> list[DatasetConfig]:
        config = self.config()
        if target.kind == "dataset":
            return [config.dataset(target.name)]
        ev = config.evaluation(target.name)
        return [config.dataset(ev.dataset), *(config.dataset(d) for d in ev.distractors)]

    def _main_dataset(self, target: Target) -> DatasetConfig:
        return self._datasets_of(target)[0]

    # ------------------------------------------------------------------ store signatures
    def _signature(self, prefixes: Sequence[str]) -> tuple:
        """(path, size, modification stamp) of every stored file under ``prefixes``."""
        store = self.store
        out = []
        for prefix in prefixes:
            base = store.path(prefix)
            try:
                found = store.fs.find(base, detail=True)
            except FileNotFoundError:
                continue
            for path, info in found.items():
                stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
                out.append((path, info.get("size"), str(stamp)))
        return tuple(sorted(out))

    def _prefixes(self, target: Target) -> list[str]:
        config = self.config()
        names = [d.name for d in self._datasets_of(target)]
        out = []
        for name in names:
            out += [shard_folder(MANIFEST, name), shard_folder(FEATURES, name)]
            out += [descriptors_folder(name), pca_folder(name)]
        evaluations = [target.name] if target.kind == "evaluation" else []
        if target.kind == "dataset" and not config.dataset(target.name).has_groundtruth:
            evaluations = [e.name for e in config.evaluations_for(target.name)]
        for ev in evaluations:
            out.append(distractor_descriptors_folder(ev))
        main = self._main_dataset(target)
        pca_source = config.paired(main.name)
        if pca_source is not None and pca_source.name not in names:
            out.append(pca_folder(main.name))
        return out

    # ------------------------------------------------------------------ databases
    def index(self, target: Target, method: Method) -> _Loaded:
        """The loaded database of ``target`` for ``method``'s stored aggregation (reloaded
        when its stored files changed)."""
        key = (target, method.stored_aggregation)
        with self._lock:
            loaded = self._indexes.get(key)
            now = time.monotonic()
            if loaded is not None and now - loaded.checked < RELOAD_CHECK_SECONDS:
                return loaded
            signature = self._signature(self._prefixes(target))
            if loaded is not None and loaded.signature == signature:
                loaded.checked = now
                return loaded
            config = self.config()
            try:
                if target.kind == "dataset":
                    index = load_index(config, self.store, target.name, method)
                else:
                    index = load_evaluation_index(config, self.store, target.name, method)
            except NotIndexedError as exc:
                raise WebError(409, str(exc)) from exc
            except (UnknownNameError, FileNotFoundError) as exc:
                raise WebError(404, str(exc)) from exc
            except ValueError as exc:
                raise WebError(400, str(exc)) from exc
            rows = {image_id: i for i, image_id in enumerate(index.ids)}
            loaded = _Loaded(signature, index, rows, time.monotonic())
            self._indexes[key] = loaded
            self.index_loads += 1
            logger.info("loaded %s %s: %d images (%s)", target.kind, target.name, len(index), key)
            return loaded

    def extractor(self, ds: DatasetConfig) -> FeatureExtractor:
        """The CNN for ``ds``'s extraction settings (one per settings, kept)."""
        from cw_pipeline.compute.features import dataset_extractor, feature_code_version

        key = f"{feature_code_version(ds)}|{ds.runtime.device}"
        with self._lock:
            if key not in self._extractors:
                self._extractors[key] = dataset_extractor(ds)
            return self._extractors[key]

    # ------------------------------------------------------------------ manifests, images
    def manifest(self, ds: DatasetConfig) -> dict[str, dict[str, Any]]:
        """Readable images of ``ds`` by id (relpath, width, height), from its stored
        manifests (reloaded when they change)."""
        prefix = shard_folder(MANIFEST, ds.name)
        with self._lock:
            cached = self._manifests.get(ds.name)
            signature = self._signature([prefix])
            if cached is not None and cached.signature == signature:
                return cached.rows
            rows: dict[str, dict[str, Any]] = {}
            for shard in stored_shards(self.store, MANIFEST, ds.name):
                table = self.store.read_table(
                    manifest_path(ds.name, shard),
                    ["image_id", "relpath", "width", "height", "error"],
                )
                for row in table.to_pylist():
                    if not row.pop("error"):
                        rows[row["image_id"]] = row
            self._manifests[ds.name] = _Manifest(signature, rows)
            return rows

    def image_path(self, dataset: str, image_id: str) -> Path:
        """The file of manifest id ``image_id`` of ``dataset`` (404 when it has none)."""
        try:
            ds = self.config().dataset(dataset)
        except UnknownNameError as exc:
            raise WebError(404, str(exc)) from exc
        row = self.manifest(ds).get(image_id)
        if row is None:
            raise WebError(404, f"dataset {dataset!r} has no indexed image with id {image_id!r}")
        return gtio.image_path(ds.images, row["relpath"])

    def image_bytes(self, dataset: str, image_id: str, size: int) -> bytes:
        """A JPEG of an indexed image, upright, its long side at most ``size`` pixels."""
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise WebError(400, f"size must be between {THUMB_SIZES[0]} and {THUMB_SIZES[1]}")
        path = self.image_path(dataset, image_id)
        try:
            stamp = path.stat().st_mtime_ns
        except OSError as exc:
            raise WebError(404, f"image {image_id!r} of {dataset!r}: {exc.strerror}") from exc
        key = (dataset, image_id, size, stamp)
        with self._lock:
            cached = self._thumbs.get(key)
        if cached is not None:
            return cached
        ds = self.config().dataset(dataset)
        try:
            image = load_image(path, max_pixels=ds.extraction.max_pixels)
        except (ImageLoadError, FileNotFoundError) as exc:
            raise WebError(422, f"image {image_id!r} of {dataset!r}: {exc}") from exc
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=88)
        data = buf.getvalue()
        with self._lock:
            self._thumbs.put(key, data)
        return data

    # ------------------------------------------------------------------ ground truth
    def groundtruth(self, ds: DatasetConfig) -> gtio.GroundTruth | None:
        """The ground truth of ``ds`` over its indexed images (None without one)."""
        from cw_pipeline.compute.queries import load_groundtruth

        if not ds.has_groundtruth:
            return None
        manifest = self.manifest(ds)
        signature = self._manifests[ds.name].signature
        with self._lock:
            cached = self._groundtruth.get(ds.name)
            if cached is not None and cached[0] == signature:
                return cached[1]
            try:
                gt = load_groundtruth(ds, sorted(manifest))
            except (OSError, ValueError) as exc:
                raise WebError(500, f"ground truth of {ds.name!r}: {exc}") from exc
            self._groundtruth[ds.name] = (signature, gt)
            return gt

    def _gt_query(self, ds: DatasetConfig, image_id: str, name: str | None) -> gtio.Query | None:
        gt = self.groundtruth(ds)
        if gt is None:
            return None
        for q in gt.queries:
            if (name and (q.name or q.image_id) == name) or (not name and q.image_id == image_id):
                return q
        if name:
            raise WebError(404, f"dataset {ds.name!r} has no ground-truth query named {name!r}")
        return None

    # ------------------------------------------------------------------ listing
    def targets(self) -> dict[str, Any]:
        """Every dataset and evaluation with distractors, with the state of its index."""
        config = self.config()
        out = []
        for name, ds in sorted(config.datasets.items()):
            out.append({**Target("dataset", name).as_dict(), **self._target_info([ds])})
        for name, ev in sorted(config.evaluations.items()):
            if ev.distractors:
                parts = [config.dataset(ev.dataset), *(config.dataset(d) for d in ev.distractors)]
                out.append({**Target("evaluation", name).as_dict(), **self._target_info(parts)})
        return {"config": str(config.source), "dagster_url": self.dagster_url, "targets": out}

    def _target_info(self, parts: list[DatasetConfig]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "datasets": [d.name for d in parts],
            "ground_truth": parts[0].has_groundtruth,
            "layout": parts[0].layout,
            "query_protocol": parts[0].query_protocol,
        }
        states = [self.freshness(d) for d in parts]
        info["images_indexed"] = sum(s["images_indexed"] for s in states)
        info["images_on_disk"] = sum(s["images_on_disk"] for s in states)
        info["not_indexed"] = sum(s["not_indexed"] for s in states)
        info["state"] = next((s["state"] for s in states if s["state"] != "indexed"), "indexed")
        stamps = [s["materialized"] for s in states if s["materialized"]]
        info["materialized"] = max(stamps) if stamps else None
        info["hint"] = " && ".join(s["hint"] for s in states if s["hint"])
        info["notes"] = [
            f"{d.name}: {n}" for d, s in zip(parts, states, strict=True) for n in s["notes"]
        ]
        return info

    def freshness(self, ds: DatasetConfig) -> dict[str, Any]:
        """Images on disk, indexed, not indexed yet, and the last descriptors written."""
        now = time.monotonic()
        with self._lock:
            cached = self._freshness.get(ds.name)
            if cached is not None and now - cached[0] < FRESHNESS_SECONDS:
                return cached[1]
        status = dataset_status(self.config(), self.store, ds)
        prefixes = [descriptors_folder(ds.name)]
        if not ds.has_groundtruth:
            prefixes = [
                distractor_descriptors_folder(e.name, ds.name)
                for e in self.config().evaluations_for(ds.name)
            ]
            if not any(self._signature([p]) for p in prefixes):
                prefixes = [shard_folder(FEATURES, ds.name)]
        signature = self._signature(prefixes)
        stamp = max((float(s) for _, _, s in signature if _is_number(s)), default=None)
        info = {
            "state": status.state,
            "images_on_disk": status.images_on_disk,
            "images_indexed": status.images_indexed,
            "not_indexed": max(0, status.images_on_disk - status.images_indexed - status.rejected),
            "rejected": status.rejected,
            "materialized": _iso(stamp),
            "hint": status.hint,
            "notes": list(status.notes),
        }
        with self._lock:
            self._freshness[ds.name] = (now, info)
        return info

    def images(
        self, target: Target, offset: int = 0, limit: int = 200, text: str = ""
    ) -> dict[str, Any]:
        """The target's images: ground-truth queries first (with their boxes), then the
        others by id; ``text`` filters by id or query name."""
        from cw_pipeline.compute.queries import query_box

        if offset < 0 or not 1 <= limit <= 1000:
            raise WebError(400, "offset must be >= 0 and limit between 1 and 1000")
        items: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for n, ds in enumerate(self._datasets_of(target)):
            manifest = self.manifest(ds)
            gt = self.groundtruth(ds) if n == 0 else None
            for q in gt.queries if gt is not None else ():
                row = manifest.get(q.image_id)
                if row is None:
                    continue
                try:
                    box = query_box(ds, q, row["width"], row["height"])
                except ValueError:
                    box = None
                items.append(_item(ds.name, q.image_id, row, query=q.name or q.image_id, box=box))
                seen.add((ds.name, q.image_id))
            for image_id in sorted(manifest):
                if (ds.name, image_id) not in seen:
                    items.append(_item(ds.name, image_id, manifest[image_id]))
        needle = text.strip().lower()
        if needle:
            items = [
                i
                for i in items
                if needle in i["id"].lower() or needle in (i["query"] or "").lower()
            ]
        return {
            "target": target.as_dict(),
            "total": len(items),
            "queries": sum(1 for i in items if i["query"]),
            "offset": offset,
            "items": items[offset : offset + limit],
        }

    # ------------------------------------------------------------------ search
    def search(
        self,
        target: Target,
        *,
        method: str = "ofa",
        top: int = DEFAULT_TOP,
        box: tuple[float, float, float, float] | None = None,
        protocol: str | None = None,
        image_id: str | None = None,
        image_dataset: str | None = None,
        query_name: str | None = None,
        upload: bytes | None = None,
        upload_name: str = "upload",
    ) -> dict[str, Any]:
        """Rank the target's database for an indexed image (by id) or an uploaded one."""
        t0 = time.perf_counter()
        try:
            m = Method.parse(method)
        except ValueError as exc:
            raise WebError(400, str(exc)) from exc
        if not 1 <= top <= MAX_TOP:
            raise WebError(400, f"top must be between 1 and {MAX_TOP}, got {top}")
        if (image_id is None) == (upload is None):
            raise WebError(400, "give an image: id=ID of an indexed image, or upload one")
        main = self._main_dataset(target)
        gt_query = None
        t_model, models = time.perf_counter(), len(self._extractors)
        extractor = self.extractor(main)  # loaded once per process
        model_seconds = time.perf_counter() - t_model if len(self._extractors) > models else 0.0
        if upload is not None:
            image, name = self._decode_upload(upload, upload_name, extractor), Path(upload_name)
            query: dict[str, Any] = {"upload": upload_name}
        else:
            owner = image_dataset or main.name
            if owner not in [d.name for d in self._datasets_of(target)]:
                raise WebError(400, f"{owner!r} is not a dataset of {target.kind} {target.name!r}")
            path = self.image_path(owner, image_id)  # type: ignore[arg-type]
            try:
                image = load_query_image(path)
            except QueryError as exc:
                raise WebError(422, str(exc)) from exc
            name = path
            query = {"id": image_id, "dataset": owner}
            if owner == main.name:
                gt_query = self._gt_query(main, image_id, query_name)  # type: ignore[arg-type]
        with self._lock:
            t_index = time.perf_counter()
            loads = self.index_loads
            loaded = self.index(target, m)
            index_seconds = time.perf_counter() - t_index if self.index_loads != loads else 0.0
            try:
                result = search_image(
                    self.config(),
                    loaded.index,
                    extractor,
                    image,
                    name,
                    box=box,
                    top=top,
                    method=m,
                    protocol=protocol,
                    full_ranking=gt_query is not None,
                )
            except QueryError as exc:
                raise WebError(400, str(exc)) from exc
            token = secrets.token_urlsafe(12)
            assert result.record is not None
            self._queries[token] = _Query(target, m, result.record, loaded.signature)
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        index = loaded.index
        labels: dict[int, str] = {}
        ap = None
        if gt_query is not None:
            assert result.ranking is not None
            labels, ap, n_pos = self._labels(loaded, gt_query, result.ranking)
            query.update(query=gt_query.name or gt_query.image_id, positives=n_pos)
        categories = _imagenet_categories(int(extractor.backbone.classifier_weight.shape[0]))
        rec = result.record
        query.update(
            box=None if result.box is None else list(result.box),
            protocol=result.protocol,
            classes=[
                {
                    "id": int(c),
                    "name": categories[int(c)] if categories else str(int(c)),
                    "prob": round(float(p), 4),
                }
                for c, p in zip(rec.class_ids[:5], rec.class_probs[:5], strict=True)
            ],
        )
        hits = []
        for hit in result.hits:
            row = loaded.rows[hit.image_id]
            owner = index.owner(row)
            hits.append(
                {
                    "rank": hit.rank,
                    "id": hit.image_id,
                    "dataset": owner,
                    "score": round(hit.score, 6),
                    "label": None if gt_query is None else labels.get(row, "negative"),
                    "image": _image_url(owner, hit.image_id),
                    "dagster": self.asset_url(target, owner),
                }
            )
        total = time.perf_counter() - t0
        return {
            "target": target.as_dict(),
            "query": query,
            "method": result.method,
            "database": len(index),
            "descriptors": index.source,
            "ap": None if ap is None else round(ap, 6),
            "results": hits,
            "map_forward_passes": result.map_forward_passes,
            "token": token,
            "timings_ms": {
                "features": round(1000 * result.timings["features"], 1),
                "ranking": round(1000 * result.timings["ranking"], 1),
                "index_load": round(1000 * index_seconds, 1),
                "model_load": round(1000 * model_seconds, 1),
                "server": round(1000 * total, 1),
            },
        }

    def _labels(
        self, loaded: _Loaded, q: gtio.Query, ranking: np.ndarray
    ) -> tuple[dict[int, str], float, int]:
        """Ground-truth label of each database row, the query's AP over the whole ranking
        (Oxford AP, junk ignored) and its number of positives."""
        from cw_pipeline.core.evaluation import average_precision

        index, rows = loaded.index, loaded.rows
        owner = index.dataset.name

        def found(ids: frozenset[str]) -> list[int]:
            return [rows[i] for i in sorted(ids) if i in rows and index.owner(rows[i]) == owner]

        pos, junk = found(q.positives), found(q.junk)
        labels = {r: "positive" for r in pos}
        labels.update({r: "junk" for r in junk})
        ap = average_precision(ranking, pos, junk) if pos else math.nan
        return labels, ap, len(pos)

    def _decode_upload(self, data: bytes, name: str, extractor: FeatureExtractor) -> Image.Image:
        """Decode an upload with indexing's limits (bomb limit, EXIF, odd modes)."""
        if len(data) > self.max_upload_bytes:
            raise WebError(413, _too_large(len(data), self.max_upload_bytes))
        if not data:
            raise WebError(400, f"the uploaded file {name!r} is empty")
        fd, tmp = tempfile.mkstemp(prefix="cw-upload-", suffix=Path(name).suffix[:10])
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return load_image(tmp, max_pixels=extractor.config.max_pixels)
        except ImageLoadError as exc:
            raise WebError(422, f"cannot read the uploaded file {name!r}: {exc.reason}") from exc
        finally:
            os.unlink(tmp)

    def asset_url(self, target: Target, dataset: str) -> str:
        """The Dagster UI page (lineage) of the asset whose descriptors hold ``dataset``'s
        images in ``target``."""
        config = self.config()
        ds = config.dataset(dataset)
        if ds.has_groundtruth:
            key = [dataset, "descriptors"]
        elif target.kind == "evaluation":
            key = [target.name, f"{dataset}_descriptors"]
        else:
            ev = next(
                (e for e in config.evaluations_for(dataset) if dataset in e.distractors), None
            )
            key = [ev.name, f"{dataset}_descriptors"] if ev else [dataset, "cam_features"]
        path = "/".join(urllib.parse.quote(k, safe="") for k in key)
        return f"{self.dagster_url}/assets/{path}?view=lineage"

    # ------------------------------------------------------------------ result view
    def detail(self, token: str, dataset: str, image_id: str) -> dict[str, Any]:
        """One result seen by a query: the mean CAM of the query's top classes over it and
        the region CAM-box re-ranking scores best (the whole image counts as one)."""
        import torch

        from cw_pipeline.compute.pca import method_pca
        from cw_pipeline.core.aggregation import aggregate
        from cw_pipeline.core.cams import boxes_to_pixels, class_activation_maps
        from cw_pipeline.core.search import region_scores
        from cw_pipeline.figures import cam_overlay, png_bytes

        with self._lock:
            q = self._queries.get(token)
            if q is None:
                raise WebError(404, "unknown or expired query token: search again")
            loaded = self.index(q.target, q.method)
            row = loaded.rows.get(image_id)
            if row is None or loaded.index.owner(row) != dataset:
                raise WebError(404, f"{image_id!r} of {dataset!r} is not in this search's index")
            index = loaded.index
            pcas = next(p for rows, p in index.groups if np.any(rows == row))
            class_method = q.method if q.method.aggregation in ("ofa", "ona") else Method("ofa")
            pca = method_pca(class_method, pcas)
            params = self.config().search
            cfg = params.rerank
            extractor = self.extractor(index.dataset)
            path = index.paths[row]
            t0 = time.perf_counter()
            try:
                image = load_image(path, max_pixels=extractor.config.max_pixels)
                resized, orig = extractor.prepare(image)
            except (ImageLoadError, FileNotFoundError, ValueError) as exc:
                raise WebError(422, f"image {image_id!r} of {dataset!r}: {exc}") from exc
            keep = extractor.keep_maps
            extractor.keep_maps = True
            try:
                rec = extractor.encode_batch([resized], [orig])[0]
            finally:
                extractor.keep_maps = keep
            assert rec.maps is not None
            weight, bias = extractor.backbone.classifier_weight, extractor.backbone.classifier_bias
            cv = q.record.class_vectors[None]
            q_r = aggregate(cv, pca, min(cfg.query_classes, cv.shape[1]))[0]
            regions = region_scores(q_r, q.record.class_ids, rec.maps, weight, bias, pca, cfg)
            x, a = rec.maps.tensors()
            ids = torch.as_tensor(np.asarray(q.record.class_ids[: cfg.box_classes], np.int64))
            with torch.inference_mode():
                heat = class_activation_maps(a, weight, ids, size=tuple(x.shape[-2:]))
            heat_np = heat[0].mean(0).cpu().numpy()
            seconds = time.perf_counter() - t0
        scale = max(1.0, 640 / image.width)
        shown = image.resize((round(image.width * scale), round(image.height * scale)))
        best = max(range(len(regions)), key=lambda i: (regions[i][1], -i))
        out_regions = []
        for cells, score in regions:
            if cells is None:
                px = [0.0, 0.0, float(image.width), float(image.height)]
            else:
                px = [float(v) for v in boxes_to_pixels(np.array([cells]), rec.grid, image.size)[0]]
            out_regions.append({"box": [round(v, 1) for v in px], "score": round(score, 6)})
        best_box = np.array([out_regions[best]["box"]]) * scale
        overlay = cam_overlay(shown, heat_np, best_box, [f"re-ranking box {regions[best][1]:.3f}"])
        categories = _imagenet_categories(int(weight.shape[0]))
        cls = [int(c) for c in q.record.class_ids[: cfg.box_classes]]
        return {
            "id": image_id,
            "dataset": dataset,
            "size": list(image.size),
            "classes": [{"id": c, "name": categories[c] if categories else str(c)} for c in cls],
            "regions": out_regions,
            "best": best,
            "whole_image_best": regions[best][0] is None,
            "overlay": "data:image/png;base64," + base64.b64encode(png_bytes(overlay)).decode(),
            "dagster": self.asset_url(q.target, dataset),
            "seconds": round(seconds, 3),
        }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _image_url(dataset: str, image_id: str) -> str:
    return "/api/image?" + urllib.parse.urlencode({"dataset": dataset, "id": image_id})


def _item(
    dataset: str,
    image_id: str,
    row: dict[str, Any],
    query: str | None = None,
    box: Sequence[float] | None = None,
) -> dict[str, Any]:
    return {
        "id": image_id,
        "dataset": dataset,
        "query": query,
        "box": None if box is None else [float(v) for v in box],
        "width": row["width"],
        "height": row["height"],
        "image": _image_url(dataset, image_id),
    }


def _too_large(size: int, limit: int) -> str:
    return (
        f"the upload is {size / 2**20:.1f} MiB, over the limit of {limit / 2**20:.1f} MiB "
        "(cw-pipeline serve --max-upload-mb)"
    )
