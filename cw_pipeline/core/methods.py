"""The aggregation registry, method strings, and the two offline steps of a method.

An aggregation turns an image's stored features into one descriptor; a *method* is an
aggregation, optionally followed by CAM-box re-ranking of the top R and query expansion with the
top K, written ``<aggregation>[+r<R>][+qe<K>]`` (``ofa+r100+qe10``). Like cirtorch's ``POOLING``
dict, :data:`AGGREGATIONS` maps a name to everything the rest of the code asks about it:

* ``describe``: the function computing offline descriptors of a feature set;
* ``pca_space``: which PCA model it uses (a key of :data:`PCA_SPACES`, or None);
* ``stored``: the name of the stored descriptors it ranks (its own name unless it reuses
  another's, as OnA ranks the OfA query descriptor against online database descriptors);
* ``online``: database descriptors aggregated per query from the feature maps (needs maps).

Adding a method is one function and one entry::

    def mean_of_top2(features, pca, params):
        return aggregate(features.class_vectors, pca, 2)

    AGGREGATIONS["top2"] = Aggregation("top2", mean_of_top2, pca_space="class")

``cw-pipeline evaluate --method top2``, the YAML's ``methods: [top2]``, the descriptors and
rankings assets and ``cw-pipeline search`` then all know it.

The offline steps every method goes through the registry for: :func:`fit_pca` (its PCA,
fitted on a *training* set) and :func:`offline_descriptors` (the descriptors stored at
indexing time); the search itself is :func:`cw_pipeline.core.retrieval.search`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cw_pipeline.core.aggregation import (
    PCAWhitening,
    aggregate,
    l2_normalize,
    pca_training_vectors,
    raw_descriptors,
)
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.search_settings import SearchParams

__all__ = [
    "AGGREGATIONS",
    "PCA_SPACES",
    "Aggregation",
    "Method",
    "PCASpace",
    "fit_pca",
    "fit_pca_space",
    "offline_descriptors",
    "stored_descriptors",
]

Describe = Callable[[FeatureSet, PCAWhitening | None, SearchParams], np.ndarray]


@dataclass(frozen=True)
class PCASpace:
    """A space PCA-whitening is learned in: its training vectors from a feature set."""

    name: str
    training_vectors: Callable[[FeatureSet, SearchParams], np.ndarray]
    vectors: str  #: what is recorded in the model's metadata ("class_vectors", ...)


@dataclass(frozen=True)
class Aggregation:
    """One registered aggregation (see the module doc)."""

    name: str
    describe: Describe
    pca_space: str | None = None
    stored_as: str | None = None
    online: bool = False
    description: str = ""

    @property
    def stored(self) -> str:
        """Name of the stored (offline) descriptors this aggregation ranks."""
        return self.stored_as or self.name


def _class_training(train: FeatureSet, params: SearchParams) -> np.ndarray:
    return pca_training_vectors(train.class_vectors, params.n_pca)


def _raw_training(train: FeatureSet, params: SearchParams) -> np.ndarray:
    return l2_normalize(train.sum_pooled)


def _raw(features: FeatureSet, pca: PCAWhitening | None, params: SearchParams) -> np.ndarray:
    return raw_descriptors(features.sum_pooled, pca)


def _ofa(features: FeatureSet, pca: PCAWhitening | None, params: SearchParams) -> np.ndarray:
    return aggregate(features.class_vectors, pca, params.aggregated_classes)


#: PCA spaces by name: class vectors (N_pca per image; OfA/OnA) and sum-pooled vectors.
PCA_SPACES: dict[str, PCASpace] = {
    "class": PCASpace("class", _class_training, "class_vectors"),
    "raw": PCASpace("raw", _raw_training, "sum_pooled"),
}

#: Aggregations by name (the first part of a method string).
AGGREGATIONS: dict[str, Aggregation] = {
    "raw": Aggregation("raw", _raw, description="l2 of the sum-pooled features"),
    "raw+pca": Aggregation("raw+pca", _raw, "raw", description="raw, PCA-whitened"),
    "ofa": Aggregation(
        "ofa", _ofa, "class", description="offline: the image's own top N_C class vectors"
    ),
    "ona": Aggregation(
        "ona",
        _ofa,
        "class",
        stored_as="ofa",
        online=True,
        description="online: the query's top N_C classes on every database image",
    ),
}


def stored_descriptors() -> tuple[str, ...]:
    """Names of the offline descriptors indexing stores: each aggregation's ``stored``."""
    return tuple(dict.fromkeys(a.stored for a in AGGREGATIONS.values()))


