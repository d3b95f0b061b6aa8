"""A new aggregation is one function and one registry entry (issue 13): it then runs through
``cw-pipeline evaluate`` and the pipeline's descriptors, rankings and map_report assets."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml

from cw_pipeline.cli import main
from cw_pipeline.compute.catalog import stored_shards
from cw_pipeline.compute.features import load_features, table_to_featureset
from cw_pipeline.compute.pca import pca_models_for
from cw_pipeline.core import methods
from cw_pipeline.core.aggregation import PCAWhitening, aggregate
from cw_pipeline.core.extract import ExtractionConfig
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Aggregation, Method, fit_pca
from cw_pipeline.core.runner import evaluate_search
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.store import query_features_path
from cw_pipeline_tests.defs.project import materialize
from cw_pipeline_tests.published import descriptors_rel, rankings_rel


def top1(features: FeatureSet, pca: PCAWhitening | None, params: SearchParams) -> np.ndarray:
    """The toy method: the image's single most probable class vector (OfA with N_C = 1)."""
    return aggregate(features.class_vectors, pca, 1)


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers ``top1`` for one test: the one entry a new method needs."""
    monkeypatch.setitem(methods.AGGREGATIONS, "top1", Aggregation("top1", top1, "class"))
    return "top1"


def _evaluate(demo: Path, *args: str) -> dict:
    buf = io.StringIO()
    argv = [
        "evaluate",
        "--layout",
        "oxford",
        "--images",
        str(demo / "demo-a" / "jpg"),
        "--groundtruth",
        str(demo / "demo-a" / "gt"),
        "--pca-from",
        str(demo / "demo-b" / "jpg"),
        "--resize",
        "fixed:160x160",
        "--threads",
        "1",
        "--quiet",
        "--json",
        *args,
    ]
    with redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


def test_a_registered_method_runs_through_evaluate(toy_method, demo_source):
    toy = _evaluate(demo_source, "--method", toy_method, "--n-pca", "2")
    assert [r["method"] for r in toy["results"]] == ["top1"]
    assert toy["methods"] == ["top1"]  # the settings record names it
    # top1 is OfA with N_C = 1: the same mAP, computed through the registry entry.
    ofa1 = _evaluate(demo_source, "--method", "ofa", "--n-pca", "2", "--aggregated-classes", "1")
    assert toy["results"][0]["map"] == ofa1["results"][0]["map"]
    ofa = _evaluate(demo_source, "--method", "ofa", "--n-pca", "2", "--aggregated-classes", "16")
    assert ofa["results"][0]["map"] != toy["results"][0]["map"]  # N_C = 16 ranks otherwise


def test_a_registered_method_runs_through_the_pipeline(toy_method, fresh_project):
    """... and its map_report states the settings it was computed with, enough to compute
    it again (extraction, search and method strings validate back into equal objects)."""
    path = fresh_project.root / "datasets.yaml"
    data = yaml.safe_load(path.read_text())
    data["methods"] = ["ofa", toy_method]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    project = fresh_project.reload()
    config, store = project.config, project.store
    assert [m.name for m in config.evaluation("alpha").methods] == ["ofa", "top1"]
    project.index("alpha")
    project.index("beta")
    keys = ["alpha/query_features", "alpha/pca_model", "alpha/descriptors", "alpha/rankings"]
    assert materialize(project, [*keys, "alpha/map_report"]).success
    assert store.exists(descriptors_rel(store, "alpha", "top1"))

    # The stored rankings are those of the library with the toy function.
    ds = config.dataset("alpha")
    feats = load_features(store, "alpha", stored_shards(store, "cam_features", "alpha"))
    train = load_features(store, "beta", stored_shards(store, "cam_features", "beta"))
    qt = store.read_table(query_features_path("alpha"))
    queries = table_to_featureset(qt.drop_columns(["bbox", "query_name"]))
    pos = {i: k for k, i in enumerate(feats.ids)}
    ranked = {}
    for name in ("ofa", "top1"):
        method = Method.parse(name)
        library = evaluate_search(
            method, feats, queries, fit_pca(method, train, config.search), config.search
        )
        table = store.read_table(rankings_rel(store, "alpha", name))
        ranked[name] = np.array([[pos[i] for i in row] for row in table["ranked_ids"].to_pylist()])
        np.testing.assert_array_equal(library.indices[:, : ranked[name].shape[1]], ranked[name])
    assert (ranked["ofa"] != ranked["top1"]).any()  # N_C = 16 against 1: not the same method

    report = json.loads((Path(config.reports) / "alpha" / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["ofa", "top1"]
    settings = report["settings"]
    assert ExtractionConfig(**settings["extraction"]) == ds.extraction
    assert SearchParams(**settings["search"]) == config.search
    assert [Method.parse(m) for m in settings["methods"]] == list(
        config.evaluation("alpha").methods
    )
    assert settings["pca_from"] == ds.pca_from == "beta"
    summary = {k: settings[k] for k in ("backbone", "layer", "resize", "stored_classes")}
    assert summary == {
        "backbone": "efficientnet_lite0",
        "layer": ds.extraction.resolved_layer,
        "resize": "fixed:160x160",
        "stored_classes": 16,
    }
    assert (settings["aggregated_classes"], settings["n_pca"], settings["pca_dims"]) == (
        16,
        4,
        None,
    )
    pcas = pca_models_for(store, ds)
    assert settings["pca_output_dims"] == {s: p.output_dim for s, p in pcas.items()}
    md = (Path(config.reports) / "alpha" / "report.md").read_text()
    assert "N_C 16 stored / 16 aggregated, N_pca 4, PCA dims all" in md
