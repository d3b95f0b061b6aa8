"""The README's demo on a fresh instance: every asset materialized, every check passed, and the
webserver's GraphQL endpoint reports the lineage graph with materialized assets."""

from __future__ import annotations

from cw_pipeline_tests.e2e.conftest import graphql

# demo_env, demo_result and webserver_port are session fixtures in conftest.py, shared with the
# browser test (test_ui_browser.py) so the demo is materialized once.


def test_demo_materializes_everything_and_checks_pass(demo_result: dict, demo_env: dict) -> None:
    assert set(demo_result["datasets"]) == {"demo-a", "demo-b", "demo-distractors"}
    for ds in demo_result["datasets"].values():
        assert ds["images"] > 0 and ds["rejected"] == 0
    assert demo_result["checks"]["evaluated"] > 0
    assert demo_result["checks"]["failed"] == []
    reports = demo_result["reports"]
    assert {"demo-a", "demo-b", "demo-a-distractors", "demo-b-distractors"} <= set(reports)
    for results in reports.values():
        ofa = next(r for r in results if r["method"] == "ofa")
        assert ofa["map"] >= 0.5
    assert (demo_env["root"] / "reports" / "demo-a" / "report.md").exists()


def test_webserver_serves_the_materialized_lineage_graph(webserver_port: int) -> None:
    data = graphql(
        webserver_port,
        "{ assetNodes { assetKey { path } dependencyKeys { path } } "
        "assetsOrError { ... on AssetConnection { nodes { key { path } "
        "assetMaterializations(limit: 1) { timestamp } } } } }",
    )
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    for key in (
        "demo-a/manifest",
        "demo-a/cam_features",
        "demo-a/pca_model",
        "demo-a/descriptors",
        "demo-a/rankings",
        "demo-a/map_report",
        "demo-a-distractors/rankings",
    ):
        assert key in nodes, sorted(nodes)
    deps = {"/".join(d["path"]) for d in nodes["demo-a/pca_model"]["dependencyKeys"]}
    assert deps == {"demo-b/cam_features"}
    materialized = {
        "/".join(n["key"]["path"]): bool(n["assetMaterializations"])
        for n in data["assetsOrError"]["nodes"]
    }
    missing = [k for k in nodes if not materialized.get(k)]
    assert missing == []
