"""What the search page does, without HTTP: the state of one ``cw-pipeline serve`` process.

* Requests run at once (the server's threads): reads (the target list, images, thumbnails)
  never wait behind a search, and up to ``max_searches`` searches (and CAM views) run at once,
  the others waiting for a slot. No lock is held over a whole request: the short ones guard
  the caches; one per database guards its (re)load, while the searches already running keep
  the database they started with, and new ones take the loaded one until the reload is done.
* The configuration is re-read when its file changes.
* One network per extraction settings, loaded on first use and kept; each running search
  takes an extractor of its own over it (:meth:`FeatureExtractor.clone`). On the CPU the
  cores are shared among the search slots: each forward pass runs on ``cores //
  max_searches`` threads (at least one), unless the dataset sets ``num_threads``.
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
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
from cw_pipeline.core.backbones import set_num_threads
from cw_pipeline.core.datasets import GroundTruth, Query, image_path
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.lru import ByteLRU
from cw_pipeline.core.methods import Method
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
    KeptQuery,
    LoadedIndex,
    Target,
    WebError,
)
from cw_pipeline.web.detail import DetailMixin
from cw_pipeline.web.listing import ListingMixin
from cw_pipeline.web.metrics import Metrics
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
#: An absolute POSIX path left in a message (its last component is kept).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>-])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)")

#: How often a dataset's manifests are checked for a change (listing, images, thumbnails).
MANIFEST_CHECK_SECONDS = 2.0
#: Searches (and CAM views) running at once by default: one per core of a small server.
DEFAULT_MAX_SEARCHES = 2


@dataclass
class _Manifest:
    """A dataset's manifests as last read (:meth:`SearchEngine.manifest`)."""

    signature: tuple
    rows: dict[str, dict[str, Any]]  #: image id -> relpath, width, height (readable files)
    checked: float = 0.0  #: when the stored manifests were last compared (monotonic)


class _ExtractorPool:
    """The extractors of one extraction settings: one per search running at once, all over
    the network of the first (loaded on first use)."""

    def __init__(self, make: Callable[[], FeatureExtractor]) -> None:
        self._make = make
        self._free: list[FeatureExtractor] = []
        self._first: FeatureExtractor | None = None
        self._lock = threading.Lock()
        self.load_seconds = 0.0  #: time the network took to load (0 once loaded)

    @property
    def loaded(self) -> bool:
        """Whether the network is loaded."""
        return self._first is not None

    @contextmanager
    def get(self) -> Iterator[FeatureExtractor]:
        with self._lock:  # the first loads the network; the others wait for it, once
            if self._first is None:
                t0 = time.perf_counter()
                self._first = self._make()
                self.load_seconds = time.perf_counter() - t0
                extractor = self._first
            else:
                extractor = self._free.pop() if self._free else self._first.clone()
        try:
            yield extractor
        finally:
            with self._lock:
                self._free.append(extractor)


