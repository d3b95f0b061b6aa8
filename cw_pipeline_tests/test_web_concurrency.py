"""The search server with many requests at once (issue 22): reads never wait behind a
search, up to ``max_searches`` searches run at once, and the method strings are bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from cw_pipeline.web import searching
from cw_pipeline.web.app import create_app
from cw_pipeline.web.common import MAX_EXPANSION, Target
from cw_pipeline.web.engine import SearchEngine
from cw_pipeline_tests.cli_project import CliProject

ALPHA = Target("dataset", "alpha")


class Gate:
    """Holds every search inside its ranking until opened; counts those inside at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.inside = 0
        self.most = 0
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()
        real = searching.search_image

        def gated(*args, **kwargs):
            with self._lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            self.entered.release()
            try:
                assert self.opened.wait(60), "the gate was never opened"
                return real(*args, **kwargs)
            finally:
                with self._lock:
                    self.inside -= 1

        monkeypatch.setattr(searching, "search_image", gated)

    def wait_inside(self, n: int) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=60), "a search never reached its ranking"


@pytest.fixture
def engine(cli_project: CliProject) -> Iterator[SearchEngine]:
    engine = SearchEngine(cli_project.config_path, max_searches=2)
    client = TestClient(create_app(engine))
    item = _query(client)
    engine.answer_search(ALPHA, image_id=item, top=5)  # network and database loaded
    yield engine


def _query(client: TestClient) -> str:
    items = client.get("/api/images", params={"dataset": "alpha"}).json()["items"]
    return next(i["id"] for i in items if i["query"])


def _searching(
    engine: SearchEngine, image_id: str, n: int, answers: list
) -> list[threading.Thread]:
    def run() -> None:
        answers.append(engine.answer_search(ALPHA, image_id=image_id, top=5))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_reads_never_wait_behind_searches(engine: SearchEngine, monkeypatch) -> None:
    """While two searches are held inside their ranking, the target list, the image list and
    thumbnails answer at once, through HTTP."""
    client = TestClient(create_app(engine))
    image_id = _query(client)
    gate, answers = Gate(monkeypatch), []
    threads = _searching(engine, image_id, 2, answers)
    try:
        gate.wait_inside(2)
        t0 = time.perf_counter()
        assert client.get("/api/datasets").status_code == 200
        assert client.get("/api/images", params={"dataset": "alpha"}).status_code == 200
        thumb = client.get("/api/image", params={"dataset": "alpha", "id": image_id, "size": 160})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert time.perf_counter() - t0 < 10  # not blocked (the searches are held for 60 s)
        assert gate.inside == 2 and not answers
    finally:
        gate.opened.set()
        for t in threads:
            t.join(60)
    assert len(answers) == 2 and all(a["results"] for a in answers)


def test_searches_run_at_once_up_to_the_limit(engine: SearchEngine, monkeypatch) -> None:
    """With max_searches=2, two searches rank at once and a third waits for a slot; each
    answers with the same results as alone, and says how long it waited."""
    client = TestClient(create_app(engine))
    image_id = _query(client)
    alone = engine.answer_search(ALPHA, image_id=image_id, top=5)
    gate, answers = Gate(monkeypatch), []
    threads = _searching(engine, image_id, 3, answers)
    try:
        gate.wait_inside(2)
        time.sleep(0.5)
        assert gate.inside == 2  # the third waits for a slot
    finally:
        gate.opened.set()
        for t in threads:
            t.join(60)
    assert gate.most == 2 and len(answers) == 3
    for answer in answers:
        assert [r["id"] for r in answer["results"]] == [r["id"] for r in alone["results"]]
    assert max(a["timings_ms"]["queued"] for a in answers) >= 400


def test_each_running_search_has_its_own_extractor(engine: SearchEngine, monkeypatch) -> None:
    """The network is loaded once; searches running at once use extractors of their own over
    it (an extractor keeps per-call state)."""
    seen: list[int] = []
    real = searching.search_image

    def record(config, index, extractor, *args, **kwargs):
        seen.append(id(extractor))
        time.sleep(0.3)
        return real(config, index, extractor, *args, **kwargs)

    monkeypatch.setattr(searching, "search_image", record)
    client = TestClient(create_app(engine))
    answers: list = []
    for t in _searching(engine, _query(client), 2, answers):
        t.join(60)
    assert len(answers) == 2 and len(set(seen)) == 2
    (pool,) = engine._extractors.values()
    assert pool.loaded


