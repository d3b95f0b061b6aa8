"""Crashes and concurrency: SIGKILL in the middle of a feature shard and while it is published,
two runs of one shard at once, concurrent writer processes, corrupt Parquet shards.

The killed and concurrent runs are real child processes (``python -m cw_pipeline_tests.faults``)
running the Dagster assets with the default backbone on ten 64×64 images, two per batch; the
child kills itself with SIGKILL at the named point (see that module). Every result is compared
with an uninterrupted run's shard, byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import torch
import yaml

from cw_pipeline.compute.checkpoints import CHECKPOINT_ROOT, ShardCheckpoints
from cw_pipeline.compute.features import feature_code_version, update_features
from cw_pipeline.compute.manifests import build_manifest
from cw_pipeline.compute.shards import scan_dataset
from cw_pipeline.config import load_config
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.defs.checks import SHARDS_READABLE
from cw_pipeline.store import CorruptShardError, FeatureStore
from cw_pipeline_tests.conftest import REPO_ROOT
from cw_pipeline_tests.defs.project import Project, materialize, synthetic_jpeg, tiny_defaults
from cw_pipeline_tests.faults import tagged_table

DATASET, SHARD = "crash", "s1"
N_IMAGES, BATCH = 10, 2
CHILD_TIMEOUT = 300


def ids(n: int, start: int = 0) -> list[str]:
    return [f"{SHARD}/img_{i:02d}" for i in range(start, n)]


def make_project(root: Path, n_images: int) -> Path:
    """A one-dataset project (one shard of ``n_images`` images); returns its config path."""
    for i in range(n_images):
        synthetic_jpeg(root / "jpg" / SHARD / f"img_{i:02d}.jpg", seed=i)
    config = {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": tiny_defaults(batch_size=BATCH),
        "datasets": {DATASET: {"layout": "folder", "images": "jpg", "shard_by": "folder"}},
    }
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def child(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cw_pipeline_tests.faults", "index", str(config), DATASET]
    return subprocess.Popen(
        [*cmd, "--log", str(log), *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, *, killed: bool = False) -> dict | None:
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    if killed:
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        return None
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def index(config: Path, log: Path, *extra: str, killed: bool = False) -> dict | None:
    return finish(child(config, log, *extra), killed=killed)


def forward_batches(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def store_of(config: Path) -> FeatureStore:
    return FeatureStore(load_config(config).warehouse)


def checkpoints_of(config: Path) -> ShardCheckpoints:
    cfg = load_config(config)
    version = feature_code_version(cfg.dataset(DATASET))
    return ShardCheckpoints(FeatureStore(cfg.warehouse), "cam_features", DATASET, SHARD, version)


def shard(store: FeatureStore) -> str:
    return store.shard_path("cam_features", DATASET, SHARD)


def rows(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None)


def visible_files(store: FeatureStore, kind: str) -> list[str]:
    """Every name in a kind's dataset folder, hidden ones included."""
    folder = Path(store.path(kind, f"dataset={DATASET}"))
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pa.Table:
    """The shard an uninterrupted run computes: the library itself, in this process, with the
    children's settings (one torch thread)."""
    root = tmp_path_factory.mktemp("reference")
    ds = load_config(make_project(root, N_IMAGES)).dataset(DATASET)
    threads = torch.get_num_threads()
    try:
        extractor = FeatureExtractor(ds.extraction, batch_size=BATCH, num_threads=1)
        manifest, _ = build_manifest(ds, scan_dataset(ds, FeatureStore(root / "w"))[SHARD])
        table = update_features(ds, manifest, None, extractor).table
    finally:
        torch.set_num_threads(threads)
    assert table.column("image_id").to_pylist() == ids(N_IMAGES)
    return table