class SearchEngine(ListingMixin, SearchMixin, DetailMixin):
    """The search page's state: configuration, models, loaded databases (see module doc)."""

    def __init__(
        self,
        config_path: Path | str | None = None,
        *,
        dagster_url: str = "http://127.0.0.1:3000",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES,
        max_searches: int = DEFAULT_MAX_SEARCHES,
    ) -> None:
        if max_searches < 1:
            raise ValueError(f"max_searches must be >= 1, got {max_searches}")
        self.config_path = config_path
        self.dagster_url = dagster_url.rstrip("/")
        self.max_upload_bytes = int(max_upload_bytes)
        self.map_cache_bytes = int(map_cache_bytes)
        self._map_caches: dict[str, MapCache] = {}  #: per extraction settings, like the CNNs
        self._settings_keys: dict[str, str] = {}  #: dataset -> its extraction settings' key
        #: (the file's mtime, the configuration read from it): one attribute, read at once
        self._config_state: tuple[int, ProjectConfig] | None = None
        self._store: FeatureStore | None = None
        self._extractors: dict[str, _ExtractorPool] = {}
        self._indexes: dict[tuple[Target, str], LoadedIndex] = {}
        self._manifests: dict[str, _Manifest] = {}
        self._groundtruth: dict[str, tuple[tuple, GroundTruth | None]] = {}
        self._freshness: dict[str, tuple[float, dict[str, Any]]] = {}
        #: dataset -> why it cannot be read, as the latest listing found (no scan per request)
        self._problems: dict[str, str] = {}
        self._queries: OrderedDict[str, KeptQuery] = OrderedDict()
        self._thumbs: ByteLRU[tuple, bytes] = ByteLRU(THUMB_CACHE_BYTES, len)
        self._lock = threading.Lock()  # the caches: held for dictionary updates only
        self._config_lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}  #: one per database, manifest
        self.max_searches = int(max_searches)
        self._search_slots = threading.BoundedSemaphore(self.max_searches)
        #: torch threads of one forward pass on the CPU: the cores shared among the slots
        self.threads_per_search = max(1, (os.cpu_count() or 1) // self.max_searches)
        self.metrics = Metrics(self.max_searches)
        self.searches_running = 0
        self.started = time.time()
        self.index_loads = 0  #: databases loaded (or reloaded) by this process

    # ------------------------------------------------------------------ configuration
    def config(self) -> ProjectConfig:
        """The configuration, re-read when its file changed (caches dropped then)."""

        path = Path(self.config_path) if self.config_path is not None else default_config_path()
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            raise WebError(500, f"configuration {path}: {exc.strerror or exc}") from exc
        state = self._config_state
        if state is not None and state[0] == mtime:
            return state[1]
        with self._config_lock:
            state = self._config_state
            if state is None or state[0] != mtime:
                try:
                    config = load_config(path, disable_missing=True)
                except ConfigError as exc:
                    raise WebError(500, str(exc)) from exc
                with self._lock:
                    self._store = FeatureStore(config.warehouse)
                    self._indexes.clear()
                    self._map_caches.clear()
                    self._settings_keys.clear()
                    self._manifests.clear()
                    self._groundtruth.clear()
                    self._freshness.clear()
                    self._problems.clear()
                    self._config_state = state = (mtime, config)
            return state[1]

    def public(self, text: str) -> str:
        """``text`` without the server's absolute paths, for an answer: paths under the
        project's folder become relative to it, the warehouse and reports roots elsewhere
        ``<warehouse>`` and ``<reports>``, a dataset's folder elsewhere ``<name>``, and any
        other absolute path its last component (``…/name``)."""
        state = self._config_state
        config = state[1] if state is not None else None
        roots: list[tuple[str, str]] = []
        if config is not None:
            project = str(Path(config.source).resolve().parent)
            roots.append((project + os.sep, ""))
            roots.append((project, "."))
            for location, name in (
                (config.warehouse, "<warehouse>"),
                (config.reports, "<reports>"),
            ):
                if os.path.isabs(str(location)):
                    roots.append((str(location), name))
            for ds in (*config.datasets.values(),):
                roots.append((str(ds.images), f"<{ds.name}>"))
            inside = project + os.sep
            roots = roots[:2] + [(r, n) for r, n in roots[2:] if not r.startswith(inside)]
        for root, shown in sorted(roots, key=lambda r: -len(r[0])):
            text = text.replace(root, shown)
        return _ABSOLUTE_PATH.sub(lambda m: f"…/{m.group(1)}", text)

    def _key_lock(self, key: Any) -> threading.Lock:
        """The lock of one database or manifest (made on first use)."""
        with self._lock:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
            return lock

    @contextmanager
    def search_slot(self) -> Iterator[None]:
        """One of the ``max_searches`` slots of the searches running at once."""
        self.metrics.waiting.inc()
        try:
            self._search_slots.acquire()
        finally:
            self.metrics.waiting.dec()
        self.metrics.running.inc()
        with self._lock:
            self.searches_running += 1
        try:
            yield
        finally:
            with self._lock:
                self.searches_running -= 1
            self.metrics.running.dec()
            self._search_slots.release()

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
    def index(self, target: Target, method: Method) -> LoadedIndex:
        """The loaded database of ``target`` for ``method``'s stored aggregation (reloaded
        when its stored files changed)."""
        key = (target, method.stored_aggregation)
        loaded = self._indexes.get(key)
        if loaded is not None and time.monotonic() - loaded.checked < RELOAD_CHECK_SECONDS:
            return loaded
        lock = self._key_lock(("index", key))
        # While another request checks or reloads it, the database loaded before serves.
        if not lock.acquire(blocking=loaded is None):
            assert loaded is not None
            return loaded
        try:
            return self._index_locked(key, target, method)
        finally:
            lock.release()

    def _index_locked(self, key: tuple[Target, str], target: Target, method: Method) -> LoadedIndex:
        """:meth:`index`, holding the database's lock."""
        loaded = self._indexes.get(key)
        now = time.monotonic()
        if loaded is not None and now - loaded.checked < RELOAD_CHECK_SECONDS:
            return loaded  # checked by the request that held the lock before
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
        rows = {image_id: i for i, image_id in enumerate(index.ids)}
        loaded = LoadedIndex(signature, index, rows, time.monotonic())
        with self._lock:
            if replaced:  # a new materialization: its images may have changed too
                self._map_caches.clear()
            self._indexes[key] = loaded
            self.index_loads += 1
        self.metrics.index_loads.inc()
        if replaced:  # the old database's memory, kept by malloc (core/allocator.py)
            allocator.release()
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

    def _extractor(self, ds: DatasetConfig) -> FeatureExtractor:
        extractor = dataset_extractor(ds)
        if ds.runtime.num_threads is None and extractor.backbone.device.type == "cpu":
            set_num_threads(self.threads_per_search)  # the slots share the cores
        return extractor

    def extractors(self, ds: DatasetConfig) -> _ExtractorPool:
        """The extractors of ``ds``'s extraction settings (one network per settings, kept);
        ``with engine.extractors(ds).get() as extractor:`` takes one for a request."""

        key = self._settings_key(ds)
        with self._lock:
            pool = self._extractors.get(key)
            if pool is None:
                pool = self._extractors[key] = _ExtractorPool(lambda: self._extractor(ds))
            return pool

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
        cached = self._manifests.get(ds.name)
        if cached is not None and time.monotonic() - cached.checked < MANIFEST_CHECK_SECONDS:
            return cached.rows
        with self._key_lock(("manifest", ds.name)):
            cached = self._manifests.get(ds.name)
            signature = self._signature([prefix])
            if cached is not None and cached.signature == signature:
                cached.checked = time.monotonic()
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
            with self._lock:
                self._manifests[ds.name] = _Manifest(signature, rows, time.monotonic())
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
        return image_path(ds.images, row["relpath"])

    # ------------------------------------------------------------------ ground truth
    def groundtruth(self, ds: DatasetConfig) -> GroundTruth | None:
        """The ground truth of ``ds`` over its indexed images (None without one)."""

        if not ds.has_groundtruth:
            return None
        manifest = self.manifest(ds)
        signature = self._manifests[ds.name].signature
        cached = self._groundtruth.get(ds.name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        with self._key_lock(("groundtruth", ds.name)):
            cached = self._groundtruth.get(ds.name)
            if cached is not None and cached[0] == signature:
                return cached[1]
            try:
                gt = load_groundtruth(ds, sorted(manifest))
            except (OSError, ValueError) as exc:
                raise WebError(500, f"ground truth of {ds.name!r}: {exc}") from exc
            with self._lock:
                self._groundtruth[ds.name] = (signature, gt)
            return gt

    def _gt_query(self, ds: DatasetConfig, image_id: str, name: str | None) -> Query | None:
        gt = self.groundtruth(ds)
        if gt is None:
            return None
        for q in gt.queries:
            if (name and (q.name or q.image_id) == name) or (not name and q.image_id == image_id):
                return q
        if name:
            raise WebError(404, f"dataset {ds.name!r} has no ground-truth query named {name!r}")
        return None
