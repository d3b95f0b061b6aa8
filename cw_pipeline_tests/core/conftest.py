"""Fixtures shared by the core tests that run the real default backbone."""

from __future__ import annotations

import pytest
import torch

from cw_pipeline.core.backbones import load_backbone


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
