"""A self-split dataset that grows one object at a time indexes, evaluates and searches at
every size: the two halves' PCA models keep the components both have (issue 21)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cw_pipeline.cli import main
from cw_pipeline.compute.pca import pca_models_for
from cw_pipeline.runs import refresh
from cw_pipeline.store import report_path
from cw_pipeline_tests.defs.project import open_project

CONFIG = """\
warehouse: warehouse
reports: reports
defaults:
  resize: "fixed:160x160"
datasets:
  grow:
    layout: ukbench
    images: grow/jpg
    pca_from: self-split
"""


def _objects(demo: Path) -> list[list[Path]]:
    """Demo views grouped by object, 4 views each."""
    views = sorted((demo / "demo-b" / "jpg").glob("*.jpg"))
    names = sorted({p.stem.rsplit("_", 1)[0] for p in views})
    groups = [[p for p in views if p.stem.startswith(f"{n}_")][:4] for n in names]
    return [g for g in groups if len(g) == 4]


def test_a_self_split_dataset_grows_one_object_at_a_time(tmp_path: Path, demo_source, capsys):
    objects = _objects(demo_source)
    assert len(objects) >= 6
    root = tmp_path / "project"
    jpg = root / "grow" / "jpg"
    jpg.mkdir(parents=True)
    config_path = root / "datasets.yaml"
    config_path.write_text(CONFIG, encoding="utf-8")
    n = 0
    for count in range(4, 7):  # 16 images (the smallest with a usable PCA) to 24
        while n < 4 * count:
            shutil.copy2(objects[n // 4][n % 4], jpg / f"ukbench{n:05d}.jpg")
            n += 1
        project = open_project(root)
        project.index("grow")
        done = refresh(project.defs, project.instance)
        assert "grow/map_report" in done, (count, done)
        store = project.store
        halves = [pca_models_for(store, project.config.dataset("grow"), h) for h in (1, 2)]
        for space in halves[0]:
            one, two = halves[0][space], halves[1][space]
            assert one.output_dim == two.output_dim, (count, space)
        fitted = {m.metadata.get("components_fitted") for h in halves for m in h.values()}
        assert None not in fitted  # what the agreement cost is recorded
        assert (Path(project.config.reports) / report_path("grow", "report.md")).is_file()
        for method in ("ofa", "raw+pca"):
            argv = ["search", str(jpg / "ukbench00000.jpg"), "--dataset", "grow"]
            code = main([*argv, "--method", method, "--config", str(config_path), "--json"])
            out, err = capsys.readouterr()
            assert code == 0, (count, method, err)
            assert json.loads(out)["results"], (count, method)
