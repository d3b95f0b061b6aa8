"""`cw-pipeline evaluate` end to end on the real UKBench-600 images, and its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cw_pipeline.cli import main


@pytest.fixture(scope="module")
def ukbench_result(shared_data: Path) -> dict:
    """One run: raw sum-pooling, CAM OfA (N_C=64, PCA from the other half), OfA + QE."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    args = [
        "evaluate",
        "--layout",
        "ukbench",
        "--images",
        str(shared_data / "ukbench" / "jpg"),
        "--pca-split",
        "--json",
        "--method",
        "raw",
        "--method",
        "ofa",
        "--method",
        "ofa+qe2",
    ]
    with redirect_stdout(buf):
        assert main(args) == 0
    return json.loads(buf.getvalue())


def test_evaluate_json_has_the_documented_keys(ukbench_result: dict) -> None:
    for key in ("dataset", "images", "method", "ns_score", "map", "seconds"):
        assert key in ukbench_result
    assert ukbench_result["dataset"] == "ukbench"
    assert ukbench_result["images"] == 600
    assert ukbench_result["method"] == "raw"
    assert [r["method"] for r in ukbench_result["results"]] == ["raw", "ofa", "ofa+qe2"]


def test_every_method_meets_the_floors(ukbench_result: dict) -> None:
    for r in ukbench_result["results"]:
        assert r["ns_score"] >= 3.80, r
        assert r["map"] >= 0.95, r
        assert len(r["halves"]) == 2  # each half evaluated with PCA from the other


def test_default_cam_configuration_reaches_3_90(ukbench_result: dict) -> None:
    ofa = next(r for r in ukbench_result["results"] if r["method"] == "ofa")
    assert ofa["ns_score"] >= 3.90, ofa
    qe = next(r for r in ukbench_result["results"] if r["method"] == "ofa+qe2")
    assert qe["ns_score"] >= ofa["ns_score"] - 0.01


def test_pca_split_halves_are_reported_and_averaged(ukbench_result: dict) -> None:
    ofa = next(r for r in ukbench_result["results"] if r["method"] == "ofa")
    mean = sum(h["ns_score"] for h in ofa["halves"]) / 2
    assert ofa["ns_score"] == pytest.approx(mean, abs=1e-4)


