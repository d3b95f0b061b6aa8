"""Safety (issue 6): restricted unpickling of ground truth, no path escapes from a dataset root,
and a UI bound to loopback unless told otherwise. (That the warehouse holds no pickles is
checked on a fully materialized project in ``defs/test_store_safety.py``.)

Decisions, also in docs/reliability.md:

* ground-truth pickles load through an allow-list (plain containers, numbers, strings, numpy
  arrays); anything else is refused before it runs;
* image ids (ground truth, query files, manifests) are relative names inside the dataset
  folder: absolute ids, ``.``/``..`` components, backslashes and NUL are refused; the scan
  refuses symlinks that lead out of the folder;
* configuration paths are the operator's explicit choice and may point anywhere local
  (absolute, or relative to the YAML file, ``..`` included); URLs are refused for datasets.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from cw_pipeline import cli
from cw_pipeline.cli import demo
from cw_pipeline.cli.common import DEFAULT_UI_HOST, is_loopback
from cw_pipeline.compute.features import update_features
from cw_pipeline.compute.manifests import MANIFEST_SCHEMA, manifest_paths
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.compute.shards import scan_files
from cw_pipeline.config import ConfigError, DatasetConfig, load_config
from cw_pipeline.core.datasets import (
    PickleLimitError,
    UnsafePickleError,
    image_path,
    load_gnd_pickle,
    read_oxford_groundtruth,
)
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.store import FeatureStore
from cw_pipeline_tests.badfiles import HOSTILE_PICKLES, plain_jpeg

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pickles


class _SystemCall:
    """Unpickling this would run ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Payload:
    """An arbitrary class: unpickling it would import this module and build an instance."""

    def __init__(self) -> None:
        self.note = "not ground truth"


def _gnd_dataset(path: Path) -> DatasetConfig:
    return DatasetConfig(name="evil", layout="gnd", images=path.parent, groundtruth=path)


def _gnd_payload(extra: object) -> dict:
    return {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0], "junk": [], "x": extra}]}


def test_ground_truth_pickle_with_an_os_system_reduce_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps(_gnd_payload(_SystemCall(marker))))
    with pytest.raises(UnsafePickleError) as info:
        load_groundtruth(_gnd_dataset(path), [])  # the pipeline's ground-truth loader
    assert str(info.value).startswith(f"{path}: refused to load global ")
    assert str(info.value).endswith(".system")
    assert not marker.exists()


def test_ground_truth_pickle_with_an_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "gnd_class.pkl"
    path.write_bytes(pickle.dumps(_gnd_payload(Payload()), protocol=4))
    with pytest.raises(UnsafePickleError) as info:
        load_groundtruth(_gnd_dataset(path), [])
    assert str(info.value) == (
        f"{path}: refused to load global cw_pipeline_tests.test_safety.Payload"
    )


#: Address space of the child loading a hostile pickle: Python, numpy and the loader need
#: about 0.5 GB; every hostile file asks for 2 GB or more.
_HOSTILE_RLIMIT_AS = 1536 * 1024 * 1024

_LOAD_UNDER_RLIMIT = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from cw_pipeline.core.datasets import load_gnd_pickle
t0 = time.perf_counter()
try:
    load_gnd_pickle(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, round(time.perf_counter() - t0, 3))
    print(exc)
else:
    print("loaded")
