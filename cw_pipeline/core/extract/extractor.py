"""The :class:`FeatureExtractor`: decodes and resizes images on background threads while the
network runs, groups images of equal size into batches bounded by a pixel budget, and yields
one record per file; also query boxes (``crop`` / ``paper`` protocols) and region encoding."""

from __future__ import annotations

import copy
import math
import os
import resource
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cw_pipeline.core import allocator
from cw_pipeline.core import images as imgs
from cw_pipeline.core.backbones import Backbone, ForwardOutput, load_backbone
from cw_pipeline.core.cams import (
    boxes_to_pixels,
    class_activation_maps,
    heatmap_boxes,
    pixels_to_cells,
)
from cw_pipeline.core.datasets import QueryProtocol
from cw_pipeline.core.encoding import sum_pool
from cw_pipeline.core.extract.config import (
    CPU_BATCH_TARGET_PIXELS,
    DEFAULT_BATCH_PIXELS,
    ExtractionConfig,
)
from cw_pipeline.core.extract.records import (
    ExtractionStats,
    FeatureMaps,
    ImageFeatures,
    crop_cells,
    encode_maps,
)

#: Niceness of the decoding threads: below the network's threads, so that decoding fills the
#: forward pass's idle moments instead of stalling its threads (end-to-end indexing went from 75
#: to 88 % of the forward-only speed on 2 cores), yet with a quarter of a core's share against a
#: busy process of normal priority, far more than decoding needs.
DECODE_NICE = 5


