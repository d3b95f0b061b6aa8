"""Tests for cw_pipeline.core.encoding: CroW channel weights, class vectors, sum pooling."""

from __future__ import annotations

import math

import pytest
import torch

from cw_pipeline.core.encoding import class_vectors, crow_channel_weights, sum_pool


def _example() -> torch.Tensor:
    """1×3×2×2 X: channel 0 has 2/4 positive cells, channel 1 has 3/4, channel 2 is all zero."""
    return torch.tensor(
        [
            [
                [[1.0, 0.0], [2.0, 0.0]],
                [[1.0, 1.0], [1.0, -1.0]],
                [[0.0, 0.0], [0.0, 0.0]],
            ]
        ]
    )


def test_crow_weights_by_hand():
    # Q = (0.5, 0.75, 0); Σ Q = 1.25; CW_k = log(1.25 / Q_k); the empty channel gets 0.
    w = crow_channel_weights(_example())
    expected = torch.tensor([[math.log(1.25 / 0.5), math.log(1.25 / 0.75), 0.0]])
    assert w.shape == (1, 3)
    assert torch.allclose(w, expected, atol=1e-6)
    assert w[0, 2] == 0.0


def test_crow_weights_per_image():
    x = torch.cat([_example(), _example()[:, [1, 0, 2]]])  # second image: channels swapped
    w = crow_channel_weights(x)
    a, b = math.log(1.25 / 0.5), math.log(1.25 / 0.75)
    assert torch.allclose(w, torch.tensor([[a, b, 0.0], [b, a, 0.0]]), atol=1e-6)


def test_crow_weights_count_positive_cells_not_magnitude():
    x = _example()
    scaled = x.clone()
    scaled[:, 0] *= 100.0
    assert torch.allclose(crow_channel_weights(scaled), crow_channel_weights(x))


def test_crow_weights_all_zero_map_and_uniform_map():
    assert torch.equal(crow_channel_weights(torch.zeros(2, 4, 3, 3)), torch.zeros(2, 4))
    # Every channel positive everywhere: Q_k = 1, Σ Q = K, so CW_k = log K.
    w = crow_channel_weights(torch.ones(1, 4, 2, 2))
    assert torch.allclose(w, torch.full((1, 4), math.log(4.0)))


def test_crow_weights_rejects_non_4d():
    with pytest.raises(ValueError, match="N×K×h×w"):
        crow_channel_weights(torch.zeros(3, 2, 2))


def test_class_vector_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]], [[4.0, 0.0], [1.0, 1.0]]]])  # 1×2×2×2
    cams = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.25]]]])  # 1×2×2×2
    cw = torch.tensor([[2.0, 0.5]])
    out = class_vectors(x, cams, cw)
    # class 0: ch0 = 2·(1·1 + 2·0.5) = 4;    ch1 = 0.5·(4·1 + 0·0.5) = 2
    # class 1: ch0 = 2·(0·1 + 3·0.25) = 1.5; ch1 = 0.5·(1·1 + 1·0.25) = 0.625
    assert out.shape == (1, 2, 2)
    assert torch.allclose(out, torch.tensor([[[4.0, 2.0], [1.5, 0.625]]]))


def test_class_vectors_default_weights_are_crow():
    x = _example()
    cams = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])  # 1×1×2×2
    out = class_vectors(x, cams)
    # Σ X_k · CAM: ch0 = 1 + 2·0.5 = 2, ch1 = 1 + 0.5 = 1.5, ch2 = 0.
    expected = torch.tensor([[[2.0 * math.log(2.5), 1.5 * math.log(1.25 / 0.75), 0.0]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_class_vectors_equal_explicit_loops():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 4, generator=gen).relu()
    cams = torch.rand(2, 5, 2, 4, generator=gen)
    cw = torch.rand(2, 3, generator=gen)
    out = class_vectors(x, cams, cw)
    assert out.shape == (2, 5, 3)
    for n in range(2):
        for c in range(5):
            for k in range(3):
                acc = 0.0
                for i in range(2):
                    for j in range(4):
                        acc += float(x[n, k, i, j]) * float(cams[n, c, i, j])
                assert math.isclose(float(out[n, c, k]), float(cw[n, k]) * acc, abs_tol=1e-5)


def test_class_vectors_shape_mismatch():
    with pytest.raises(ValueError, match="differ in batch or grid size"):
        class_vectors(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 3, 2))
    with pytest.raises(ValueError, match="differ in batch or grid size"):
        class_vectors(torch.zeros(2, 3, 2, 2), torch.zeros(1, 4, 2, 2))


def test_sum_pool_by_hand():
    out = sum_pool(_example())
    assert out.shape == (1, 3)
    assert out.tolist() == [[3.0, 2.0, 0.0]]
    two = sum_pool(torch.arange(16.0).reshape(2, 2, 2, 2))
    assert two.tolist() == [[6.0, 22.0], [38.0, 54.0]]
