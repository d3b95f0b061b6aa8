"""Commit points: searches running while a project is re-indexed many times each see one
published state (see :mod:`cw_pipeline_tests.defs.reindex_readers`)."""

from __future__ import annotations

from cw_pipeline.runs import refresh
from cw_pipeline_tests.defs.project import build_project, open_project, write_config
from cw_pipeline_tests.defs.reindex_readers import (
    expected_answers,
    recording,
    search_during_reindex,
    unexplained,
)


def test_searches_during_reindexing_see_one_generation(tmp_path, demo_source, monkeypatch):
    root = tmp_path / "project"
    build_project(root, demo_source)
    write_config(root, reproject_at_once=None)  # gamma follows beta's PCA in the same refresh
    project = open_project(root)
    out = recording(monkeypatch)
    project.index_all()
    refresh(project.defs, project.instance, include_cron=True)

    search_during_reindex(project, monkeypatch, out, rounds=4)

    assert out.errors == []
    generations = [c[2]["generation"] for c in out.commits if c[:2] == ("index", "beta")]
    assert len(generations) == 5  # the first index, then one per round (a new PCA each)
    expected = expected_answers(project, out)
    assert len({h for e in expected.values() for h in [e["ofa"][:10]]}) > 1  # they differ
    assert len(out.answers) >= 40
    kinds = {(kind, method) for kind, method, _ in out.answers}
    assert kinds == {(k, m) for k in ("dataset", "evaluation") for m in ("ofa", "raw+pca")}
    assert unexplained(out, expected) == []