def test_sigkill_mid_shard_resumes_from_the_checkpoints(tmp_path, reference) -> None:
    config = make_project(tmp_path, N_IMAGES)
    store, cps = store_of(config), checkpoints_of(config)

    # Killed right after the forward pass of batch 3: batches 1-2 checkpointed, 3 lost.
    index(config, tmp_path / "killed.log", "--kill-after-batches", "2", killed=True)
    done = forward_batches(tmp_path / "killed.log")
    assert done == [ids(2), ids(4, 2), ids(6, 4)]
    assert not store.exists(shard(store))  # nothing published, no partial file
    assert store.list("cam_features") == [] and visible_files(store, "cam_features") == []
    assert len(cps.files()) == 2
    checkpointed = cps.load()
    assert checkpointed is not None
    assert checkpointed.column("image_id").to_pylist() == ids(4)

    result = index(config, tmp_path / "rerun.log")
    assert result is not None
    again = [k for batch in forward_batches(tmp_path / "rerun.log") for k in batch]
    assert again == ids(N_IMAGES, 4)  # exactly the images without stored features, once each
    assert (result["forward_passes"], result["reused"], result["resumed"]) == (6, 4, 4)

    final = rows(store.read_table(shard(store)))
    assert final.column("image_id").to_pylist() == ids(N_IMAGES)  # unique, complete
    assert final.equals(reference)  # bit-identical to the uninterrupted run
    assert cps.files() == [] and not store.exists(CHECKPOINT_ROOT)
    assert visible_files(store, "cam_features") == [Path(shard(store)).name]


def test_sigkill_while_publishing_keeps_the_previous_shard(tmp_path, reference) -> None:
    config = make_project(tmp_path, N_IMAGES)
    store, cps = store_of(config), checkpoints_of(config)
    # The previous complete version of the shard: the first six images.
    previous = reference.slice(0, 6)
    store.write_table(shard(store), previous, metadata={"code_version": cps.code_version})
    index(config, tmp_path / "killed.log", "--kill-at-publish", killed=True)
    assert forward_batches(tmp_path / "killed.log") == [ids(8, 6), ids(10, 8)]
    # The reader sees the previous complete shard; the dead writer's file is hidden.
    assert rows(store.read_table(shard(store))).equals(previous)
    assert store.list("cam_features") == [shard(store)]
    leftover = [n for n in visible_files(store, "cam_features") if n.startswith(".")]
    assert len(leftover) == 1 and leftover[0].endswith(".tmp")
    assert not leftover[0].endswith(".parquet")
    assert len(cps.files()) == 2  # the new rows survive in the checkpoints

    result = index(config, tmp_path / "rerun.log")
    assert result is not None
    assert forward_batches(tmp_path / "rerun.log") == []  # nothing to recompute
    assert (result["forward_passes"], result["reused"], result["resumed"]) == (0, 10, 4)
    assert rows(store.read_table(shard(store))).equals(reference)
    assert cps.files() == []