@pytest.mark.parametrize(
    ("method", "words"),
    [
        (f"ofa+qe{MAX_EXPANSION + 1}", f"go up to {MAX_EXPANSION}"),
        ("ofa+r100000", f"go up to {MAX_EXPANSION}"),
        ("ofa+qe999", "more than the 48 images of the database"),
        ("ofa+r200", "more than the 48 images of the database"),
    ],
)
def test_expansion_and_re_ranking_are_bounded(cli_project: CliProject, method, words) -> None:
    client = TestClient(create_app(SearchEngine(cli_project.config_path)))
    params = {"dataset": "alpha", "id": _query(client), "method": method}
    response = client.get("/api/search", params=params)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_health_and_metrics(cli_project: CliProject, tmp_path) -> None:
    """`/api/health` says ok (503 with the error when the configuration breaks); `/metrics` is
    the Prometheus text format with per-route request counts and latency histograms, search
    times by method, and the running searches."""
    from prometheus_client.parser import text_string_to_metric_families

    client = TestClient(create_app(SearchEngine(cli_project.config_path)))
    health = client.get("/api/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["max_searches"] >= 1 and body["datasets"] >= 4
    image_id = _query(client)
    for method in ("ofa", "ofa+qe5", "raw"):
        params = {"dataset": "alpha", "id": image_id, "method": method}
        assert client.get("/api/search", params=params).status_code == 200
    assert client.get("/api/search", params={"dataset": "nope", "id": "x"}).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    search = {"endpoint": "/api/search", "method": "GET"}
    assert value("cw_http_requests_total", **search, status="200") == 3
    assert value("cw_http_requests_total", **search, status="404") == 1
    assert value("cw_http_requests_total", endpoint="other", method="GET", status="404") == 1
    assert value("cw_http_request_duration_seconds_count", endpoint="/api/search") == 4
    assert value("cw_search_ranking_seconds_count", method="ofa") == 1
    assert value("cw_search_ranking_seconds_count", method="ofa+qe") == 1
    assert value("cw_search_features_seconds_count") == 3
    assert value("cw_searches_running") == 0 and value("cw_search_slots") >= 1
    assert value("cw_index_loads_total") >= 1

    broken = tmp_path / "broken.yaml"
    broken.write_text("datasets: [unclosed", encoding="utf-8")
    down = TestClient(create_app(SearchEngine(broken))).get("/api/health")
    assert down.status_code == 503 and down.json()["status"] == "error"
    assert "broken.yaml" in down.json()["error"]


def test_errors_never_show_the_servers_absolute_paths(cli_project: CliProject, tmp_path) -> None:
    """Damaged files, a missing folder, an unindexed dataset, a bad configuration: every
    error the page or the API shows names files relative to the project (or by image id)."""
    import shutil

    import yaml

    from cw_pipeline.config import load_config
    from cw_pipeline.store import FeatureStore
    from cw_pipeline.store.commits import read_commit

    root = tmp_path / "copy"
    shutil.copytree(cli_project.root, root, symlinks=True)
    path = root / cli_project.config_path.name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["datasets"]["gone"] = {"layout": "folder", "images": str(tmp_path / "elsewhere/gone")}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    store = FeatureStore(load_config(path, disable_missing=True).warehouse)
    rel = read_commit(store, "dataset", "alpha", "index").file("descriptors:ofa")
    store.write_bytes(rel, store.read_bytes(rel)[:100])
    client = TestClient(create_app(SearchEngine(path)))
    answers = [client.get("/api/datasets").text]
    targets = {t["name"]: t for t in client.get("/api/datasets").json()["targets"]}
    assert f"'warehouse/{rel}'" in targets["alpha"]["error"], targets["alpha"]["error"]
    assert "…/gone" in targets["gone"]["error"], targets["gone"]["error"]
    for params in (
        {"dataset": "alpha", "id": "x"},
        {"dataset": "epsilon", "id": "x"},
        {"dataset": "beta", "id": "no-such-image"},
    ):
        response = client.get("/api/search", params=params)
        assert response.status_code >= 400
        answers.append(response.text)
    hint = targets["epsilon"]["hint"]  # configured, never indexed: says what to run
    assert hint == "cw-pipeline index --dataset epsilon --config datasets.yaml", hint
    path.write_text("datasets: [unclosed", encoding="utf-8")
    answers.append(client.get("/api/health").text)
    for text in answers:
        assert str(tmp_path) not in text and "/tmp/" not in text, text
