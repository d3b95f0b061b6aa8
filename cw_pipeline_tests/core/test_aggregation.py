"""Tests for cw_pipeline.core.aggregation: l2, PCA-whitening, OfA aggregation."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest

from cw_pipeline.core.aggregation import (
    PCAWhitening,
    aggregate,
    l2_normalize,
    pca_training_vectors,
    raw_descriptors,
)


def _training_data(n: int = 300, d: int = 5, seed: int = 0) -> np.ndarray:
    """Correlated data with very different variances per direction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])[:d]
    mix = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return z @ mix + rng.normal(size=d)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / math.sqrt(float((v**2).sum()))


# --------------------------------------------------------------------------- l2


def test_l2_normalize_by_hand():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        l2_normalize(np.array([[3.0, 0.0], [4.0, 1.0]]), axis=0),
        [
            [0.6, 0.0],
            [0.8, 1.0],
        ],
    )


# --------------------------------------------------------------------------- PCA


def test_pca_whitening_gives_identity_covariance_on_training_data():
    x = _training_data()
    pca = PCAWhitening.fit(x)
    assert pca.input_dim == 5 and pca.output_dim == 5
    y = pca.transform(x).astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(5), atol=1e-4)
    # Eigenvalues are the covariance's (independent reference: eigh), in decreasing order.
    ref = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(pca.eigenvalues, ref, rtol=1e-4)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), rtol=1e-6)


def test_pca_dims_cut_keeps_leading_directions():
    x = _training_data()
    full = PCAWhitening.fit(x)
    cut = PCAWhitening.fit(x, dims=2)
    assert cut.output_dim == 2
    assert cut.metadata["output_dim"] == 2
    np.testing.assert_allclose(cut.transform(x), full.transform(x)[:, :2], atol=1e-4)
    y = cut.transform(x).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(2), atol=1e-4)


def test_pca_fewer_vectors_than_dims_keeps_n_minus_1(caplog):
    x = np.random.default_rng(3).normal(size=(4, 10))
    with caplog.at_level(logging.INFO, logger="cw_pipeline.core.aggregation"):
        pca = PCAWhitening.fit(x)
    assert pca.output_dim == 3
    assert pca.components.shape == (3, 10)
    assert "4 training vectors for 10 dimensions" in caplog.text
    assert "fitting 3 components" in caplog.text
    y = pca.transform(x).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(3), atol=1e-4)


def test_pca_dims_larger_than_available_is_logged(caplog):
    x = np.random.default_rng(4).normal(size=(6, 10))
    with caplog.at_level(logging.INFO, logger="cw_pipeline.core.aggregation"):
        pca = PCAWhitening.fit(x, dims=8)
    assert pca.output_dim == 5
    assert "fitting 5 components instead of 8" in caplog.text


def test_pca_drops_numerically_null_directions():
    rng = np.random.default_rng(5)
    x = np.zeros((20, 4))
    x[:, :2] = rng.normal(size=(20, 2))  # rank 2 data in 4 dimensions
    pca = PCAWhitening.fit(x)
    assert pca.output_dim == 2
    assert np.isfinite(pca.transform(x)).all()


def test_pca_without_whitening_only_projects():
    x = _training_data()
    pca = PCAWhitening.fit(x, dims=3, whiten=False)
    np.testing.assert_array_equal(pca.eigenvalues, np.ones(3, dtype=np.float32))
    expected = (x - x.mean(axis=0)) @ pca.components.T.astype(np.float64)
    np.testing.assert_allclose(pca.transform(x), expected, atol=1e-3)
    assert pca.metadata["whiten"] is False


def test_pca_call_is_l2_pca_l2():
    x = _training_data()
    pca = PCAWhitening.fit(l2_normalize(x), dims=3)
    v = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 0.0, 2.0, 1.0]])
    expected = np.stack(
        [_unit(((_unit(r) - pca.mean) @ pca.components.T) / np.sqrt(pca.eigenvalues)) for r in v]
    )
    np.testing.assert_allclose(pca(v), expected, atol=1e-5)
    # Works on n × N_C × K arrays too.
    np.testing.assert_allclose(pca(v[None])[0], expected, atol=1e-5)


def test_pca_metadata_and_errors():
    pca = PCAWhitening.fit(_training_data(), dims=4, metadata={"backbone": "b", "n_pca": 1})
    assert pca.metadata["backbone"] == "b"
    assert pca.metadata["n_pca"] == 1
    assert pca.metadata["training_vectors"] == 300
    assert pca.metadata["input_dim"] == 5
    assert pca.metadata["output_dim"] == 4
    with pytest.raises(ValueError, match="at least 2 training vectors"):
        PCAWhitening.fit(np.ones((1, 5)))
    bad = _training_data()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        PCAWhitening.fit(bad)
    with pytest.raises(ValueError, match="expects 5-d vectors, got 4-d"):
        pca.transform(np.zeros((2, 4)))


def test_pca_npz_bytes_round_trip():
    x = _training_data()
    pca = PCAWhitening.fit(x, dims=3, metadata={"backbone": "efficientnet_lite0", "set": "paris"})
    data = pca.npz_bytes()
    # Plain arrays (no pickles).
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["components", "eigenvalues", "mean"]
        np.testing.assert_array_equal(npz["components"], pca.components)
    loaded = PCAWhitening.from_npz_bytes(data, pca.metadata)
    np.testing.assert_array_equal(loaded.mean, pca.mean)
    np.testing.assert_array_equal(loaded.components, pca.components)
    np.testing.assert_array_equal(loaded.eigenvalues, pca.eigenvalues)
    assert loaded.metadata == pca.metadata and loaded.output_dim == 3
    np.testing.assert_array_equal(loaded(x), pca(x))


