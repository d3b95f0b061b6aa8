"""`cw-pipeline search` against the materialized index of a small indexed project
(:mod:`cw_pipeline_tests.cli_project`), and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cw_pipeline.cli import main
from cw_pipeline.config import UnknownNameError
from cw_pipeline.figures import FRAME_COLOURS, sheet_tile_box
from cw_pipeline.query import NotIndexedError, QueryError
from cw_pipeline_tests.cli_project import CliProject

QUERY = "astronaut_000001"  # an alpha image; its instance has 6 images in alpha


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def search_json(capsys, project: CliProject, *argv: str) -> dict:
    code, out, err = run(capsys, "search", *argv, "--config", str(project.config_path), "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def query(cli_project: CliProject) -> Path:
    return cli_project.image("alpha", QUERY)


@pytest.fixture(scope="module")
def plain(cli_project: CliProject, query: Path) -> dict:
    """The default search (OfA, top 10) with a database image as the query."""
    args = ["search", str(query), "--dataset", "alpha", "--config", str(cli_project.config_path)]
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*args, "--json"]) == 0
    return json.loads(buf.getvalue())


def test_a_database_image_finds_itself_then_its_instance(
    capsys, cli_project: CliProject, query: Path, plain: dict
) -> None:
    hits = plain["results"]
    assert hits[0]["id"] == QUERY
    assert hits[0]["score"] == pytest.approx(1.0, abs=0.01)
    full = search_json(capsys, cli_project, str(query), "--dataset", "alpha", "--top", "48")
    ranks = {h["id"]: h["rank"] for h in full["results"]}
    assert len(ranks) == 48
    views = [r for i, r in ranks.items() if i.startswith("astronaut_") and i != QUERY]
    others = [r for i, r in ranks.items() if not i.startswith("astronaut_")]
    assert len(views) == 5
    assert sum(views) / len(views) < 0.5 * sum(others) / len(others), ranks


@pytest.mark.parametrize("method", ["ofa", "ofa+qe5", "raw+pca"])
def test_same_query_and_box_give_the_rankings_asset(
    capsys, cli_project: CliProject, method: str
) -> None:
    """A ground-truth query with its box ranks like the pipeline's rankings asset."""
    from cw_pipeline.store import FeatureStore, query_features_path
    from cw_pipeline_tests.published import rankings_rel

    store = FeatureStore(cli_project.config.warehouse)
    queries = store.read_table(query_features_path("alpha"))
    qid, bbox = queries.column("image_id")[0].as_py(), queries.column("bbox")[0].as_py()
    path = cli_project.image("alpha", qid)
    w, h = Image.open(path).size
    box = [max(0.0, bbox[0]), max(0.0, bbox[1]), min(float(w), bbox[2]), min(float(h), bbox[3])]
    stored = store.read_table(rankings_rel(store, "alpha", method)).to_pylist()
    row = next(r for r in stored if r["query_id"] == qid)
    argv = [str(path), "--dataset", "alpha", "--method", method, "--box", *map(str, box)]
    res = search_json(capsys, cli_project, *argv)
    assert [r["id"] for r in res["results"]] == row["ranked_ids"][:10]
    # The stored query features are int8 like the database's; the CLI's query is float32.
    assert [r["score"] for r in res["results"]] == pytest.approx(row["scores"][:10], abs=2e-3)


def test_json_has_the_documented_structure(plain: dict, query: Path) -> None:
    assert set(plain) >= {"dataset", "query", "box", "method", "database", "results", "seconds"}
    assert plain["dataset"] == "alpha" and plain["method"] == "ofa"
    assert plain["query"] == str(query) and plain["box"] is None
    assert plain["database"] == 48
    hits = plain["results"]
    assert [h["rank"] for h in hits] == list(range(1, 11))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        assert set(h) == {"rank", "id", "score", "path"}
        assert Path(h["path"]).is_file() and Path(h["path"]).stem == h["id"]


