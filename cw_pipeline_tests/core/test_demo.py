"""Tests for cw_pipeline.core.demo: the generated demo benchmark."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cw_pipeline.core.datasets import read_oxford_groundtruth, scan_image_folder
from cw_pipeline.core.demo import (
    DEMO_DATASETS,
    DEMO_VERSION,
    DemoRefusedError,
    demo_instances,
    generate_demo,
)
from cw_pipeline.core.demo import data as demo_data
from cw_pipeline.core.demo import render as demo_render

SMALL = {"size": 128, "n_distractors": 12}


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo at its default parameters, generated once for this module."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root)
    return root


def test_default_demo_counts_and_layout(demo_root: Path) -> None:
    info = generate_demo(demo_root)  # complete already: nothing written
    assert info.generated == ()
    assert set(info.datasets) == set(DEMO_DATASETS)
    a, b, d = (info.datasets[n] for n in DEMO_DATASETS)
    assert info.n_instances >= 12
    for half in (a, b):
        assert len(half.instances) >= 6
        assert half.n_queries == len(half.instances)
        assert half.n_images == len(half.instances) * (1 + 5 + 1)  # query, 5 views, junk
        assert half.images == demo_root / half.name / "jpg"
        assert half.groundtruth == demo_root / half.name / "gt"
        assert len(list(half.images.glob("*.jpg"))) == half.n_images
    assert d.n_images == 40 and d.groundtruth is None and d.instances == ()
    assert info.n_images == a.n_images + b.n_images + d.n_images
    for name in DEMO_DATASETS:  # nothing but the dataset folders is left under the root
        assert (demo_root / name / "manifest.json").is_file()
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(DEMO_DATASETS)


def test_images_are_real_jpegs_of_about_size(demo_root: Path) -> None:
    for name in DEMO_DATASETS:
        for path in sorted((demo_root / name / "jpg").glob("*.jpg")):
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert 0.75 * 320 - 1 <= max(img.size) <= 320
                assert min(img.size) >= 32
                arr = np.asarray(img, dtype=np.float64)
            assert arr.std() > 2.0, f"{path} is (almost) flat"


@pytest.mark.parametrize("half", ["demo-a", "demo-b"])
def test_oxford_reader_reads_each_half(demo_root: Path, half: str) -> None:
    images = demo_root / half / "jpg"
    ids = [image_id for image_id, _ in scan_image_folder(images)]
    gt = read_oxford_groundtruth(demo_root / half / "gt", image_ids=ids, dataset=half)
    instances = demo_instances()[half]
    assert [q.name for q in gt.queries] == sorted(f"{i}_1" for i in instances)
    assert gt.queries_in_database and not gt.revisited
    index = gt.to_index_gnd(strict=True)  # every listed name is a database image
    for q, entry in zip(gt.queries, index, strict=True):
        instance = q.name.removesuffix("_1")
        assert q.image_id == f"{instance}_000000"
        assert q.image_id in q.positives  # as in Oxford, the query image is a positive
        assert len(q.positives) == 1 + 5 and len(q.junk) == 1
        assert len(entry["ok"]) == 6
        own = {i for i in ids if i.startswith(f"{instance}_")}
        assert q.positives | q.junk == own  # every view of the instance is listed
        good = (demo_root / half / "gt" / f"{q.name}_good.txt").read_text().split()
        ok = (demo_root / half / "gt" / f"{q.name}_ok.txt").read_text().split()
        assert len(good) == 5 and len(ok) == 1 and set(good) | set(ok) == q.positives


@pytest.mark.parametrize("half", ["demo-a", "demo-b"])
def test_query_boxes_lie_inside_their_images(demo_root: Path, half: str) -> None:
    gt = read_oxford_groundtruth(demo_root / half / "gt")
    for q in gt.queries:
        assert q.bbox is not None
        with Image.open(demo_root / half / "jpg" / f"{q.image_id}.jpg") as img:
            width, height = img.size
        x1, y1, x2, y2 = q.bbox
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert (x2 - x1) * (y2 - y1) >= 0.25 * width * height  # the object is large
        line = (demo_root / half / "gt" / f"{q.name}_query.txt").read_text()
        assert line.startswith(f"oxc1_{q.image_id} ") and line.endswith("\n")


def test_halves_and_distractors_are_disjoint(demo_root: Path) -> None:
    names = {n: {p.stem for p in (demo_root / n / "jpg").glob("*.jpg")} for n in DEMO_DATASETS}
    a, b, d = (names[n] for n in DEMO_DATASETS)
    assert not (a & b) and not (a & d) and not (b & d)
    inst = demo_instances()
    assert not set(inst["demo-a"]) & set(inst["demo-b"])
    assert all(n.startswith("distractor_") for n in d)
    # the same bytes never appear twice anywhere
    digests = [hashlib.sha1(p.read_bytes()).digest() for p in demo_root.rglob("*.jpg")]
    assert len(digests) == len(set(digests))


def _overlap(p: tuple[float, ...], q: tuple[float, ...]) -> bool:
    return min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1])


def test_source_regions_never_overlap() -> None:
    """Instances sharing a photo use disjoint regions; distractors avoid every instance."""
    instances = [*demo_data.HALF_A, *demo_data.HALF_B]
    assert len({i.name for i in instances}) == len(instances) >= 12
    for i, p in enumerate(instances):
        x1, y1, x2, y2 = p.obj
        s1, t1, s2, t2 = p.scene
        assert s1 <= x1 < x2 <= s2 and t1 <= y1 < y2 <= t2, p.name
        for q in instances[i + 1 :]:
            sources = {p.source, p.alt_source} & {q.source, q.alt_source} - {None}
            assert not (sources and _overlap(p.scene, q.scene)), (p.name, q.name)
    used = {s for i in instances for s in (i.source, i.alt_source) if s}
    for source, region in demo_data.DISTRACTOR_REGIONS:
        if source in used:
            assert region is not None, source
            for inst in instances:
                if source in (inst.source, inst.alt_source):
                    assert not _overlap(region, inst.scene), (source, region, inst.name)


def test_generation_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    generate_demo(tmp_path / "one", seed=3, **SMALL)
    generate_demo(tmp_path / "two", seed=3, **SMALL)
    one, two = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert one == two
    assert len(one) > 100
    # datasets generated alone are identical to those generated together
    generate_demo(tmp_path / "alone", seed=3, only=["demo-b"], **SMALL)
    alone = _digests(tmp_path / "alone")
    assert alone == {k: v for k, v in one.items() if k.startswith("demo-b/")}
    # another seed changes the views (the same instances and names, though)
    generate_demo(tmp_path / "other", seed=4, **SMALL)
    other = _digests(tmp_path / "other")
    assert set(other) == set(one)
    changed = [k for k in one if k.endswith(".jpg") and one[k] != other[k]]
    assert len(changed) == sum(k.endswith(".jpg") for k in one)


def test_manifest_records_params_and_files(tmp_path: Path) -> None:
    generate_demo(tmp_path, seed=1, views=4, **SMALL)
    manifest = json.loads((tmp_path / "demo-a" / "manifest.json").read_text())
    assert manifest["params"] == {
        "version": DEMO_VERSION,
        "dataset": "demo-a",
        "seed": 1,
        "size": 128,
        "views": 4,
    }
    files = manifest["files"]
    for rel, entry in files.items():
        data = (tmp_path / "demo-a" / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}
    on_disk = {
        p.relative_to(tmp_path / "demo-a").as_posix()
        for p in (tmp_path / "demo-a").rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(files) == on_disk
    dm = json.loads((tmp_path / "demo-distractors" / "manifest.json").read_text())
    assert dm["params"]["n_distractors"] == 12 and "views" not in dm["params"]


def test_views_parameter(tmp_path: Path) -> None:
    info = generate_demo(tmp_path, views=7, only=["demo-a"], **SMALL)
    half = info.datasets["demo-a"]
    assert set(info.datasets) == {"demo-a"}
    assert half.n_images == len(half.instances) * (1 + 7 + 1)
    gt = read_oxford_groundtruth(half.groundtruth)
    q = gt.queries[0]
    ok = (half.groundtruth / f"{q.name}_ok.txt").read_text().split()
    assert len(q.positives) == 8 and len(ok) == 2


def test_rerun_is_a_noop_and_mismatch_regenerates(tmp_path: Path) -> None:
    first = generate_demo(tmp_path, seed=0, **SMALL)
    assert first.generated == DEMO_DATASETS
    before = _digests(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate_demo(tmp_path, seed=0, **SMALL)
    assert again.generated == ()
    assert again.datasets == {
        n: dataclasses.replace(d, generated=False, status="kept") for n, d in first.datasets.items()
    }
    assert _digests(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

    # other views: an existing folder is the user's data and is kept; with regenerate both
    # halves are rebuilt, the distractors (which do not use views) are kept
    assert generate_demo(tmp_path, seed=0, views=4, **SMALL).generated == ()
    assert _digests(tmp_path) == before
    changed = generate_demo(tmp_path, seed=0, views=4, regenerate=True, **SMALL)
    assert changed.generated == ("demo-a", "demo-b")
    after = _digests(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("demo-distractors/")} == {
        k: v for k, v in before.items() if k.startswith("demo-distractors/")
    }
    assert after != before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_DATASETS)  # no temp left

    assert {n: d.status for n, d in changed.datasets.items()} == {
        "demo-a": "regenerated",
        "demo-b": "regenerated",
        "demo-distractors": "kept",
    }

    # a deleted generated file is the user's choice: kept deleted, and regenerating is refused
    # (naming it), with nothing touched
    victim = next((tmp_path / "demo-b" / "jpg").glob("*.jpg"))
    data = victim.read_bytes()
    victim.unlink()
    assert generate_demo(tmp_path, seed=0, views=4, **SMALL).generated == ()
    assert not victim.exists()
    with pytest.raises(DemoRefusedError, match=f"missing: jpg/{victim.name}") as err:
        generate_demo(tmp_path, seed=0, views=5, regenerate=True, **SMALL)
    assert err.value.outcomes["demo-a"] == "regenerated"  # what would have been done
    assert err.value.outcomes["demo-distractors"] == "kept"
    assert not victim.exists() and _digests(tmp_path) == {
        k: v for k, v in after.items() if k != f"demo-b/jpg/{victim.name}"
    }
    victim.write_bytes(data)
    again = generate_demo(tmp_path, seed=0, views=4, regenerate=True, **SMALL)
    assert {d.status for d in again.datasets.values()} == {"kept"}
    assert _digests(tmp_path) == after


def test_user_changes_to_a_demo_folder_are_never_overwritten(tmp_path: Path) -> None:
    """Added, edited and deleted images survive every call; regenerate refuses, naming them."""
    generate_demo(tmp_path, seed=0, only=["demo-a"], **SMALL)
    jpg = tmp_path / "demo-a" / "jpg"
    added = jpg / "my_photo.jpg"
    added.write_bytes(b"mine")
    edited = sorted(jpg.glob("*.jpg"))[0]
    edited.write_bytes(edited.read_bytes()[:200])
    deleted = sorted(jpg.glob("*.jpg"))[-1]
    deleted.unlink()
    state = _digests(tmp_path)
    for kwargs in ({}, {"seed": 1}, {"views": 4}):
        info = generate_demo(tmp_path, only=["demo-a"], **{"seed": 0, **SMALL, **kwargs})
        assert info.generated == ()
        assert _digests(tmp_path) == state
    with pytest.raises(FileExistsError, match=r"added: jpg/my_photo\.jpg") as err:
        generate_demo(tmp_path, seed=0, only=["demo-a"], regenerate=True, **SMALL)
    assert f"edited: jpg/{edited.name}" in str(err.value)
    assert f"missing: jpg/{deleted.name}" in str(err.value)
    assert _digests(tmp_path) == state
    assert os.listdir(tmp_path) == ["demo-a"]  # no temporary folder left behind


@pytest.mark.parametrize("change", ["added", "same-size edit", "edit"])
def test_regenerate_compares_every_file_by_content(tmp_path: Path, change: str) -> None:
    """An added file alone, or an edit that keeps the size, makes the folder the user's:
    regenerate refuses, naming the file, with each folder's outcome, and touches nothing."""
    generate_demo(tmp_path, seed=0, only=["demo-a", "demo-b"], **SMALL)
    jpg = tmp_path / "demo-a" / "jpg"
    target = sorted(jpg.glob("*.jpg"))[0]
    if change == "added":
        target = jpg / "holiday.jpg"
        target.write_bytes(b"my own photo")
    else:
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data) if change == "same-size edit" else bytes(data[:-100]))
    kind = "added" if change == "added" else "edited"
    state = _digests(tmp_path)
    for params in ({}, {"views": 4}):
        with pytest.raises(DemoRefusedError) as err:
            generate_demo(
                tmp_path, seed=0, only=["demo-a", "demo-b"], regenerate=True, **{**SMALL, **params}
            )
        assert err.value.outcomes["demo-a"] == f"refused ({kind}: jpg/{target.name})"
        assert err.value.outcomes["demo-b"] == ("kept" if not params else "regenerated")
        assert f"demo-a: refused ({kind}: jpg/{target.name})" in str(err.value)
        assert _digests(tmp_path) == state
    # without regenerate, the folder is the user's and is kept as it is
    info = generate_demo(tmp_path, seed=0, only=["demo-a"], **SMALL)
    assert info.datasets["demo-a"].status == "kept" and _digests(tmp_path) == state


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_demo(tmp_path, seed=0, only=["demo-a"], **SMALL)
    before = _digests(tmp_path)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        generate_demo(tmp_path, seed=5, only=["demo-a"], regenerate=True, **SMALL)
    monkeypatch.undo()
    assert _digests(tmp_path) == before  # the old complete copy is still in place
    assert os.listdir(tmp_path) == ["demo-a"]


