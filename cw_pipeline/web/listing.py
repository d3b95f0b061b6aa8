"""The search page's listings: the search targets with the state of their index, a
target's images (ground-truth queries first), and thumbnails of indexed images."""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from cw_pipeline.compute.catalog import dataset_status
from cw_pipeline.compute.queries import query_box
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.store import (
    FEATURES,
    descriptors_folder,
    distractor_descriptors_folder,
    shard_folder,
)
from cw_pipeline.web.common import (
    FRESHNESS_SECONDS,
    THUMB_SIZES,
    Target,
    WebError,
    _is_number,
    _iso,
    _item,
)


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
