"""Tests for cw_pipeline.core.datasets (real ground truth read in place + synthetic cases)."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cw_pipeline.core.datasets import (
    GroundTruth,
    Query,
    TextDecodeError,
    UnsafePickleError,
    check_query_protocol,
    holidays_groundtruth,
    load_gnd_pickle,
    read_oxford_groundtruth,
    read_text_lines,
    scan_folder,
    scan_image_folder,
    skipped_summary,
    ukbench_groundtruth,
    ukbench_labels,
    validate_groundtruth,
)
from cw_pipeline.core.datasets import folder as folder_module
from cw_pipeline.core.evaluation import compute_map
from cw_pipeline_tests.badfiles import FifoWatch, fifo, unix_socket


class _NoGlobals(pickle.Unpickler):
    """Test-side loader for the raw pkls, which hold only lists, dicts, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise AssertionError(f"unexpected global {module}.{name}")


def _raw_pkl(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return _NoGlobals(fh).load()


# --------------------------------------------------------------------------------------------
# Oxford / Paris text files vs the official pkl
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["oxford5k", "paris6k"])
def test_text_ground_truth_matches_pickle_exactly(shared_data: Path, name: str) -> None:
    folder = shared_data / "groundtruth" / name
    raw = _raw_pkl(folder / f"gnd_{name}.pkl")
    from_pkl = load_gnd_pickle(folder / f"gnd_{name}.pkl")
    from_txt = read_oxford_groundtruth(folder, image_ids=raw["imlist"])

    assert len(from_txt.queries) == 55
    assert from_txt.dataset == name
    assert from_pkl.dataset == name
    assert not from_txt.revisited and not from_pkl.revisited
    assert from_txt.queries_in_database and from_pkl.queries_in_database
    assert from_txt.image_ids == from_pkl.image_ids == tuple(raw["imlist"])

    # query order
    assert [q.image_id for q in from_txt.queries] == raw["qimlist"]
    assert [q.image_id for q in from_pkl.queries] == raw["qimlist"]
    for qt, qp, g in zip(from_txt.queries, from_pkl.queries, raw["gnd"], strict=True):
        assert qt.bbox == qp.bbox == tuple(float(v) for v in g["bbx"])
        assert qt.positives == qp.positives
        assert qt.junk == qp.junk
        assert not qt.positives & qt.junk
        assert qt.image_id in qt.positives  # classic: the query image is a positive
    # index form equals the pickle's own index lists
    for entry, g in zip(from_txt.to_index_gnd(), raw["gnd"], strict=True):
        assert entry["ok"].tolist() == g["ok"]
        assert entry["junk"].tolist() == g["junk"]
        assert set(entry) == {"ok", "junk"}


def test_oxford_names_prefix_and_boxes(shared_data: Path) -> None:
    gt = read_oxford_groundtruth(shared_data / "groundtruth" / "oxford5k")
    q = gt.queries[0]
    assert q.name == "all_souls_1"
    assert q.image_id == "all_souls_000013"  # 'oxc1_' stripped
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert [x.name for x in gt.queries[:6]] == [
        "all_souls_1",
        "all_souls_2",
        "all_souls_3",
        "all_souls_4",
        "all_souls_5",
        "ashmolean_1",
    ]
    assert not any(x.image_id.startswith("oxc1_") for x in gt.queries)
    # without image_ids, the database is the sorted union of all names in the files
    assert list(gt.image_ids) == sorted(gt.image_ids)
    assert {x.image_id for x in gt.queries} <= set(gt.image_ids)
    for x in gt.queries:
        assert x.positives | x.junk <= set(gt.image_ids)


def test_paris_prefix_and_empty_good_files(shared_data: Path) -> None:
    folder = shared_data / "groundtruth" / "paris6k"
    gt = read_oxford_groundtruth(folder)
    assert gt.queries[0].name == "defense_1"
    assert gt.queries[0].image_id == "paris_defense_000605"
    assert all((folder / f"{q.name}_good.txt").stat().st_size == 0 for q in gt.queries)
    assert all(q.positives for q in gt.queries)


def test_duplicate_line_is_merged(shared_data: Path) -> None:
    folder = shared_data / "groundtruth" / "oxford5k"
    lines = (folder / "all_souls_1_good.txt").read_text().split()
    ok_lines = (folder / "all_souls_1_ok.txt").read_text().split()
    assert lines.count("all_souls_000091") == 2
    gt = read_oxford_groundtruth(folder)
    q = gt.queries[0]
    assert "all_souls_000091" in q.positives
    assert len(q.positives) == len(set(lines) | set(ok_lines)) == len(lines) + len(ok_lines) - 1


