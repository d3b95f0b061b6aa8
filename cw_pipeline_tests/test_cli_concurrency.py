"""`cw-pipeline index` commands started at the same moment on one embedded (SQLite) instance.

Before: on a fresh ``DAGSTER_HOME`` one of them died with a raw SQLAlchemy traceback
(``UNIQUE constraint failed: alembic_version.version_num``, ``table … already exists``, or a
schedule database stamped twice: ``more than one head present``, for good); on an existing
instance two commands adding the same new shards failed on ``UNIQUE constraint failed:
dynamic_partitions``.
"""

from __future__ import annotations

import pytest

from cw_pipeline_tests.concurrent_index import (
    check_all_indexed,
    fresh_home,
    index_at_once,
    make_images,
    write_project,
)

#: Same dataset three times, then three different ones, then a mix: 4 commands at once.
ROUNDS = (("one", "one", "one", "two"), ("one", "two", "three", "three"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("datasets", ROUNDS, ids=["same", "mixed"])
def test_concurrent_index_commands_on_a_fresh_instance(tmp_path, images, datasets):
    """4 commands on a fresh DAGSTER_HOME and a fresh warehouse: all exit 0, no traceback,
    every dataset indexed (both shards, 3 images)."""
    config = write_project(tmp_path / "project", images)
    home = fresh_home(tmp_path / "home")
    check_all_indexed(config, index_at_once(config, home, datasets))


def test_concurrent_index_commands_adding_the_same_shards_on_an_existing_instance(tmp_path, images):
    """The instance exists (one command indexed ``two``); 4 commands then add ``one``'s and
    ``three``'s new shards at once: no partition race, everything indexed."""
    config = write_project(tmp_path / "project", images)
    home = fresh_home(tmp_path / "home")
    check_all_indexed(config, index_at_once(config, home, ["two"]))
    check_all_indexed(config, index_at_once(config, home, ["one", "one", "three", "three"]))
