"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_dagster_home(tmp_path_factory, monkeypatch) -> None:
    """Each test's commands use a Dagster home of their own (a test may set another): never
    the developer's ``$DAGSTER_HOME`` nor the repository's ``.dagster/``, which the CLI takes
    when the variable is unset, and never another test's runs and refresh cursor."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``<repo>/../shared/data``, or ``$CW_SHARED_DATA``).

    Fails (never skips) when the folder is missing: the real-data tests are mandatory.
    """
    override = os.environ.get("CW_SHARED_DATA")
    path = Path(override) if override else REPO_ROOT / ".." / "shared" / "data"
    if not path.is_dir():
        source = "CW_SHARED_DATA" if override else "the default location"
        pytest.fail(
            f"shared test data folder not found at {path} (from {source}); "
            "set CW_SHARED_DATA to the folder holding groundtruth/ and ukbench/",
            pytrace=False,
        )
    return path.resolve()


@pytest.fixture(scope="session")
def cli_project(tmp_path_factory):
    """A small project indexed through Dagster, for the ``search`` and ``datasets`` tests
    (see :mod:`cw_pipeline_tests.cli_project`)."""
    from cw_pipeline_tests.cli_project import build_cli_project

    return build_cli_project(tmp_path_factory.mktemp("cli"))
