"""Bad input, one test each, through the real entry points (issue 6, "Bad input").

The corpus of :mod:`cw_pipeline_tests.badfiles` is indexed once per module as a ``folder``
dataset by the Dagster pipeline (``runs.index_dataset``: manifest + features assets and their
checks); each test then looks at what happened to its file, and at what the pipeline's own
image loader (``FeatureExtractor.load``) makes of it. Ground truth, PCA, configuration and
empty-dataset cases use a small Oxford-layout project. Policy (docs/reliability.md):

* an unreadable image is quarantined: a row with its reason in the shard's ``rejected``
  Parquet table beside its features, counted in the materialization metadata, flagged by the
  ``no_rejected_images`` warning check; the rest of the shard is indexed;
* readable images are read upright (EXIF) and in RGB whatever their mode;
* configuration and ground-truth errors fail fast, naming the file, line or entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import ImageFile

from cw_pipeline import cli
from cw_pipeline.compute import manifests
from cw_pipeline.compute.features import (
    REJECTED_SCHEMA,
    feature_schema,
    load_features,
    update_features,
)
from cw_pipeline.compute.manifests import build_manifest, manifest_paths, sha1_file
from cw_pipeline.compute.queries import compute_query_features
from cw_pipeline.compute.shards import ROOT_SHARD, scan_files, shard_key
from cw_pipeline.config import ConfigError, load_config
from cw_pipeline.core.datasets import folder as folder_module
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.images import ImageLoadError
from cw_pipeline.runtime.runs import IndexResult
from cw_pipeline.store import FeatureStore, decode_component, shard_name_from_path
from cw_pipeline_tests.badfiles import (
    BLUE,
    BY_NAME,
    CMYK_RGB,
    CORPUS,
    GREEN,
    LINK_TARGETS,
    RED,
    YELLOW,
    BadFile,
    FifoWatch,
    plain_jpeg,
    write_corpus,
)
from cw_pipeline_tests.defs.project import Project, check_evaluations, materialize, open_project

# The corpus' 100-Mpx PNG makes Pillow warn when it parses the header; the loader then refuses
# it. The warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

DEFAULTS = {
    "backbone": "efficientnet_lite0",
    "resize": "native",
    "stored_classes": 8,
    "batch_size": 8,
    "device": "cpu",
    "num_threads": 1,
}
QUARANTINED = [f.name for f in BY_NAME.values() if f.rejected is not None]
SKIPPED = [f.name for f in BY_NAME.values() if f.skipped is not None]
INDEXED = [f.name for f in BY_NAME.values() if f.rejected is None and f.skipped is None]
FIFOS = ["corpus/pipe.jpg", "corpus/pipe-target"]


def _write_yaml(root: Path, datasets: dict) -> Path:
    data = {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": DEFAULTS,
        "datasets": datasets,
        "search": {"aggregated_classes": 8, "n_pca": 1},
    }
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _shard(f: BadFile) -> str:
    """The shard of a corpus file: its top folder's shard key (``_root`` at the top level)."""
    return shard_key(f.relpath.split("/", 1)[0]) if "/" in f.relpath else ROOT_SHARD


def _in_shard(names: list[str], shard: str) -> list[str]:
    return [n for n in names if _shard(BY_NAME[n]) == shard]


@dataclass
class Corpus:
    """The corpus indexed by the pipeline, and what the pipeline stored about it."""

    project: Project
    paths: dict[str, Path]
    result: IndexResult
    fifos_opened: list[Path]
    checks: dict[tuple[str, str, str], object] = field(default_factory=dict)

    @property
    def store(self) -> FeatureStore:
        return self.project.store

    def features(self, shard: str) -> dict[str, dict]:
        return {r["image_id"]: r for r in self.project.features("bad", shard).to_pylist()}

    def manifest(self, shard: str) -> dict[str, dict]:
        rel = self.store.shard_path("manifest", "bad", shard)
        return {r["image_id"]: r for r in self.store.read_table(rel).to_pylist()}

    def rejected(self, shard: str) -> dict[str, str]:
        rel = self.store.shard_path("rejected", "bad", shard)
        return {r["image_id"]: r["reason"] for r in self.store.read_table(rel).to_pylist()}

    def materialization(self, shard: str, asset: str = "cam_features") -> dict:
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(["bad", asset]), asset_partitions=[shard])
        records = self.project.instance.fetch_materializations(flt, limit=1).records
        return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("bad_input")
    paths = write_corpus(root / "bad")
    _write_yaml(root, {"bad": {"layout": "folder", "images": "bad", "shard_by": "folder"}})
    project = open_project(root)
    # Opening a FIFO for reading blocks: the watch lets any such reader go, and says so.
    with FifoWatch([root / "bad" / rel for rel in FIFOS]) as watch:
        result = project.index("bad")
    out = Corpus(project, paths, result, watch.opened)
    for ev, shard in check_evaluations(project.instance):
        key = ev.asset_check_key
        out.checks[(key.asset_key.to_user_string(), key.name, shard)] = ev
    return out


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    """The pipeline's extractor for the corpus' settings (efficientnet_lite0, native size)."""
    return FeatureExtractor(ExtractionConfig(stored_classes=8), num_threads=1)


