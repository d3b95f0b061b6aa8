"""Self-split datasets grown one object or one image at a time, from the smallest that
loads: every size either indexes, evaluates and searches, or `cw-pipeline index` says in one
line why it cannot (the dataset, its group sizes, the limit). The two halves' PCA models keep
the components both have (issue 21)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cw_pipeline.cli import main
from cw_pipeline.compute.pca import pca_models_for
from cw_pipeline.config import load_config
from cw_pipeline.store import FeatureStore, report_path

CONFIG = """\
warehouse: warehouse
reports: reports
defaults:
  resize: "fixed:160x160"
datasets:
  grow:
    layout: {layout}
    images: grow/jpg
    pca_from: self-split
"""


def _objects(demo: Path) -> list[list[Path]]:
    """Demo views grouped by object, 4 views each."""
    views = sorted((demo / "demo-b" / "jpg").glob("*.jpg"))
    names = sorted({p.stem.rsplit("_", 1)[0] for p in views})
    groups = [[p for p in views if p.stem.startswith(f"{n}_")][:4] for n in names]
    return [g for g in groups if len(g) == 4]


#: (layout, the images added at each step as (object, view), the error each step gives or
#: None). UKBench grows one object (4 views) at a time; Holidays one image at a time.
GROWTH = {
    "ukbench": [
        ([(0, v) for v in range(4)], r"has 1 object\(s\) \(4 image\(s\)\); at least 2 are needed"),
        ([(1, v) for v in range(4)], None),
        ([(2, v) for v in range(4)], None),
        ([(3, v) for v in range(4)], None),
    ],
    "holidays": [
        ([(0, 0)], r"has 1 object\(s\) \(1 image\(s\)\); at least 2 are needed"),
        ([(0, 1)], r"has 1 object\(s\) \(2 image\(s\)\); at least 2 are needed"),
        (
            [(1, 0)],
            r"half 2 of its objects \(self-split; halves of 1 and 2 images\), which has "
            r"1 image\(s\) with features; at least 2 are needed",
        ),
        ([(1, 1)], None),
        ([(2, 0)], None),
        ([(2, 1)], None),
        ([(3, 0)], None),
    ],
}


def _name(layout: str, obj: int, view: int) -> str:
    if layout == "ukbench":
        return f"ukbench{4 * obj + view:05d}.jpg"
    return f"{1000 + obj}{view:02d}.jpg"  # Holidays: group, then 00 for its query


@pytest.mark.parametrize("layout", sorted(GROWTH))
def test_a_self_split_dataset_grows_from_the_smallest_size(
    tmp_path: Path, demo_source, capsys, layout: str
) -> None:
    objects = _objects(demo_source)
    root = tmp_path / "project"
    jpg = root / "grow" / "jpg"
    jpg.mkdir(parents=True)
    config_path = root / "datasets.yaml"
    config_path.write_text(CONFIG.format(layout=layout), encoding="utf-8")
    cfg = ["--config", str(config_path)]
    for step, (added, refused) in enumerate(GROWTH[layout]):
        for obj, view in added:
            shutil.copy2(objects[obj][view], jpg / _name(layout, obj, view))
        code = main(["index", "--dataset", "grow", *cfg])
        out, err = capsys.readouterr()
        if refused is not None:
            assert code == 2, (step, out, err)
            (line,) = [x for x in err.splitlines() if x.startswith("cw-pipeline: error:")]
            assert "'grow'" in line and re.search(refused, line), line
            continue
        assert code == 0, (step, err)
        config = load_config(config_path)
        store = FeatureStore(config.warehouse)
        halves = [pca_models_for(store, config.dataset("grow"), h) for h in (1, 2)]
        for space in halves[0]:
            assert halves[0][space].output_dim == halves[1][space].output_dim, (step, space)
        fitted = {m.metadata.get("components_fitted") for h in halves for m in h.values()}
        assert None not in fitted  # what the agreement cost is recorded
        report = Path(config.reports) / report_path("grow", "report.json")
        assert json.loads(report.read_text(encoding="utf-8"))["results"], step
        query = jpg / _name(layout, 0, 0)
        for method in ("ofa", "raw+pca"):
            argv = ["search", str(query), "--dataset", "grow", "--method", method, *cfg]
            code = main([*argv, "--json"])
            out, err = capsys.readouterr()
            assert code == 0, (step, method, err)
            assert json.loads(out)["results"], (step, method)


PAIRED = """\
warehouse: warehouse
reports: reports
defaults:
  resize: "fixed:160x160"
datasets:
  oxf:
    layout: oxford
    images: oxf/jpg
    groundtruth: oxf/gt
    pca_from: src
  src:
    layout: folder
    images: src/jpg
"""


def test_a_dataset_and_its_pca_source_grow_one_image_at_a_time(
    tmp_path: Path, demo_source, capsys
) -> None:
    """An Oxford-layout dataset (every image its ground truth names, the smallest that
    loads, then one unlabelled image more per step) whose PCA is learned on a folder dataset
    grown from one image: one image cannot train a PCA (one line naming both datasets, the
    count and the limit); from two on, both index and search."""
    root = tmp_path / "project"
    shutil.copytree(demo_source / "demo-a" / "gt", root / "oxf" / "gt")
    shutil.copytree(demo_source / "demo-a" / "jpg", root / "oxf" / "jpg")
    (root / "src" / "jpg").mkdir(parents=True)
    config_path = root / "datasets.yaml"
    config_path.write_text(PAIRED, encoding="utf-8")
    cfg = ["--config", str(config_path)]
    extra = sorted((demo_source / "demo-b" / "jpg").glob("*.jpg"))
    for step in range(1, 4):
        shutil.copy2(extra[step], root / "src" / "jpg" / f"s{step}.jpg")
        if step > 1:
            shutil.copy2(extra[20 + step], root / "oxf" / "jpg" / f"unlabelled_{step}.jpg")
        if step == 1:  # src is indexed, then the refresh of what depends on it says why not
            code = main(["index", "--dataset", "src", *cfg])
            out, err = capsys.readouterr()
            assert code == 2, (out, err)
            assert main(["index", "--dataset", "oxf", *cfg]) == 0  # its features
            capsys.readouterr()
            query = root / "oxf" / "jpg" / "astronaut_000000.jpg"
            assert main(["search", str(query), "--dataset", "oxf", *cfg]) == 2
            err += capsys.readouterr().err  # and a search of it says why, too
            lines = [x for x in err.splitlines() if x.startswith("cw-pipeline: error:")]
            assert len(lines) == 2, err
            for line in lines:
                assert "dataset 'oxf': its PCA is learned on dataset 'src', which has 1 " in line
                assert "at least 2 are needed" in line
            continue
        assert main(["index", "--dataset", "src", *cfg]) == 0, capsys.readouterr().err
        code = main(["index", "--dataset", "oxf", *cfg])
        out, err = capsys.readouterr()
        assert code == 0, (step, err)
        query = root / "oxf" / "jpg" / "astronaut_000000.jpg"
        for dataset, method in (("oxf", "ofa"), ("oxf", "raw+pca"), ("src", "raw")):
            argv = ["search", str(query), "--dataset", dataset, "--method", method, *cfg]
            assert main([*argv, "--json"]) == 0, (step, dataset, method)
            hits = json.loads(capsys.readouterr().out)["results"]
            assert len(hits) == min(10, 48 + step - 1 if dataset == "oxf" else step)
