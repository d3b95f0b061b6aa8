"""Small random features for the core tests: feature sets built exactly as the extractor builds
them (``K`` channels, ``C`` classes, ``N_C`` class vectors stored per image) for the steps over
feature sets (:func:`scene`: a training set, a database and queries taken from it, and the
settings :data:`PARAMS` those tests search with), and feature maps (:func:`random_maps`)."""

from __future__ import annotations

import numpy as np
import torch

from cw_pipeline.core.extract import FeatureMaps, ImageFeatures, encode_maps
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.search_settings import RerankConfig, SearchParams

K, C, N_C = 6, 12, 4  # channels, classes, stored class vectors per image

PARAMS = SearchParams(
    aggregated_classes=N_C, n_pca=1, rerank=RerankConfig(query_classes=3, min_cells=1)
)

Classifier = tuple[torch.Tensor, torch.Tensor]
Scene = tuple[Classifier, FeatureSet, FeatureSet, FeatureSet]


def random_classifier(seed: int = 0) -> Classifier:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(C, K, generator=gen), torch.randn(C, generator=gen)


def random_records(
    n: int, seed: int, classifier: Classifier, keep_maps: bool = True
) -> list[ImageFeatures]:
    """Records built from random maps exactly as the extractor builds them."""
    rng = np.random.default_rng(seed)
    weight, bias = classifier
    out = []
    for _ in range(n):
        x16 = np.maximum(rng.normal(size=(K, 3, 4)), 0).astype(np.float16)
        x = torch.from_numpy(x16.astype(np.float32))[None]
        ids, probs, cv = encode_maps(x, x, weight, bias, n_classes=N_C)
        out.append(
            ImageFeatures(
                class_ids=ids[0].numpy().astype(np.int16),
                class_probs=probs[0].numpy(),
                class_vectors=cv[0].numpy(),
                sum_pooled=x[0].sum(dim=(1, 2)).numpy(),
                boxes=np.full((5, 4), np.nan, dtype=np.float32),
                grid=(3, 4),
                input_size=(128, 96),
                image_size=(128, 96),
                maps=FeatureMaps(features=x16, input_size=(128, 96)) if keep_maps else None,
            )
        )
    return out


def random_feature_set(
    n: int, seed: int, classifier: Classifier, prefix: str, keep_maps: bool = True
) -> FeatureSet:
    recs = random_records(n, seed, classifier, keep_maps)
    return FeatureSet.from_records([f"{prefix}{i}" for i in range(n)], recs)


def scene() -> Scene:
    """The classifier, 30 training images, a database of 10 and 3 of them as queries."""
    clf = random_classifier()
    train = random_feature_set(30, seed=1, classifier=clf, prefix="train")
    database = random_feature_set(10, seed=2, classifier=clf, prefix="db")
    queries = database.subset([7, 2, 4])
    return clf, train, database, queries


def random_maps(
    rng: np.random.Generator, shapes, k: int = 5, k_a: int | None = None
) -> list[FeatureMaps]:
    """Maps of ``k`` channels (and ``k_a`` separate CAM channels) per (h, w) of ``shapes``."""
    out = []
    for h, w in shapes:
        x = np.maximum(rng.normal(size=(k, h, w)), 0).astype(np.float16)
        a = None if k_a is None else np.maximum(rng.normal(size=(k_a, h, w)), 0).astype(np.float16)
        out.append(FeatureMaps(features=x, cam_maps=a, input_size=(w * 32, h * 32)))
    return out
