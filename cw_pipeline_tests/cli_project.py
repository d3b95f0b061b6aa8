"""A small project indexed through Dagster, for the tests of ``search`` and ``datasets``.

The pipeline tests' project (:mod:`cw_pipeline_tests.defs.project`: alpha and beta with ground
truth, PCA from each other; gamma, the distractor set of evaluation ``beta-gamma``; delta, a
folder used by nothing) plus:

* ``ukb`` — 16 demo views renamed ``ukbench00000-00015`` (4 objects × 4 views), PCA
  ``self-split`` (each half searched with the PCA of the other);
* ``epsilon`` — two images in a folder that is never indexed.

Everything is indexed (manifest + features) and the assets the search reads are materialized:
PCA models, descriptors and the distractor descriptors of ``beta-gamma``; and the rankings of
alpha and ukb (with alpha's query features), to compare the search with.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from threadpoolctl import threadpool_limits

from cw_pipeline.config import ProjectConfig, load_config
from cw_pipeline.core.demo import generate_demo
from cw_pipeline_tests.defs.project import (
    DISTRACTOR_EVAL,
    build_project,
    materialize,
    open_project,
    synthetic_jpeg,
)

INDEXED = ("alpha", "beta", "gamma", "delta", "ukb")
UKB_INSTANCES = 4  #: objects of ``ukb`` (4 views each)


@dataclass(frozen=True)
class CliProject:
    """The project folder, its config file and its loaded configuration."""

    root: Path
    config_path: Path
    config: ProjectConfig

    def image(self, dataset: str, image_id: str) -> Path:
        """The file of an indexed image (``image_id`` relative to the dataset folder)."""
        folder = self.config.dataset(dataset).images
        hits = sorted(folder.rglob(f"{Path(image_id).name}.jpg"))
        assert hits, f"no image {image_id} in {folder}"
        return hits[0]


def _add_datasets(root: Path, demo: Path) -> None:
    views = sorted((demo / "demo-b" / "jpg").glob("*.jpg"))
    instances = sorted({p.stem.rsplit("_", 1)[0] for p in views})[:UKB_INSTANCES]
    n = 0
    for inst in instances:
        for view in [p for p in views if p.stem.startswith(f"{inst}_")][1:5]:
            dst = root / "ukb" / "jpg" / f"ukbench{n:05d}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(view, dst)
            n += 1
    for i in range(2):
        synthetic_jpeg(root / "epsilon" / "jpg" / f"e{i}.jpg", seed=2000 + i)
    path = root / "datasets.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["datasets"]["ukb"] = {"layout": "ukbench", "images": "ukb/jpg", "pca_from": "self-split"}
    data["datasets"]["epsilon"] = {"layout": "folder", "images": "epsilon/jpg"}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def build_cli_project(root: Path) -> CliProject:
    """Generate the demo, lay out the project under ``root`` and index it (about 30 s)."""
    demo = root / "demo"
    generate_demo(demo, size=160, views=4, n_distractors=12)
    config_path = build_project(root / "project", demo)
    _add_datasets(root / "project", demo)
    with threadpool_limits(1):
        project = open_project(root / "project")
        for name in INDEXED:
            project.index(name)
        pca = [f"{d}/pca_model" for d in ("alpha", "beta", "ukb")]
        assert materialize(project, pca).success
        assert materialize(project, [f"{d}/descriptors" for d in ("alpha", "beta", "ukb")]).success
        assert materialize(project, ["alpha/query_features", "alpha/rankings"]).success
        assert materialize(project, ["ukb/rankings"]).success
        key = f"{DISTRACTOR_EVAL}/gamma_descriptors"
        for shard in project.instance.get_dynamic_partitions("gamma_shards"):
            assert materialize(project, [key], shard).success
    return CliProject(root / "project", config_path, load_config(config_path))
