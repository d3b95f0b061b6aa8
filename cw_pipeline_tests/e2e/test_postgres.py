"""The Dagster instance on PostgreSQL (``dagster-postgres``; docs/deployment.md), against a
real server on 127.0.0.1 (Debian's ``postgresql``, started and stopped by the test)."""

from __future__ import annotations

import dagster as dg
import pytest

from cw_pipeline.runtime.instance import INSTANCE_YAML, open_instance
from cw_pipeline_tests.concurrent_index import (
    check_all_indexed,
    fresh_home,
    index_at_once,
    make_images,
    write_project,
)
from cw_pipeline_tests.conftest import REPO_ROOT
from cw_pipeline_tests.defs.project import synthetic_jpeg
from cw_pipeline_tests.e2e.postgres import DAGSTER_YAML_STORAGE, postgres_server


@pytest.fixture(scope="module")
def server():
    with postgres_server() as s:
        yield s


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


def _dagster_yaml() -> str:
    """The project's ``dagster.yaml`` (run limits) with the PostgreSQL storage block."""
    return (REPO_ROOT / INSTANCE_YAML).read_text(encoding="utf-8") + DAGSTER_YAML_STORAGE


def _shard_tags(instance: dg.DagsterInstance) -> set[str]:
    return {
        r.tags["cw_pipeline/shard"] for r in instance.get_runs() if "cw_pipeline/shard" in r.tags
    }


def test_concurrent_index_commands_on_postgres(tmp_path, server, images, monkeypatch):
    """4 commands (``one`` twice, ``two``, ``three``) at once on a fresh database, each with its
    own DAGSTER_HOME (as on separate machines: no shared lock file): all exit 0 without a
    traceback, every dataset indexed, the runs and partitions in PostgreSQL, no SQLite file."""
    env = server.env(server.create_database("concurrent"))
    config = write_project(tmp_path / "project", images)
    home = fresh_home(tmp_path / "home", _dagster_yaml())
    outcomes = index_at_once(
        config, home, ["one", "one", "two", "three"], env=env, separate_homes=True
    )
    check_all_indexed(config, outcomes)
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with open_instance(home) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        for ds in ("one", "two", "three"):
            assert sorted(instance.get_dynamic_partitions(f"{ds}_shards")) == ["s0", "s1"]
        expected = {f"{ds}/{s}" for ds in ("one", "two", "three") for s in ("s0", "s1")}
        assert _shard_tags(instance) == expected


def test_index_and_refresh_on_postgres(tmp_path, server, images):
    """``cw-pipeline index`` with its refresh on PostgreSQL: first everything (8 forward passes,
    PCA, descriptors, rankings, report), then after one image changed one forward pass and the
    same refresh, then nothing."""
    env = server.env(server.create_database("refresh"))
    ukb = tmp_path / "images"
    make_images(ukb)  # a copy this test may edit
    config = write_project(tmp_path / "project", ukb, ukb=True)
    home = fresh_home(tmp_path / "home", _dagster_yaml())
    refreshed = {"ukb/pca_model", "ukb/descriptors", "ukb/rankings", "ukb/map_report"}

    (first,) = index_at_once(config, home, ["ukb"], env=env)
    res = first.result()
    assert (res["images"], res["forward_passes"]) == (8, 8), res
    assert set(res["refreshed"]) == refreshed, res

    synthetic_jpeg(ukb / "ukb" / "ukbench00003.jpg", seed=999, size=(64, 48))
    (second,) = index_at_once(config, home, ["ukb"], env=env)
    res = second.result()
    assert (res["images"], res["forward_passes"], res["reused"]) == (8, 1, 7), res
    assert set(res["refreshed"]) == refreshed, res

    (third,) = index_at_once(config, home, ["ukb"], env=env)
    res = third.result()
    assert (res["forward_passes"], res["indexed_shards"], res["refreshed"]) == (0, [], []), res
    assert not list(home.rglob("*.db"))
