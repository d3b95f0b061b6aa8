"""Commit points: searches running while a project is re-indexed many times each see one
published state (see :mod:`cw_pipeline_tests.defs.reindex_readers`)."""

from __future__ import annotations

from cw_pipeline_tests.defs.project import build_project, open_project, write_config
from cw_pipeline_tests.defs.reindex_readers import index_and_search_during_reindex, unexplained


def test_searches_during_reindexing_see_one_generation(tmp_path, demo_source, monkeypatch):
    root = tmp_path / "project"
    build_project(root, demo_source)
    write_config(root, reproject_at_once=None)  # gamma follows beta's PCA in the same refresh
    project = open_project(root)
    out, expected = index_and_search_during_reindex(project, monkeypatch, rounds=4)
    assert len({h for e in expected.values() for h in [e["ofa"][:10]]}) > 1  # they differ
    assert len(out.answers) >= 40
    kinds = {(kind, method) for kind, method, _ in out.answers}
    assert kinds == {(k, m) for k in ("dataset", "evaluation") for m in ("ofa", "raw+pca")}
    assert unexplained(out, expected) == []
