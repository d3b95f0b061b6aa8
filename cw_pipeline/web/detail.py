"""The result view of the search page: one result seen by a query kept from a search
(the mean CAM of the query's top classes over it and the region CAM-box re-ranking scores
best)."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from cw_pipeline.compute.pca import method_pca
from cw_pipeline.core.aggregation import aggregate
from cw_pipeline.core.cams import boxes_to_pixels, mean_cam
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.core.methods import Method
from cw_pipeline.core.reranking import region_scores
from cw_pipeline.figures import cam_overlay, png_bytes
from cw_pipeline.web.common import (
    WebError,
    imagenet_categories,
)


class DetailMixin:
    """The result view of :class:`~cw_pipeline.web.engine.SearchEngine`."""

    # ------------------------------------------------------------------ result view
    def detail(self, token: str, dataset: str, image_id: str) -> dict[str, Any]:
        """One result seen by a query: the mean CAM of the query's top classes over it and
        the region CAM-box re-ranking scores best (the whole image counts as one)."""
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
        path = index.paths[row]
        with self.search_slot(), self.extractors(index.dataset).get() as extractor:
            t0 = time.perf_counter()
            try:
                image = load_image(path, max_pixels=extractor.config.max_pixels)
                rec = extractor.extract_with_maps(image)
            except (ImageLoadError, FileNotFoundError, ValueError) as exc:
                raise WebError(422, f"image {image_id!r} of {dataset!r}: {exc}") from exc
            assert rec.maps is not None
            weight, bias = extractor.backbone.classifier_weight, extractor.backbone.classifier_bias
            cv = q.record.class_vectors[None]
            q_r = aggregate(cv, pca, min(cfg.query_classes, cv.shape[1]))[0]
            regions = region_scores(q_r, q.record.class_ids, rec.maps, weight, bias, pca, cfg)
            x, a = rec.maps.tensors()
            heat_np = mean_cam(x, a, weight, q.record.class_ids[: cfg.box_classes])
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
        categories = imagenet_categories(int(weight.shape[0]))
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