# --------------------------------------------------------------------------------------------
# revisited pkls
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_db"), [("roxford5k", 4993), ("rparis6k", 6322)])
def test_revisited_pickles(shared_data: Path, name: str, n_db: int) -> None:
    path = shared_data / "groundtruth" / "revisited" / f"gnd_{name}.pkl"
    raw = _raw_pkl(path)
    gt = load_gnd_pickle(path)
    assert gt.dataset == name
    assert gt.revisited
    assert not gt.queries_in_database
    assert len(gt.queries) == 70
    assert len(gt.image_ids) == n_db
    ids = set(gt.image_ids)
    assert not {q.image_id for q in gt.queries} & ids
    for q, g in zip(gt.queries, raw["gnd"], strict=True):
        assert q.easy == {raw["imlist"][i] for i in g["easy"]}
        assert q.hard == {raw["imlist"][i] for i in g["hard"]}
        assert q.junk == {raw["imlist"][i] for i in g["junk"]}
        assert q.positives == q.easy | q.hard
        assert q.bbox is not None and len(q.bbox) == 4
    index_gnd = gt.to_index_gnd()
    assert set(index_gnd[0]) == {"ok", "junk", "easy", "hard"}
    assert index_gnd[0]["easy"].tolist() == raw["gnd"][0]["easy"]


def test_revisited_oxford_specifics(shared_data: Path) -> None:
    gt = load_gnd_pickle(shared_data / "groundtruth" / "revisited" / "gnd_roxford5k.pkl")
    assert gt.queries[0].image_id == "all_souls_000013"
    assert gt.queries[0].bbox == (136.5, 34.1, 648.5, 955.7)
    assert sum(1 for q in gt.queries if not q.easy) == 2  # skipped by the Easy protocol


# --------------------------------------------------------------------------------------------
# pickle safety and format errors
# --------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, ("1 + 1",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_evil.pkl"
    payload = {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0], "junk": [], "x": None}]}
    payload["gnd"][0]["x"] = _Evil(marker)
    path.write_bytes(pickle.dumps(payload))  # pickling does not run __reduce__'s callable
    with pytest.raises(UnsafePickleError, match=r"gnd_evil\.pkl.*system"):
        load_gnd_pickle(path)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, ValueError)


def test_builtins_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gnd_eval.pkl"
    path.write_bytes(pickle.dumps({"imlist": [_EvalEvil()]}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refused .*builtin.*\.eval"):
        load_gnd_pickle(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_in_pickles_are_allowed(tmp_path: Path, protocol: int) -> None:
    payload = {
        "imlist": ["a", "b", "c", "q"],
        "qimlist": ["q"],
        "gnd": [
            {
                "bbx": np.array([1.0, 2.0, 3.5, 4.0]),
                "ok": np.array([0, 2], dtype=np.int64),
                "junk": np.array([np.int32(1)]),
            }
        ],
    }
    path = tmp_path / "gnd_tiny.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    gt = load_gnd_pickle(path)
    assert gt.dataset == "tiny"
    assert gt.queries == (Query("q", (1.0, 2.0, 3.5, 4.0), frozenset("ac"), frozenset("b")),)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([1, 2], "expected a dict"),
        ({"qimlist": [], "gnd": []}, "'imlist'"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": []}, "one entry per qimlist"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [3], "junk": []}]}, "index 3"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0]}]}, "lacks 'junk'"),
        ({"imlist": ["a", "a"], "qimlist": [], "gnd": []}, "duplicate image id 'a'"),
        (
            {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [1], "ok": [0], "junk": []}]},
            "4 numbers",
        ),
    ],
)
def test_malformed_pickles(tmp_path: Path, payload: Any, match: str) -> None:
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=match):
        load_gnd_pickle(path)


def test_missing_or_corrupt_pickle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gnd_none\.pkl"):
        load_gnd_pickle(tmp_path / "gnd_none.pkl")
    (tmp_path / "gnd_trunc.pkl").write_bytes(pickle.dumps({"imlist": ["a"]})[:-3])
    with pytest.raises(ValueError, match=r"gnd_trunc\.pkl"):
        load_gnd_pickle(tmp_path / "gnd_trunc.pkl")


# --------------------------------------------------------------------------------------------
# Oxford-format errors and ordering on synthetic folders
# --------------------------------------------------------------------------------------------


