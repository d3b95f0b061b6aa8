"""Fixtures of the pipeline tests: the demo images, fresh and fully indexed projects
(see :mod:`cw_pipeline_tests.defs.project`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from cw_pipeline.core.demo import generate_demo
from cw_pipeline_tests.defs.project import Project, SavedStates, build_project, open_project


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread, like torch: PCA fits are ~7x slower with two threads on a
    CPU shared with other processes."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    """The generated demo (160 px, 4 views, 12 distractors), shared by the session."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, size=160, views=4, n_distractors=12)
    return root


@pytest.fixture
def fresh_project(tmp_path, demo_source) -> Project:
    """A project with its files and an empty ephemeral instance (nothing indexed)."""
    build_project(tmp_path / "project", demo_source)
    return open_project(tmp_path / "project")


@pytest.fixture(scope="session")
def saved_states(tmp_path_factory, demo_source) -> Iterator[SavedStates]:
    """Project states built once per test process and copied into each test that starts
    from one (indexing the demo project costs about 10 s; a copy, a fraction of one)."""
    states = SavedStates(tmp_path_factory.mktemp("saved-states"), demo_source)
    yield states
    states.check_unchanged()


@pytest.fixture
def indexed_project(tmp_path, saved_states) -> Project:
    """A project fully indexed: every dataset, then everything downstream (cron-gated too)."""
    return saved_states.project("refreshed", tmp_path / "project")


@pytest.fixture
def indexed_no_refresh(tmp_path, saved_states) -> Project:
    """A project whose datasets are all indexed, with nothing downstream refreshed."""
    return saved_states.project("indexed", tmp_path / "project")
