"""What extraction produces: per-image records (:class:`ImageFeatures`), the feature maps kept
for online aggregation and re-ranking (:class:`FeatureMaps`), run counters, and
:func:`encode_maps` (class ids, probabilities and class vectors of a batch of maps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cw_pipeline.core.cams import class_activation_maps, top_classes
from cw_pipeline.core.encoding import class_vectors, crow_channel_weights


@dataclass
class ImageFeatures:
    """Per-image record.

    Attributes:
        class_ids: N_C class ids, most probable first.
        class_probs: their softmax probabilities.
        class_vectors: N_C × K class vectors (Eq. 4), in class-rank order.
        sum_pooled: K raw sum-pooled vector (baseline).
        boxes: T × 4 CAM boxes (x1, y1, x2, y2) in original-image pixels, one per threshold of
            the heatmap = mean of the top ``box_classes`` CAMs; NaN rows where none.
        grid: (h, w) of X.
        input_size: (W, H) of the network input.
        image_size: (W, H) of the original image (after EXIF orientation).
        maps: optional ``FeatureMaps`` kept for online aggregation and re-ranking.
    """

    class_ids: np.ndarray
    class_probs: np.ndarray
    class_vectors: np.ndarray
    sum_pooled: np.ndarray
    boxes: np.ndarray
    grid: tuple[int, int]
    input_size: tuple[int, int]
    image_size: tuple[int, int]
    maps: FeatureMaps | None = None


@dataclass
class FeatureMaps:
    """X and A of one image on X's grid (A resampled when its grid differs), float16 to save RAM.

    ``cam_maps`` is None when A is X (the default layer of every backbone except VGG16-CAM).
    """

    features: np.ndarray
    cam_maps: np.ndarray | None = None
    input_size: tuple[int, int] = (0, 0)
    image_size: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + (0 if self.cam_maps is None else self.cam_maps.nbytes))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.features.astype(np.float32))[None]
        a = x if self.cam_maps is None else torch.from_numpy(self.cam_maps.astype(np.float32))[None]
        return x, a


@dataclass
class ExtractionStats:
    """Counters of an extraction run."""

    images: int = 0
    batches: int = 0
    failed: int = 0
    forward_seconds: float = 0.0
    #: CPU seconds (user, system: all threads of the process) and minor page faults during
    #: forward passes: the allocator tuning (core/allocator.py) keeps the last two near zero.
    forward_user_seconds: float = 0.0
    forward_system_seconds: float = 0.0
    forward_page_faults: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def forward_usage(self) -> tuple[float, float, int]:
        """(user CPU s, system CPU s, minor page faults) of the forward passes so far."""
        return self.forward_user_seconds, self.forward_system_seconds, self.forward_page_faults


def encode_maps(
    x: torch.Tensor,
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    n_classes: int,
    class_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class ids, probabilities and class vectors of a batch of (X, A) on the same grid.

    When ``class_ids`` is None each image uses its own top ``n_classes`` (OfA); otherwise the
    given ids (1-D, shared; or N × n) are used (OnA, re-ranking) and probabilities are theirs.
    """
    logits = a.mean(dim=(2, 3)) @ weight.T + bias
    probs = torch.softmax(logits, dim=1)
    if class_ids is None:
        ids, p = top_classes(probs, n_classes)
    else:
        ids = class_ids.to(torch.long)
        ids = ids.expand(x.shape[0], -1) if ids.ndim == 1 else ids
        p = torch.gather(probs, 1, ids)
    cams = class_activation_maps(a, weight, ids, size=tuple(x.shape[-2:]))
    cv = class_vectors(x, cams, crow_channel_weights(x))
    return ids, p, cv


def crop_cells(t: torch.Tensor, cells: Sequence[int]) -> torch.Tensor:
    """Crop an N × K × h × w tensor to cells (x1, y1, x2, y2), end-exclusive."""
    x1, y1, x2, y2 = (int(v) for v in cells)
    return t[..., y1:y2, x1:x2]