def _write_query(
    folder: Path, name: str, line: str, good: str = "", ok: str = "", junk: str = ""
) -> None:
    (folder / f"{name}_query.txt").write_text(line)
    (folder / f"{name}_good.txt").write_text(good)
    (folder / f"{name}_ok.txt").write_text(ok)
    (folder / f"{name}_junk.txt").write_text(junk)


def test_natural_query_order_and_union_database(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        _write_query(tmp_path, f"tower_{n}", f"oxc1_img{n} 0 0 5 5\n", good=f"p{n}\n", junk="j\n")
    gt = read_oxford_groundtruth(tmp_path, dataset="toy")
    assert gt.dataset == "toy"
    assert [q.name for q in gt.queries] == ["tower_1", "tower_2", "tower_10"]
    assert gt.image_ids == ("img1", "img10", "img2", "j", "p1", "p10", "p2")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("img 1 2 3\n", r"a_1_query\.txt:1"),
        ("\nimg 1 2 x 4\n", r"a_1_query\.txt:2: box coordinates"),
        ("img 5 0 1 1\n", r"a_1_query\.txt:1: invalid box"),
        ("img 0 0 1 1\nimg2 0 0 1 1\n", "exactly one query line"),
    ],
)
def test_malformed_query_lines(tmp_path: Path, line: str, match: str) -> None:
    _write_query(tmp_path, "a_1", line)
    with pytest.raises(ValueError, match=match):
        read_oxford_groundtruth(tmp_path)


