"""Descriptor aggregation: l2 → PCA-whitening → l2 per class vector, then sum and l2.

* ``PCAWhitening``: fitted on class vectors of a *training* dataset (the paired dataset: Paris for
  Oxford and vice versa), N_pca vectors per image. Serialised as ``.npz`` bytes
  (:meth:`PCAWhitening.npz_bytes`); the feature store keeps them beside their JSON metadata.
* Offline aggregation (OfA): an image's own top N_C class vectors, at indexing time.
* Online aggregation (OnA): the query's top N_C classes applied to every database image, at
  search time (see :mod:`cw_pipeline.core.online_aggregation`).
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit l2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, EPS)


@dataclass
class PCAWhitening:
    """PCA-whitening: ``y = ((x - mean) @ components.T) / sqrt(eigenvalues)``.

    Attributes:
        mean: D-vector.
        components: d × D principal directions (rows), by decreasing variance.
        eigenvalues: d variances.
        metadata: provenance (backbone, layer, n_pca, dims, training set and size ...).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    def truncated(self, dims: int, **metadata: Any) -> PCAWhitening:
        """The same model keeping only its first ``dims`` components (the largest
        variances), with ``metadata`` added to its own."""
        if not 1 <= dims <= self.output_dim:
            raise ValueError(f"cannot keep {dims} of {self.output_dim} PCA components")
        return PCAWhitening(
            mean=self.mean,
            components=self.components[:dims].copy(),
            eigenvalues=self.eigenvalues[:dims].copy(),
            metadata={**self.metadata, "output_dim": int(dims), **metadata},
        )

    @classmethod
    def fit(
        cls,
        vectors: np.ndarray,
        dims: int | None = None,
        *,
        whiten: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> PCAWhitening:
        """Fit on training vectors (n × D), already l2-normalised by the caller.

        With fewer training vectors than dimensions only min(D, n − 1) components carry
        variance: that many are kept (and said in a log line). ``dims`` optionally cuts further.
        """
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"PCA needs at least 2 training vectors, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("PCA training vectors contain NaN or infinity")
        n, d_in = x.shape
        mean = x.mean(axis=0)
        centred = x - mean
        # Economy SVD of the centred data: eigenvalues of the covariance are s² / (n − 1).
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        eig = s**2 / (n - 1)
        available = min(d_in, n - 1)
        keep = available if dims is None else min(int(dims), available)
        if dims is not None and dims > available:
            logger.info(
                "PCA: %d training vectors for %d dimensions: fitting %d components instead of %d",
                n,
                d_in,
                available,
                dims,
            )
        elif dims is None and available < d_in:
            logger.info(
                "PCA: %d training vectors for %d dimensions: fitting %d components",
                n,
                d_in,
                available,
            )
        # Drop numerically null directions (rank-deficient data), which whitening would blow up.
        tol = eig[0] * 1e-10 if eig.size and eig[0] > 0 else 0.0
        keep = max(1, min(keep, int((eig > tol).sum())))
        meta = dict(metadata or {})
        meta.update(
            {
                "training_vectors": int(n),
                "input_dim": int(d_in),
                "output_dim": int(keep),
                "whiten": bool(whiten),
            }
        )
        return cls(
            mean=mean.astype(np.float32),
            components=vt[:keep].astype(np.float32),
            eigenvalues=(eig[:keep] if whiten else np.ones(keep)).astype(np.float32),
            metadata=meta,
        )

    def transform(self, x: np.ndarray, row_invariant: bool = False) -> np.ndarray:
        """Project and whiten (no normalisation); accepts (..., D) arrays.

        ``row_invariant``: each vector's result is the same whatever other vectors are
        projected with it. A float32 BLAS product's rounding depends on a row's place in the
        matrix; accumulated in float64, the float32 results agree (the search's kept
        per-image values, re-ranking scores and OnA descriptors, need it; it costs twice the
        product's time)."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"PCA expects {self.input_dim}-d vectors, got {x.shape[-1]}-d")
        # One 2-D product: numpy's stacked (3-D) matmul skips BLAS and is ~10× slower.
        rows = x.reshape(-1, x.shape[-1]) - self.mean
        if row_invariant:
            if rows.shape[0] == 1:  # BLAS runs a single row by another kernel: run two
                rows = np.concatenate([rows, rows])
            flat = (rows.astype(np.float64) @ self._components64.T).astype(np.float32)
            flat = flat[: int(np.prod(x.shape[:-1], dtype=np.int64))]
        else:
            flat = rows @ self.components.T
        y = flat.reshape(*x.shape[:-1], flat.shape[-1])
        return y / np.sqrt(np.maximum(self.eigenvalues, EPS))

    @property
    def _components64(self) -> np.ndarray:
        cached = self.__dict__.get("_c64")
        if cached is None or cached.shape != self.components.shape:
            cached = self.components.astype(np.float64)
            self.__dict__["_c64"] = cached
        return cached

    def __call__(self, x: np.ndarray, row_invariant: bool = False) -> np.ndarray:
        """The paper's per-vector step: l2 → PCA-whitening → l2."""
        return l2_normalize(self.transform(l2_normalize(x), row_invariant))

    def npz_bytes(self) -> bytes:
        """The arrays as ``.npz`` bytes (``mean``, ``components``, ``eigenvalues``; no pickles).

        The one serialisation of a model: the feature store writes these bytes beside the
        metadata as JSON (``cw_pipeline.store.FeatureStore.write_pca``).
        """
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, eigenvalues=self.eigenvalues)
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes, metadata: dict[str, Any] | None = None) -> PCAWhitening:
        """The model whose arrays :meth:`npz_bytes` wrote; ValueError (saying what is wrong)
        when they do not decode without pickles, lack an array or have inconsistent shapes."""
        names = ("mean", "components", "eigenvalues")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in names if k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a PCA model ({exc})") from None
        missing = [k for k in names if k not in arrays]
        if missing:
            raise ValueError(f"not a PCA model: no array {', '.join(missing)}")
        mean, comps, eig = arrays["mean"], arrays["components"], arrays["eigenvalues"]
        if (
            mean.ndim != 1
            or comps.ndim != 2
            or eig.ndim != 1
            or comps.shape[1] != mean.shape[0]
            or comps.shape[0] != eig.shape[0]
        ):
            raise ValueError(
                f"inconsistent PCA array shapes: mean {mean.shape}, components {comps.shape}, "
                f"eigenvalues {eig.shape}"
            )
        return cls(mean=mean, components=comps, eigenvalues=eig, metadata=dict(metadata or {}))


