"""Fixtures shared by the core tests: the real default backbone, and a small random scene of
feature sets (:mod:`cw_pipeline_tests.core.random_features`)."""

from __future__ import annotations

import pytest
import torch

from cw_pipeline.core.backbones import load_backbone
from cw_pipeline_tests.core import random_features


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs: one intra-op thread is fastest, and immune to other jobs on busy CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone()


@pytest.fixture(scope="module")
def scene() -> random_features.Scene:
    """The classifier, a training set, a database and queries taken from it."""
    return random_features.scene()
