"""Tests for cw_pipeline.core.methods: method strings, PCA fitted on a training set only, and
the offline descriptors of the registered aggregations."""

from __future__ import annotations

import numpy as np
import pytest

from cw_pipeline.core.aggregation import l2_normalize
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method, fit_pca, offline_descriptors
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline_tests.core.random_features import N_C, PARAMS, K

# --------------------------------------------------------------------------- Method


@pytest.mark.parametrize("name", ["raw", "raw+pca", "ofa", "ona", "ona+qe10", "ofa+r100+qe10"])
def test_method_parse_round_trips(name):
    method = Method.parse(name)
    assert method.name == name
    assert Method.parse(method.name) == method


def test_method_parse_fields():
    assert Method.parse("ofa+r100+qe10") == Method("ofa", rerank=100, qe=10)
    assert Method.parse("ona+qe10") == Method("ona", rerank=0, qe=10)
    assert Method.parse("raw+pca") == Method("raw+pca")
    assert Method.parse("  OFA+QE5 ") == Method("ofa", qe=5)
    # Options in either order; the name is normalised to r before qe.
    assert Method.parse("ofa+qe10+r100").name == "ofa+r100+qe10"
    assert not Method.parse("raw").uses_pca
    assert Method.parse("raw+pca").uses_pca and Method.parse("ofa").uses_pca
    assert Method.parse("ona").needs_maps and Method.parse("ofa+r10").needs_maps
    assert not Method.parse("ofa+qe10").needs_maps


@pytest.mark.parametrize(
    "junk",
    ["", "foo", "ofa+", "ofa+qe", "ofa+x10", "raw+pca+pca", "ona qe10", "ofa+qe-1", "pca", "ofa+"],
)
def test_method_parse_rejects_junk(junk):
    with pytest.raises(ValueError, match="invalid method"):
        Method.parse(junk)


# --------------------------------------------------------------------------- PCA


def test_fit_pca_uses_only_the_training_set(scene):
    _, train, database, _ = scene
    pca = fit_pca(Method.parse("ofa"), train, PARAMS, metadata={"dataset": "train"})
    train_vecs = l2_normalize(train.class_vectors[:, 0])
    db_vecs = l2_normalize(database.class_vectors[:, 0])
    np.testing.assert_allclose(pca.mean, train_vecs.mean(axis=0), atol=1e-6)
    assert not np.allclose(pca.mean, db_vecs.mean(axis=0), atol=1e-3)
    assert pca.metadata["training_images"] == 30
    assert pca.metadata["training_vectors"] == 30
    assert pca.metadata["vectors"] == "class_vectors"
    assert pca.metadata["dataset"] == "train"
    # Whitens the training vectors (and only those) to identity covariance.
    y = pca.transform(train_vecs).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(K), atol=1e-3)
    y_db = pca.transform(db_vecs).astype(np.float64)
    assert not np.allclose(np.cov(y_db, rowvar=False), np.eye(K), atol=1e-1)
    # Same model whatever the database: the database is not an input.
    again = fit_pca(Method.parse("ofa"), train, PARAMS)
    np.testing.assert_array_equal(again.components, pca.components)


def test_fit_pca_n_pca_and_raw_spaces(scene):
    _, train, _, _ = scene
    params2 = SearchParams(aggregated_classes=N_C, n_pca=2)
    pca2 = fit_pca(Method.parse("ona"), train, params2)
    assert pca2.metadata["training_vectors"] == 60
    ref = l2_normalize(train.class_vectors[:, :2].reshape(-1, K)).mean(axis=0)
    np.testing.assert_allclose(pca2.mean, ref, atol=1e-6)
    raw = fit_pca(Method.parse("raw+pca"), train, SearchParams(pca_dims=3))
    assert raw.metadata["vectors"] == "sum_pooled"
    assert raw.output_dim == 3
    np.testing.assert_allclose(raw.mean, l2_normalize(train.sum_pooled).mean(axis=0), atol=1e-6)
    assert fit_pca(Method.parse("raw"), train, PARAMS) is None


# --------------------------------------------------------------------------- descriptors


def test_offline_descriptors_by_hand():
    fs = FeatureSet(
        ids=["a", "b"],
        class_ids=np.zeros((2, 2), dtype=np.int16),
        class_probs=np.zeros((2, 2), dtype=np.float32),
        class_vectors=np.array([[[3.0, 4.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]),
        sum_pooled=np.array([[3.0, 4.0], [0.0, 2.0]]),
        boxes=np.zeros((2, 0, 4)),
    )
    raw = offline_descriptors(Method.parse("raw"), fs, None, SearchParams())
    np.testing.assert_allclose(raw, [[0.6, 0.8], [0.0, 1.0]])
    ofa = offline_descriptors(Method.parse("ofa"), fs, None, SearchParams(aggregated_classes=2))
    np.testing.assert_allclose(ofa, [np.array([0.6, 1.8]) / np.sqrt(3.6), [1.0, 0.0]], atol=1e-6)
    # N_C = 64 asked, 2 stored: an error (the configuration is checked once, never clamped).
    with pytest.raises(ValueError, match=r"N_C=64 outside 1\.\.2 stored class vectors"):
        offline_descriptors(Method.parse("ofa"), fs, None, SearchParams(aggregated_classes=64))
    one = offline_descriptors(Method.parse("ofa"), fs, None, SearchParams(aggregated_classes=1))
    np.testing.assert_allclose(one, [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
