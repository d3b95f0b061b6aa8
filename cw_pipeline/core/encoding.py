"""Feature weighting and pooling: CroW channel weights (Eqs. 2-3) and class vectors (Eq. 4).

All functions take batches (N × K × h × w feature maps X) and are vectorised over images,
channels and classes.
"""

from __future__ import annotations

import torch

from cw_pipeline.core.cams import batch_matmul


def crow_channel_weights(features: torch.Tensor) -> torch.Tensor:
    """CroW channel weights CW_k = log(Σ_n Q_n / Q_k), Q_k = share of cells with X_k > 0.

    Channels that are zero everywhere (Q_k = 0) get weight 0, as in CroW's reference code.

    Args:
        features: X, N × K × h × w (unweighted).

    Returns:
        N × K weights.
    """
    if features.ndim != 4:
        raise ValueError(f"X must be N×K×h×w, got shape {tuple(features.shape)}")
    q = (features > 0).float().mean(dim=(2, 3))
    total = q.sum(dim=1, keepdim=True)
    ratio = torch.where(q > 0, total / q.clamp_min(1e-12), torch.ones_like(q))
    return torch.log(ratio)


def class_vectors(
    features: torch.Tensor, cams: torch.Tensor, channel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Class vectors f^c_k = CW_k · Σ_ij X_kij · CAM_c,ij for every image and class.

    Args:
        features: X, N × K × h × w.
        cams: normalised CAMs, N × C × h × w (same h × w as X).
        channel_weights: N × K CroW weights (computed from ``features`` when None).

    Returns:
        N × C × K class vectors.
    """
    if features.shape[0] != cams.shape[0] or features.shape[-2:] != cams.shape[-2:]:
        raise ValueError(
            f"X {tuple(features.shape)} and CAMs {tuple(cams.shape)} differ in batch or grid size"
        )
    if channel_weights is None:
        channel_weights = crow_channel_weights(features)
    n, k, h, w = features.shape
    pooled = batch_matmul(cams.reshape(n, cams.shape[1], h * w), features.reshape(n, k, h * w).mT)
    return pooled * channel_weights[:, None, :]


def sum_pool(features: torch.Tensor) -> torch.Tensor:
    """Raw sum-pooled vector of X (the paper's baseline "Raw Features"), N × K."""
    return features.sum(dim=(2, 3))
