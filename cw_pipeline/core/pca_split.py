"""Which images share a PCA model: a whole set (its PCA learned on another set), or, for a set
whose images are grouped into objects (ukbench, holidays) and split for its PCA (``--pca-split``,
``pca_from: self-split``), the two halves of its objects, each searched with the PCA learned on
the other. ``cw-pipeline evaluate``, the PCA, descriptors and rankings assets and
``cw-pipeline search`` all iterate over :func:`pca_groups`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cw_pipeline.core.datasets import holidays_labels, ukbench_labels


def group_labels(layout: str, ids: Sequence[str]) -> np.ndarray:
    """Object label of each image of a grouped layout."""
    if layout == "ukbench":
        return ukbench_labels(ids)
    if layout == "holidays":
        return holidays_labels(ids)
    raise ValueError(f"layout {layout!r} has no object groups")


@dataclass(frozen=True)
class PcaGroup:
    """Images that share one PCA model: a whole set, or one half of a self-split set.

    Attributes:
        rows: indices of the group's images (searched, described, scored with its PCA).
        half: 1 or 2 for a half of a self-split set (its PCA's store name), None for a
            whole set.
        training: a self-split half's training rows: the *other* half; None for a whole set
            (its PCA is learned elsewhere).
    """

    rows: np.ndarray
    half: int | None = None
    training: np.ndarray | None = None

    @property
    def training_half(self) -> int | None:
        """The half its PCA is learned on (the other one), or None."""
        return None if self.half is None else 3 - self.half


def pca_groups(n_images: int, labels: np.ndarray | None = None) -> list[PcaGroup]:
    """The images of a set by the PCA model they use: with object ``labels`` (self-split),
    the two halves of the objects (:func:`split_by_group`), each learning its PCA on the
    other; without, one group of all ``n_images``. The one place the self-split loop is
    written: evaluate, the assets and ``search`` iterate over these groups."""
    if labels is None:
        return [PcaGroup(np.arange(n_images))]
    if len(labels) != n_images:
        raise ValueError(f"{len(labels)} object labels for {n_images} images")
    first, second = split_by_group(np.asarray(labels))
    return [PcaGroup(first, 1, second), PcaGroup(second, 2, first)]


def split_by_group(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices into two halves of the objects (sorted labels; first half, second)."""
    groups = np.unique(labels)
    if groups.size < 2:
        raise ValueError("a split needs at least two objects")
    first = set(groups[: groups.size // 2].tolist())
    mask = np.array([lab in first for lab in labels])
    return np.flatnonzero(mask), np.flatnonzero(~mask)