def assert_quarantined(corpus: Corpus, extractor: FeatureExtractor, name: str) -> str:
    """The file is absent from its shard's features, in its ``rejected`` table with a reason
    naming it, and the pipeline's loader refuses it the same way; returns the reason."""
    f = BY_NAME[name]
    shard = _shard(f)
    assert f.image_id not in corpus.features(shard)
    reason = corpus.rejected(shard)[f.image_id]
    assert re.search(f.rejected, reason), reason
    assert str(corpus.paths[name]) in reason
    with pytest.raises(ImageLoadError, match=f.rejected):
        extractor.load(corpus.paths[name])
    return reason


def assert_indexed(corpus: Corpus, name: str) -> dict:
    f = BY_NAME[name]
    row = corpus.features(_shard(f))[f.image_id]
    assert f.image_id not in corpus.rejected(_shard(f))
    return row


def close(pixel, expected, tol: int = 6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


# --------------------------------------------------------------------------- the policy


def test_unreadable_images_are_quarantined_beside_the_shard_and_the_rest_proceeds(corpus):
    store = corpus.store
    # The rejected table is a Parquet file of the store, beside the shard's features.
    features_rel = store.shard_path("cam_features", "bad", "corpus")
    rejected_rel = store.shard_path("rejected", "bad", "corpus")
    assert {features_rel, rejected_rel} <= set(store.list())
    table = pq.read_table(store.path(rejected_rel))
    assert table.column_names == ["image_id", "relpath", "sha1", "reason"]
    quarantined = _in_shard(QUARANTINED, "corpus")
    assert sorted(table.column("image_id").to_pylist()) == sorted(
        BY_NAME[n].image_id for n in quarantined
    )
    # Every row has its reason; files that were read have their sha1, files refused before
    # any open (not regular, unrepresentable names) have none.
    unread = {BY_NAME[n].image_id for n in quarantined if BY_NAME[n].unread}
    assert all(
        r["reason"] and bool(r["sha1"]) != (r["image_id"] in unread) for r in table.to_pylist()
    )
    # The rest of the shard was indexed, and everything is counted.
    assert set(corpus.features("corpus")) == {
        BY_NAME[n].image_id for n in _in_shard(INDEXED, "corpus")
    }
    assert (corpus.result.rejected, corpus.result.forward_passes) == (
        len(QUARANTINED),
        len(INDEXED),
    )
    meta = corpus.materialization("corpus")
    assert (meta["rejected"], meta["rows"]) == (
        len(quarantined),
        len(_in_shard(INDEXED, "corpus")),
    )
    check = corpus.checks[("bad/cam_features", "no_rejected_images", "corpus")]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["rejected"].value == len(quarantined)
    assert "corpus/empty: cannot load image" in check.metadata["reasons"].value
    assert corpus.checks[("bad/cam_features", "features_finite_and_shaped", "corpus")].passed
    # A shard without bad files passes its check.
    assert corpus.checks[("bad/cam_features", "no_rejected_images", "été 2024")].passed


# --------------------------------------------------------------------------- unreadable files


def test_zero_byte_file(corpus, extractor):
    assert_quarantined(corpus, extractor, "zero_byte")
    assert corpus.manifest("corpus")["corpus/empty"]["bytes"] == 0


def test_truncated_jpeg(corpus, extractor):
    assert_quarantined(corpus, extractor, "truncated_jpeg")
    # Its header is fine: the manifest has its size, the decoder found the damage.
    assert corpus.manifest("corpus")["corpus/truncated"]["width"] == 64


def test_text_file_named_jpg(corpus, extractor):
    assert_quarantined(corpus, extractor, "text_as_jpeg")
    assert "unrecognised" in corpus.manifest("corpus")["corpus/notes"]["error"]


def test_image_over_the_decompression_bomb_limit_is_rejected_unread(corpus, extractor, monkeypatch):
    assert_quarantined(corpus, extractor, "bomb")
    assert_quarantined(corpus, extractor, "bomb_hard")  # over twice the limit: Pillow refuses
    row = corpus.manifest("corpus")["corpus/bomb"]
    assert (row["width"], row["height"], row["bytes"] < 50_000) == (10_000, 10_000, True)

    # The pixel data is never decoded: refusing happens on the header.
    def no_decode(self):
        raise AssertionError("the decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError, match="over the limit of 89478485 pixels"):
        extractor.load(corpus.paths["bomb"])


def test_image_smaller_than_the_network_stride_is_rejected_with_the_policy(corpus, extractor):
    reason = assert_quarantined(corpus, extractor, "tiny")
    assert "not upscaled silently" in reason and "'native'" in reason
    # As the reason says, a policy that enlarges small images indexes it.
    fixed = FeatureExtractor(
        ExtractionConfig(resize="fixed:64x48", stored_classes=8), backbone=extractor.backbone
    )
    image, original = fixed.load(corpus.paths["tiny"])
    assert (image.size, original) == ((64, 48), (16, 16))


# --------------------------------------------------------------------------- awkward, readable


def test_png_with_alpha_is_composited_over_white(corpus, extractor):
    row = assert_indexed(corpus, "png_alpha")
    assert (row["input_w"], row["input_h"]) == (64, 48)
    image, _ = extractor.load(corpus.paths["png_alpha"])
    assert image.mode == "RGB"
    assert image.getpixel((8, 24)) == (255, 255, 255)  # transparent black -> white
    assert image.getpixel((56, 24)) == BLUE


def test_grayscale_is_read_as_rgb(corpus, extractor):
    assert_indexed(corpus, "grayscale")
    image, _ = extractor.load(corpus.paths["grayscale"])
    left, right = image.getpixel((8, 24)), image.getpixel((56, 24))
    assert image.mode == "RGB" and len(set(left)) == 1 and len(set(right)) == 1
    assert close(left, (40, 40, 40), 3) and close(right, (200, 200, 200), 3)


def test_cmyk_jpeg_is_converted_to_rgb(corpus, extractor):
    assert_indexed(corpus, "cmyk")
    image, _ = extractor.load(corpus.paths["cmyk"])
    assert image.mode == "RGB" and close(image.getpixel((32, 24)), CMYK_RGB, 4)


def test_16bit_png_is_scaled_to_8bit(corpus, extractor):
    assert_indexed(corpus, "png_16bit")
    image, _ = extractor.load(corpus.paths["png_16bit"])
    arr = np.asarray(image)
    assert arr.dtype == np.uint8 and image.mode == "RGB"
    assert arr[10, [5, 32, 60], 0].tolist() == [0, 128, 255]  # 0, 32768, 65535


def test_exif_rotated_photo_is_read_upright(corpus, extractor):
    row = assert_indexed(corpus, "exif_rotated")
    # Stored 64x48 with orientation 6: the pipeline sees the upright 48x64 image everywhere.
    manifest = corpus.manifest("corpus")["corpus/rotated"]
    assert (manifest["width"], manifest["height"]) == (48, 64)
    assert (row["input_w"], row["input_h"]) == (48, 64)
    boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
    finite = boxes[np.isfinite(boxes).all(axis=1)]
    assert len(finite) and finite[:, [0, 2]].max() <= 48 and finite[:, [1, 3]].max() <= 64
    # The stored quadrants turned 90° clockwise: blue | red over yellow | green.
    image, _ = extractor.load(corpus.paths["exif_rotated"])
    assert image.size == (48, 64)
    assert close(image.getpixel((12, 16)), BLUE)
    assert close(image.getpixel((36, 16)), RED)
    assert close(image.getpixel((12, 48)), YELLOW)
    assert close(image.getpixel((36, 48)), GREEN)


def test_unicode_and_spaces_in_names(corpus):
    f = BY_NAME["unicode"]
    assert f.image_id == "été 2024/façade 東京 n°1"
    shards = sorted(corpus.project.instance.get_dynamic_partitions("bad_shards"))
    assert {"corpus", "été 2024"} <= set(shards)  # short names are kept as they are
    row = assert_indexed(corpus, "unicode")
    assert row["sha1"] == corpus.manifest("été 2024")[f.image_id]["sha1"]
    assert corpus.manifest("été 2024")[f.image_id]["relpath"] == f.relpath
    # The store names the shard with safe characters only, reversibly.
    rel = corpus.store.shard_path("cam_features", "bad", "été 2024")
    assert re.fullmatch(r"cam_features/dataset=bad/shard=[A-Za-z0-9%._-]+\.parquet", rel)
    assert decode_component(rel.rsplit("shard=", 1)[1][: -len(".parquet")]) == "été 2024"


# --------------------------------------------------------------------------- dataset folders


def test_same_image_id_in_two_shards_is_refused(corpus, tmp_path):
    # 1. Flat ids (Oxford/Paris layouts): two files with one name in two shard folders.
    flat = tmp_path / "flat"
    plain_jpeg(flat / "a" / "x.jpg")
    plain_jpeg(flat / "b" / "x.jpg")
    (tmp_path / "gt").mkdir()
    datasets = {
        "flat": {
            "layout": "oxford",
            "images": "flat",
            "groundtruth": "gt",
            "pca_from": "other",
            "shard_by": "folder",
        },
        "other": {"layout": "folder", "images": "flat"},
    }
    config = load_config(_write_yaml(tmp_path, datasets))
    with pytest.raises(ValueError, match=r"image id 'x' is not unique: 'a/x\.jpg' and 'b/x\.jpg'"):
        scan_files(config.dataset("flat"))
    # 2. A stored shard holding rows of another (a duplicated shard file, a stale shard of an
    #    older plan): reading the dataset's features refuses it, naming the id and the shards.
    store = FeatureStore(tmp_path / "warehouse")
    corpus_rows = corpus.project.features("bad", "corpus")
    store.write_table(store.shard_path("cam_features", "bad", "corpus"), corpus_rows)
    store.write_table(store.shard_path("cam_features", "bad", "copy"), corpus_rows)
    with pytest.raises(
        ValueError,
        match=r"image id 'corpus/alpha' is stored in shards 'copy' and 'corpus'.*--force",
    ):
        load_features(store, "bad", ["copy", "corpus"])
    assert len(load_features(store, "bad", ["corpus"])) == corpus_rows.num_rows


def test_symlink_loop_in_a_dataset_folder_is_skipped_with_a_warning(corpus, caplog):
    ds = corpus.project.config.dataset("bad")
    assert (ds.images / "corpus" / "loop").is_symlink()
    found: list = []
    with caplog.at_level("WARNING", logger="cw_pipeline.core.datasets.folder"):
        worker = threading.Thread(target=lambda: found.extend(scan_files(ds)), daemon=True)
        worker.start()
        worker.join(timeout=60)
    assert not worker.is_alive(), "the scan did not finish: it follows the loop"
    assert {f.relpath for f in found} == {f.relpath for f in CORPUS if f.skipped is None}
    assert re.search(r"skipping .*corpus/loop: folder .* already scanned", caplog.text)
    assert re.search(r"skipping broken or looping symlink .*self\.jpg", caplog.text)
    # The pipeline indexed the folder once, the loop and the self-link excluded.
    ids = set(corpus.manifest("corpus"))
    assert not any("loop" in i or "self" in i for i in ids)


# --------------------------------------------------------------------------- one odd file


NOT_REGULAR = ["fifo", "fifo_link", "socket", "socket_link"]
BAD_NAMES = ["backslash", "newline", "not_utf8", "control_folder", "not_utf8_folder"]
HASHED_SHARDS = [
    "long_folder",
    "long_multibyte_folder",
    "dots_folder",
    "root_folder",
    "hashlike_folder",
    "control_folder",
    "not_utf8_folder",
]


def assert_refused_unread(corpus: Corpus, name: str) -> str:
    """Quarantined from ``stat`` and name alone: a rejected row with its reason (naming the
    file, on one line), a manifest row without sha1; returns the reason."""
    f = BY_NAME[name]
    shard = _shard(f)
    reason = corpus.rejected(shard)[f.image_id]
    assert re.search(f.rejected, reason), reason
    assert reason.startswith("cannot load image '") and "\n" not in reason and "\t" not in reason
    row = corpus.manifest(shard)[f.image_id]
    assert (row["sha1"], row["error"]) == (None, reason)
    assert f.image_id not in corpus.features(shard)
    return reason


def test_files_that_are_not_regular_files_are_quarantined_without_being_opened(corpus, extractor):
    for name in NOT_REGULAR:
        reason = assert_refused_unread(corpus, name)
        assert str(corpus.paths[name]) in reason
    # No reader ever opened the FIFOs (the linked one included); the rest was indexed.
    assert corpus.fifos_opened == []
    assert set(corpus.features("corpus")) == {
        BY_NAME[n].image_id for n in _in_shard(INDEXED, "corpus")
    }
    # The loader refuses them (and devices) the same way, from stat, before any open.
    specials = [corpus.paths[n] for n in NOT_REGULAR] + [Path("/dev/null")]
    with FifoWatch([corpus.paths["fifo"], corpus.paths["fifo"].parent / "pipe-target"]) as w:
        for path in specials:
            with pytest.raises(ImageLoadError, match=r"not a regular file \((FIFO|socket|char)"):
                extractor.load(path)
            with pytest.raises(ImageLoadError, match=re.escape(str(path))):
                sha1_file(path)
    assert w.opened == []


def test_search_with_a_query_that_is_not_a_regular_file_fails_naming_it(corpus, capsys):
    config = str(corpus.project.root / "datasets.yaml")
    queries = {
        corpus.paths["fifo"]: "FIFO",
        corpus.paths["fifo_link"]: "FIFO",
        corpus.paths["socket_link"]: "socket",
        Path("/dev/null"): "character device",
    }
    fifos = [corpus.paths["fifo"], corpus.paths["fifo"].parent / "pipe-target"]
    with FifoWatch(fifos) as watch:
        for path, kind in queries.items():
            code = cli.main(["search", str(path), "--dataset", "bad", "--config", config])
            err = capsys.readouterr().err.strip()
            assert code == 2, err
            assert err == (
                f"cw-pipeline: error: cannot load image '{path}': not a regular file ({kind}); "
                "only regular files are read"
            )
    assert watch.opened == []


def test_a_file_vanishing_between_scan_and_read_is_quarantined_and_the_rest_indexed(
    tmp_path, monkeypatch, extractor
):
    for name in ("a", "b", "c", "d"):
        plain_jpeg(tmp_path / "imgs" / "s" / f"{name}.jpg")
    _write_yaml(tmp_path, {"v": {"layout": "folder", "images": "imgs", "shard_by": "folder"}})
    project = open_project(tmp_path)
    ds = project.config.dataset("v")
    folder = ds.images / "s"

    # 1. Listed, then gone before its stat: the scan records it instead of failing.
    real_scandir = os.scandir

    def scandir_then_vanish(path):
        entries = list(real_scandir(path))
        if Path(path) == folder and (folder / "a.jpg").exists():
            (folder / "a.jpg").rename(tmp_path / "a.jpg")
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(folder_module.os, "scandir", scandir_then_vanish)
    files = {f.relpath: f for f in scan_files(ds)}
    monkeypatch.undo()
    assert re.fullmatch(
        rf"cannot load image '{re.escape(str(folder / 'a.jpg'))}': it vanished after the "
        r"listing \(No such file or directory\)",
        files["s/a.jpg"].error,
    )
    assert all(files[f"s/{n}.jpg"].error is None for n in "bcd")
    (tmp_path / "a.jpg").rename(folder / "a.jpg")

    # 2. Scanned, then gone before it is read (the manifest's hashing), in a pipeline run.
    real_sha1 = sha1_file

    def vanish_then_hash(path):
        if Path(path).name == "b.jpg":
            Path(path).unlink()
        return real_sha1(path)

    monkeypatch.setattr(manifests, "sha1_file", vanish_then_hash)
    result = project.index("v")
    monkeypatch.undo()
    assert (result.images, result.rejected, result.forward_passes) == (3, 1, 3)
    rel = project.store.shard_path("rejected", "v", "s")
    rows = project.store.read_table(rel).to_pylist()
    assert [(r["image_id"], r["sha1"]) for r in rows] == [("s/b", None)]
    assert rows[0]["reason"] == (
        f"cannot load image '{folder / 'b.jpg'}': it vanished after the scan "
        "(No such file or directory)"
    )

    # 3. In the manifest, then gone before its features are computed.
    manifest, _ = build_manifest(ds, scan_files(ds))
    (folder / "c.jpg").unlink()
    update = update_features(ds, manifest, None, extractor)
    assert sorted(update.table.column("image_id").to_pylist()) == ["s/a", "s/d"]
    [row] = update.rejected.to_pylist()
    assert row["image_id"] == "s/c" and str(folder / "c.jpg") in row["reason"]
    assert "not found" in row["reason"]


def test_names_no_image_id_can_hold_are_quarantined_and_the_rest_indexed(corpus):
    reasons = {name: assert_refused_unread(corpus, name) for name in BAD_NAMES}
    # The stored id and the message show undecodable bytes and control characters escaped.
    assert BY_NAME["not_utf8"].image_id == "corpus/caf\\xe9"
    assert "bad/corpus/caf\\xe9.jpg'" in reasons["not_utf8"]
    assert "bad/corpus/line\\x0abreak.jpg'" in reasons["newline"]
    assert "bad/tab\\x09here/x.jpg'" in reasons["control_folder"]
    assert "bad/k\\xf6ln/x.jpg'" in reasons["not_utf8_folder"]
    # The readable files beside them are indexed, whatever the shard.
    for shard in {_shard(BY_NAME[n]) for n in INDEXED}:
        expected = {BY_NAME[n].image_id for n in _in_shard(INDEXED, shard)}
        assert set(corpus.features(shard)) == expected
    # Readers of the manifests (the map provider of re-ranking) pass over the quarantined rows.
    shards = corpus.project.instance.get_dynamic_partitions("bad_shards")
    paths = manifest_paths(corpus.store, corpus.project.config.dataset("bad"), shards)
    assert all(paths[BY_NAME[n].image_id] == corpus.paths[n] for n in INDEXED)
    assert not {BY_NAME[n].image_id for n in BAD_NAMES + NOT_REGULAR} & set(paths)


#: Names that could collide once shortened or cleaned up, or that Dagster or the store refuse.
AWKWARD_NAMES = [
    "x" * 203,
    "x" * 204,
    "x" * 250,
    "x" * 204 + "y",
    "é" * 33,
    "é" * 34,
    "東" * 30,
    "東" * 80,
    "a\tb",
    "a\nb",
    "a_b",
    "a...b",
    "a_b~0123456789abcdef",
    "_root",
    "k\udcf6ln",
    "k\\xf6ln",
    "k_ln",
    "corpus",
    "été 2024",
]


def test_shard_names_are_bounded_valid_and_collision_free(corpus, tmp_path):
    shards = set(corpus.project.instance.get_dynamic_partitions("bad_shards"))
    # Existing short names are kept: the store's files of older indexes stay valid.
    assert {"corpus", "été 2024", ROOT_SHARD} <= shards
    assert _shard(BY_NAME["top_level"]) == ROOT_SHARD
    # Folders with names too long for the store, refused by Dagster, or reserved: a readable
    # prefix and a hash, as Dagster partitions, with their images indexed.
    for name in HASHED_SHARDS:
        f = BY_NAME[name]
        key = _shard(f)
        assert re.fullmatch(r"[^\x00-\x1f]{1,48}~[0-9a-f]{16}", key) and "..." not in key
        assert key in shards
        if f.rejected is None:
            assert f.image_id in corpus.features(key)
    assert _shard(BY_NAME["long_folder"]).startswith("a long folder name")
    assert _shard(BY_NAME["root_folder"]).startswith("_root~")
    # Every store file name fits a file system's 255 bytes.
    for rel in corpus.store.list(suffix=None):
        assert all(len(part.encode()) <= 255 for part in rel.split("/")), rel
    # Over many awkward names: distinct keys, valid partition keys, bounded store names.
    keys = [shard_key(n) for n in AWKWARD_NAMES]
    keys += [shard_key(k) for k in keys if k not in AWKWARD_NAMES]  # named like another's key
    assert len(set(keys)) == len(keys)
    dg.StaticPartitionsDefinition(keys)  # Dagster's own check of partition keys
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="invalid substrings"):
        dg.StaticPartitionsDefinition(["wait... what"])  # the check bites on raw names
    dg.StaticPartitionsDefinition(sorted(shards))
    store = FeatureStore(tmp_path / "wh")
    for key in keys:
        rel = store.shard_path("cam_features", "bad", key)
        assert len(rel.rsplit("/", 1)[1]) <= FeatureStore.MAX_SHARD_COMPONENT + 15
        store.write_table(rel, pa.table({"x": [1]}))  # the atomic write's temporary fits
        assert shard_name_from_path(rel) == key
    assert shard_key("x" * 203) == "x" * 203  # the longest name that fits stays as it is
    # A name the store cannot hold fails naming it, not with [Errno 36] inside the store.
    with pytest.raises(ValueError, match=r"shard name 'xxx.* characters once percent-encoded"):
        store.shard_path("cam_features", "bad", "x" * 204)


def test_skipped_files_are_counted_and_named(corpus, capsys):
    expected = Counter(BY_NAME[n].skipped for n in _in_shard(SKIPPED, "corpus"))
    expected.update(LINK_TARGETS.values())
    expected["broken or looping symlink"] += 1  # corpus/self.jpg (the symlink loops)
    meta = corpus.materialization("corpus", "manifest")
    assert meta["skipped"] == sum(expected.values()) == 8
    summary = meta["skipped_files"]
    assert summary.startswith("8 files (2 unsupported extension .gif, ")
    for reason, n in expected.items():
        assert f"{n} {reason}" in summary
    assert "corpus/STILL.GIF, corpus/anim.gif" in summary and summary.endswith("and 3 more")
    assert corpus.materialization("été 2024", "manifest")["skipped"] == 0
    # cw-pipeline datasets counts and names them too.
    config = str(corpus.project.root / "datasets.yaml")
    assert cli.main(["datasets", "--config", config]) == 0
    out = capsys.readouterr().out
    assert f"  skipped: {summary}" in out.splitlines()
    assert cli.main(["datasets", "--config", config, "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)["datasets"]
    assert status["skipped"] == 8 and f"skipped: {summary}" in status["notes"]


# --------------------------------------------------------------------------- a small project

LAND_QUERY = "oxc1_tower_000 2 2 60 46\n"


@pytest.fixture
def land(tmp_path) -> Project:
    """An Oxford-layout dataset ``land`` (4 images, one query ``tower_1``), its PCA source
    ``solo`` (one image) and an empty folder dataset ``void``."""
    for i in range(4):
        plain_jpeg(tmp_path / "land" / "jpg" / f"tower_{i:03d}.jpg")
    plain_jpeg(tmp_path / "solo" / "only.jpg")
    (tmp_path / "void").mkdir()
    gt = tmp_path / "land" / "gt"
    gt.mkdir()
    (gt / "tower_1_query.txt").write_text(LAND_QUERY)
    (gt / "tower_1_good.txt").write_text("tower_001\ntower_002\n")
    (gt / "tower_1_ok.txt").write_text("")
    (gt / "tower_1_junk.txt").write_text("tower_003\n")
    _write_yaml(
        tmp_path,
        {
            "land": {
                "layout": "oxford",
                "images": "land/jpg",
                "groundtruth": "land/gt",
                "pca_from": "solo",
                "shard_by": "folder",
                "query_protocol": "crop",
            },
            "solo": {"layout": "folder", "images": "solo"},
            "void": {"layout": "folder", "images": "void"},
        },
    )
    return open_project(tmp_path)


def _query_features(project: Project, extractor: FeatureExtractor):
    ds = project.config.dataset("land")
    manifest, _ = build_manifest(ds, scan_files(ds))
    return compute_query_features(ds, manifest, extractor)


def test_ground_truth_naming_missing_images_fails_fast(land, extractor):
    assert _query_features(land, extractor).num_rows == 1  # the intact project works
    gt = land.config.dataset("land").groundtruth
    (gt / "tower_1_good.txt").write_text("tower_001\ntower_009\n")
    (gt / "tower_1_junk.txt").write_text("ghost_1\n")
    calls = []
    extractor_spy = _Spy(extractor, calls)
    with pytest.raises(ValueError) as info:
        _query_features(land, extractor_spy)
    message = str(info.value)
    assert message.startswith(f"{gt}: the ground truth of dataset 'land' names 2 image(s)")
    assert (
        "'ghost_1', 'tower_009'" in message and str(land.config.dataset("land").images) in message
    )
    assert calls == []  # failed before any forward pass


class _Spy:
    """An extractor that records every query it is asked to encode."""

    def __init__(self, extractor: FeatureExtractor, calls: list) -> None:
        self._extractor, self._calls = extractor, calls

    def extract_query(self, *args, **kwargs):
        self._calls.append(args)
        return self._extractor.extract_query(*args, **kwargs)


@pytest.mark.parametrize(
    ("query", "match"),
    [
        (
            "oxc1_tower_000 100 100 120 120\n",
            r"gt: query 'tower_1' \(image 'tower_000', 64x48 px\): box \(100\.0, 100\.0, 120\.0, "
            r"120\.0\) lies outside the image",
        ),
        ("oxc1_tower_000 10 10 10 30\n", r"tower_1_query\.txt:1: invalid box .*zero area"),
        ("oxc1_tower_000 10 30 20 30\n", r"tower_1_query\.txt:1: invalid box .*zero area"),
    ],
    ids=["outside", "zero-width", "zero-height"],
)
def test_query_box_outside_its_image_or_of_zero_area_fails_naming_the_query(
    land, extractor, query, match
):
    gt = land.config.dataset("land").groundtruth
    (gt / "tower_1_query.txt").write_text(query)
    with pytest.raises(ValueError, match=match):
        _query_features(land, extractor)
    # A box reaching past the border is clipped, not refused.
    (gt / "tower_1_query.txt").write_text("oxc1_tower_000 -10 -5 40 500\n")
    table = _query_features(land, extractor)
    assert table.column("bbox").to_pylist() == [[-10.0, -5.0, 40.0, 500.0]]


def test_empty_dataset_fails_naming_the_dataset_and_folder(land, tmp_path, monkeypatch, capsys):
    folder = re.escape(str(land.config.dataset("void").images))
    message = rf"dataset 'void' \(.*datasets\.yaml\) has no images under {folder} \(looked for"
    with pytest.raises(ValueError, match=message):
        land.index("void")
    with pytest.raises(ValueError, match=rf"dataset 'void' has no images under {folder}"):
        load_features(land.store, "void", [], land.config.dataset("void").images)
    # Files, but none readable: the message counts the rejected ones.
    store = FeatureStore(tmp_path / "warehouse")
    store.write_table(
        store.shard_path("cam_features", "void", "s"), feature_schema(8, 1280, 5).empty_table()
    )
    bad = [{"image_id": "x", "relpath": "x.jpg", "sha1": "0", "reason": "file is empty"}]
    rejected = pa.Table.from_pylist(bad * 2, schema=REJECTED_SCHEMA)
    store.write_table(store.shard_path("rejected", "void", "s"), rejected)
    with pytest.raises(ValueError, match=r"no readable images under .*2 image\(s\) rejected"):
        load_features(store, "void", ["s"], land.config.dataset("void").images)
    # From the command line: exit status 2, one line naming the dataset and the folder.
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    config = str(land.root / "datasets.yaml")
    assert cli.main(["index", "--dataset", "void", "--config", config, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"cw-pipeline: error: {message}", err[0]), err


def test_dataset_too_small_for_a_pca_fails_naming_it(land):
    land.index("solo")
    with pytest.raises(ValueError) as info:  # in-process runs re-raise the asset's error
        materialize(land, ["land/pca_model"])
    assert str(info.value) == (
        "dataset 'land': its PCA is learned on dataset 'solo', which has 1 image(s) with "
        "features; at least 2 are needed (a PCA needs two vectors and raw+PCA has one per "
        "image): add images to it, or take the PCA from a larger dataset (pca_from)"
    )


# --------------------------------------------------------------------------- configuration


def test_config_entry_with_an_unknown_layout_names_file_entry_and_line(tmp_path):
    (tmp_path / "fl").mkdir()
    path = tmp_path / "datasets.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            datasets:
              good:
                layout: folder
                images: fl
              typo:
                images: fl
                layout: oxfrod
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.source, err.line, err.entry) == (str(path), 7, "dataset 'typo'")
    assert str(err).startswith(f"{path}:7: dataset 'typo': unknown layout 'oxfrod' (expected")


def test_config_entry_with_a_missing_folder_names_file_entry_and_line(tmp_path):
    path = tmp_path / "datasets.yaml"
    path.write_text("datasets:\n  gone:\n    layout: folder\n    images: not/here\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:4: dataset 'gone': image folder not found: {tmp_path / 'not' / 'here'}"
    )
    # An optional entry is disabled instead, with the same reason.
    path.write_text(
        "datasets:\n  gone:\n    layout: folder\n    images: not/here\n    optional: true\n"
    )
    assert "image folder not found" in load_config(path).disabled_datasets["gone"]