def test_foreign_folders_are_kept_and_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "demo-a").mkdir()
    (tmp_path / "demo-a" / "mine.txt").write_text("precious")
    assert generate_demo(tmp_path, only=["demo-a"], **SMALL).generated == ()
    with pytest.raises(FileExistsError, match=r"added: mine\.txt.*did not write"):
        generate_demo(tmp_path, only=["demo-a"], regenerate=True, **SMALL)
    assert (tmp_path / "demo-a" / "mine.txt").read_text() == "precious"
    assert os.listdir(tmp_path / "demo-a") == ["mine.txt"]
    (tmp_path / "demo-b").mkdir()  # an empty folder is fine
    assert generate_demo(tmp_path, only=["demo-b"], **SMALL).generated == ("demo-b",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"views": 3}, "views must be >= 4"),
        ({"size": 10}, "size must be in"),
        ({"n_distractors": -1}, "n_distractors"),
        ({"only": ["demo-c"]}, "unknown demo dataset"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_sources_are_bundled_files_read_without_network() -> None:
    for key in demo_data.SOURCE_FILES:
        assert demo_render._package_file(*demo_data.SOURCE_FILES[key]).is_file()
    arr = demo_render._source_array("lfw2")
    assert arr.shape == (100, 100, 3) and arr.dtype == np.uint8 and not arr.flags.writeable
    with pytest.raises(FileNotFoundError, match="needs the installed package"):
        demo_render._package_file("no_such_package_xyz", "a.png")


@pytest.mark.parametrize("kind", ["good", "ok"])
def test_clutter_sets_the_view_into_a_smaller_region_of_a_background(kind: str) -> None:
    """A composited view keeps its frame size; the object shrinks into a background region."""
    view = Image.new("RGB", (200, 150), (255, 0, 255))  # magenta: in no source photo
    cfg = demo_data.CLUTTER[kind]
    composited = 0
    for k in range(20):
        out = demo_render._clutter(np.random.default_rng(k), view, kind)  # type: ignore[arg-type]
        assert out.size == view.size
        magenta = np.all(np.asarray(out) == (255, 0, 255), axis=2)
        if magenta.all():
            continue  # not composited this time (p < 1 for good views)
        composited += 1
        ys, xs = np.nonzero(magenta)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert cfg.scale[0] * 200 - 2 <= w <= cfg.scale[1] * 200 + 2
        assert cfg.scale[0] * 150 - 2 <= h <= cfg.scale[1] * 150 + 2
        assert magenta.mean() < cfg.scale[1] ** 2 + 0.01  # the rest is background
    assert composited >= (20 if cfg.p == 1.0 else 3)


def test_query_views_are_never_cluttered() -> None:
    view = Image.new("RGB", (64, 48), (255, 0, 255))
    out = demo_render._clutter(np.random.default_rng(0), view, "query")
    assert out is view