def pca_training_vectors(class_vectors: np.ndarray, n_pca: int) -> np.ndarray:
    """The first ``n_pca`` class vectors of each image (n × N_C × K → (n·N_pca) × K), l2-normed."""
    cv = np.asarray(class_vectors, dtype=np.float32)
    if cv.ndim != 3:
        raise ValueError(f"class vectors must be n×N_C×K, got shape {cv.shape}")
    if n_pca < 1 or n_pca > cv.shape[1]:
        raise ValueError(f"N_pca={n_pca} outside 1..{cv.shape[1]} stored class vectors")
    return l2_normalize(cv[:, :n_pca].reshape(-1, cv.shape[2]))


def aggregate(class_vectors: np.ndarray, pca: PCAWhitening | None, n_classes: int) -> np.ndarray:
    """OfA descriptors: l2(Σ_{c ≤ N_C} l2(PCAw(l2(f_c)))) for n × N_C' × K class vectors.

    ``class_vectors`` must be ordered by class rank (most probable first); the first
    ``n_classes`` are aggregated. Without PCA the l2-normalised vectors are summed.
    """
    cv = np.asarray(class_vectors, dtype=np.float32)
    if cv.ndim == 2:
        cv = cv[None]
    if cv.ndim != 3:
        raise ValueError(f"class vectors must be n×N_C×K, got shape {cv.shape}")
    if n_classes < 1 or n_classes > cv.shape[1]:
        raise ValueError(f"N_C={n_classes} outside 1..{cv.shape[1]} stored class vectors")
    sel = cv[:, :n_classes]
    per_class = pca(sel) if pca is not None else l2_normalize(sel)
    return l2_normalize(per_class.sum(axis=1))


def raw_descriptors(sum_pooled: np.ndarray, pca: PCAWhitening | None = None) -> np.ndarray:
    """Baseline: l2 of the sum-pooled vector, optionally l2 → PCA-whitening → l2."""
    x = np.asarray(sum_pooled, dtype=np.float32)
    return pca(x) if pca is not None else l2_normalize(x)