"""


def _load_under_rlimit(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    script = _LOAD_UNDER_RLIMIT.format(limit=_HOSTILE_RLIMIT_AS)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_real_ground_truth_loads_under_the_memory_limit_of_the_hostile_pickle_tests(
    shared_data,
):
    path = shared_data / "groundtruth" / "revisited" / "gnd_rparis6k.pkl"
    assert _load_under_rlimit(path).stdout.strip() == "loaded"


@pytest.mark.parametrize("hostile", HOSTILE_PICKLES, ids=lambda h: h.name)
def test_hostile_ground_truth_pickles_are_refused_fast_and_in_little_memory(tmp_path, hostile):
    path = hostile.make(tmp_path / f"gnd_{hostile.name}.pkl")
    assert path.stat().st_size < 2 * 1024 * 1024  # small files asking for GBs
    proc = _load_under_rlimit(path)
    kind, seconds = proc.stdout.splitlines()[0].split()
    message = "\n".join(proc.stdout.splitlines()[1:])
    assert kind == "PickleLimitError", proc.stdout
    assert message.startswith(f"{path}: refused"), message
    assert re.search(hostile.refused, message), message
    assert float(seconds) < 5.0


def test_ground_truth_pickle_opcodes_count_against_the_cap(tmp_path):
    # 200,000 references to one string (DUP): 1.6 MB of pointers from a 200 KB file.
    path = tmp_path / "gnd_dups.pkl"
    ops = b"](" + b"X\x01\x00\x00\x00a" + b"2" * 200_000 + b"e"
    path.write_bytes(b"\x80\x02}X\x06\x00\x00\x00imlist" + ops + b"s.")
    with pytest.raises(PickleLimitError, match=r"gnd_dups\.pkl: refused.*over 1000000 bytes"):
        load_gnd_pickle(path, max_bytes=1_000_000)
    with pytest.raises(ValueError, match="duplicate image id 'a'"):  # under the cap: loads
        load_gnd_pickle(path, max_bytes=100_000_000)


def test_ground_truth_pickle_larger_than_the_cap_is_not_read(tmp_path):
    path = tmp_path / "gnd_big.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["x" * 5000]}))
    with pytest.raises(PickleLimitError, match=r"gnd_big\.pkl.*the file has \d+ bytes"):
        load_gnd_pickle(path, max_bytes=4096)


def test_ground_truth_pickle_holding_itself_is_refused(tmp_path):
    path = tmp_path / "gnd_loop.pkl"
    looped: list = []
    looped.append(looped)
    path.write_bytes(pickle.dumps({"imlist": looped, "qimlist": [], "gnd": []}))
    with pytest.raises(PickleLimitError, match=r"gnd_loop\.pkl: refused: .*holds itself"):
        load_gnd_pickle(path)


@pytest.mark.parametrize(
    ("relpath", "layout", "n_db", "n_queries"),
    [
        ("oxford5k/gnd_oxford5k.pkl", "gnd", 5063, 55),
        ("paris6k/gnd_paris6k.pkl", "gnd", 6392, 55),
        ("revisited/gnd_roxford5k.pkl", "revisited", 4993, 70),
        ("revisited/gnd_rparis6k.pkl", "revisited", 6322, 70),
    ],
)
def test_real_ground_truth_pickles_load_with_the_restricted_unpickler(
    shared_data, relpath, layout, n_db, n_queries
):
    path = shared_data / "groundtruth" / relpath
    ds = DatasetConfig(name=path.stem, layout=layout, images=path.parent, groundtruth=path)
    gt = load_groundtruth(ds, [])
    assert (len(gt.image_ids), len(gt.queries)) == (n_db, n_queries)
    assert all(q.bbox is not None and q.positives for q in gt.queries)


# --------------------------------------------------------------------------- image ids


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/./b", "a\\..\\b", "x/"])
def test_ground_truth_ids_cannot_leave_the_dataset_folder(tmp_path, bad):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "q_1_query.txt").write_text("oxc1_a 1 1 5 5\n")
    (gt / "q_1_good.txt").write_text(f"b\n{bad}\n")
    (gt / "q_1_ok.txt").write_text("")
    (gt / "q_1_junk.txt").write_text("")
    with pytest.raises(ValueError) as info:
        read_oxford_groundtruth(gt)
    assert str(info.value).startswith(f"{gt / 'q_1_good.txt'}:2: image id {bad!r} is not")
    # The query file's image too.
    (gt / "q_1_good.txt").write_text("b\n")
    (gt / "q_1_query.txt").write_text(f"oxc1_{bad} 1 1 5 5\n")
    with pytest.raises(ValueError, match=r"q_1_query\.txt:1: image id .* is not a relative name"):
        read_oxford_groundtruth(gt)
    # And the names of a gnd pickle.
    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a", bad], "qimlist": ["a"], "gnd": []}))
    with pytest.raises(ValueError, match=r"gnd_x\.pkl \[imlist\]\[1\]: image id"):
        load_gnd_pickle(path)


def test_manifest_paths_cannot_leave_the_dataset_folder(tmp_path):
    root = tmp_path / "images"
    plain_jpeg(root / "ok.jpg")
    plain_jpeg(tmp_path / "secret.jpg")
    assert image_path(root, "sub/ok.jpg") == root / "sub" / "ok.jpg"
    ds = DatasetConfig(name="d", layout="folder", images=root)
    forged = pa.Table.from_pylist(
        [
            {
                "image_id": "leak",
                "relpath": "../secret.jpg",
                "bytes": 1,
                "mtime_ns": 1,
                "sha1": "0" * 40,
                "width": 64,
                "height": 48,
                "error": None,
            }
        ],
        schema=MANIFEST_SCHEMA,
    )
    extractor = FeatureExtractor(ExtractionConfig(stored_classes=8), num_threads=1)
    with pytest.raises(ValueError, match=r"image id '\.\./secret\.jpg' is not a relative name"):
        update_features(ds, forged, None, extractor)
    assert extractor.stats.images == 0
    store = FeatureStore(tmp_path / "warehouse")
    store.write_table(store.shard_path("manifest", "d", "s"), forged)
    with pytest.raises(ValueError, match=r"'\.\./secret\.jpg' is not a relative name"):
        manifest_paths(store, ds, ["s"])


def test_scan_refuses_symlinks_out_of_the_dataset_folder(tmp_path):
    outside = tmp_path / "outside"
    plain_jpeg(outside / "secret.jpg")
    root = tmp_path / "images"
    plain_jpeg(root / "a.jpg")
    (root / "alias.jpg").symlink_to(root / "a.jpg")  # inside: followed
    ds = DatasetConfig(name="d", layout="folder", images=root)
    assert [f.relpath for f in scan_files(ds)] == ["a.jpg", "alias.jpg"]
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"symlink .*escape points outside the image folder"):
        scan_files(ds)
    (root / "escape").unlink()
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(ValueError, match=r"symlink .*leak\.jpg points outside the image folder"):
        scan_files(ds)


def test_store_paths_of_hostile_names_stay_inside_the_store(tmp_path):
    store = FeatureStore(tmp_path / "warehouse")
    rel = store.shard_path("cam_features", "../../ds", "../../../shard")
    assert ".." not in rel.split("/") and rel.startswith("cam_features/dataset=")
    store.write_table(rel, pa.table({"x": [1]}))
    assert (tmp_path / "warehouse" / rel).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warehouse"]
    with pytest.raises(ValueError, match="invalid store path"):
        store.write_bytes("../escape.bin", b"x")


def test_config_paths_may_point_anywhere_local_explicitly(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "abs").mkdir()
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "datasets.yaml"
    path.write_text(
        "datasets:\n"
        "  rel:\n    layout: folder\n    images: ../elsewhere\n"
        f"  abs:\n    layout: folder\n    images: {tmp_path / 'abs'}\n"
    )
    config = load_config(path)
    assert config.dataset("rel").images == tmp_path / "elsewhere"  # normalised, absolute
    assert config.dataset("abs").images == tmp_path / "abs"
    path.write_text("datasets:\n  url:\n    layout: folder\n    images: s3://bucket/images\n")
    with pytest.raises(ConfigError, match=r"datasets\.yaml:4: dataset 'url': images must be a "):
        load_config(path)


# --------------------------------------------------------------------------- the webserver


def test_demo_ui_binds_to_loopback_unless_told_otherwise():
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert (args.host, args.port) == ("127.0.0.1", 3000) == (DEFAULT_UI_HOST, 3000)
    assert demo.ui_command(args.host, args.port) == ["dg", "dev", "-h", "127.0.0.1", "-p", "3000"]
    told = parser.parse_args(["demo", "--host", "0.0.0.0", "--port", "8080"])
    assert demo.ui_command(told.host, told.port)[-4:] == ["-h", "0.0.0.0", "-p", "8080"]
    # the address printed for a UI bound to every interface is the loopback one
    assert demo.ui_base("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert demo.ui_base("::1", 3000) == "http://[::1]:3000"
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.1.1")] == [True] * 4
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.org"))


def _make_dry_run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "UI_"))}
    proc = subprocess.run(
        ["make", "--dry-run", "--always-make", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def test_makefile_serves_the_ui_on_loopback_unless_told_otherwise():
    assert "/dg dev -h 127.0.0.1 -p 3000" in _make_dry_run("ui")
    assert "cw-pipeline demo --host 127.0.0.1 --port 3000" in _make_dry_run("demo")
    told = _make_dry_run("ui", "UI_HOST=0.0.0.0", "UI_PORT=8080")
    assert "/dg dev -h 0.0.0.0 -p 8080" in told