def _start_together(procs: list[subprocess.Popen], go: Path) -> None:
    """Create ``go`` once every child announced it is ready (see ``faults._wait_for``)."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while len(list(go.parent.glob(f"{go.name}.*.ready"))) < len(procs):
        assert all(p.poll() is None for p in procs), "a child exited before the start"
        assert time.monotonic() < deadline, "children never got ready"
        time.sleep(0.05)
    go.touch()


def test_two_runs_of_one_shard_at_once_leave_one_consistent_file(tmp_path, reference) -> None:
    config = make_project(tmp_path, N_IMAGES)
    store, cps = store_of(config), checkpoints_of(config)
    go = tmp_path / "go"
    procs = [child(config, tmp_path / f"run{k}.log", "--start-after", str(go)) for k in (1, 2)]
    _start_together(procs, go)
    reads = 0
    while any(p.poll() is None for p in procs):
        assert store.list("cam_features") in ([], [shard(store)])
        if store.exists(shard(store)):
            assert rows(store.read_table(shard(store))).equals(reference)  # never partial
            reads += 1
        time.sleep(0.01)
    results = [finish(p) for p in procs]
    for r in results:
        assert r is not None and r["forward_passes"] + r["reused"] == N_IMAGES
    final = rows(store.read_table(shard(store)))
    assert final.equals(reference)
    assert cps.files() == []
    assert visible_files(store, "cam_features") == [Path(shard(store)).name]  # no temp left


def test_concurrent_writer_processes_and_a_reader(tmp_path) -> None:
    """Many replacements of one shard by two processes: a reader only ever sees one of the two
    complete tables (unique temporary names per writer, atomic rename)."""
    store = FeatureStore(tmp_path / "warehouse")
    rel = store.shard_path("cam_features", DATASET, SHARD)
    tables = {"a": tagged_table("a", 300), "b": tagged_table("b", 500)}
    store.write_table(rel, tables["a"], metadata={"writer": "a"})
    go = tmp_path / "go"
    cmd = [sys.executable, "-m", "cw_pipeline_tests.faults", "write", str(store.root), rel]
    cmd += ["--iterations", "150", "--start-after", str(go)]
    procs = [
        subprocess.Popen(
            [*cmd, "--tag", tag, "--rows", str(tables[tag].num_rows)],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in tables
    ]
    _start_together(procs, go)
    seen: dict[str, int] = {"a": 0, "b": 0}
    while any(p.poll() is None for p in procs):
        got = store.read_table(rel)
        writer = got.schema.metadata[b"writer"].decode()
        assert rows(got).equals(tables[writer])
        seen[writer] += 1
    for p in procs:
        _, err = p.communicate(timeout=CHILD_TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    final = store.read_table(rel)
    assert rows(final).equals(tables[store.read_metadata(rel)["writer"]])
    assert visible_files(store, "cam_features") == [Path(rel).name]
    assert sum(seen.values()) > 0


# --------------------------------------------------------------------------- corrupt shards


def check_alone(project: Project, asset: str) -> dg.AssetCheckEvaluation:
    """Run ``<asset>``'s ``shards_readable`` check on its own (every shard of the dataset)."""
    key = dg.AssetCheckKey(dg.AssetKey.from_user_string(asset), SHARDS_READABLE)
    result = dg.materialize(
        list(project.defs.assets or []),
        instance=project.instance,
        resources=project.defs.resources,
        selection=dg.AssetSelection.checks(key),
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncate_shard(project, dataset: str, kind: str, shard: str) -> str:
    """Cut a stored shard file in half; returns its location (as checks and errors name it)."""
    location = project.store.url(project.store.shard_path(kind, dataset, shard))
    truncate(Path(location))
    return location


def assert_names_corrupt(check, location: str) -> None:
    """The shards_readable check failed as an ERROR naming the damaged file."""
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert location in check.description


def test_corrupt_feature_shard_fails_its_check_and_is_rebuilt(indexed_no_refresh) -> None:
    project = indexed_no_refresh
    assert materialize(project, ["alpha/pca_model", "alpha/descriptors"]).success
    assert check_alone(project, "alpha/cam_features").passed

    location = truncate_shard(project, "alpha", "cam_features", "part2")
    check = check_alone(project, "alpha/cam_features")
    assert_names_corrupt(check, location)
    assert check.metadata["corrupt_files"].value == location
    assert check.metadata["checked"].value == 3 and check.metadata["corrupt"].value == 1

    # Downstream fails with one clear error naming the file, not a half-built result.
    failed = materialize_failure(project, ["alpha/descriptors"])
    assert CorruptShardError.__name__ in failed and location in failed

    before = project.materialization_count("alpha/cam_features", "part2")
    run = materialize(project, ["alpha/cam_features"], "part2")
    assert run.success
    assert project.materialization_count("alpha/cam_features", "part2") == before + 1
    checks = {e.check_name: e.passed for e in run.get_asset_check_evaluations()}
    assert checks[SHARDS_READABLE] is True  # the rebuilt shard, checked in its own run
    (mat,) = [
        m
        for m in run.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey(["alpha", "cam_features"])
    ]
    md = mat.step_materialization_data.materialization.metadata
    assert md["forward_passes"].value == md["rows"].value > 0  # nothing reused from the wreck
    assert check_alone(project, "alpha/cam_features").passed
    assert materialize(project, ["alpha/descriptors"]).success


def test_corrupt_manifest_shard_is_named_and_rebuilt(fresh_project) -> None:
    project = fresh_project
    project.index("delta")
    location = truncate_shard(project, "delta", "manifest", "misc1")
    assert_names_corrupt(check_alone(project, "delta/manifest"), location)
    failed = materialize_failure(project, ["delta/cam_features"], "misc1")
    assert CorruptShardError.__name__ in failed and location in failed

    assert materialize(project, ["delta/manifest", "delta/cam_features"], "misc1").success
    assert check_alone(project, "delta/manifest").passed
    assert (
        project.store.read_table(project.store.shard_path("manifest", "delta", "misc1")).num_rows
        == 3
    )


def materialize_failure(project: Project, keys: list[str], partition: str | None = None) -> str:
    """Materialize ``keys`` expecting the run to fail; returns the step's error text."""
    result = dg.materialize(
        list(project.defs.assets or []),
        instance=project.instance,
        resources=project.defs.resources,
        selection=dg.AssetSelection.assets(*(dg.AssetKey.from_user_string(k) for k in keys)),
        partition_key=partition,
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    return "\n".join(parts)
