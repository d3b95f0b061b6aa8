"""Per-batch checkpoints of feature shards (checkpoints.py, indexing.update_features), without
Dagster or a network: a scripted extractor stands in for the CNN. The real thing, killed with
SIGKILL in a child process, is tested in ``defs/test_crashes.py``."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cw_pipeline.compute.checkpoints import CHECKPOINT_ROOT, ShardCheckpoints
from cw_pipeline.compute.features import records_to_table, update_features
from cw_pipeline.compute.manifests import MANIFEST_SCHEMA
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.extract import ExtractionConfig, ImageFeatures
from cw_pipeline.store import FeatureStore

N_C, DIM = 2, 4


class Crash(Exception):
    """Stands in for the process dying (SIGKILL is tested with real child processes)."""


class _Backbone:
    feature_dim = DIM


class ScriptedExtractor:
    """Yields batches of ``batch_size`` records derived from each image id, logging every
    forward pass in ``events``; raises :class:`Crash` before batch ``crash_at`` (1-based)."""

    def __init__(self, batch_size: int = 2, crash_at: int | None = None) -> None:
        self.config = ExtractionConfig(stored_classes=N_C)
        self.backbone = _Backbone()
        self.batch_size = batch_size
        self.crash_at = crash_at
        self.events: list[tuple[str, list[str]]] = []

    def extract_batches(self, items, *, workers: int = 2, on_error: str = "raise"):
        items = list(items)
        for n, start in enumerate(range(0, len(items), self.batch_size), 1):
            if self.crash_at is not None and n >= self.crash_at:
                raise Crash(f"killed before batch {n}")
            keys = [key for key, _ in items[start : start + self.batch_size]]
            self.events.append(("forward", keys))
            yield [(key, record(key)) for key in keys]

    @property
    def forward_passes(self) -> list[str]:
        return [k for kind, keys in self.events if kind == "forward" for k in keys]


def record(key: str) -> ImageFeatures:
    seed = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    return ImageFeatures(
        class_ids=rng.permutation(1000)[:N_C].astype(np.int16),
        class_probs=rng.random(N_C).astype(np.float32),
        class_vectors=rng.standard_normal((N_C, DIM)).astype(np.float32),
        sum_pooled=rng.random(DIM).astype(np.float32),
        boxes=rng.random((5, 4)).astype(np.float32),
        grid=(2, 2),
        input_size=(64, 64),
        image_size=(64, 64),
    )


def manifest(n: int, changed: dict[str, str] | None = None) -> pa.Table:
    rows = []
    for i in range(n):
        image_id = f"img{i:02d}"
        sha1 = (changed or {}).get(image_id, hashlib.sha1(image_id.encode()).hexdigest())
        rows.append(
            {
                "image_id": image_id,
                "relpath": f"{image_id}.jpg",
                "bytes": 100,
                "mtime_ns": 1,
                "sha1": sha1,
                "width": 64,
                "height": 64,
                "error": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


@pytest.fixture
def ds(tmp_path: Path) -> DatasetConfig:
    return DatasetConfig(name="d", layout="folder", images=tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "warehouse")


def uninterrupted(ds: DatasetConfig, n: int) -> pa.Table:
    return update_features(ds, manifest(n), None, ScriptedExtractor()).table


def test_every_batch_is_checkpointed_before_the_next_forward_pass(ds) -> None:
    extractor = ScriptedExtractor(batch_size=2)

    def checkpoint(table: pa.Table) -> None:
        extractor.events.append(("checkpoint", table.column("image_id").to_pylist()))

    update = update_features(ds, manifest(5), None, extractor, checkpoint=checkpoint)
    batches = [["img00", "img01"], ["img02", "img03"], ["img04"]]
    expected = [(kind, b) for b in batches for kind in ("forward", "checkpoint")]
    assert extractor.events == expected
    assert (update.forward_passes, update.reused, update.resumed) == (5, 0, 0)
    assert update.table.column("image_id").to_pylist() == [f"img{i:02d}" for i in range(5)]


def test_a_crashed_run_resumes_from_its_checkpoints(ds, store) -> None:
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    crashing = ScriptedExtractor(batch_size=2, crash_at=3)
    with pytest.raises(Crash):
        update_features(ds, manifest(6), None, crashing, checkpoint=cps.write)
    assert len(cps.files()) == 2 and cps.written == 2
    assert store.list("cam_features") == []  # nothing published

    again = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    resumed = again.load()
    assert resumed is not None and resumed.num_rows == 4
    extractor = ScriptedExtractor(batch_size=2)
    update = update_features(
        ds, manifest(6), None, extractor, resumed=resumed, checkpoint=again.write
    )
    assert extractor.forward_passes == ["img04", "img05"]
    assert (update.forward_passes, update.reused, update.resumed) == (2, 4, 4)
    assert update.table.equals(uninterrupted(ds, 6))
    assert len(again.files()) == 3  # the new batch was checkpointed too
    assert again.clear() == 3 and again.files() == []
    assert not store.exists(CHECKPOINT_ROOT)  # empty folders pruned


def test_checkpointed_rows_are_reused_only_while_their_sha1_matches(ds, store) -> None:
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    with pytest.raises(Crash):
        update_features(ds, manifest(4), None, ScriptedExtractor(crash_at=2), checkpoint=cps.write)
    # img01 was edited after the crash: its checkpointed row no longer applies.
    edited = manifest(5, changed={"img01": "e" * 40})
    extractor = ScriptedExtractor()
    update = update_features(ds, edited, None, extractor, resumed=cps.load())
    assert sorted(extractor.forward_passes) == ["img01", "img02", "img03", "img04"]
    assert (update.forward_passes, update.resumed) == (4, 1)
    ids = update.table.column("image_id").to_pylist()
    assert ids == sorted(set(ids)) and len(ids) == 5
    row = update.table.filter(pc.equal(update.table["image_id"], "img01"))
    assert row.column("sha1").to_pylist() == ["e" * 40]


def test_stored_and_checkpointed_rows_together_give_no_duplicates(ds, store) -> None:
    previous = uninterrupted(ds, 3)
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    # A checkpoint repeating stored rows (a run killed after the shard was published, before
    # its checkpoints were cleared) and adding a new one.
    cps.write(update_features(ds, manifest(4), None, ScriptedExtractor()).table.slice(1, 3))
    extractor = ScriptedExtractor()
    update = update_features(ds, manifest(5), previous, extractor, resumed=cps.load())
    assert extractor.forward_passes == ["img04"]
    assert (update.reused, update.resumed) == (4, 1)
    assert update.table.equals(uninterrupted(ds, 5))


def test_stale_and_corrupt_checkpoints_are_ignored(ds, store, caplog) -> None:
    old = ShardCheckpoints(store, "cam_features", "d", "s", "v-old")
    old.write(uninterrupted(ds, 2))
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    good = cps.write(uninterrupted(ds, 1))
    broken = f"{cps.prefix}/part-broken-000000.parquet"
    store.write_bytes(broken, b"PAR1 truncated")
    with caplog.at_level(logging.INFO, logger="cw_pipeline.compute.checkpoints"):
        rows = cps.load()
    assert rows is not None and rows.column("image_id").to_pylist() == ["img00"]
    assert "ignoring 1 checkpoint(s) of another code version" in caplog.text
    assert "part-broken-000000.parquet" in caplog.text and "ignoring this checkpoint" in caplog.text
    assert good in cps.files()
    assert cps.clear() == 3 and store.list(CHECKPOINT_ROOT) == []


def test_checkpoints_are_invisible_to_shard_readers(ds, store) -> None:
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    cps.write(uninterrupted(ds, 2))
    assert store.list("cam_features") == []
    with pytest.raises(FileNotFoundError):
        store.dataset("cam_features")
    assert cps.prefix == f"{CHECKPOINT_ROOT}/cam_features/dataset=d/shard=s"


def test_clear_never_removes_what_a_concurrent_run_is_writing(ds, store) -> None:
    cps = ShardCheckpoints(store, "cam_features", "d", "s", "v1")
    cps.write(uninterrupted(ds, 2))
    folder = Path(store.path(cps.prefix))
    in_flight = folder / ".part-other-000003.parquet.1234.tmp"  # another run, mid-write
    in_flight.write_bytes(b"PAR1 half")
    dead = folder / ".part-killed-000001.parquet.5678.tmp"  # a run killed two hours ago
    dead.write_bytes(b"PAR1 half")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(dead, (two_hours_ago, two_hours_ago))
    assert cps.clear() == 1
    assert in_flight.exists() and folder.is_dir()
    assert not dead.exists()


def test_checkpoints_over_a_non_local_filesystem(ds) -> None:
    store = FeatureStore(f"memory://cw-ckpt-{uuid.uuid4().hex}")
    try:
        cps = ShardCheckpoints(store, "cam_features", "d", "shard é/1", "v1")
        for i in range(3):
            cps.write(records_to_table([f"img{i:02d}"], [f"{i:040d}"], [record(f"img{i:02d}")]))
        rows = cps.load()
        assert rows is not None and rows.column("image_id").to_pylist() == [
            "img00",
            "img01",
            "img02",
        ]
        assert cps.clear() == 3 and cps.load() is None
    finally:
        if store.fs.exists(store.path()):
            store.fs.rm(store.path(), recursive=True)


@pytest.fixture
def s3_store():
    """A FeatureStore on an S3 endpoint served by moto on the loopback interface."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", **creds).create_bucket(
        Bucket="cw-checkpoints"
    )
    try:
        yield FeatureStore(
            "s3://cw-checkpoints/warehouse",
            key="testing",
            secret="testing",
            client_kwargs={"endpoint_url": url, "region_name": "us-east-1"},
        )
    finally:
        server.stop()


def test_a_crashed_run_resumes_over_s3(ds, s3_store) -> None:
    cps = ShardCheckpoints(s3_store, "cam_features", "d", "s", "v1")
    with pytest.raises(Crash):
        update_features(ds, manifest(5), None, ScriptedExtractor(crash_at=3), checkpoint=cps.write)
    assert len(cps.files()) == 2 and s3_store.list("cam_features") == []
    again = ShardCheckpoints(s3_store, "cam_features", "d", "s", "v1")
    extractor = ScriptedExtractor()
    update = update_features(ds, manifest(5), None, extractor, resumed=again.load())
    assert extractor.forward_passes == ["img04"]
    assert update.table.equals(uninterrupted(ds, 5))
    assert again.clear() == 2 and again.files() == [] and again.load() is None
