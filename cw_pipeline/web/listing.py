"""The search page's listings: the search targets with the state of their index, a
target's images (ground-truth queries first), and thumbnails of indexed images."""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cw_pipeline.compute.catalog import dataset_status
from cw_pipeline.compute.queries import query_box
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.query import index_problem
from cw_pipeline.store import (
    FEATURES,
    commits_folder,
    distractor_descriptors_folder,
    shard_folder,
)
from cw_pipeline.web.common import FRESHNESS_SECONDS, THUMB_SIZES, Target, WebError, image_url

logger = logging.getLogger(__name__)


def _iso(ts: float | None) -> str | None:
    """A POSIX time as ISO 8601 UTC, to the second (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds")


def _is_number(text: str) -> bool:
    """Whether ``text`` reads as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _item(
    dataset: str,
    image_id: str,
    row: dict[str, Any],
    query: str | None = None,
    box: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A listed image (JSON): its id, dataset, query name and box, size and link."""
    return {
        "id": image_id,
        "dataset": dataset,
        "query": query,
        "box": None if box is None else [float(v) for v in box],
        "width": row["width"],
        "height": row["height"],
        "image": image_url(dataset, image_id),
    }


def _error_info(datasets: list[str], error: str) -> dict[str, Any]:
    """A target that cannot be read: listed with its error, nothing indexed."""
    return {
        "datasets": datasets,
        "state": "error",
        "error": error,
        "images_indexed": 0,
        "images_on_disk": 0,
        "not_indexed": 0,
        "materialized": None,
        "hint": "",
        "notes": [],
    }


class ListingMixin:
    """What :class:`~cw_pipeline.web.engine.SearchEngine` lists: targets, images, thumbnails."""

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
        cached = self._thumbs.get(key)  # (a ByteLRU: its own lock)
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
        self._thumbs.put(key, data)
        return data

    # ------------------------------------------------------------------ listing
    def targets(self) -> dict[str, Any]:
        """Every dataset and evaluation with distractors, with the state of its index. One
        that cannot be read (its folder gone, a file escaping it, a damaged store...) is
        listed with ``state: error`` and its ``error``, and the others as usual."""
        config = self.config()
        out = []
        for name, ds in sorted(config.datasets.items()):
            out.append({**Target("dataset", name).as_dict(), **self._info_or_error([ds])})
        for name, reason in sorted(config.disabled_datasets.items()):
            out.append({**Target("dataset", name).as_dict(), **_error_info([name], reason)})
        for name, ev in sorted(config.evaluations.items()):
            if ev.distractors:
                parts = [config.dataset(ev.dataset), *(config.dataset(d) for d in ev.distractors)]
                out.append({**Target("evaluation", name).as_dict(), **self._info_or_error(parts)})
        for name, reason in sorted(config.disabled_evaluations.items()):
            if name not in config.disabled_datasets and name not in config.datasets:
                out.append({**Target("evaluation", name).as_dict(), **_error_info([], reason)})
        for t in out:  # what the page shows: no absolute path of the server
            for key in ("error", "hint"):
                if t.get(key):
                    t[key] = self.public(t[key])
            t["notes"] = [self.public(n) for n in t.get("notes", [])]
        source = Path(config.source)
        return {"config": source.name, "dagster_url": self.dagster_url, "targets": out}

    def target_problem(self, parts: list[DatasetConfig]) -> str | None:
        """Why a target made of these datasets cannot be listed or searched now (None: it
        can): the error reading its index state gives, recorded for :meth:`known_problem`."""
        for ds in parts:
            try:
                self.freshness(ds)
            except (OSError, ValueError, KeyError) as exc:
                message = str(exc) or type(exc).__name__
                logger.warning("dataset %s: %s", ds.name, message)
                with self._lock:
                    self._problems[ds.name] = message
                return message
            with self._lock:
                self._problems.pop(ds.name, None)
        return None

    def known_problem(self, parts: list[DatasetConfig]) -> str | None:
        """The problem the latest listing found with one of these datasets (a request does
        not scan folders: the listing does, every ``FRESHNESS_SECONDS`` at most)."""
        with self._lock:
            return next((self._problems[d.name] for d in parts if d.name in self._problems), None)

    def _info_or_error(self, parts: list[DatasetConfig]) -> dict[str, Any]:
        problem = self.target_problem(parts)
        if problem is not None:
            return _error_info([d.name for d in parts], problem)
        return self._target_info(parts)

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
        problem = index_problem(self.store, ds) if ds.has_groundtruth else None
        if problem is not None:  # listed with it, not searchable (target_problem)
            raise ValueError(problem)
        prefixes = [commits_folder("dataset", ds.name)]  # its index's publications
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