def _lower_priority() -> None:
    """Run this (decoding) thread at a lower priority than the forward pass's threads."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):  # not Linux: every thread shares the process's priority
        pass


def _pixels(size: tuple[int, int], bucket: Sequence) -> int:
    """Pixels held by a bucket of images of ``size``."""
    return size[0] * size[1] * len(bucket)


class FeatureExtractor:
    """Runs a backbone over images and encodes them into ``ImageFeatures``.

    A forward pass holds at most ``batch_size`` images and ``batch_pixels`` input pixels (the
    sum of width × height after resizing); an image over ``batch_pixels`` on its own is refused
    with an error naming it, its size and the budget. Images are grouped up to
    ``batch_target_pixels`` (default: ``CPU_BATCH_TARGET_PIXELS`` on the CPU, where larger
    batches are no faster and hold more memory; ``batch_pixels`` on an accelerator); an image
    over the target runs alone.
    """

    def __init__(
        self,
        config: ExtractionConfig | None = None,
        *,
        backbone: Backbone | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
        batch_size: int = 16,
        batch_pixels: int = DEFAULT_BATCH_PIXELS,
        batch_target_pixels: int | None = None,
        keep_maps: bool = False,
    ):
        self.config = config or ExtractionConfig()
        self.backbone = backbone or load_backbone(
            self.config.backbone,
            layer=self.config.layer,
            weights=self.config.weights,
            device=device,
            num_threads=num_threads,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_pixels < 1:
            raise ValueError(f"batch_pixels must be >= 1, got {batch_pixels}")
        if batch_target_pixels is not None and batch_target_pixels < 1:
            raise ValueError(f"batch_target_pixels must be >= 1, got {batch_target_pixels}")
        self.batch_size = batch_size
        self.batch_pixels = batch_pixels
        if batch_target_pixels is None:
            on_cpu = self.backbone.device.type == "cpu"
            batch_target_pixels = CPU_BATCH_TARGET_PIXELS if on_cpu else batch_pixels
        self.batch_target_pixels = min(batch_target_pixels, batch_pixels)
        # Keep the forward pass's freed buffers for the next layer and batch (core/allocator.py).
        allocator.keep_freed_memory(int(self.backbone.activation_bytes * batch_pixels))
        self.keep_maps = keep_maps
        #: dtype of the kept maps: float16 halves their memory (and the kept files); the mAP
        #: change against float32 is measured by ``benchmarks/map_precision.py``.
        self.maps_dtype: type = np.float16
        self.policy = self.config.resize_policy
        self.stats = ExtractionStats()

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
        """Resize by the configured policy; returns the input image and the original size.

        Policy for tiny images: an input whose shorter side is below the network stride
        (one feature-map cell) is refused, never silently upscaled — its features would be
        one interpolated cell. The error says which resize policies would enlarge it. An
        input over ``batch_pixels`` is refused too.
        """
        resized = imgs.resize(image, self.policy)
        w, h = resized.size
        if w * h > self.batch_pixels:
            raise ValueError(
                f"image of {image.width}×{image.height} px is {w}×{h} = {w * h} px after resize "
                f"policy '{self.policy.describe()}', over the pixel budget of one forward pass "
                f"({self.batch_pixels} px, batch_pixels)"
            )
        self._check_stride(resized)
        return resized, image.size

    def _check_stride(self, resized: Image.Image) -> None:
        if min(resized.size) < self.backbone.stride:
            raise ValueError(
                f"image of {resized.size[0]}×{resized.size[1]} px is smaller than the network "
                f"stride ({self.backbone.stride} px) after resize policy "
                f"'{self.policy.describe()}'; it is not upscaled silently (a policy that "
                "enlarges small images, e.g. 'paper:720:1024:upscale' or 'fixed:WxH', "
                "would index it)"
            )

    def load(self, path: str | os.PathLike) -> tuple[Image.Image, tuple[int, int]]:
        """Load (EXIF, colour, bomb limit, pixel budget) and resize one file.

        The file is decoded already reduced (:func:`~cw_pipeline.core.images.load_resized`);
        one whose input would exceed ``batch_pixels`` is refused before decoding.
        """
        resized, original = imgs.load_resized(
            path,
            self.policy,
            max_pixels=self.config.max_pixels,
            max_output_pixels=self.batch_pixels,
        )
        try:
            self._check_stride(resized)
        except ValueError as exc:
            raise imgs.ImageLoadError(path, str(exc)) from exc
        return resized, original

    def batch_capacity(self, size: tuple[int, int]) -> int:
        """How many images of ``size`` (width, height) one forward pass takes (at least 1)."""
        return max(1, min(self.batch_size, self.batch_target_pixels // (size[0] * size[1])))

    # ------------------------------------------------------------------ encoding
    def _forward(self, batch: torch.Tensor) -> ForwardOutput:
        """``backbone.forward``, counting its CPU time and page faults in :attr:`stats`."""
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        out = self.backbone.forward(batch)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.stats.forward_user_seconds += r1.ru_utime - r0.ru_utime
        self.stats.forward_system_seconds += r1.ru_stime - r0.ru_stime
        self.stats.forward_page_faults += r1.ru_minflt - r0.ru_minflt
        return out

    def _maps_on_grid(self, out_x: torch.Tensor, out_a: torch.Tensor) -> torch.Tensor:
        if out_a is out_x or tuple(out_a.shape[-2:]) == tuple(out_x.shape[-2:]):
            return out_a
        return F.interpolate(out_a, size=tuple(out_x.shape[-2:]), mode="bilinear")

    def encode_batch(
        self, images: Sequence[Image.Image], original_sizes: Sequence[tuple[int, int]]
    ) -> list[ImageFeatures]:
        """Encode a batch of equal-sized (already resized) images in one forward pass."""
        bb = self.backbone
        batch = imgs.to_tensor(images, bb.mean, bb.std)
        t0 = time.perf_counter()
        out = self._forward(batch)
        x = out.features
        a = self._maps_on_grid(x, out.cam_maps)
        with torch.inference_mode():
            ids, probs, cv = encode_maps(
                x, a, bb.classifier_weight, bb.classifier_bias, n_classes=self.config.stored_classes
            )
            sp = sum_pool(x)
            heat = class_activation_maps(
                a, bb.classifier_weight, ids[:, : self.config.box_classes], size=x.shape[-2:]
            ).mean(dim=1)
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        input_size = images[0].size
        records = []
        ids_np, probs_np = ids.cpu().numpy(), probs.cpu().numpy()
        cv_np, sp_np, heat_np = cv.cpu().numpy(), sp.cpu().numpy(), heat.cpu().numpy()
        for i, orig in enumerate(original_sizes):
            boxes = boxes_to_pixels(heatmap_boxes(heat_np[i], self.config.thresholds), grid, orig)
            maps = None
            if self.keep_maps:
                maps = FeatureMaps(
                    features=x[i].cpu().numpy().astype(self.maps_dtype),
                    cam_maps=None if a is x else a[i].cpu().numpy().astype(self.maps_dtype),
                    input_size=input_size,
                    image_size=tuple(orig),
                )
            records.append(
                ImageFeatures(
                    class_ids=ids_np[i].astype(np.int16),
                    class_probs=probs_np[i].astype(np.float32),
                    class_vectors=cv_np[i].astype(np.float32),
                    sum_pooled=sp_np[i].astype(np.float32),
                    boxes=boxes,
                    grid=grid,
                    input_size=input_size,
                    image_size=tuple(orig),
                    maps=maps,
                )
            )
        self.stats.images += len(records)
        return records

    def extract_images(self, images: Sequence[Image.Image]) -> list[ImageFeatures]:
        """Encode in-memory RGB images (resized by the policy), batching equal sizes within
        ``batch_size`` and ``batch_pixels``."""
        prepared = [self.prepare(im) for im in images]
        results: list[ImageFeatures | None] = [None] * len(prepared)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (im, _) in enumerate(prepared):
            buckets.setdefault(im.size, []).append(i)
        for size, idx in buckets.items():
            step = self.batch_capacity(size)
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                recs = self.encode_batch(
                    [prepared[i][0] for i in chunk], [prepared[i][1] for i in chunk]
                )
                for i, rec in zip(chunk, recs, strict=True):
                    results[i] = rec
        return [r for r in results if r is not None]

    def extract_files(
        self,
        items: Iterable[tuple[str, str | os.PathLike]],
        *,
        workers: int = 2,
        on_error: Literal["raise", "yield"] = "raise",
    ) -> Iterator[tuple[str, ImageFeatures | Exception]]:
        """Encode files ``(key, path)``, decoding on ``workers`` threads while the network runs.

        Equal-sized images are batched (up to ``batch_size`` and ``batch_pixels``); records come
        out as batches complete, not necessarily in input order. With ``on_error="yield"`` an
        unreadable file (or one over the pixel budget) yields ``(key, exception)`` and the rest
        proceed; with ``"raise"`` it raises.
        """
        for group in self.extract_batches(items, workers=workers, on_error=on_error):
            yield from group

    def extract_batches(
        self,
        items: Iterable[tuple[str, str | os.PathLike]],
        *,
        workers: int = 2,
        on_error: Literal["raise", "yield"] = "raise",
    ) -> Iterator[list[tuple[str, ImageFeatures | Exception]]]:
        """Like :meth:`extract_files`, one list per forward pass (the records of one batch) or
        per unreadable file (``[(key, exception)]``, with ``on_error="yield"``).

        The next batch is computed only when the caller asks for it, so a caller can make each
        batch durable (see ``cw_pipeline.compute.checkpoints``) before any more work is done.

        Memory does not grow with the files: decoded images wait in half-full batches of their
        size only while they hold at most ``batch_pixels`` pixels in all (beyond that the
        fullest waiting batch runs early), and images are decoded ahead of the network only
        while the ones in flight could hold at most ``batch_pixels`` pixels (as many images as
        the resize policy's largest output allows, at least ``2 * workers``).

        Decoding threads run at a lower priority than the network's, so that they fill its idle
        moments instead of stalling its threads. The memory the forward passes keep for each
        other (core/allocator.py) stays with the process for the next call; an indexing run
        hands it back when it is over (:func:`~cw_pipeline.core.allocator.release`).
        """
        items = list(items)
        pending: OrderedDict[tuple[int, int], list] = OrderedDict()
        pending_px = 0
        largest = self.policy.max_output_pixels() or self.batch_pixels
        window = max(2 * workers, min(4 * self.batch_size, self.batch_pixels // largest))
        with ThreadPoolExecutor(max_workers=max(1, workers), initializer=_lower_priority) as pool:
            futures: deque = deque()
            it = iter(items)

            def submit_next() -> bool:
                nxt = next(it, None)
                if nxt is None:
                    return False
                key, path = nxt
                futures.append((key, pool.submit(self.load, path)))
                return True

            for _ in range(window):
                if not submit_next():
                    break
            while futures:
                key, fut = futures.popleft()
                submit_next()
                try:
                    image, orig = fut.result()
                except Exception as exc:
                    self.stats.failed += 1
                    self.stats.errors.append((key, str(exc)))
                    if on_error == "raise":
                        raise
                    yield [(key, exc)]
                    continue
                size = image.size
                bucket = pending.setdefault(size, [])
                bucket.append((key, image, orig))
                pending_px += size[0] * size[1]
                if len(bucket) >= self.batch_capacity(size):
                    pending_px -= _pixels(size, pending.pop(size))
                    yield list(self._flush(bucket))
                while pending_px > self.batch_pixels:
                    fullest = max(pending, key=lambda sz: _pixels(sz, pending[sz]))
                    group = pending.pop(fullest)
                    pending_px -= _pixels(fullest, group)
                    yield list(self._flush(group))
            for bucket in pending.values():
                yield list(self._flush(bucket))

    def _flush(self, bucket: list) -> Iterator[tuple[str, ImageFeatures]]:
        recs = self.encode_batch([b[1] for b in bucket], [b[2] for b in bucket])
        for (key, _, _), rec in zip(bucket, recs, strict=True):
            yield key, rec

    def clone(self) -> FeatureExtractor:
        """Another extractor of the same settings sharing this one's network (inference does
        not change it), with its own counters and flags: one per thread extracting at once."""
        out = copy.copy(self)
        out.stats = ExtractionStats()
        return out

    def extract_with_maps(self, image: Image.Image) -> ImageFeatures:
        """Encode one (upright RGB) image keeping its feature maps (``.maps``), whatever
        :attr:`keep_maps` says: for the CAM views of the reports and the search page."""
        resized, orig = self.prepare(image)
        keep = self.keep_maps
        self.keep_maps = True
        try:
            return self.encode_batch([resized], [orig])[0]
        finally:
            self.keep_maps = keep

    # ------------------------------------------------------------------ queries and regions
    def extract_query(
        self,
        image: Image.Image,
        box: Sequence[float] | None = None,
        protocol: QueryProtocol = "crop",
    ) -> ImageFeatures:
        """Encode a query image, optionally restricted to a box (original-image pixels).

        ``crop``: the image is cropped to the box before the forward pass. ``paper``: the full
        image goes through the network and X and A are cropped to the box's cells (the box is
        scaled to the resized image first, unlike the original code); the query's classes are
        those predicted from the region's pooled A.
        """
        if box is None:
            return self.extract_images([image])[0]
        if protocol == "crop":
            rec = self.extract_images([imgs.crop_box(image, box)])[0]
            # Report boxes in the full image's coordinates: shift by the origin of the pixels
            # crop_box actually cut (the box clipped to the image and floored, as it does).
            left = min(math.floor(max(0.0, float(box[0])) + 1e-6), image.width - 1)
            top = min(math.floor(max(0.0, float(box[1])) + 1e-6), image.height - 1)
            rec.boxes = rec.boxes + np.array([left, top, left, top], dtype=np.float32)
            rec.image_size = image.size
            return rec
        if protocol != "paper":
            raise ValueError(f"unknown query protocol {protocol!r}; use 'paper' or 'crop'")
        imgs.crop_box(image, box)  # validates the box against the image
        resized, orig = self.prepare(image)
        bb = self.backbone
        out = self._forward(imgs.to_tensor([resized], bb.mean, bb.std))
        x = out.features
        a = self._maps_on_grid(x, out.cam_maps)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        cells = pixels_to_cells(box, grid, orig)
        rec = self.encode_region(x, a, cells)
        rec.input_size, rec.image_size = resized.size, orig
        heat = self._heat(x, a, rec.class_ids)
        rec.boxes = boxes_to_pixels(heatmap_boxes(heat, self.config.thresholds), grid, orig)
        return rec

    def _heat(self, x: torch.Tensor, a: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        k = self.config.box_classes
        cams = class_activation_maps(
            a, self.backbone.classifier_weight, torch.as_tensor(ids[:k]).long(), size=x.shape[-2:]
        )
        return cams[0].mean(dim=0).cpu().numpy()

    def encode_region(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        cells: Sequence[int] | None = None,
        class_ids: torch.Tensor | np.ndarray | None = None,
    ) -> ImageFeatures:
        """Encode one image's maps (1 × K × h × w), optionally cropped to ``cells``.

        CroW weights and CAM normalisation are computed on the region itself.
        """
        if cells is not None:
            x, a = crop_cells(x, cells), crop_cells(a, cells)
        bb = self.backbone
        ids_t = None if class_ids is None else torch.as_tensor(np.asarray(class_ids)).long()
        with torch.inference_mode():
            ids, probs, cv = encode_maps(
                x,
                a,
                bb.classifier_weight,
                bb.classifier_bias,
                n_classes=self.config.stored_classes,
                class_ids=ids_t,
            )
            sp = sum_pool(x)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        return ImageFeatures(
            class_ids=ids[0].cpu().numpy().astype(np.int16),
            class_probs=probs[0].cpu().numpy().astype(np.float32),
            class_vectors=cv[0].cpu().numpy().astype(np.float32),
            sum_pooled=sp[0].cpu().numpy().astype(np.float32),
            boxes=np.full((0, 4), np.nan, dtype=np.float32),
            grid=grid,
            input_size=(0, 0),
            image_size=(0, 0),
        )