def test_malformed_list_line_and_missing_files(tmp_path: Path) -> None:
    _write_query(tmp_path, "a_1", "img 0 0 1 1\n", ok="x\ny z\n")
    with pytest.raises(ValueError, match=r"a_1_ok\.txt:2"):
        read_oxford_groundtruth(tmp_path)
    (tmp_path / "a_1_ok.txt").write_text("x\n")
    (tmp_path / "a_1_junk.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"a_1_junk\.txt"):
        read_oxford_groundtruth(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_oxford_groundtruth(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no '\*_query\.txt'"):
        read_oxford_groundtruth(empty)


def test_positive_and_junk_overlap_is_an_error(tmp_path: Path) -> None:
    _write_query(tmp_path, "a_1", "img 0 0 1 1\n", good="x\n", junk="x\n")
    with pytest.raises(ValueError, match="'x' is also a positive"):
        read_oxford_groundtruth(tmp_path)


def test_duplicate_image_ids_are_refused(tmp_path: Path) -> None:
    _write_query(tmp_path, "a_1", "img 0 0 1 1\n")
    with pytest.raises(ValueError, match="duplicate image id 'img'"):
        read_oxford_groundtruth(tmp_path, image_ids=["img", "b", "img"])


# --------------------------------------------------------------------------------------------
# to_index_gnd / validate_groundtruth
# --------------------------------------------------------------------------------------------


def _toy_gt() -> GroundTruth:
    q = Query("q", None, frozenset({"q", "a", "gone"}), frozenset({"j"}), name="toy_1")
    return GroundTruth("toy", ("a", "j", "q", "b"), (q,), revisited=False, queries_in_database=True)


def test_to_index_gnd_strict_and_lenient() -> None:
    gt = _toy_gt()
    with pytest.raises(ValueError, match="'gone'"):
        gt.to_index_gnd()
    gnd = gt.to_index_gnd(strict=False)
    assert gnd[0]["ok"].tolist() == [0, 2]
    assert gnd[0]["junk"].tolist() == [1]
    assert gnd[0]["ok"].dtype == np.int64


def test_validate_groundtruth() -> None:
    gt = _toy_gt()
    warnings = validate_groundtruth(gt, ["a", "j", "q"])
    assert any("'b'" in w for w in warnings)  # database image missing
    assert any("gone" in w and "toy_1" in w for w in warnings)
    with pytest.raises(ValueError, match="query image 'q'"):
        validate_groundtruth(gt, ["a", "j", "b", "gone"])
    assert validate_groundtruth(gt, ["a", "j", "q", "b", "gone"]) == []


def test_validate_real_ground_truth(shared_data: Path) -> None:
    folder = shared_data / "groundtruth" / "oxford5k"
    gt = load_gnd_pickle(folder / "gnd_oxford5k.pkl")
    assert validate_groundtruth(read_oxford_groundtruth(folder), gt.image_ids) == []


def test_perfect_ranking_scores_one_on_real_ground_truth(shared_data: Path) -> None:
    gt = load_gnd_pickle(shared_data / "groundtruth" / "oxford5k" / "gnd_oxford5k.pkl")
    gnd = gt.to_index_gnd()
    n = len(gt.image_ids)
    # junk first, then positives, then the rest: junk is ignored so AP is still 1
    cols = [
        np.concatenate(
            [g["junk"], g["ok"], np.setdiff1d(np.arange(n), np.union1d(g["ok"], g["junk"]))]
        )
        for g in gnd
    ]
    assert compute_map(np.stack(cols, axis=1), gnd).map == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# UKBench / Holidays
# --------------------------------------------------------------------------------------------


def test_ukbench_labels_and_groundtruth() -> None:
    ids = [f"ukbench{i:05d}" for i in range(8)]
    assert ukbench_labels(ids).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ukbench_labels(["jpg/ukbench00123", "ukbench10199.jpg"]).tolist() == [30, 2549]
    gt = ukbench_groundtruth(ids)
    assert gt.dataset == "ukbench" and gt.queries_in_database and not gt.revisited
    assert len(gt.queries) == 8
    assert gt.queries[5].image_id == "ukbench00005"
    assert gt.queries[5].positives == {f"ukbench{i:05d}" for i in range(4, 8)}
    assert gt.queries[5].bbox is None and not gt.queries[5].junk
    with pytest.raises(ValueError, match="'holiday_01'"):
        ukbench_labels(["ukbench00001", "holiday_01"])
    with pytest.raises(ValueError, match="duplicate"):
        ukbench_groundtruth(["ukbench00001", "ukbench00001"])


def test_real_ukbench_folder(shared_data: Path) -> None:
    images = scan_image_folder(shared_data / "ukbench")
    assert len(images) == 600
    assert images[0] == ("jpg/ukbench00000", "jpg/ukbench00000.jpg")
    gt = ukbench_groundtruth([image_id for image_id, _ in images])
    assert all(len(q.positives) == 4 and q.image_id in q.positives for q in gt.queries)
    assert len(set(ukbench_labels(gt.image_ids).tolist())) == 150


def test_holidays_groundtruth() -> None:
    ids = ["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg"]
    gt = holidays_groundtruth(ids)
    assert gt.dataset == "holidays" and gt.queries_in_database
    assert [q.image_id for q in gt.queries] == ["100000.jpg", "100100.jpg"]
    q0 = gt.queries[0]
    assert q0.positives == {"100001.jpg", "100002.jpg"}
    assert q0.junk == {"100000.jpg"}
    gnd = gt.to_index_gnd()
    assert gnd[1]["ok"].tolist() == [4] and gnd[1]["junk"].tolist() == [3]
    with pytest.raises(ValueError, match="group 1001 has no query image 100100"):
        holidays_groundtruth(["100000", "100001", "100101"])
    with pytest.raises(ValueError, match="'12345'"):
        holidays_groundtruth(["12345"])


def test_query_protocols() -> None:
    assert check_query_protocol("paper") == "paper"
    assert check_query_protocol("crop") == "crop"
    with pytest.raises(ValueError, match="'box'"):
        check_query_protocol("box")


# --------------------------------------------------------------------------------------------
# scan_image_folder
# --------------------------------------------------------------------------------------------


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_scan_image_folder_tree(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for rel in [
        "b.JPG",
        "a.jpg",
        "sub dir/ünïcødé ü.png",
        "sub dir/.hidden.jpg",
        ".hiddendir/x.jpg",
        "notes.txt",
        "shard1/img.jpeg",
        "shard1/deep/z.TIFF",
        "c.webp",
    ]:
        _touch(root / rel)
    result = scan_image_folder(root)
    assert result == [
        ("a", "a.jpg"),
        ("b", "b.JPG"),
        ("c", "c.webp"),
        ("shard1/deep/z", "shard1/deep/z.TIFF"),
        ("shard1/img", "shard1/img.jpeg"),
        ("sub dir/ünïcødé ü", "sub dir/ünïcødé ü.png"),
    ]
    assert scan_image_folder(str(root), extensions=("PNG",)) == [
        ("sub dir/ünïcødé ü", "sub dir/ünïcødé ü.png")
    ]
    flat = scan_image_folder(root, flat=True)
    assert ("img", "shard1/img.jpeg") in flat


def test_scan_image_folder_duplicate_ids(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"'a'.*'a\.jpg' and 'a\.png'"):
        scan_image_folder(tmp_path)


def test_scan_image_folder_flat_duplicate_ids(tmp_path: Path) -> None:
    _touch(tmp_path / "x" / "a.jpg")
    _touch(tmp_path / "y" / "a.jpg")
    assert len(scan_image_folder(tmp_path)) == 2
    with pytest.raises(ValueError, match=r"'x/a\.jpg' and 'y/a\.jpg'"):
        scan_image_folder(tmp_path, flat=True)


def test_scan_image_folder_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root / "sub" / "a.jpg")
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)  # back to the root
    (root / "l1.jpg").symlink_to("l2.jpg")  # l1 -> l2 -> l1: unresolvable
    (root / "l2.jpg").symlink_to("l1.jpg")
    (root / "alias.jpg").symlink_to("sub/a.jpg")  # inside the root: kept
    assert scan_image_folder(root) == [("alias", "alias.jpg"), ("sub/a", "sub/a.jpg")]


def test_scan_image_folder_refuses_symlinks_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _touch(outside / "secret.jpg")
    root = tmp_path / "root"
    _touch(root / "a.jpg")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"escape.*outside"):
        scan_image_folder(root)
    (root / "escape").unlink()
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(ValueError, match=r"leak\.jpg.*outside"):
        scan_image_folder(root)


def test_scan_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    assert scan_image_folder(tmp_path) == []  # a plain empty folder: no images, no error


# --------------------------------------------------------------------------------------------
# errors that say where (issue 12)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["query", "good", "ok", "junk"])
def test_non_utf8_text_ground_truth_names_the_file_and_line(tmp_path: Path, kind: str) -> None:
    _write_query(tmp_path, "a_1", "img 0 0 5 5\n", good="p1\n", ok="p2\n", junk="j\n")
    path = tmp_path / f"a_1_{kind}.txt"
    path.write_bytes(path.read_bytes() + "caf\u00e9 0 0 5 5\n".encode("latin-1"))  # line 2
    with pytest.raises(TextDecodeError) as info:
        read_oxford_groundtruth(tmp_path)
    assert str(info.value).startswith(
        f"{path}:2: not UTF-8 text: byte 0xe9 at column 4 (invalid continuation byte)"
    )
    assert (info.value.source, info.value.line) == (str(path), 2)


def test_text_lines_keep_universal_newlines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n\xc3\xa9t\xc3\xa9")
    assert read_text_lines(path) == ["one", "two", "three", "\u00e9t\u00e9"]


_Q = {"imlist": ["a", "b"], "qimlist": ["a"]}


@pytest.mark.parametrize(
    ("gnd", "match"),
    [
        ({"bbx": [0, 0, "oops", 4], "ok": [1], "junk": []},
         r"gnd\[0\] \(query 'a'\) \['bbx'\]: could not convert string to float: 'oops'"),
        ({"bbx": {"x": 1}, "ok": [1], "junk": []}, r"gnd\[0\] \(query 'a'\) \['bbx'\]: "),
        ({"bbx": [[0, 0], [1]], "ok": [1], "junk": []}, r"gnd\[0\] \(query 'a'\) \['bbx'\]: "),
        ({"ok": [[0], [1, 1]], "junk": []}, r"gnd\[0\] \(query 'a'\) \['ok'\]: "),
        ({"ok": ["b"], "junk": []}, r"gnd\[0\] \(query 'a'\) \['ok'\]: holds non-integer"),
        ({"ok": [1], "junk": [float("nan")]}, r"gnd\[0\] \(query 'a'\) \['junk'\]: holds non-int"),
        ({"ok": [1], "junk": [7]}, r"gnd\[0\] \(query 'a'\) \['junk'\] index 7 out of range"),
    ],
)  # fmt: skip
def test_every_pickle_field_conversion_names_file_query_and_field(
    tmp_path: Path, gnd: dict, match: str
) -> None:
    path = tmp_path / "gnd_fields.pkl"
    path.write_bytes(pickle.dumps({**_Q, "gnd": [gnd]}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {match}"):
        load_gnd_pickle(path)


@pytest.mark.parametrize("value", [7, "ab", {"a": 1}])
def test_pickle_name_lists_must_be_lists(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "gnd_names.pkl"
    path.write_bytes(pickle.dumps({"imlist": value, "qimlist": [], "gnd": []}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: \['imlist'\] must be a list"):
        load_gnd_pickle(path)


def test_scan_folder_sorts_every_entry_into_candidates_or_skipped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for rel in [
        "a.jpg",
        "sub/b.png",
        "sub/anim.gif",
        "sub/STILL.GIF",
        "notes.txt",
        "LICENSE",
        ".DS_Store",
        ".cache/x.jpg",
        "back\\slash.jpg",
        "line\nbreak.jpg",
        "tab\there/c.jpg",
        "caf\udce9.jpg",
    ]:
        _touch(root / rel)
    fifo(root / "pipe.jpg")
    fifo(root / "pipe")
    unix_socket(root / "sub" / "sock.png")
    (root / "pipe-link.jpeg").symlink_to("pipe")
    (root / "broken.jpg").symlink_to("nowhere.jpg")
    with FifoWatch([root / "pipe.jpg", root / "pipe"]) as watch:
        scan = scan_folder(root)
    assert watch.opened == []
    errors = {f.relpath: f.error for f in scan.files}
    assert [f.relpath for f in scan.images] == ["a.jpg", "sub/b.png"]
    assert scan_image_folder(root) == [("a", "a.jpg"), ("sub/b", "sub/b.png")]
    expected_errors = {
        "back\\slash.jpg": r"back\\slash\.jpg': its name contains a backslash",
        "line\nbreak.jpg": r"line\\x0abreak\.jpg': its name contains the control character U\+000A",
        "tab\there/c.jpg": r"tab\\x09here/c\.jpg': .*control character U\+0009",
        "caf\udce9.jpg": r"caf\\xe9\.jpg': its name is not valid UTF-8",
        "pipe.jpg": r"pipe\.jpg': not a regular file \(FIFO\); only regular files are read",
        "pipe-link.jpeg": r"not a regular file \(FIFO, through a symlink\)",
        "sub/sock.png": r"sock\.png': not a regular file \(socket\)",
    }
    assert set(errors) == {"a.jpg", "sub/b.png", *expected_errors}
    for rel, pattern in expected_errors.items():
        assert errors[rel].startswith(f"cannot load image '{root}/"), errors[rel]
        assert re.search(pattern, errors[rel]), errors[rel]
    assert {s.relpath: s.reason for s in scan.skipped} == {
        ".DS_Store": "hidden name",
        ".cache": "hidden name",
        "LICENSE": "no extension",
        "broken.jpg": "broken or looping symlink",
        "notes.txt": "unsupported extension .txt",
        "pipe": "not a regular file (FIFO)",
        "sub/STILL.GIF": "unsupported extension .gif",
        "sub/anim.gif": "unsupported extension .gif",
    }
    assert skipped_summary(scan.skipped, names=3) == (
        "8 files (2 hidden name, 2 unsupported extension .gif, 1 broken or looping symlink, "
        "1 no extension, 1 not a regular file (FIFO), 1 unsupported extension .txt): "
        ".DS_Store, .cache, LICENSE and 5 more"
    )
    assert skipped_summary([]) == ""


def test_scan_folder_records_a_file_that_vanishes_after_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.jpg", "b.jpg", "c.txt"):
        _touch(tmp_path / name)
    real_scandir = os.scandir

    def listing_then_vanish(path: Any) -> Any:
        entries = list(real_scandir(path))
        for name in ("b.jpg", "c.txt"):
            (tmp_path / name).unlink()
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(folder_module.os, "scandir", listing_then_vanish)
    scan = scan_folder(tmp_path)
    assert [(f.relpath, f.error) for f in scan.files] == [
        ("a.jpg", None),
        (
            "b.jpg",
            f"cannot load image '{tmp_path / 'b.jpg'}': it vanished after the listing "
            "(No such file or directory)",
        ),
    ]
    assert [(s.relpath, s.reason) for s in scan.skipped] == [
        ("c.txt", "vanished or unreadable entry")
    ]
    # A sub-folder found, then gone before its own listing: skipped, named.
    _touch(tmp_path / "sub" / "d.jpg")

    def folder_vanishes(path: Any) -> Any:
        if Path(path) == tmp_path / "sub":
            (tmp_path / "sub").rename(tmp_path.parent / f"{tmp_path.name}-moved")
        return real_scandir(path)

    monkeypatch.setattr(folder_module.os, "scandir", folder_vanishes)
    scan = scan_folder(tmp_path)
    assert [f.relpath for f in scan.files] == ["a.jpg"]
    assert [(s.relpath, s.reason) for s in scan.skipped] == [
        ("sub", "folder vanished after the listing")
    ]
