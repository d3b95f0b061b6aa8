"""Class Activation Maps (the paper's Eq. 1), their normalisation, and CAM region boxes.

CAM_c = Σ_k w_{k,c} · A_k with the classifier weights W (no bias). Each map is divided by its
maximum and negative values are set to 0, so maps lie in [0, 1]. All classes of a whole batch are
computed in one batched matrix product (:func:`batch_matmul`), whose result for an image does
not depend on the other images of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: Thresholds (fractions of the heatmap maximum) used for re-ranking boxes.
BOX_THRESHOLDS: tuple[float, ...] = (0.01, 0.10, 0.20, 0.30, 0.40)


def top_classes(probs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and probabilities of the ``n`` most probable classes per image (N × n each)."""
    n = min(int(n), probs.shape[1])
    if n < 1:
        raise ValueError(f"number of classes must be >= 1, got {n}")
    values, ids = torch.topk(probs, n, dim=1, largest=True, sorted=True)
    return ids, values


def batch_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[i] @ b[i]`` for every i (N × m × k and N × k × p → N × m × p), bit for bit the same
    whatever else is in the batch.

    A plain ``einsum`` or ``matmul`` picks its kernel by the total sizes, so an image's values
    moved in the last bits with the batch it was computed in; ``torch.bmm`` runs one product
    per item, except for a batch of one (a different kernel): that one is run as two. Kept
    per-image values (re-ranking scores, OnA descriptors) then equal recomputed ones exactly.
    """
    if a.shape[0] == 1:
        return torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))[:1]
    return torch.bmm(a, b)


def compute_cams(
    cam_maps: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor
) -> torch.Tensor:
    """Raw CAMs of the given classes for every image of a batch, in one batched product.

    Args:
        cam_maps: A, N × K × h × w.
        weight: classifier weights, C × K.
        class_ids: N × n class indices (each image its own classes), or a 1-D tensor of n ids
            applied to every image.

    Returns:
        N × n × h × w raw (unnormalised) maps.
    """
    if cam_maps.ndim != 4:
        raise ValueError(f"A must be N×K×h×w, got shape {tuple(cam_maps.shape)}")
    if weight.shape[1] != cam_maps.shape[1]:
        raise ValueError(
            f"classifier has {weight.shape[1]} input channels but A has {cam_maps.shape[1]}"
        )
    class_ids = class_ids.to(weight.device, torch.long)
    n, k, h, w = cam_maps.shape
    if class_ids.ndim == 1:
        rows = weight[class_ids].expand(n, -1, -1)
    else:
        if class_ids.shape[0] != n:
            raise ValueError(f"class_ids has {class_ids.shape[0]} rows for a batch of {n} images")
        rows = weight[class_ids]
    flat = cam_maps.reshape(n, k, h * w)
    return batch_matmul(rows.to(flat.dtype), flat).reshape(n, rows.shape[1], h, w)


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Divide each map by its maximum, then set negatives to 0 (maps with max ≤ 0 become 0)."""
    peak = cams.amax(dim=(-2, -1), keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    out = (cams / safe).clamp_(min=0.0)
    return torch.where(peak > 0, out, torch.zeros_like(out))


def class_activation_maps(
    cam_maps: torch.Tensor,
    weight: torch.Tensor,
    class_ids: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Normalised CAMs, resized (bilinear) to ``size`` = (h, w) of X when that differs from A's."""
    cams = compute_cams(cam_maps, weight, class_ids)
    if size is not None and tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    return normalize_cams(cams)


def mean_cam(
    features: torch.Tensor, cam_maps: torch.Tensor, weight: torch.Tensor, class_ids: Sequence[int]
) -> np.ndarray:
    """The heatmap CAM-box re-ranking draws its boxes from: the normalised CAMs of
    ``class_ids`` on one image (``cam_maps``: 1 × K × h × w), on the grid of its conv features
    X (1 × C × H × W), averaged over the classes (H × W)."""
    ids = torch.as_tensor(np.asarray(class_ids, dtype=np.int64))
    with torch.inference_mode():
        heat = class_activation_maps(cam_maps, weight, ids, size=tuple(features.shape[-2:]))
    return heat[0].mean(0).cpu().numpy()


def largest_component_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Box (x1, y1, x2, y2), end-exclusive in cells, of the largest 8-connected component."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    # Ties: the first component in raster order (deterministic).
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def heatmap_boxes(
    heatmap: np.ndarray,
    thresholds: Sequence[float] = BOX_THRESHOLDS,
    min_cells: int = 1,
) -> np.ndarray:
    """Boxes around the largest connected region above each threshold (fraction of the max).

    Returns a T × 4 float array of (x1, y1, x2, y2) in feature-map cells (end-exclusive), one
    row per threshold; a threshold that yields no region, or a box of fewer than ``min_cells``
    cells, gives a row of NaN.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    out = np.full((len(thresholds), 4), np.nan, dtype=np.float32)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    if peak <= 0:
        return out
    for i, t in enumerate(thresholds):
        box = largest_component_box(heatmap >= t * peak if t > 0 else heatmap > 0)
        if box is not None and (box[2] - box[0]) * (box[3] - box[1]) >= min_cells:
            out[i] = box
    return out


def boxes_to_pixels(
    boxes: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int]
) -> np.ndarray:
    """Map cell boxes on an h × w grid to pixel boxes of an image of ``image_size`` = (W, H)."""
    h, w = grid
    width, height = image_size
    scale = np.array([width / w, height / h, width / w, height / h], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32) * scale


def pixels_to_cells(
    box: Sequence[float], grid: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Cells (x1, y1, x2, y2; end-exclusive) of an h × w grid covered by a pixel box.

    Every cell whose area intersects the box is included; at least one cell is returned.
    """
    h, w = grid
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    cx1 = int(np.clip(np.floor(x1 * w / width), 0, w - 1))
    cy1 = int(np.clip(np.floor(y1 * h / height), 0, h - 1))
    cx2 = int(np.clip(np.ceil(x2 * w / width), cx1 + 1, w))
    cy2 = int(np.clip(np.ceil(y2 * h / height), cy1 + 1, h))
    return cx1, cy1, cx2, cy2
