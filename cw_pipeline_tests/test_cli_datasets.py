"""`cw-pipeline datasets`: configured datasets, images indexed, and the state of their index."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from cw_pipeline.cli import main
from cw_pipeline_tests.cli_project import CliProject
from cw_pipeline_tests.defs.project import synthetic_jpeg, truncated_jpeg


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def states(capsys, config: Path) -> dict[str, dict]:
    code, out, err = run(capsys, "datasets", "--config", str(config), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["config"] == str(config)
    return {d["name"]: d for d in data["datasets"]}


# --------------------------------------------------------------------------- indexed project


def test_states_of_an_indexed_project(capsys, cli_project: CliProject) -> None:
    got = states(capsys, cli_project.config_path)
    assert sorted(got) == ["alpha", "beta", "delta", "epsilon", "gamma", "ukb"]
    for name, n in (("alpha", 48), ("beta", 48), ("ukb", 16)):
        d = got[name]
        assert d["state"] == "indexed", d
        assert d["images_on_disk"] == d["images_indexed"] == d["descriptor_images"] == n
        assert d["pca"] is True and d["descriptors"] is True
        assert d["hint"] == "" and d["rejected"] == 0
    assert got["alpha"]["shards_on_disk"] == got["alpha"]["shards_indexed"] == 3
    gamma = got["gamma"]
    assert gamma["state"] == "indexed" and gamma["images_indexed"] == 12
    assert gamma["pca"] is None and gamma["distractor_of"] == ["beta-gamma"]
    # how gamma's descriptors follow a change of beta's PCA, and why (the test project has
    # reproject_at_once 0: a set handled as a 100k one would be)
    assert gamma["refreshes"] == [
        "distractors of beta-gamma: re-projected after the cron tick '0 3 * * *' of "
        "beta-gamma's schedule when beta's PCA changes (12 images > reproject_at_once 0; its "
        "rankings wait)"
    ]
    delta = got["delta"]
    assert delta["state"] == "indexed" and delta["descriptors"] is False
    eps = got["epsilon"]
    assert eps["state"] == "not indexed"
    assert eps["images_on_disk"] == 2 and eps["images_indexed"] == 0
    assert eps["hint"] == f"cw-pipeline index --dataset epsilon --config {cli_project.config_path}"
    assert eps["folder"] == str(cli_project.root / "epsilon" / "jpg")


def test_human_table(capsys, cli_project: CliProject) -> None:
    code, out, err = run(capsys, "datasets", "--config", str(cli_project.config_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["dataset", "layout", "state"]
    rows = {line.split()[0]: line for line in lines[1:7]}
    assert rows["alpha"].split()[:6] == ["alpha", "oxford", "indexed", "48", "48", "0"]
    assert "yes (beta-gamma)" in rows["gamma"]
    assert "  distractors of beta-gamma: re-projected after the cron tick '0 3 * * *'" in out
    assert rows["epsilon"].split()[:6] == ["epsilon", "folder", "not", "indexed", "2", "0"]
    assert f"  run: cw-pipeline index --dataset epsilon --config {cli_project.config_path}" in lines


def test_a_missing_config_is_one_line(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "datasets", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and out == ""
    expected = f"cw-pipeline: error: {tmp_path / 'none.yaml'}: config file not found"
    assert err.strip().splitlines() == [expected]


# --------------------------------------------------------------------------- a dataset's life


def tiny_project(root: Path) -> Path:
    """One folder dataset in two sub-folders (shards ``a`` and ``b``) of two images each."""
    for k, sub in enumerate("ab"):
        for i in range(2):
            synthetic_jpeg(root / "tiny" / sub / f"{i}.jpg", seed=3000 + 10 * k + i)
    config = {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": {"resize": "fixed:160x160", "stored_classes": 16, "num_threads": 1},
        "datasets": {"tiny": {"layout": "folder", "images": "tiny", "shard_by": "folder"}},
        "methods": ["raw"],
        "search": {"n_pca": 4, "aggregated_classes": 16},
    }
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_states_before_and_after_indexing_and_after_changes(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    cfg = tiny_project(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.delenv("CW_PIPELINE_CONFIG", raising=False)  # cmd_index sets it: undone after
    images = tmp_path / "tiny"

    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "not indexed" and tiny["images_on_disk"] == 4
    assert (
        tiny["images_indexed"] == 0
        and tiny["hint"] == f"cw-pipeline index --dataset tiny --config {cfg}"
    )

    # Indexing from a terminal draws a progress bar (and keeps Dagster's run log quiet).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "index", "--dataset", "tiny", "--config", str(cfg), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 4
    # a folder dataset used by nothing: nothing refreshed, nothing left to automation
    assert (result["refreshed"], result["pending"]) == ([], [])
    assert result["daemon"] == "not running"
    assert result["see"][0].startswith("the Runs page of the Dagster UI")
    assert "tiny features" in err and "4/4" in err and "img/s" in err
    assert "RUN_START" not in err

    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "indexed", tiny
    assert tiny["images_indexed"] == 4 and tiny["shards_indexed"] == tiny["shards_on_disk"] == 2
    assert tiny["hint"] == "" and tiny["pca"] is None

    # A file added to an indexed shard: stale. A new shard alone would be "partial".
    synthetic_jpeg(images / "a" / "2.jpg", seed=3100)
    synthetic_jpeg(images / "c" / "0.jpg", seed=3101)
    truncated_jpeg(images / "c" / "1.jpg", seed=3102)
    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "stale", tiny
    assert tiny["changed_shards"] == ["a"] and tiny["new_shards"] == ["c"]
    assert tiny["images_on_disk"] == 7 and tiny["images_indexed"] == 4
    assert tiny["hint"].startswith("cw-pipeline index --dataset tiny")

    # --quiet: no bar, even on a terminal. Shards a (2 reused, 1 new) and c (1 new, 1 bad).
    code, out, err = run(capsys, "index", "--dataset", "tiny", "--config", str(cfg), "--quiet")
    assert code == 0, err
    assert "img/s" not in err and "RUN_START" not in err
    assert out.startswith("tiny: 3 shards, 6 images; 2 forward passes, 2 reused, 1 rejected")
    assert out.splitlines()[1] == "  nothing else is stale"

    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "indexed", tiny
    assert (tiny["images_on_disk"], tiny["images_indexed"], tiny["rejected"]) == (7, 6, 1)

    synthetic_jpeg(images / "d" / "0.jpg", seed=3103)
    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "partial" and tiny["new_shards"] == ["d"], tiny

    # Other extraction settings: every indexed shard is stale.
    text = cfg.read_text().replace("fixed:160x160", "fixed:128x128")
    cfg.write_text(text)
    tiny = states(capsys, cfg)["tiny"]
    assert tiny["state"] == "stale" and tiny["changed_shards"] == ["a", "b", "c"], tiny
    assert any("extraction settings" in n for n in tiny["notes"])


@pytest.mark.parametrize("name", ["omega", "Tiny"])
def test_index_of_an_unknown_dataset_lists_the_known_ones(
    capsys, monkeypatch, tmp_path: Path, name: str
) -> None:
    cfg = tiny_project(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("CW_PIPELINE_CONFIG", str(cfg))
    code, out, err = run(capsys, "index", "--dataset", name, "--config", str(cfg))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"cw-pipeline: error: {cfg}: unknown dataset {name!r} (known: tiny)"
    ]


def test_a_large_distractor_set_waits_for_the_cron_and_says_so() -> None:
    from cw_pipeline.compute.catalog import _reprojection
    from cw_pipeline.config import EvaluationConfig

    ev = EvaluationConfig(
        name="oxford105k", dataset="oxford5k", distractors=("flickr100k",), schedule="0 3 * * 0"
    )
    assert _reprojection(ev, "flickr100k", 100_000) == (
        "distractors of oxford105k: re-projected after the cron tick '0 3 * * 0' of "
        "oxford105k's schedule when oxford5k's PCA changes (100,000 images > "
        "reproject_at_once 20,000; its rankings wait)"
    )
    small = ev.model_copy(update={"reproject_at_once": 100_000})
    assert "re-projected at once" in _reprojection(small, "flickr100k", 100_000)