def test_human_output_is_a_ranked_table(capsys, cli_project: CliProject, query: Path) -> None:
    code, out, err = run(
        capsys,
        *("search", str(query), "--dataset", "alpha", "--top", "3"),
        *("--config", str(cli_project.config_path)),
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("alpha: 48 images, method ofa")
    assert lines[1].split() == ["rank", "score", "id", "path"]
    assert len(lines) == 5
    rank, score, image_id, path = lines[2].split()
    assert (rank, image_id, Path(path)) == ("1", QUERY, query)
    assert float(score) == pytest.approx(1.0, abs=0.01)


def test_box_crops_the_query(
    capsys, cli_project: CliProject, query: Path, plain: dict, tmp_path: Path
) -> None:
    w, h = Image.open(query).size
    box = ["--box", "0", "0", str(w), str(h)]
    whole = search_json(capsys, cli_project, str(query), "--dataset", "alpha", *box)
    assert whole["box"] == [0, 0, w, h] and whole["protocol"] == "crop"
    assert [r["id"] for r in whole["results"]] == [r["id"] for r in plain["results"]]
    part = search_json(
        capsys, cli_project, str(query), "--dataset", "alpha", "--box", "20", "20", "100", "100"
    )
    assert part["box"] == [20, 20, 100, 100]
    assert [r["score"] for r in part["results"]] != [r["score"] for r in plain["results"]]
    assert part["results"][0]["score"] < 0.9  # a crop is not the whole image
    # crop protocol: the same as searching with the cropped picture
    cropped = tmp_path / "crop.png"
    Image.open(query).convert("RGB").crop((20, 20, 100, 100)).save(cropped)
    alone = search_json(capsys, cli_project, str(cropped), "--dataset", "alpha")
    assert [r["id"] for r in alone["results"]] == [r["id"] for r in part["results"]]
    assert [r["score"] for r in alone["results"]] == pytest.approx(
        [r["score"] for r in part["results"]], abs=1e-5
    )
    paper = search_json(
        capsys,
        cli_project,
        *(str(query), "--dataset", "alpha", "--box", "20", "20", "100", "100"),
        *("--protocol", "paper"),
    )
    assert paper["protocol"] == "paper"
    assert [r["score"] for r in paper["results"]] != [r["score"] for r in part["results"]]


@pytest.mark.parametrize(
    ("options", "method"),
    [
        (["--qe", "3"], "ofa+qe3"),
        (["--rerank", "5"], "ofa+r5"),
        (["--method", "ofa+r4+qe2"], "ofa+r4+qe2"),
        (["--method", "raw+pca"], "raw+pca"),
    ],
)
def test_query_expansion_and_reranking_keep_the_top_hit(
    capsys, cli_project: CliProject, query: Path, options: list[str], method: str
) -> None:
    res = search_json(capsys, cli_project, str(query), "--dataset", "alpha", *options)
    assert res["method"] == method
    top = [r["id"] for r in res["results"]]
    # QE re-ranks with the mean of the top K: with K = 2 the query shares the first place.
    assert top[0] == QUERY if "+qe2" not in method else QUERY in top[:2]
    assert len(res["results"]) == 10
    rerank = int(method.split("+r")[1].split("+")[0]) if "+r" in method else 0
    assert res["map_forward_passes"] == rerank  # maps recomputed for the re-ranked head only


def test_online_aggregation_runs_over_recomputed_maps(
    capsys, cli_project: CliProject, query: Path
) -> None:
    res = search_json(capsys, cli_project, str(query), "--dataset", "alpha", "--method", "ona")
    assert res["results"][0]["id"] == QUERY
    assert res["map_forward_passes"] == 48


def test_self_split_dataset_searches_each_half_with_its_pca(
    capsys, cli_project: CliProject
) -> None:
    from cw_pipeline.store import FeatureStore
    from cw_pipeline_tests.published import rankings_rel

    q = cli_project.image("ukb", "ukbench00005")  # object 1 (images 4-7), in the first half
    res = search_json(capsys, cli_project, str(q), "--dataset", "ukb", "--top", "16")
    assert res["database"] == 16 and "half" in res["descriptors"]
    ids = [r["id"] for r in res["results"]]
    scores = [r["score"] for r in res["results"]]
    assert sorted(ids) == [f"ukbench{i:05d}" for i in range(16)]  # both halves, merged
    assert scores == sorted(scores, reverse=True)
    assert ids[0] == "ukbench00005" and scores[0] == pytest.approx(1.0, abs=0.01)
    # Within its half, the order of the pipeline's ranking (with that half's PCA).
    store = FeatureStore(cli_project.config.warehouse)
    stored = store.read_table(rankings_rel(store, "ukb", "ofa")).to_pylist()
    row = next(r for r in stored if r["query_id"] == "ukbench00005")
    assert len(row["ranked_ids"]) == 8
    mine = [(i, s) for i, s in zip(ids, scores, strict=True) if i in row["ranked_ids"]]
    assert [i for i, _ in mine] == row["ranked_ids"]
    assert [s for _, s in mine] == pytest.approx(row["scores"], abs=2e-3)


def test_folder_datasets(capsys, cli_project: CliProject) -> None:
    q = cli_project.image("gamma", "distractor_003")
    res = search_json(capsys, cli_project, str(q), "--dataset", "gamma", "--top", "3")
    assert res["database"] == 12 and "beta-gamma" in res["descriptors"]
    assert res["results"][0]["id"] == "distractor_003"
    q = cli_project.image("delta", "d1_2")
    res = search_json(capsys, cli_project, str(q), "--dataset", "delta", "--method", "raw")
    assert res["database"] == 6 and "no PCA" in res["descriptors"]
    assert res["results"][0]["id"] == "misc2/d1_2"
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_sheet_is_written(capsys, cli_project: CliProject, query: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    res = search_json(
        capsys, cli_project, str(query), "--dataset", "alpha", "--top", "4", "--sheet", str(sheet)
    )
    assert res["sheet"] == str(sheet)
    image = Image.open(sheet)
    assert image.format == "PNG"
    # Query tile then 4 results in one row, 160 px thumbnails, a title line.
    first, last = sheet_tile_box(0, 160, 5, "title"), sheet_tile_box(4, 160, 5, "title")
    assert image.width == last[2] + first[0]  # the same margin on both sides
    assert last[3] < image.height < sheet_tile_box(5, 160, 5, "title")[3]  # one row
    rgb = image.convert("RGB")
    assert rgb.getpixel((first[0] + 1, first[1] + 1)) == FRAME_COLOURS["query"]
    for k in range(1, 5):
        box = sheet_tile_box(k, 160, 5, "title")
        assert rgb.getpixel((box[0] + 1, box[1] + 1)) == FRAME_COLOURS["none"]


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "notes.jpg"
    path.write_text("not an image")
    return path


def _error_cases(project: CliProject, query: Path, bad: Path) -> dict:
    return {
        "unknown dataset": (
            [str(query), "--dataset", "omega"],
            UnknownNameError,
            ["unknown dataset 'omega'", "alpha, beta, delta, epsilon, gamma, ukb"],
        ),
        "not indexed": (
            [str(query), "--dataset", "epsilon"],
            NotIndexedError,
            ["not indexed", "cw-pipeline index --dataset epsilon"],
        ),
        "folder without PCA": (
            [str(query), "--dataset", "delta"],
            ValueError,
            ["has no PCA", "--method raw"],
        ),
        "missing image": (
            [str(query.with_name("nope.jpg")), "--dataset", "alpha"],
            QueryError,
            ["query image not found", str(query.with_name("nope.jpg"))],
        ),
        "unreadable image": ([str(bad), "--dataset", "alpha"], QueryError, [str(bad)]),
        "box outside": (
            [str(query), "--dataset", "alpha", "--box", "10", "10", "5000", "50"],
            QueryError,
            ["outside the", str(query)],
        ),
        "box of zero area": (
            [str(query), "--dataset", "alpha", "--box", "10", "10", "10", "50"],
            QueryError,
            ["zero area"],
        ),
    }


CASES = [
    "unknown dataset",
    "not indexed",
    "folder without PCA",
    "missing image",
    "unreadable image",
    "box outside",
    "box of zero area",
]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_with_exit_2(
    capsys, cli_project: CliProject, query: Path, not_an_image: Path, case: str
) -> None:
    argv, _, words = _error_cases(cli_project, query, not_an_image)[case]
    code, out, err = run(capsys, "search", *argv, "--config", str(cli_project.config_path))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cw-pipeline: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("case", CASES)
def test_debug_shows_the_exception(
    cli_project: CliProject, query: Path, not_an_image: Path, case: str
) -> None:
    argv, error, _ = _error_cases(cli_project, query, not_an_image)[case]
    with pytest.raises(error):
        main(["--debug", "search", *argv, "--config", str(cli_project.config_path)])


def test_the_installed_command_prints_a_traceback_only_with_debug(
    cli_project: CliProject, query: Path
) -> None:
    exe = Path(sys.executable).parent / "cw-pipeline"
    argv = ["search", str(query), "--dataset", "omega", "--config", str(cli_project.config_path)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    plain = subprocess.run([exe, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    debug = subprocess.run(
        [exe, "--debug", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "unknown dataset 'omega'" in debug.stderr


@pytest.mark.parametrize("dims", [1280, 256])
def test_the_query_descriptor_is_the_same_on_one_blas_thread(dims: int) -> None:
    """search_image computes the query's descriptor with BLAS on one thread (fast on a busy
    machine): bitwise the descriptor of the default threads, so rankings do not move."""
    from threadpoolctl import threadpool_info

    from cw_pipeline.core.aggregation import PCAWhitening, aggregate
    from cw_pipeline.query.ranking import _one_blas_thread

    rng = np.random.default_rng(0)
    vectors = np.abs(rng.standard_normal((3, 64, 1280))).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((1280, dims)))
    pca = PCAWhitening(
        mean=rng.standard_normal(1280).astype(np.float32) / 100,
        components=basis.T.astype(np.float32),
        eigenvalues=rng.random(dims).astype(np.float32) + 0.1,
        metadata={},
    )
    default = aggregate(vectors, pca, 64)
    with _one_blas_thread():
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
        single = aggregate(vectors, pca, 64)
    np.testing.assert_array_equal(single, default)