def test_pca_methods_need_a_training_set(tmp_path: Path, capsys, shared_data: Path) -> None:
    code = main(
        [
            "evaluate",
            "--layout",
            "ukbench",
            "--images",
            str(shared_data / "ukbench" / "jpg"),
            "--method",
            "ofa",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "training set" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_folder_is_one_readable_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    code = main(["evaluate", "--layout", "ukbench", "--images", str(missing), "--method", "raw"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and len(err.splitlines()) == 1


def test_pca_split_needs_groups(tmp_path: Path, capsys, shared_data: Path) -> None:
    gt = shared_data / "groundtruth" / "oxford5k"
    (tmp_path / "img").mkdir()
    code = main(
        [
            "evaluate",
            "--layout",
            "oxford",
            "--images",
            str(tmp_path / "img"),
            "--groundtruth",
            str(gt),
            "--pca-split",
            "--method",
            "raw",
        ]
    )
    assert code == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------ errors found early (issue 12)


@pytest.fixture
def no_forward_pass(monkeypatch):
    """Fail the test if ``evaluate`` builds a network or extracts a feature."""
    import torch

    from cw_pipeline.cli import evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(evaluate, "FeatureExtractor", refuse)
    monkeypatch.setattr(evaluate, "extract_features", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _small_ukbench(tmp_path: Path, shared_data: Path) -> Path:
    import shutil

    folder = tmp_path / "uk"
    folder.mkdir()
    for i in range(8):
        name = f"ukbench{i:05d}.jpg"
        shutil.copyfile(shared_data / "ukbench" / "jpg" / name, folder / name)
    return folder


def _bad_text_gt(tmp_path: Path) -> Path:
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a_1_query.txt").write_text("img 0 0 5 5\n")
    (gt / "a_1_good.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (gt / "a_1_ok.txt").write_text("")
    (gt / "a_1_junk.txt").write_text("")
    return gt


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("pca_missing", "--pca-from folder not found: {tmp}/nope"),
        ("pca_empty", "no images under --pca-from {tmp}/empty"),
        ("pca_file", "--pca-from is not a folder: {tmp}/file.txt"),
        ("device_cuda", "device 'cuda' requested but CUDA is not available"),
        ("device_mps", "device 'mps' requested but MPS (Apple GPU) is not available"),
        ("device_bad", "invalid device 'gpu0'"),
        ("gt_missing", "ground-truth folder not found: {tmp}/no-gt"),
        ("gt_pickle_missing", "ground-truth pickle not found: {tmp}/gnd_none.pkl"),
        ("gt_not_utf8", "{tmp}/gt/a_1_good.txt:1: not UTF-8 text: byte 0xe9"),
    ],
)
def test_evaluate_checks_every_input_before_any_forward_pass(
    tmp_path: Path, capsys, shared_data: Path, no_forward_pass, case: str, expected: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    images = _small_ukbench(tmp_path, shared_data)
    args = ["evaluate", "--layout", "ukbench", "--images", str(images), "--method", "ofa"]
    args += {
        "pca_missing": ["--pca-from", str(tmp_path / "nope")],
        "pca_empty": ["--pca-from", str(tmp_path / "empty")],
        "pca_file": ["--pca-from", str(tmp_path / "file.txt")],
        "device_cuda": ["--pca-split", "--device", "cuda"],
        "device_mps": ["--pca-split", "--device", "mps"],
        "device_bad": ["--pca-split", "--device", "gpu0"],
        "gt_missing": ["--pca-from", str(images)],
        "gt_pickle_missing": ["--pca-from", str(images)],
        "gt_not_utf8": ["--pca-from", str(images)],
    }[case]
    if case.startswith("gt_"):
        args[2] = "gnd" if case == "gt_pickle_missing" else "oxford"
        gt = {"gt_missing": "no-gt", "gt_pickle_missing": "gnd_none.pkl", "gt_not_utf8": "gt"}
        if case == "gt_not_utf8":
            _bad_text_gt(tmp_path)
        args += ["--groundtruth", str(tmp_path / gt[case])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("cw-pipeline: error: ") and "Traceback" not in err
    assert expected.format(tmp=tmp_path) in err, err


def test_index_with_an_unavailable_device_is_one_line_and_status_2(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CW_PIPELINE_CONFIG", "unused")  # _pipeline sets it; restored after
    monkeypatch.delenv("CW_PIPELINE_DEVICE", raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "fl").mkdir()
    config = tmp_path / "datasets.yaml"
    config.write_text("datasets:\n  fl:\n    layout: folder\n    images: fl\n    device: cuda\n")
    assert main(["index", "--dataset", "fl", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"cw-pipeline: error: {config}: dataset 'fl': device 'cuda' requested but CUDA is not "
        f"available on this machine (torch {torch.__version__}, "
        f"{'built without CUDA' if torch.version.cuda is None else 'no CUDA GPU found'}); use "
        "cpu (or set $CW_PIPELINE_DEVICE=cpu for this process)"
    )
    monkeypatch.setenv("CW_PIPELINE_DEVICE", "mps:x")
    assert main(["index", "--dataset", "fl", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cw-pipeline: error: $CW_PIPELINE_DEVICE: invalid device 'mps:x'")
    assert len(err.strip().splitlines()) == 1


def test_qe_and_rerank_apply_to_every_method() -> None:
    """``evaluate --method ofa --qe 2`` runs ofa+qe2 (it silently ran plain ofa)."""
    from cw_pipeline.cli import build_parser
    from cw_pipeline.cli.evaluate import _methods

    def parsed(*extra: str) -> list[str]:
        args = build_parser().parse_args(
            ["evaluate", "--layout", "ukbench", "--images", "x", *extra]
        )
        return [m.name for m in _methods(args)]

    assert parsed("--method", "ofa", "--qe", "2") == ["ofa+qe2"]
    assert parsed("--method", "raw", "--method", "ona+qe5", "--rerank", "3") == [
        "raw+r3",
        "ona+r3+qe5",
    ]
    assert parsed("--qe", "4") == ["ofa+qe4"]
    assert parsed("--method", "ofa+qe10") == ["ofa+qe10"]


def test_oxford_ground_truth_naming_missing_images_is_refused(tmp_path: Path) -> None:
    """As the pipeline: missing positives are not dropped (that scored AP 1.0 for 0.9359)."""
    from PIL import Image

    from cw_pipeline.core.runner import load_benchmark

    images, gt = tmp_path / "jpg", tmp_path / "gt"
    images.mkdir()
    gt.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (32, 32)).save(images / f"{name}.jpg")
    (gt / "tower_1_query.txt").write_text("oxc1_a 0 0 10 10\n")
    (gt / "tower_1_good.txt").write_text("b\ngone\n")
    (gt / "tower_1_ok.txt").write_text("")
    (gt / "tower_1_junk.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="gone"):
        load_benchmark("oxford", images, gt)