def _aggregation(name: str) -> Aggregation:
    spec = AGGREGATIONS.get(name)
    if spec is None:
        raise ValueError(f"unknown aggregation {name!r} (expected one of {tuple(AGGREGATIONS)})")
    return spec


_OPTION_RE = re.compile(r"(r|qe)(\d+)")


@dataclass(frozen=True)
class Method:
    """A retrieval method: aggregation, optional CAM-box re-ranking of the top R, then QE.

    Parsed from strings such as ``raw``, ``raw+pca``, ``ofa``, ``ona+qe10``, ``ofa+r100+qe10``.
    """

    aggregation: str = "ofa"
    rerank: int = 0
    qe: int = 0

    def __post_init__(self) -> None:
        _aggregation(self.aggregation)
        for name in ("rerank", "qe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Method:
        """Parse a method string (case and option order are not significant here; the YAML
        loader asks for the canonical spelling, :attr:`name`)."""
        parts = text.strip().lower().split("+")
        for cut in range(len(parts), 0, -1):  # the longest registered name ("raw+pca")
            if "+".join(parts[:cut]) in AGGREGATIONS:
                options = [_OPTION_RE.fullmatch(p) for p in parts[cut:]]
                if all(options):
                    found = dict(m.groups() for m in options)  # type: ignore[union-attr]
                    return cls(
                        "+".join(parts[:cut]), int(found.get("r", 0)), int(found.get("qe", 0))
                    )
        raise ValueError(
            f"invalid method {text!r}: expected {'|'.join(AGGREGATIONS)}, optionally followed "
            "by +r<R> and/or +qe<k> (e.g. ofa+r100+qe10)"
        )

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        parts = [self.aggregation]
        if self.rerank:
            parts.append(f"r{self.rerank}")
        if self.qe:
            parts.append(f"qe{self.qe}")
        return "+".join(parts)

    @property
    def spec(self) -> Aggregation:
        """The registry entry of the method's aggregation."""
        return _aggregation(self.aggregation)

    @property
    def uses_pca(self) -> bool:
        return self.spec.pca_space is not None

    @property
    def stored_aggregation(self) -> str:
        """The offline descriptors the method ranks (OnA: the OfA query descriptor; its
        database descriptors are aggregated online from the maps)."""
        return self.spec.stored

    @property
    def needs_maps(self) -> bool:
        return self.spec.online or self.rerank > 0


def fit_pca(
    method: Method,
    train: FeatureSet,
    params: SearchParams,
    metadata: dict | None = None,
) -> PCAWhitening | None:
    """PCA-whitening for a method, fitted on a training set (never the evaluated images);
    None for a method without PCA."""
    space = method.spec.pca_space
    return None if space is None else fit_pca_space(space, train, params, metadata)


def fit_pca_space(
    space: str, train: FeatureSet, params: SearchParams, metadata: dict | None = None
) -> PCAWhitening:
    """PCA-whitening of one registered space (:data:`PCA_SPACES`) fitted on ``train``."""
    spec = PCA_SPACES[space]
    meta = {"n_pca": params.n_pca, "training_images": len(train), **(metadata or {})}
    meta["vectors"] = spec.vectors
    return PCAWhitening.fit(spec.training_vectors(train, params), params.pca_dims, metadata=meta)


def offline_descriptors(
    method: Method, features: FeatureSet, pca: PCAWhitening | None, params: SearchParams
) -> np.ndarray:
    """Descriptors stored at indexing time for the method's aggregation (its ``describe``)."""
    return method.spec.describe(features, pca, params)