def test_pca_from_npz_bytes_rejects_what_is_not_a_model():
    buf = io.BytesIO()
    np.savez(buf, mean=np.zeros(4), components=np.zeros((2, 3)), eigenvalues=[1, 1])
    with pytest.raises(ValueError, match=r"inconsistent PCA array shapes: mean \(4,\)"):
        PCAWhitening.from_npz_bytes(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, mean=np.zeros(4), components=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="not a PCA model: no array eigenvalues"):
        PCAWhitening.from_npz_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a PCA model"):
        PCAWhitening.from_npz_bytes(b"not an npz file")
    buf = io.BytesIO()
    np.savez(buf, mean=np.array([{"a": 1}], dtype=object), components=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="not a PCA model"):  # pickles are never loaded
        PCAWhitening.from_npz_bytes(buf.getvalue())


# --------------------------------------------------------------------------- aggregation


def test_pca_training_vectors_by_hand():
    cv = np.array(
        [
            [[3.0, 4.0], [1.0, 0.0], [5.0, 5.0]],
            [[0.0, 2.0], [0.0, -3.0], [1.0, 1.0]],
        ]
    )
    np.testing.assert_allclose(pca_training_vectors(cv, 1), [[0.6, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(
        pca_training_vectors(cv, 2), [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    )
    with pytest.raises(ValueError, match=r"N_pca=4 outside 1\.\.3"):
        pca_training_vectors(cv, 4)
    with pytest.raises(ValueError, match="N_pca=0"):
        pca_training_vectors(cv, 0)
    with pytest.raises(ValueError, match="n×N_C×K"):
        pca_training_vectors(cv[0], 1)


def test_aggregate_without_pca_by_hand():
    cv = np.array(
        [
            [[3.0, 4.0], [0.0, 2.0], [9.0, -9.0]],  # third vector not aggregated (N_C = 2)
            [[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]],
        ]
    )
    out = aggregate(cv, None, 2)
    # image 0: (0.6, 0.8) + (0, 1) = (0.6, 1.8) → / sqrt(3.6); image 1: (1, 1) / sqrt(2)
    expected = np.array([[0.6, 1.8] / np.sqrt(3.6), [1.0, 1.0] / np.sqrt(2.0)])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # A single image may be given as N_C × K.
    np.testing.assert_allclose(aggregate(cv[0], None, 2), expected[:1], atol=1e-6)
    # N_C = 3 includes the third vector.
    third = np.array([0.6, 1.8]) + np.array([1.0, -1.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(aggregate(cv, None, 3)[0], _unit(third), atol=1e-6)


def test_aggregate_equals_l2_sum_of_l2_rows_random():
    rng = np.random.default_rng(7)
    cv = rng.normal(size=(3, 4, 6)) * rng.uniform(0.1, 10.0, size=(3, 4, 1))
    out = aggregate(cv, None, 4)
    for i in range(3):
        ref = sum(_unit(cv[i, c]) for c in range(4))
        np.testing.assert_allclose(out[i], _unit(ref), atol=1e-5)


def test_aggregate_with_pca_equals_explicit_loop():
    rng = np.random.default_rng(8)
    pca = PCAWhitening.fit(l2_normalize(rng.normal(size=(50, 6))), dims=4)
    cv = rng.normal(size=(2, 3, 6))
    out = aggregate(cv, pca, 3)
    assert out.shape == (2, 4)
    for i in range(2):
        acc = np.zeros(4)
        for c in range(3):
            y = (_unit(cv[i, c]) - pca.mean) @ pca.components.T / np.sqrt(pca.eigenvalues)
            acc += _unit(y)
        np.testing.assert_allclose(out[i], _unit(acc), atol=1e-5)


def test_aggregate_rejects_bad_n_classes():
    cv = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"N_C=4 outside 1\.\.3"):
        aggregate(cv, None, 4)
    with pytest.raises(ValueError, match="N_C=0"):
        aggregate(cv, None, 0)


def test_raw_descriptors_by_hand():
    np.testing.assert_allclose(raw_descriptors(np.array([[3.0, 0.0, 4.0]])), [[0.6, 0.0, 0.8]])
    rng = np.random.default_rng(9)
    pca = PCAWhitening.fit(l2_normalize(rng.normal(size=(30, 3))), dims=2)
    v = np.array([[3.0, 0.0, 4.0]])
    y = (np.array([0.6, 0.0, 0.8]) - pca.mean) @ pca.components.T / np.sqrt(pca.eigenvalues)
    np.testing.assert_allclose(raw_descriptors(v, pca), [_unit(y)], atol=1e-5)


def test_pca_transform_of_stacked_vectors_equals_row_by_row():
    """(n, n_c, D) input is projected as one 2-D product; results equal the per-row ones."""
    rng = np.random.default_rng(3)
    pca = PCAWhitening.fit(rng.normal(size=(40, 16)), dims=6)
    x = rng.normal(size=(5, 3, 16)).astype(np.float32)
    y = pca.transform(x)
    assert y.shape == (5, 3, 6)
    rows = np.stack([pca.transform(v) for v in x.reshape(-1, 16)]).reshape(5, 3, 6)
    np.testing.assert_allclose(y, rows, rtol=1e-5, atol=1e-6)
