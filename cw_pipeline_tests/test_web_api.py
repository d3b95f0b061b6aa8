"""The search page's JSON API (Starlette's TestClient) over the small indexed project of
:mod:`cw_pipeline_tests.cli_project`: the same results as ``cw-pipeline search``, evaluations
with distractors, ground-truth labels and AP, the CAM view, reloading, path safety, uploads
and errors."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image
from starlette.testclient import TestClient

from cw_pipeline.cli import main
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.compute.rankings import score_rankings
from cw_pipeline.config import load_config
from cw_pipeline.core.evaluation import average_precision
from cw_pipeline.store import FeatureStore, commit_path
from cw_pipeline.store.commits import read_commit
from cw_pipeline.web import engine as engine_mod
from cw_pipeline.web.app import create_app
from cw_pipeline.web.engine import SearchEngine
from cw_pipeline_tests.cli_project import CliProject
from cw_pipeline_tests.defs.project import DISTRACTOR_EVAL
from cw_pipeline_tests.published import rankings_rel


@pytest.fixture(scope="module")
def engine(cli_project: CliProject) -> SearchEngine:
    return SearchEngine(cli_project.config_path, max_upload_bytes=2_000_000)


@pytest.fixture(scope="module")
def client(engine: SearchEngine) -> TestClient:
    return TestClient(create_app(engine))


def cli_search(capsys, project: CliProject, *argv: str) -> dict:
    code = main(["search", *argv, "--config", str(project.config_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def gt_query(client: TestClient, dataset: str = "alpha") -> dict:
    items = client.get("/api/images", params={"dataset": dataset}).json()["items"]
    return next(i for i in items if i["query"])


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["error"]
    return body["error"]


# --------------------------------------------------------------------------- listing


def test_datasets_lists_targets_with_their_index_state(client: TestClient) -> None:
    data = ok(client.get("/api/datasets"))
    by_name = {(t["kind"], t["name"]): t for t in data["targets"]}
    alpha = by_name[("dataset", "alpha")]
    assert alpha["images_indexed"] == 48 and alpha["images_on_disk"] == 48
    assert alpha["not_indexed"] == 0 and alpha["state"] == "indexed"
    assert alpha["materialized"] and alpha["ground_truth"]
    ev = by_name[("evaluation", DISTRACTOR_EVAL)]
    beta, gamma = by_name[("dataset", "beta")], by_name[("dataset", "gamma")]
    assert ev["datasets"] == ["beta", "gamma"]
    assert ev["images_indexed"] == beta["images_indexed"] + gamma["images_indexed"]
    # epsilon is configured but never indexed: listed, with the command to run
    eps = by_name[("dataset", "epsilon")]
    assert eps["state"] == "not indexed" and eps["not_indexed"] == 2
    assert "cw-pipeline index --dataset epsilon" in eps["hint"]


def test_images_list_ground_truth_queries_first_with_boxes(
    client: TestClient, cli_project: CliProject
) -> None:
    data = ok(client.get("/api/images", params={"dataset": "alpha"}))
    items = data["items"]
    gt = load_groundtruth(cli_project.config.dataset("alpha"), [i["id"] for i in items])
    n = len(gt.queries)
    assert data["queries"] == n and data["total"] == 48
    assert [i["id"] for i in items[:n]] == [q.image_id for q in gt.queries]
    assert all(i["query"] and i["box"] for i in items[:n])
    assert not any(i["query"] for i in items[n:])
    page = ok(client.get("/api/images", params={"dataset": "alpha", "offset": 5, "limit": 3}))
    assert [i["id"] for i in page["items"]] == [i["id"] for i in items[5:8]]
    found = ok(client.get("/api/images", params={"dataset": "alpha", "q": items[-1]["id"]}))
    assert [i["id"] for i in found["items"]] == [items[-1]["id"]]
    ev = ok(client.get("/api/images", params={"evaluation": DISTRACTOR_EVAL, "limit": 1000}))
    assert {i["dataset"] for i in ev["items"]} == {"beta", "gamma"}


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("method", ["ofa", "ofa+qe5", "raw+pca", "ona", "ofa+r5"])
def test_top_k_equals_cw_pipeline_search(
    capsys, client: TestClient, cli_project: CliProject, method: str
) -> None:
    """A ground-truth query with its box, by id: the page's top-k is the CLI's."""
    q = gt_query(client)
    path = cli_project.image("alpha", q["id"])
    box = [str(v) for v in q["box"]]
    cli = cli_search(
        capsys, cli_project, str(path), "--dataset", "alpha", "--method", method,
        "--box", *box, "--top", "12",
    )  # fmt: skip
    params = {"dataset": "alpha", "id": q["id"], "box": ",".join(box), "method": method}
    page = ok(client.get("/api/search", params={**params, "top": 12}))
    assert [r["id"] for r in page["results"]] == [r["id"] for r in cli["results"]]
    assert [r["score"] for r in page["results"]] == pytest.approx(
        [r["score"] for r in cli["results"]], abs=1e-5
    )
    assert page["database"] == cli["database"] and page["method"] == cli["method"]


def test_upload_equals_cw_pipeline_search_of_the_file(
    capsys, client: TestClient, cli_project: CliProject
) -> None:
    path = cli_project.image("ukb", "ukbench00005")  # a self-split dataset: two halves merged
    cli = cli_search(capsys, cli_project, str(path), "--dataset", "ukb", "--top", "8")
    body = path.read_bytes()
    params = {"dataset": "ukb", "top": 8, "filename": path.name}
    page = ok(client.post("/api/search", params=params, content=body))
    assert [r["id"] for r in page["results"]] == [r["id"] for r in cli["results"]]
    assert page["query"]["upload"] == path.name and page["ap"] is None
    assert all(r["label"] is None for r in page["results"])


def test_ground_truth_labels_and_ap(client: TestClient, cli_project: CliProject) -> None:
    """Labels come from the query's ground truth; the AP is the map_report's for that query
    (the stored rankings, ranked with the query features of the pipeline)."""
    q = gt_query(client)
    params = {"dataset": "alpha", "id": q["id"], "box": ",".join(map(str, q["box"])), "top": 48}
    page = ok(client.get("/api/search", params={**params, "query": q["query"]}))
    ds = cli_project.config.dataset("alpha")
    ids = [r["id"] for r in page["results"]]
    gt = load_groundtruth(ds, ids)
    query = next(x for x in gt.queries if x.image_id == q["id"])
    for r in page["results"]:
        want = (
            "junk" if r["id"] in query.junk else "positive" if r["id"] in query.positives else None
        )
        assert r["label"] == (want or "negative"), r
    assert page["query"]["positives"] == len(query.positives)
    rows = {i: k for k, i in enumerate(ids)}
    own = average_precision(
        [rows[i] for i in ids], [rows[i] for i in query.positives], [rows[i] for i in query.junk]
    )
    assert page["ap"] == pytest.approx(own, abs=1e-6)
    store = FeatureStore(cli_project.config.warehouse)
    stored = score_rankings(ds, gt, ids, store.read_table(rankings_rel(store, "alpha", "ofa")))
    assert page["ap"] == pytest.approx(stored["aps"][q["id"]], abs=0.02)


@pytest.mark.parametrize(
    ("dataset", "method"),
    [("alpha", "ofa+r5"), ("alpha", "ona+qe3"), ("ukb", "ofa"), ("ukb", "ofa+r5")],
)
def test_ap_is_that_of_the_whole_ranking_whose_top_is_shown(
    client: TestClient, dataset: str, method: str
) -> None:
    """The AP (from where the positives stand, the database never sorted) is the AP of the
    whole ranking the page lists when asked for all of it, whose top the short list is; ukb
    is self-split: its two halves are merged by score."""
    q = gt_query(client, dataset)
    params = {"dataset": dataset, "id": q["id"], "method": method}
    short = ok(client.get("/api/search", params={**params, "top": 3}))
    whole = ok(client.get("/api/search", params={**params, "top": short["database"]}))
    ids = [r["id"] for r in whole["results"]]
    assert len(ids) == len(set(ids)) == whole["database"]
    assert [r["id"] for r in short["results"]] == ids[:3]
    labels = [r["label"] for r in whole["results"]]
    positives = [k for k, label in enumerate(labels) if label == "positive"]
    junk = [k for k, label in enumerate(labels) if label == "junk"]
    own = average_precision(np.arange(len(ids)), positives, junk)
    assert positives and whole["query"]["positives"] == len(positives)
    assert short["ap"] == whole["ap"] == pytest.approx(own, abs=1e-6)


def test_repeated_searches_reuse_the_database_feature_maps(cli_project: CliProject) -> None:
    """+r and OnA compute database feature maps once: a repeated search runs no forward pass
    for them (same results); with --map-cache-mb 0 it computes them again."""
    for cache_bytes, again_passes in ((64 * 2**20, 0), (0, None)):
        engine = SearchEngine(cli_project.config_path, map_cache_bytes=cache_bytes)
        client = TestClient(create_app(engine))
        q = gt_query(client)
        query = {"dataset": "alpha", "id": q["id"], "box": ",".join(map(str, q["box"]))}
        for method in ("ofa+r5", "ona"):
            params = {**query, "method": method, "top": 10}
            first = ok(client.get("/api/search", params=params))
            again = ok(client.get("/api/search", params=params))
            assert first["map_forward_passes"] > 0
            want = first["map_forward_passes"] if again_passes is None else again_passes
            if method == "ona" and cache_bytes:  # +r5 already computed 5 of its maps
                assert first["map_forward_passes"] == first["database"] - 5
            assert again["map_forward_passes"] == want
            assert again["results"] == first["results"] and again["ap"] == first["ap"]


def test_evaluation_with_distractors_ranks_dataset_and_distractors(
    client: TestClient, capsys, cli_project: CliProject
) -> None:
    q = gt_query(client, "beta")
    params = {"id": q["id"], "box": ",".join(map(str, q["box"])), "top": 500}
    ev = ok(client.get("/api/search", params={**params, "evaluation": DISTRACTOR_EVAL}))
    alone = ok(client.get("/api/search", params={**params, "dataset": "beta"}))
    gamma = ok(client.get("/api/images", params={"dataset": "gamma", "limit": 1000}))["total"]
    assert ev["database"] == alone["database"] + gamma
    assert {r["dataset"] for r in ev["results"]} == {"beta", "gamma"}
    # the distractors only interleave: beta's own images keep their order and scores
    mine = [(r["id"], r["score"]) for r in ev["results"] if r["dataset"] == "beta"]
    assert mine == [(r["id"], r["score"]) for r in alone["results"]]
    assert ev["ap"] <= alone["ap"] + 1e-9
    links = {r["dataset"]: r["dagster"] for r in ev["results"]}
    assert links["beta"].endswith("/assets/beta/descriptors?view=lineage")
    assert links["gamma"].endswith(f"/assets/{DISTRACTOR_EVAL}/gamma_descriptors?view=lineage")


def test_timings_split_features_and_ranking(client: TestClient) -> None:
    q = gt_query(client)
    page = ok(client.get("/api/search", params={"dataset": "alpha", "id": q["id"]}))
    t = page["timings_ms"]
    assert t["features"] > 0 and t["ranking"] > 0
    assert t["server"] >= t["features"] + t["ranking"]


def test_model_and_index_loaded_once_and_reloaded_on_a_new_materialization(
    cli_project: CliProject, monkeypatch
) -> None:
    engine = SearchEngine(cli_project.config_path)
    client = TestClient(create_app(engine))
    q = gt_query(client)
    params = {"dataset": "alpha", "id": q["id"]}
    first = ok(client.get("/api/search", params=params))
    assert first["timings_ms"]["index_load"] > 0
    for _ in range(2):
        again = ok(client.get("/api/search", params=params))
        assert again["timings_ms"]["index_load"] == 0 and again["timings_ms"]["model_load"] == 0
    assert engine.index_loads == 1 and len(engine._extractors) == 1
    monkeypatch.setattr(engine_mod, "RELOAD_CHECK_SECONDS", 0.0)
    ok(client.get("/api/search", params=params))
    assert engine.index_loads == 1  # nothing changed in the store
    rerank = {**params, "method": "ofa+r5"}
    assert ok(client.get("/api/search", params=rerank))["map_forward_passes"] == 5
    assert ok(client.get("/api/search", params=rerank))["map_forward_passes"] == 0
    # A new publication of alpha's index (same content, a new pointer file).
    store = FeatureStore(cli_project.config.warehouse)
    rel = commit_path("dataset", "alpha", "index")
    store.write_bytes(rel, store.read_bytes(rel))
    later = os.stat(store.path(rel)).st_mtime + 5
    os.utime(store.path(rel), (later, later))
    reloaded = ok(client.get("/api/search", params=params))
    assert engine.index_loads == 2 and reloaded["timings_ms"]["index_load"] > 0
    assert [r["id"] for r in reloaded["results"]] == [r["id"] for r in first["results"]]
    # the feature maps kept for +r are dropped with the old database
    assert ok(client.get("/api/search", params=rerank))["map_forward_passes"] == 5


def test_cam_view_shows_the_box_re_ranking_scores(client: TestClient) -> None:
    q = gt_query(client)
    params = {"dataset": "alpha", "id": q["id"], "box": ",".join(map(str, q["box"]))}
    page = ok(client.get("/api/search", params={**params, "method": "ofa+r5", "top": 5}))
    for r in page["results"][:3]:
        d = ok(client.get("/api/detail", params={"token": page["token"], **_pick(r)}))
        # re-ranking's score of an image is its best region's: the one the view shows
        assert d["regions"][d["best"]]["score"] == pytest.approx(r["score"], abs=1e-4)
        assert max(x["score"] for x in d["regions"]) == d["regions"][d["best"]]["score"]
        assert d["regions"][0]["box"] == [0, 0, *d["size"]]
        png = base64.b64decode(d["overlay"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).width >= d["size"][0]
        assert d["dagster"].endswith("/assets/alpha/descriptors?view=lineage")
    assert "expired" in error(client.get("/api/detail", params={"token": "x", **_pick(r)}), 404)


def _pick(result: dict) -> dict:
    return {"dataset": result["dataset"], "id": result["id"]}


# --------------------------------------------------------------------------- images, safety


def test_images_are_served_by_manifest_id_only(client: TestClient, cli_project: CliProject) -> None:
    q = gt_query(client)
    r = client.get("/api/image", params={"dataset": "alpha", "id": q["id"], "size": 100})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) <= 100
    config = str(cli_project.config_path)
    for bad in (
        "../datasets.yaml",
        config,
        "..%2Fdatasets.yaml",
        f"{q['id']}.jpg",
        "/etc/passwd",
        "",
    ):
        assert "no indexed image" in error(
            client.get("/api/image", params={"dataset": "alpha", "id": bad}), 404
        )
    # an id of another dataset is not this one's
    other = gt_query(client, "beta")["id"]
    error(client.get("/api/image", params={"dataset": "alpha", "id": other}), 404)
    error(client.get("/api/image", params={"dataset": "../alpha", "id": q["id"]}), 404)
    error(client.get("/static/../engine.py"), 404)
    error(client.get("/static/engine.py"), 404)
    error(client.get("/api/image", params={"dataset": "alpha", "id": q["id"], "size": 9}), 400)


def test_search_by_id_never_takes_a_path(client: TestClient, cli_project: CliProject) -> None:
    path = cli_project.image("alpha", gt_query(client)["id"])
    r = client.get("/api/search", params={"dataset": "alpha", "id": str(path)})
    assert "no indexed image" in error(r, 404)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_uploads_are_refused_with_a_message(
    client: TestClient, cli_project: CliProject
) -> None:
    params = {"dataset": "alpha", "filename": "q.jpg"}
    assert "unrecognised" in error(
        client.post("/api/search", params=params, content=b"not an image at all"), 422
    )
    good = cli_project.image("alpha", gt_query(client)["id"]).read_bytes()
    assert "q.jpg" in error(client.post("/api/search", params=params, content=good[:300]), 422)
    bomb = _png_header(10_000, 10_000)  # over the 89.5 Mpx limit that indexing uses
    assert "over the limit" in error(client.post("/api/search", params=params, content=bomb), 422)
    assert "MiB" in error(
        client.post("/api/search", params=params, content=b"\xff" * 2_100_000), 413
    )
    assert "empty" in error(client.post("/api/search", params=params, content=b""), 400)


def test_odd_modes_and_exif_uploads_are_read_like_indexing(
    client: TestClient, cli_project: CliProject
) -> None:
    """A rotated file with an EXIF orientation tag and an RGBA PNG of the same picture
    rank like the upright JPEG (decoded by the same code as indexing)."""
    path = cli_project.image("alpha", gt_query(client)["id"])
    upright = Image.open(path).convert("RGB")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=95, exif=exif)
    rgba = io.BytesIO()
    upright.convert("RGBA").save(rgba, "PNG")
    params = {"dataset": "alpha", "top": 5}
    base = ok(client.post("/api/search", params=params, content=path.read_bytes()))
    for data in (rotated.getvalue(), rgba.getvalue()):
        res = ok(client.post("/api/search", params=params, content=data))
        assert res["results"][0]["id"] == base["results"][0]["id"]


def test_every_error_is_json(client: TestClient, engine: SearchEngine, monkeypatch) -> None:
    q = gt_query(client)
    assert "unknown dataset" in error(client.get("/api/search", params={"dataset": "nope"}), 404)
    error(client.get("/api/search", params={"dataset": "alpha", "evaluation": "alpha"}), 400)
    base = {"dataset": "alpha", "id": q["id"]}
    assert "method" in error(client.get("/api/search", params={**base, "method": "xyz"}), 400)
    assert "box" in error(client.get("/api/search", params={**base, "box": "1,2,3"}), 400)
    assert "outside" in error(client.get("/api/search", params={**base, "box": "0,0,9999,5"}), 400)
    assert "zero area" in error(client.get("/api/search", params={**base, "box": "5,5,5,9"}), 400)
    assert "top" in error(client.get("/api/search", params={**base, "top": "0"}), 400)
    assert "integer" in error(client.get("/api/search", params={**base, "top": "ten"}), 400)
    assert "not allowed" in error(client.post("/api/datasets"), 405)
    assert "no such page" in error(client.get("/admin"), 404)
    error(client.get("/api/search", params={"dataset": "alpha"}), 400)  # no image
    # a folder dataset without PCA is searched with raw only
    r = client.post("/api/search", params={"dataset": "delta"}, content=_jpeg())
    assert "method raw" in error(r, 400)
    # an unexpected failure: a JSON 500, no traceback page
    monkeypatch.setattr(engine, "targets", lambda: 1 / 0)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    msg = error(quiet.get("/api/datasets"), 500)
    assert "ZeroDivisionError" in msg and "Traceback" not in msg


def test_page_and_static_files_load_nothing_from_elsewhere(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        for text in (page.text, r.text):
            assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text


def test_an_unindexed_dataset_says_what_to_run(client: TestClient) -> None:
    r = client.get("/api/search", params={"dataset": "epsilon", "method": "raw", "id": "e0"})
    assert "no indexed image" in error(r, 404)
    r = client.post("/api/search", params={"dataset": "epsilon", "method": "raw"}, content=_jpeg())
    assert "cw-pipeline index --dataset epsilon" in error(r, 409)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_serve_warns_on_a_non_loopback_address(monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr("cw_pipeline.cli.query.serve", lambda *a, **k: calls.append((a, k)))
    assert main(["serve", "--host", "0.0.0.0", "--port", "3999"]) == 0
    out, err = capsys.readouterr()
    assert "http://0.0.0.0:3999" in out and "no authentication" in err
    assert main(["serve"]) == 0
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:3001" in out and err == ""
    assert [a[1:3] for a, _ in calls] == [("0.0.0.0", 3999), ("127.0.0.1", 3001)]
    assert main(["serve", "--max-upload-mb", "0"]) == 2


def test_one_broken_dataset_never_takes_the_list_down(cli_project: CliProject, tmp_path) -> None:
    """A dataset whose folder holds a link outside it and one whose folder is gone are listed
    with their error, cannot be searched (409, the error), and every other dataset is listed
    and searched as before."""
    data = yaml.safe_load(cli_project.config_path.read_text(encoding="utf-8"))
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(outside)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "elsewhere.jpg").symlink_to(outside)
    gone = tmp_path / "gone"
    gone.mkdir()
    data["datasets"]["broken-link"] = {"layout": "folder", "images": str(linked)}
    data["datasets"]["folder-gone"] = {"layout": "folder", "images": str(gone)}
    path = cli_project.root / "datasets_with_broken_ones.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    gone.rmdir()
    client = TestClient(create_app(SearchEngine(path)))

    targets = {t["name"]: t for t in ok(client.get("/api/datasets"))["targets"]}
    assert targets["alpha"]["state"] == "indexed" and "error" not in targets["alpha"]
    for name, words in (
        ("broken-link", "elsewhere.jpg"),
        ("folder-gone", "gone"),
    ):
        assert targets[name]["state"] == "error", targets[name]
        assert words in targets[name]["error"], targets[name]
        message = error(client.get("/api/images", params={"dataset": name}), 409)
        assert message == targets[name]["error"]
    q = gt_query(client)
    found = ok(client.get("/api/search", params={"dataset": "alpha", "id": q["id"], "top": 3}))
    assert found["results"]


@pytest.mark.parametrize("damage", ["corrupt descriptors", "pca of another dimension"])
def test_a_damaged_index_is_listed_with_its_error_and_the_others_work(
    cli_project: CliProject, tmp_path, damage: str
) -> None:
    """A dataset whose published descriptors do not decode, or whose PCA gives vectors of
    another dimension than its descriptors, is listed with the error naming the file and
    cannot be searched (409, the error); every other dataset is searched as before."""
    root = tmp_path / "copy"
    shutil.copytree(cli_project.root, root, symlinks=True)
    path = root / cli_project.config_path.name
    store = FeatureStore(load_config(path).warehouse)
    index = read_commit(store, "dataset", "alpha", "index")
    if damage == "corrupt descriptors":
        rel = index.file("descriptors:ofa")
        data = store.read_bytes(rel)
        store.write_bytes(rel, data[: len(data) // 2])
        words = [rel.split("/")[-1], "corrupt"]
    else:  # the class-space PCA of beta written over alpha's
        beta = read_commit(store, "dataset", "beta", "index")
        model = store.read_pca(beta.file("pca:class"))
        store.write_pca(index.file("pca:class"), model.truncated(model.output_dim - 1))
        words = ["ofa descriptors", "dimensions", "--force"]
    client = TestClient(create_app(SearchEngine(path)))
    targets = {t["name"]: t for t in ok(client.get("/api/datasets"))["targets"]}
    assert targets["alpha"]["state"] == "error", targets["alpha"]
    assert all(w in targets["alpha"]["error"] for w in words), targets["alpha"]["error"]
    for name in ("beta", DISTRACTOR_EVAL):
        assert "error" not in targets[name], targets[name]
    for endpoint in ("/api/search", "/api/images"):
        message = error(client.get(endpoint, params={"dataset": "alpha", "id": "a"}), 409)
        assert message == targets["alpha"]["error"]
    beta_q = gt_query(client, "beta")
    found = ok(client.get("/api/search", params={"dataset": "beta", "id": beta_q["id"]}))
    assert found["results"]


def test_an_invalid_entry_disables_only_itself(cli_project: CliProject, tmp_path) -> None:
    """A dataset entry the configuration refuses (an unknown layout), a dataset whose PCA
    source is that entry, and an evaluation naming an unknown distractor set are listed with
    their errors (file and line) and answer 409; the page and every other target work.
    `cw-pipeline index` still refuses the whole file."""
    data = yaml.safe_load(cli_project.config_path.read_text(encoding="utf-8"))
    data["datasets"]["typo"] = {"layout": "oxfrod", "images": "alpha/jpg"}
    data["datasets"]["orphan"] = {
        "layout": "oxford",
        "images": "alpha/jpg",
        "groundtruth": "alpha/gt",
        "pca_from": "typo",
    }
    data["evaluations"]["lost"] = {"dataset": "beta", "distractors": ["nowhere"]}
    path = cli_project.root / "datasets_with_invalid_entries.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    client = TestClient(create_app(SearchEngine(path)))
    targets = {t["name"]: t for t in ok(client.get("/api/datasets"))["targets"]}
    assert "unknown layout 'oxfrod'" in targets["typo"]["error"]
    assert f"{path.name}:" in targets["typo"]["error"]  # the file and line
    assert "its PCA source 'typo' is disabled" in targets["orphan"]["error"]
    assert "unknown distractor set 'nowhere'" in targets["lost"]["error"]
    assert targets["alpha"]["state"] == "indexed" and "error" not in targets[DISTRACTOR_EVAL]
    assert "oxfrod" in error(client.get("/api/images", params={"dataset": "typo"}), 409)
    assert "nowhere" in error(client.get("/api/images", params={"evaluation": "lost"}), 409)
    q = gt_query(client)
    assert ok(client.get("/api/search", params={"dataset": "alpha", "id": q["id"]}))["results"]
    assert main(["index", "--dataset", "alpha", "--config", str(path)]) == 2
