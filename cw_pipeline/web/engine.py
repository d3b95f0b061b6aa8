"""What the search page does, without HTTP: the state of one ``cw-pipeline serve`` process.

* The configuration is re-read when its file changes.
* One feature extractor (the CNN) per extraction settings, loaded on first use and kept.
* The database of each search target (a dataset, or an evaluation with distractors) is loaded
  once per aggregation and kept; it is reloaded when a new generation is published (its commit
  pointers, its manifests, features or distractor descriptors change), checked at most every
  :data:`RELOAD_CHECK_SECONDS`. A load reads one published generation (see
  :mod:`cw_pipeline.store.commits`), so a database is never a mix of two re-indexes; while the
  published parts disagree (distractors not yet re-projected with a new PCA), the database
  loaded before is kept and searched.
* Images are found by manifest id only: no path from a request reaches the file system.
* Every search goes through :func:`cw_pipeline.query.search_image`, the function of
  ``cw-pipeline search``.
* Database feature maps computed for OnA and ``+r`` are kept (least recently used dropped
  beyond :data:`DEFAULT_MAP_CACHE_BYTES`), so a repeated search runs no forward pass again;
  they are dropped when a database is reloaded or the configuration changes.

Errors the user can act on are :class:`WebError` (an HTTP status and one readable line).

This module holds the state (configuration, CNNs, loaded databases, manifests, ground truth);
:class:`SearchEngine` takes what it does with it from :mod:`~cw_pipeline.web.searching`,
:mod:`~cw_pipeline.web.listing` and :mod:`~cw_pipeline.web.detail`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cw_pipeline.compute.catalog import stored_shards
from cw_pipeline.compute.features import dataset_extractor, feature_code_version
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.config import (
    ConfigError,
    DatasetConfig,
    ProjectConfig,
    UnknownNameError,
    default_config_path,
    load_config,
)
from cw_pipeline.core import allocator
from cw_pipeline.core import datasets as gtio
from cw_pipeline.core.experiment import Method
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.retrieval import MapCache
from cw_pipeline.query import (
    BrokenIndexError,
    InconsistentIndexError,
    NotIndexedError,
    SearchIndex,
    load_evaluation_index,
    load_index,
)
from cw_pipeline.store import (
    FEATURES,
    MANIFEST,
    CorruptFileError,
    FeatureStore,
    commits_folder,
    distractor_descriptors_folder,
    manifest_path,
    shard_folder,
)
from cw_pipeline.web.common import (
    DEFAULT_MAP_CACHE_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    THUMB_CACHE_BYTES,
    Target,
    WebError,
    _Loaded,
    _Manifest,
    _Query,
    _ThumbCache,
)
from cw_pipeline.web.detail import DetailMixin
from cw_pipeline.web.listing import ListingMixin
from cw_pipeline.web.searching import SearchMixin

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAP_CACHE_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "SearchEngine",
    "Target",
    "WebError",
]

#: How often, at most, a request checks whether the stored index changed.
RELOAD_CHECK_SECONDS = 2.0


class SearchEngine(ListingMixin, SearchMixin, DetailMixin):
    """The search page's state: configuration, models, loaded databases (see module doc)."""

    def __init__(
        self,
        config_path: Path | str | None = None,
        *,
        dagster_url: str = "http://127.0.0.1:3000",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES,
    ) -> None:
        self.config_path = config_path
        self.dagster_url = dagster_url.rstrip("/")
        self.max_upload_bytes = int(max_upload_bytes)
        self.map_cache_bytes = int(map_cache_bytes)
        self._map_caches: dict[str, MapCache] = {}  #: per extraction settings, like the CNNs
        self._settings_keys: dict[str, str] = {}  #: dataset -> its extraction settings' key
        self._config: ProjectConfig | None = None
        self._config_mtime: int | None = None
        self._store: FeatureStore | None = None
        self._extractors: dict[str, FeatureExtractor] = {}
        self._indexes: dict[tuple[Target, str], _Loaded] = {}
        self._manifests: dict[str, _Manifest] = {}
        self._groundtruth: dict[str, tuple[tuple, gtio.GroundTruth | None]] = {}
        self._freshness: dict[str, tuple[float, dict[str, Any]]] = {}
        #: dataset -> why it cannot be read, as the latest listing found (no scan per request)
        self._problems: dict[str, str] = {}
        self._queries: OrderedDict[str, _Query] = OrderedDict()
        self._thumbs = _ThumbCache(THUMB_CACHE_BYTES)
        self._lock = threading.RLock()  # the CNN and the caches: one request at a time
        self.index_loads = 0  #: databases loaded (or reloaded) by this process

    # ------------------------------------------------------------------ configuration
    def config(self) -> ProjectConfig:
        """The configuration, re-read when its file changed (caches dropped then)."""

        path = Path(self.config_path) if self.config_path is not None else default_config_path()
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            raise WebError(500, f"configuration {path}: {exc.strerror or exc}") from exc
        with self._lock:
            if self._config is None or mtime != self._config_mtime:
                try:
                    config = load_config(path, disable_missing=True)
                except ConfigError as exc:
                    raise WebError(500, str(exc)) from exc
                self._config, self._config_mtime = config, mtime
                self._store = FeatureStore(config.warehouse)
                self._indexes.clear()
                self._map_caches.clear()
                self._settings_keys.clear()
                self._manifests.clear()
                self._groundtruth.clear()
                self._freshness.clear()
                self._problems.clear()
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
        if dataset and dataset in config.disabled_datasets:
            raise WebError(409, config.disabled_datasets[dataset])
        if evaluation and evaluation in config.disabled_evaluations:
            raise WebError(409, config.disabled_evaluations[evaluation])
        try:
            if dataset:
                parts = [config.dataset(dataset)]
                target = Target("dataset", dataset)
            else:
                ev = config.evaluation(evaluation)  # type: ignore[arg-type]
                parts = [config.dataset(d) for d in (ev.dataset, *ev.distractors)]
                target = Target("evaluation", evaluation)  # type: ignore[arg-type]
        except UnknownNameError as exc:
            raise WebError(404, str(exc)) from exc
        problem = self.known_problem(parts)
        if problem is not None:  # listed with this error; the other targets work
            raise WebError(409, problem)
        return target

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
            out.append(commits_folder("dataset", name))
        evaluations = [target.name] if target.kind == "evaluation" else []
        if target.kind == "dataset" and not config.dataset(target.name).has_groundtruth:
            evaluations = [e.name for e in config.evaluations_for(target.name)]
        for ev in evaluations:
            out.append(distractor_descriptors_folder(ev))
            owner = config.evaluation(ev).dataset  # whose PCA the distractors are projected with
            if owner not in names:
                out.append(commits_folder("dataset", owner))
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
                index = self._load(config, target, method, wait=loaded is None)
            except InconsistentIndexError as exc:
                if loaded is None:
                    raise WebError(409, str(exc)) from exc
                logger.info("kept %s %s as loaded: %s", target.kind, target.name, exc)
                loaded.checked = now  # the new state is tried again later
                return loaded
            except NotIndexedError as exc:
                raise WebError(409, str(exc)) from exc
            except (BrokenIndexError, CorruptFileError) as exc:
                # damaged stored files: this target is listed with the error, the others work
                message = str(exc)
                with self._lock:
                    for ds in self._datasets_of(target):
                        self._problems.setdefault(ds.name, message)
                raise WebError(409, message) from exc
            except (UnknownNameError, FileNotFoundError) as exc:
                raise WebError(404, str(exc)) from exc
            except ValueError as exc:
                raise WebError(400, str(exc)) from exc
            replaced = loaded is not None
            if replaced:  # a new materialization: its images may have changed too
                self._map_caches.clear()
            rows = {image_id: i for i, image_id in enumerate(index.ids)}
            loaded = _Loaded(signature, index, rows, time.monotonic())
            self._indexes[key] = loaded
            if replaced:  # the old database's memory, kept by malloc (core/allocator.py)
                allocator.release()
            self.index_loads += 1
            logger.info("loaded %s %s: %d images (%s)", target.kind, target.name, len(index), key)
            return loaded

    def _load(
        self, config: ProjectConfig, target: Target, method: Method, wait: bool
    ) -> SearchIndex:
        """Read the database of ``target``; once more when a generation it was reading was
        removed meanwhile (a reader that paused past the grace period: the pointer it read is
        no longer current). ``wait``: for distractor shards being rewritten to agree (without
        it, one that is being rewritten raises :class:`InconsistentIndexError` at once)."""
        for attempt in (1, 2):
            try:
                if target.kind == "dataset":
                    return load_index(config, self.store, target.name, method)
                return load_evaluation_index(
                    config, self.store, target.name, method, wait_seconds=10.0 if wait else 0.0
                )
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _settings_key(self, ds: DatasetConfig) -> str:
        """``ds``'s extraction settings and device (a hash, kept until the configuration
        changes)."""

        with self._lock:
            key = self._settings_keys.get(ds.name)
            if key is None:
                key = self._settings_keys[ds.name] = (
                    f"{feature_code_version(ds)}|{ds.runtime.device}"
                )
            return key

    def extractor(self, ds: DatasetConfig) -> FeatureExtractor:
        """The CNN for ``ds``'s extraction settings (one per settings, kept)."""

        key = self._settings_key(ds)
        with self._lock:
            if key not in self._extractors:
                self._extractors[key] = dataset_extractor(ds)
            return self._extractors[key]

    def _map_cache(self, ds: DatasetConfig) -> MapCache | None:
        """The database feature maps kept for ``ds``'s extraction settings (None: disabled)."""
        if self.map_cache_bytes <= 0:
            return None
        key = self._settings_key(ds)
        with self._lock:
            if key not in self._map_caches:
                self._map_caches[key] = MapCache(self.map_cache_bytes)
            return self._map_caches[key]

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

    # ------------------------------------------------------------------ ground truth
    def groundtruth(self, ds: DatasetConfig) -> gtio.GroundTruth | None:
        """The ground truth of ``ds`` over its indexed images (None without one)."""

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
