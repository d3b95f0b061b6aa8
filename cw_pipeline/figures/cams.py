"""CAM figures computed by the network: the mean CAM of a query's top classes over an image,
with the boxes CAM re-ranking would score (one forward pass per figure); drawn with
:func:`cw_pipeline.figures.charts.cam_overlay`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cw_pipeline.core.cams import boxes_to_pixels, heatmap_boxes, mean_cam
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.images import load_image
from cw_pipeline.core.search_settings import RerankConfig
from cw_pipeline.figures.charts import cam_overlay

#: CAM overlays of narrower images are enlarged to this width (display only).
CAM_MIN_SIDE = 384


def query_cam_figure(
    extractor: FeatureExtractor, path: Path, class_ids: np.ndarray, rerank: RerankConfig
) -> Image.Image:
    """The mean CAM of ``class_ids[:box_classes]`` on the image at ``path`` (one forward pass),
    with the boxes re-ranking would score: one per threshold, labelled with it."""
    image = load_image(path, max_pixels=extractor.config.max_pixels)
    rec = extractor.extract_with_maps(image)
    assert rec.maps is not None
    x, a = rec.maps.tensors()
    weight = extractor.backbone.classifier_weight
    heat_np = mean_cam(x, a, weight, class_ids[: rerank.box_classes])
    cells = heatmap_boxes(heat_np, rerank.thresholds, min_cells=rerank.min_cells)
    # Drawn at least CAM_MIN_SIDE pixels wide so that small images stay legible.
    scale = max(1.0, CAM_MIN_SIDE / image.width)
    shown = image.resize((round(image.width * scale), round(image.height * scale)))
    boxes = boxes_to_pixels(cells, rec.grid, shown.size)
    labels = [f"{t:.0%}" for t in rerank.thresholds]
    return cam_overlay(shown, heat_np, boxes, labels)
