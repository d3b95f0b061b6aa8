"""Readers searching in a loop while a project is re-indexed again and again (commit points).

:func:`search_during_reindex` runs searching threads, through the search server's engine and
through ``cw-pipeline search``'s own path (:func:`~cw_pipeline.query.load_index` +
:func:`~cw_pipeline.query.search_image`), while the test project's ``alpha`` gets a new
image per round and everything downstream is refreshed: each round publishes a new PCA of
``beta`` (learned on ``alpha``), so ``beta``'s index, ``gamma``'s re-projected distractor
descriptors and every evaluation's rankings and report change too.

Every published commit is recorded. Afterwards each ``beta`` index generation is made current
again in turn and searched alone, and every answer given during the re-indexing must be
exactly the answer of one of them: the same ids and scores for a dataset search; for a search
of the evaluation with distractors, the same scores for each of ``beta``'s images in it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from cw_pipeline.compute import published
from cw_pipeline.compute.features import dataset_extractor
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.core.methods import Method
from cw_pipeline.query import load_evaluation_index, load_index, search_image
from cw_pipeline.runtime.runs import refresh
from cw_pipeline.store import commit_path
from cw_pipeline.web import engine as engine_mod
from cw_pipeline.web.common import Target
from cw_pipeline.web.engine import SearchEngine
from cw_pipeline_tests.defs.project import DISTRACTOR_EVAL, Project, synthetic_jpeg

METHODS = ("ofa", "raw+pca")
TOP = 10


@dataclass
class Outcome:
    """What the readers saw: answers (kind, method, ((id, score), ...)), errors, and every
    commit published meanwhile (unit, owner, pointer JSON)."""

    answers: list[tuple[str, str, tuple[tuple[str, float], ...]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    commits: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def recording(monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """An outcome that records every commit published from now on."""
    out = Outcome()
    real_publish = published.publish

    def recording_publish(store, owner_kind, owner, unit, *args, **kwargs):
        commit = real_publish(store, owner_kind, owner, unit, *args, **kwargs)
        with out.lock:
            out.commits.append((unit, owner, commit.as_json()))
        return commit

    monkeypatch.setattr(published, "publish", recording_publish)
    return out


def search_during_reindex(
    project: Project,
    monkeypatch: pytest.MonkeyPatch,
    out: Outcome,
    rounds: int,
    readers: int = 3,
) -> Outcome:
    """Re-index ``rounds`` times while ``readers`` threads search (see the module doc);
    ``out`` from :func:`recording`, called before the project was first indexed."""
    monkeypatch.setattr(engine_mod, "RELOAD_CHECK_SECONDS", 0.0)
    config = project.config
    beta = config.dataset("beta")
    query = load_groundtruth(beta, _beta_ids(project)).queries[0].image_id
    query_path = beta.images / _relpath(project, query)
    engine = SearchEngine(config.source)
    extractor = dataset_extractor(beta)
    stop = threading.Event()

    def server(k: int) -> None:
        n = 0
        while not stop.is_set():
            method = METHODS[(n + k) % len(METHODS)]
            kind = "evaluation" if (n + k) % 3 == 2 else "dataset"
            target = Target(kind, DISTRACTOR_EVAL if kind == "evaluation" else "beta")
            answer = engine.answer_search(
                target, method=method, top=TOP, image_id=query, image_dataset="beta"
            )
            hits = tuple((h["id"], h["score"]) for h in answer["results"])
            with out.lock:
                out.answers.append((kind, method, hits))
            n += 1

    def command_line() -> None:  # what `cw-pipeline search` does
        n = 0
        while not stop.is_set():
            method = METHODS[n % len(METHODS)]
            evaluation = n % 3 == 2
            m = Method.parse(method)
            if evaluation:
                index = load_evaluation_index(config, project.store, DISTRACTOR_EVAL, m)
            else:
                index = load_index(config, project.store, "beta", m)
            with Image.open(query_path) as img:
                result = search_image(
                    config, index, extractor, img.convert("RGB"), query_path, method=m, top=TOP
                )
            hits = tuple((h.image_id, round(h.score, 6)) for h in result.hits)
            with out.lock:
                out.answers.append(("evaluation" if evaluation else "dataset", method, hits))
            n += 1

    def guarded(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # every error counts, and the reader goes on
                with out.lock:
                    out.errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
                if not stop.is_set():
                    guarded(fn, *args)()

        return run

    threads = [threading.Thread(target=guarded(server, k)) for k in range(readers - 1)]
    threads.append(threading.Thread(target=guarded(command_line)))
    for t in threads:
        t.start()
    try:
        for r in range(rounds):
            synthetic_jpeg(project.images("alpha") / "part1" / f"round_{r}.jpg", seed=500 + r)
            project.index("alpha")
            refresh(project.defs, project.instance)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    return out


def index_and_search_during_reindex(
    project: Project, monkeypatch: pytest.MonkeyPatch, rounds: int
) -> tuple[Outcome, dict[str, dict[str, tuple[tuple[str, float], ...]]]]:
    """Index the whole project (recording every commit), then :func:`search_during_reindex`
    ``rounds`` times; checks that no reader saw an error and that ``beta`` published one index
    per round besides the first; returns what the readers saw and :func:`expected_answers`."""
    out = recording(monkeypatch)
    project.index_all()
    refresh(project.defs, project.instance, include_cron=True)
    search_during_reindex(project, monkeypatch, out, rounds=rounds)
    assert out.errors == []
    generations = [c[2]["generation"] for c in out.commits if c[:2] == ("index", "beta")]
    assert len(generations) == rounds + 1  # the first index, then a new PCA each round
    return out, expected_answers(project, out)


def expected_answers(
    project: Project, out: Outcome
) -> dict[str, dict[str, tuple[tuple[str, float], ...]]]:
    """Each recorded ``beta`` index generation's whole ranking by method (searched alone,
    with that generation made current again); the current pointer is put back after."""
    config, store = project.config, project.store
    beta = config.dataset("beta")
    query = load_groundtruth(beta, _beta_ids(project)).queries[0].image_id
    query_path = beta.images / _relpath(project, query)
    extractor = dataset_extractor(beta)
    rel = commit_path("dataset", "beta", "index")
    current = store.read_bytes(rel)
    expected: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {}
    try:
        for unit, owner, pointer in out.commits:
            if (unit, owner) != ("index", "beta"):
                continue
            store.write_json(rel, pointer)
            for method in METHODS:
                index = load_index(config, store, "beta", Method.parse(method))
                with Image.open(query_path) as img:
                    result = search_image(
                        config, index, extractor, img.convert("RGB"), query_path,
                        method=method, top=len(index),
                    )  # fmt: skip
                hits = tuple((h.image_id, round(h.score, 6)) for h in result.hits)
                expected.setdefault(pointer["generation"], {})[method] = hits
    finally:
        store.write_bytes(rel, current)
    return expected


def unexplained(out: Outcome, expected: dict) -> list[tuple[str, str, tuple]]:
    """The answers that are not those of any one generation."""
    full = {
        g: {m: dict(hits) for m, hits in by_method.items()} for g, by_method in expected.items()
    }
    bad = []
    for kind, method, hits in out.answers:
        if kind == "dataset":
            ok = any(e[method][:TOP] == hits for e in expected.values())
        else:  # beta's images among the distractors score as in one beta generation
            ok = any(
                all(i not in scores[method] or scores[method][i] == s for i, s in hits)
                and any(i in scores[method] for i, _ in hits)
                for scores in full.values()
            )
        if not ok:
            bad.append((kind, method, hits))
    return bad


def _beta_ids(project: Project) -> list[str]:
    ids = []
    for shard in project.instance.get_dynamic_partitions("beta_shards"):
        t = project.store.read_table(project.store.shard_path("manifest", "beta", shard))
        ids += t.column("image_id").to_pylist()
    return sorted(ids)


def _relpath(project: Project, image_id: str) -> str:
    for shard in project.instance.get_dynamic_partitions("beta_shards"):
        t = project.store.read_table(project.store.shard_path("manifest", "beta", shard))
        for row in t.select(["image_id", "relpath"]).to_pylist():
            if row["image_id"] == image_id:
                return row["relpath"]
    raise KeyError(image_id)
