"""Online aggregation (OnA): database descriptors aggregated over the *query's* classes, from
the database images' stored feature maps (the offline aggregation, OfA, is
:func:`cw_pipeline.core.aggregation.aggregate`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cw_pipeline.core.aggregation import PCAWhitening, l2_normalize
from cw_pipeline.core.extract import FeatureMaps, crop_cells, encode_maps


def online_descriptors(
    maps: Sequence[FeatureMaps],
    class_ids: np.ndarray,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pca: PCAWhitening | None,
    cells: Sequence[Sequence[int] | None] | None = None,
) -> np.ndarray:
    """OnA: descriptors of database images aggregated over the *query's* classes.

    Each image's class vectors are computed from its stored maps (X, A) for ``class_ids``, then
    l2 → PCA-whitening → l2, summed and l2-normalised. ``cells`` optionally restricts each image
    to a region (re-ranking boxes). Maps of equal shape are encoded together in one einsum.
    """
    # A copy: class ids read from Parquet are read-only arrays, which torch warns about.
    ids = torch.from_numpy(np.array(class_ids, dtype=np.int64))
    groups: dict[tuple, list[int]] = {}
    crops: list[tuple[torch.Tensor, torch.Tensor]] = []
    full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one float32 copy per distinct map
    for i, m in enumerate(maps):
        if id(m) not in full:
            full[id(m)] = m.tensors()
        x, a = full[id(m)]
        if cells is not None and cells[i] is not None:
            x, a = crop_cells(x, cells[i]), crop_cells(a, cells[i])
        crops.append((x, a))
        groups.setdefault((tuple(x.shape), tuple(a.shape)), []).append(i)
    k = maps[0].features.shape[0] if maps else 0
    vecs = np.zeros((len(maps), len(ids), k), dtype=np.float32)
    for members in groups.values():
        x = torch.cat([crops[i][0] for i in members])
        a = torch.cat([crops[i][1] for i in members])
        with torch.inference_mode():
            _, _, cv = encode_maps(x, a, weight, bias, n_classes=len(ids), class_ids=ids)
        vecs[members] = cv.numpy()
    # One PCA product for all regions (not one per shape group): most of re-ranking's time.
    per_class = pca(vecs, row_invariant=True) if pca is not None else l2_normalize(vecs)
    return l2_normalize(per_class.sum(axis=1))


class OnlineIndex:
    """Online aggregation over a fixed database: per-image, per-class PCA-whitened vectors.

    For every database image and every class in ``classes`` (the union of the classes that
    queries may ask for; all 1000 at most) it keeps l2(PCAw(l2(f_c))), so each query's OnA
    descriptors are a sum of rows plus one l2 — no forward pass and no PCA at search time.
    Memory: n_db × |classes| × d × 4 bytes (``nbytes``); the paper's reason to offer OnA only
    without distractors.
    """

    def __init__(
        self,
        maps: Sequence[FeatureMaps],
        classes: np.ndarray,
        weight: torch.Tensor,
        bias: torch.Tensor,
        pca: PCAWhitening | None,
        chunk: int = 32,
    ):
        self.classes = np.unique(np.asarray(classes, dtype=np.int64))
        self._pos = {int(c): i for i, c in enumerate(self.classes)}
        ids = torch.as_tensor(self.classes)
        dim = pca.output_dim if pca is not None else (maps[0].features.shape[0] if maps else 0)
        self.vectors = np.zeros((len(maps), len(self.classes), dim), dtype=np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(maps):
            groups.setdefault(
                (m.features.shape, None if m.cam_maps is None else m.cam_maps.shape), []
            ).append(i)
        for members in groups.values():
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                xs, as_ = zip(*(maps[i].tensors() for i in part), strict=True)
                with torch.inference_mode():
                    _, _, cv = encode_maps(
                        torch.cat(xs),
                        torch.cat(as_),
                        weight,
                        bias,
                        n_classes=len(ids),
                        class_ids=ids,
                    )
                vecs = cv.numpy()
                self.vectors[part] = (
                    pca(vecs, row_invariant=True) if pca is not None else l2_normalize(vecs)
                )

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes)

    def descriptors(self, class_ids: np.ndarray) -> np.ndarray:
        """OnA database descriptors (n_db × d) for one query's classes."""
        try:
            pos = [self._pos[int(c)] for c in np.asarray(class_ids)]
        except KeyError as exc:
            raise ValueError(f"class {exc.args[0]} is not in this online index") from None
        return l2_normalize(self.vectors[:, pos].sum(axis=1))
