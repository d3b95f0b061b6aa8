"""The feature store and the reports on an S3-compatible server (``s3://bucket/prefix``).

A ``moto`` S3 server runs on 127.0.0.1 (a free port) for this module; the pipeline reaches it
through s3fs with the standard variables ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``, like a deployment on MinIO or AWS. The
tests cover the whole demo graph materialized into the bucket, an incremental update (new
images get forward passes, nothing else does) and the store's atomic writes there.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from moto.server import ThreadedMotoServer
from threadpoolctl import threadpool_limits

from cw_pipeline.core.demo import generate_demo
from cw_pipeline.runtime.runs import refresh
from cw_pipeline.store import FeatureStore
from cw_pipeline_tests.defs.project import (
    DATASETS,
    DISTRACTOR_EVAL,
    METHODS,
    Project,
    build_project,
    open_project,
    project_yaml,
    synthetic_jpeg,
)
from cw_pipeline_tests.defs.reindex_readers import index_and_search_during_reindex, unexplained
from cw_pipeline_tests.e2e.processes import free_port

BUCKET = "cw-features"
WAREHOUSE = f"s3://{BUCKET}/project/warehouse"
REPORTS = f"s3://{BUCKET}/project/reports"


@pytest.fixture(scope="module")
def s3() -> Iterator[boto3.client]:
    """A moto S3 server on loopback with bucket ``BUCKET``, and the AWS variables pointing at
    it; a boto3 client to look at the bucket directly."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        for var, value in env.items():
            mp.setenv(var, value)
        s3fs.S3FileSystem.clear_instance_cache()  # none bound to another endpoint
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        try:
            yield client
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def keys(client, prefix: str = "") -> dict[str, str]:
    """Every object under ``prefix`` in the bucket: key -> ETag."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


@pytest.fixture(scope="module")
def s3_project(s3, tmp_path_factory) -> Iterator[Project]:
    """The test project (demo-a/b, distractors, six synthetic images) with its feature store
    and reports in the bucket, fully materialized (every asset, cron-gated ones too)."""
    demo = tmp_path_factory.mktemp("demo")
    generate_demo(demo, size=160, views=4, n_distractors=12)
    root = tmp_path_factory.mktemp("s3project") / "project"
    build_project(root, demo)
    data = project_yaml()
    data.update(warehouse=WAREHOUSE, reports=REPORTS)
    (root / "datasets.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with threadpool_limits(1):
        project = open_project(root)
        assert project.config.warehouse == WAREHOUSE
        project.index_results = project.index_all()
        project.refreshed = refresh(project.defs, project.instance, include_cron=True)
        yield project


def test_demo_materializes_into_the_bucket(s3, s3_project: Project) -> None:
    project = s3_project
    graph = project.defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        pdef = graph.get(key).partitions_def
        if pdef is None:
            assert project.instance.get_latest_materialization_event(key) is not None, key
        else:
            expected = set(pdef.get_partition_keys(dynamic_partitions_store=project.instance))
            assert expected and project.instance.get_materialized_partitions(key) == expected

    stored = keys(s3, "project/")
    store = project.store
    for name in DATASETS:
        shards = project.instance.get_dynamic_partitions(f"{name}_shards")
        for shard in shards:
            for kind in ("manifest", "cam_features"):
                assert f"project/warehouse/{store.shard_path(kind, name, shard)}" in stored
        assert project.index_results[name].forward_passes == project.index_results[name].images
    for ev in ("alpha", "beta", DISTRACTOR_EVAL):
        for name in ("report.md", "report.json", "per_query_ap.csv"):
            assert f"project/reports/{ev}/{name}" in stored, (ev, name)
        report = FeatureStore(REPORTS).read_json(f"{ev}/report.json")
        assert [r["method"] for r in report["results"]] == METHODS
        assert all(0.0 < r["map"] <= 1.0 for r in report["results"])
    # Nothing but complete objects: no temporary or hidden keys; nothing written locally.
    assert not [k for k in stored if any(p.startswith(".") for p in k.split("/"))]
    assert not (project.root / "warehouse").exists()
    assert not (project.root / "reports").exists()
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_incremental_update_in_the_bucket(s3, s3_project: Project) -> None:
    project = s3_project
    store = project.store
    before = keys(s3, "project/warehouse/")
    part1 = f"project/warehouse/{store.shard_path('cam_features', 'alpha', 'part1')}"
    part2 = f"project/warehouse/{store.shard_path('cam_features', 'alpha', 'part2')}"
    rows_before = store.read_table(store.shard_path("cam_features", "alpha", "part1")).num_rows

    new = [
        synthetic_jpeg(project.images("alpha") / "part1" / f"extra_{i}.jpg", seed=9000 + i)
        for i in range(2)
    ]
    with threadpool_limits(1):
        result = project.index("alpha")
        refreshed = refresh(project.defs, project.instance)
    assert result.indexed_shards == ["part1"]
    assert result.forward_passes == len(new)
    assert result.reused == rows_before
    assert "alpha/descriptors" in refreshed

    after = keys(s3, "project/warehouse/")
    assert after[part1] != before[part1]  # replaced in place
    assert after[part2] == before[part2]  # untouched
    ids = store.read_table(store.shard_path("cam_features", "alpha", "part1"), ["image_id"])
    assert ids.num_rows == rows_before + len(new)
    assert {p.stem for p in new} <= {i.rsplit("/", 1)[-1] for i in ids.column(0).to_pylist()}
    descriptors = store.list("descriptors")
    assert descriptors and all(f"project/warehouse/{d}" in after for d in descriptors)


class _Boom(RuntimeError):
    pass


def test_atomic_writes_on_s3(s3) -> None:
    store = FeatureStore(f"s3://{BUCKET}/atomic")
    table = pa.table({"x": list(range(1000))})
    rel = "cam_features/dataset=d/shard=s.parquet"

    # A writer that fails halfway leaves nothing: no object, no key under the prefix, no
    # pending multipart upload.
    def half_then_fail(fh) -> None:
        fh.write(b"PAR1" + b"\0" * 1000)
        raise _Boom("disk full")

    with pytest.raises(_Boom):
        store._write_atomic(rel, half_then_fail)
    assert keys(s3, "atomic/") == {}
    assert not store.exists(rel)
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")

    # A complete write; a failed rewrite keeps the complete old object.
    store.write_table(rel, table, metadata={"code_version": "v1"})
    etag = keys(s3, "atomic/")[f"atomic/{rel}"]
    with pytest.raises(_Boom):
        store._write_atomic(rel, half_then_fail)
    assert keys(s3, "atomic/") == {f"atomic/{rel}": etag}
    assert store.read_table(rel).equals(table)
    assert store.read_metadata(rel)["code_version"] == "v1"

    # Writers racing on one key: one complete table wins; readers meanwhile see a complete
    # table (old or new), never a part of one.
    tables = [pa.table({"x": [k] * 20000}) for k in range(4)]
    seen: list[int] = []
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            seen.append(store.read_table(rel).num_rows)

    reader = threading.Thread(target=read_loop)
    reader.start()
    writers = [threading.Thread(target=store.write_table, args=(rel, t)) for t in tables]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    final = store.read_table(rel)
    assert any(final.equals(t) for t in tables)
    assert seen and set(seen) <= {1000, 20000}
    assert list(keys(s3, "atomic/")) == [f"atomic/{rel}"]  # no temporary keys anywhere


def test_objects_written_by_other_processes_are_seen_at_once(s3) -> None:
    store = FeatureStore(f"s3://{BUCKET}/shared")
    store.write_bytes("plans/a.json", b"{}")
    assert store.list(suffix=None) == ["plans/a.json"]  # the prefix is listed (and was cached)
    # Another worker writes a shard with its own client.
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), buf)
    s3.put_object(Bucket=BUCKET, Key="shared/plans/b.parquet", Body=buf.getvalue())
    assert store.exists("plans/b.parquet")
    assert store.list("plans") == ["plans/b.parquet"]
    assert store.read_table("plans/b.parquet").num_rows == 1


def test_searches_during_reindexing_in_the_bucket_see_one_generation(
    s3, tmp_path, monkeypatch
) -> None:
    """Commit points on S3: searches (the server's engine and `cw-pipeline search`'s path)
    running while the project in the bucket is re-indexed again and again each see one
    published state; every pointer switch is one PUT (see
    :mod:`cw_pipeline_tests.defs.reindex_readers`)."""
    demo = tmp_path / "demo"
    generate_demo(demo, size=160, views=4, n_distractors=12)
    root = tmp_path / "project"
    build_project(root, demo)
    data = project_yaml(reproject_at_once=None)  # gamma follows beta's PCA in the same run
    data.update(warehouse=f"s3://{BUCKET}/commits/warehouse", reports=f"s3://{BUCKET}/commits/r")
    (root / "datasets.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with threadpool_limits(1):
        project = open_project(root)
        out, expected = index_and_search_during_reindex(project, monkeypatch, rounds=3)
        assert len(out.answers) >= 20
        assert unexplained(out, expected) == []
    pointers = keys(s3, "commits/warehouse/commits/")
    assert "commits/warehouse/commits/dataset=beta/index.json" in pointers
    assert not [k for k in keys(s3, "commits/") if any(p.startswith(".") for p in k.split("/"))]
