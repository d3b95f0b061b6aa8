"""Reports are valid files (issue 12): a query without positives is named as excluded from the
mAP, and every JSON the project writes is strict (no NaN/Infinity tokens)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cw_pipeline.compute import reports
from cw_pipeline.compute.published import database_table, publish_rankings
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.datasets import GroundTruth, Query
from cw_pipeline.core.jsonsafe import dumps, finite
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.store import FeatureStore


def _strict(text: str):
    """``json.loads`` that raises on NaN, Infinity and -Infinity."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def report_with_an_empty_query(tmp_path: Path, monkeypatch) -> dict:
    """Two queries on a 4-image database; 'lonely' has no positive (its only one is missing)."""
    db = ["a", "b", "c", "d"]
    ds = DatasetConfig(name="toy", layout="oxford", images=tmp_path, groundtruth=tmp_path)
    gt = GroundTruth(
        "toy",
        tuple(db),
        (
            Query("a", None, frozenset({"b"}), frozenset(), name="a_1"),
            Query("c", None, frozenset({"gone"}), frozenset(), name="lonely"),
        ),
        revisited=False,
        queries_in_database=True,
    )
    monkeypatch.setattr(reports, "load_groundtruth", lambda ds, ids: gt)
    monkeypatch.setattr(reports, "pca_output_dims", lambda store, ds: {})  # no PCA here
    store = FeatureStore(str(tmp_path / "wh"))
    ev = SimpleNamespace(name="toy", dataset="toy", distractors=(), methods=[])
    tables = {}
    for method in ("raw", "ofa"):
        ev.methods.append(Method.parse(method))
        table = pa.table(
            {
                "query_id": ["a", "c"],
                "ranked_ids": pa.array(
                    [["b", "a", "c", "d"], ["c", "d", "a", "b"]], pa.list_(pa.string())
                ),
            }
        )
        tables[method] = table
    publish_rankings(store, "toy", tables, database_table([("toy", db)]))
    config = SimpleNamespace(dataset=lambda name: ds, search=SearchParams())
    return reports.build_report(config, store, ev, {})


def test_a_query_without_positives_is_named_as_excluded(report_with_an_empty_query) -> None:
    report = report_with_an_empty_query
    assert report["queries"] == 2 and report["evaluated_queries"] == 1
    assert report["excluded_queries"] == [{"query": "c", "reason": reports.EXCLUDED_NO_POSITIVES}]
    assert [r["map"] for r in report["results"]] == [1.0, 1.0]  # 'c' left out, 'a' perfect
    assert report["per_query"]["ofa"] == {"a": 1.0, "c": None}
    md = reports.markdown(report)
    assert "1 of 2 queries in the mAP; 1 excluded:" in md
    assert f"* `c`: {reports.EXCLUDED_NO_POSITIVES}" in md


def test_written_reports_are_strict_json_and_csv(tmp_path, report_with_an_empty_query) -> None:
    folder = reports.write_report(str(tmp_path / "reports"), report_with_an_empty_query)
    text = (folder / "report.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    assert _strict(text)["per_query"]["raw"]["c"] is None
    rows = list(csv.reader(io.StringIO((folder / "per_query_ap.csv").read_text())))
    assert rows == [["query", "raw", "ofa"], ["a", "1.0000", "1.0000"], ["c", "", ""]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan"), np.inf])
def test_every_json_writer_turns_non_finite_numbers_into_null(tmp_path, bad) -> None:
    doc = {"x": bad, "nested": [1.5, {"y": bad}], "arr": np.array([1.0, bad])}
    expected = {"x": None, "nested": [1.5, {"y": None}], "arr": [1.0, None]}
    assert _strict(dumps(doc)) == expected
    store = FeatureStore(str(tmp_path / "s"))  # report.json, PCA metadata, plans
    store.write_json("doc.json", doc)
    assert _strict((tmp_path / "s" / "doc.json").read_text()) == expected
    pca = PCAWhitening(np.zeros(2), np.eye(2), np.ones(2), metadata={"note": bad})
    store.write_pca("pca", pca)
    assert _strict((tmp_path / "s" / "pca.json").read_text()) == {"note": None}
    with pytest.raises(ValueError, match="Out of range float"):  # the guard behind finite()
        json.dumps(float(bad), allow_nan=False)
    assert finite((bad, "s", 3)) == [None, "s", 3]


def test_cli_json_output_is_strict(monkeypatch, capsys) -> None:
    from cw_pipeline import cli

    parser_args = ["evaluate", "--layout", "ukbench", "--images", ".", "--json"]
    monkeypatch.setattr(
        cli, "build_parser", _parser_with(cli.build_parser, "evaluate", lambda a: {"map": math.nan})
    )
    assert cli.main(parser_args) == 0
    assert _strict(capsys.readouterr().out) == {"map": None}


def _parser_with(build, command: str, func):
    def wrapped():
        parser = build()
        for action in parser._subparsers._group_actions:  # the sub-command's defaults
            action.choices[command].set_defaults(func=func)
        return parser

    return wrapped
