"""Commit points (:mod:`cw_pipeline.store.commits`, :mod:`cw_pipeline.compute.published`):
generations, pointers, what stays readable and what is removed when."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cw_pipeline.compute import published
from cw_pipeline.compute.descriptors import descriptor_table, read_descriptors
from cw_pipeline.compute.pca import pca_models_for
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.methods import PCA_SPACES, stored_descriptors
from cw_pipeline.store import (
    CorruptFileError,
    FeatureStore,
    commit_path,
    descriptors_path,
    pca_path,
)
from cw_pipeline.store import commits as commits_mod
from cw_pipeline.store.commits import (
    GRACE_VARIABLE,
    generation_time,
    grace_seconds,
    new_generation,
    publish,
    read_commit,
    remove_expired,
)

DS = SimpleNamespace(name="oxford5k", self_split=False)


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "warehouse")


def _models(seed: int) -> dict[str, PCAWhitening]:
    rng = np.random.default_rng(seed)
    return {
        published.pca_role(space): PCAWhitening.fit(rng.normal(size=(30, 6)), dims=4)
        for space in PCA_SPACES
    }


def _tables(seed: int) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(5)]
    return {a: descriptor_table(ids, rng.normal(size=(5, 4))) for a in stored_descriptors()}


def _generation_folders(store: FeatureStore, top: str) -> set[str]:
    return {
        rel.split("generation=", 1)[1].split("/", 1)[0]
        for rel in store.list(top, suffix=None)
        if "generation=" in rel
    }


def test_a_generation_is_invisible_until_its_pointer_is_switched(store, monkeypatch) -> None:
    first = published.publish_pca(store, DS, _models(1))
    assert read_commit(store, "dataset", DS.name, "pca") == first
    pointer = store.read_json(commit_path("dataset", DS.name, "pca"))
    assert pointer["generation"] == first.generation
    assert set(pointer["files"]) == {"pca:class", "pca:raw"}

    # A writer that dies before its pointer is written leaves the published state as it was.
    def dies(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(published, "publish", dies)
    with pytest.raises(OSError):
        published.publish_pca(store, DS, _models(2))
    assert published.current_pca(store, DS) == first
    assert len(_generation_folders(store, "pca")) == 2  # the orphan, removed after its grace
    old = pca_models_for(store, DS, None, first)
    np.testing.assert_array_equal(
        pca_models_for(store, DS)["class"].components, old["class"].components
    )


def test_an_index_reads_the_pca_it_was_projected_with(store) -> None:
    pca1 = published.publish_pca(store, DS, _models(1))
    index1 = published.publish_index(store, DS, _tables(1), pca1)
    assert index1.refs == {"pca": pca1.generation}
    pca2 = published.publish_pca(store, DS, _models(2))  # a re-index half done
    index = published.current_index(store, DS)
    assert index == index1
    with_index = pca_models_for(store, DS, None, index)["class"].components
    np.testing.assert_array_equal(
        with_index, pca_models_for(store, DS, None, pca1)["class"].components
    )
    assert not np.array_equal(with_index, pca_models_for(store, DS)["class"].components)
    # The next index names the new PCA, and keeps the one it replaced readable.
    index2 = published.publish_index(store, DS, _tables(2), pca2)
    assert index2.refs == {"pca": pca2.generation}
    assert index2.previous is not None and index2.previous.generation == index1.generation
    assert read_commit(store, "dataset", DS.name, "index").previous.files == index1.files
    ids, mat = read_descriptors(store, published.descriptors_file(index2.previous, "ofa"))
    assert ids == [f"img{i}" for i in range(5)] and mat.shape == (5, 4)


def test_old_generations_go_after_the_grace_period_unless_in_use(store, monkeypatch) -> None:
    pca1 = published.publish_pca(store, DS, _models(1))
    index1 = published.publish_index(store, DS, _tables(1), pca1)
    pca2 = published.publish_pca(store, DS, _models(2))
    pca3 = published.publish_pca(store, DS, _models(3))
    # Default grace (15 min): every generation is still there.
    assert _generation_folders(store, "pca") == {pca1.generation, pca2.generation, pca3.generation}
    monkeypatch.setenv(GRACE_VARIABLE, "0")
    assert remove_expired(store, "dataset", DS.name) == [f"pca/{pca2.generation}"]
    # pca1 stays: the published index was projected with it.
    assert _generation_folders(store, "pca") == {pca1.generation, pca3.generation}
    index2 = published.publish_index(store, DS, _tables(2), pca3)
    # pca1 and index1 stay too: index1 is kept readable as index2's previous.
    assert _generation_folders(store, "pca") == {pca1.generation, pca3.generation}
    assert _generation_folders(store, "descriptors") == {index1.generation, index2.generation}
    index3 = published.publish_index(store, DS, _tables(3), pca3)
    assert _generation_folders(store, "pca") == {pca3.generation}
    assert _generation_folders(store, "descriptors") == {index2.generation, index3.generation}


def test_a_retired_generation_stays_for_the_grace_period(store, monkeypatch) -> None:
    monkeypatch.setenv(GRACE_VARIABLE, "60")
    first = published.publish_pca(store, DS, _models(1))
    second = published.publish_pca(store, DS, _models(2))
    pointer = read_commit(store, "dataset", DS.name, "pca")
    assert set(pointer.retired) == {f"pca/{first.generation}"}
    retired_at = pointer.retired[f"pca/{first.generation}"]
    assert remove_expired(store, "dataset", DS.name, now=retired_at + 59) == []
    removed = remove_expired(store, "dataset", DS.name, now=retired_at + 61)
    assert removed == [f"pca/{first.generation}"]
    assert _generation_folders(store, "pca") == {second.generation}


def test_a_generation_never_published_goes_once_its_grace_period_is_over(store) -> None:
    published.publish_pca(store, DS, _models(1))
    orphan = new_generation()
    store.write_pca(pca_path(DS.name, "class", None, orphan), _models(2)["pca:class"])
    created = generation_time(orphan)
    assert created is not None and abs(created - time.time()) < 60
    grace = grace_seconds()
    assert remove_expired(store, "dataset", DS.name, now=created + grace - 1) == []
    assert remove_expired(store, "dataset", DS.name, now=created + grace + 1) == [f"pca/{orphan}"]


def test_a_damaged_pointer_names_itself(store) -> None:
    rel = commit_path("dataset", DS.name, "index")
    store.write_bytes(rel, b'{"generation": "x"')
    with pytest.raises(CorruptFileError, match=r"commits/dataset=oxford5k/index\.json"):
        read_commit(store, "dataset", DS.name, "index")
    store.write_bytes(rel, json.dumps({"generation": "x"}).encode())
    with pytest.raises(CorruptFileError, match="not a commit pointer"):
        read_commit(store, "dataset", DS.name, "index")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_grace_period_is_refused_naming_the_variable(monkeypatch, value) -> None:
    monkeypatch.setenv(GRACE_VARIABLE, value)
    with pytest.raises(ValueError, match=GRACE_VARIABLE):
        grace_seconds()


def test_units_and_names_are_checked(store) -> None:
    with pytest.raises(ValueError, match="unknown commit unit"):
        publish(store, "dataset", DS.name, "reports", new_generation(), {})
    with pytest.raises(ValueError, match="invalid generation"):
        pca_path(DS.name, "class", None, "../x")
    assert commits_mod.generation_time("legacy") is None


def test_a_store_written_before_commit_points_is_read_as_it_is(store) -> None:
    models = _models(1)
    for role, model in models.items():
        store.write_pca(pca_path(DS.name, role.removeprefix("pca:")), model)
    assert published.current_index(store, DS) is None  # no descriptors yet
    for agg, table in _tables(1).items():
        store.write_table(descriptors_path(DS.name, agg), table)
    index = published.current_index(store, DS)
    assert index is not None and index.generation == published.LEGACY
    assert published.descriptors_file(index, "ofa") == descriptors_path(DS.name, "ofa")
    np.testing.assert_array_equal(
        pca_models_for(store, DS, None, index)["raw"].components, models["pca:raw"].components
    )
    # The next publication replaces it; the files at the old paths are never removed.
    pca = published.publish_pca(store, DS, _models(2))
    published.publish_index(store, DS, _tables(2), pca)
    assert published.current_index(store, DS).generation != published.LEGACY
    assert store.exists(descriptors_path(DS.name, "ofa"))
