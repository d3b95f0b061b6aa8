"""Several ``cw-pipeline index`` commands started at the same moment on one Dagster instance.

Used by ``test_cli_concurrency.py`` (the embedded SQLite instance) and
``e2e/test_postgres.py`` (PostgreSQL storage). The project: three datasets of three synthetic
64×48 images in two folder shards each, 64×64 inputs, one torch thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from cw_pipeline.config import load_config
from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline.store import FeatureStore
from cw_pipeline_tests.conftest import REPO_ROOT
from cw_pipeline_tests.defs.project import synthetic_jpeg, tiny_defaults

DATASETS = ("one", "two", "three")
IMAGES = 3  #: per dataset, in shards s0 (2 images) and s1 (1)
COMMAND_TIMEOUT = 240.0


def make_images(root: Path) -> Path:
    """The three datasets' image folders under ``root`` (written once, shared by rounds), and
    ``ukb``: 8 images named like UKBench (2 objects × 4 views)."""
    for d, ds in enumerate(DATASETS):
        for i in range(IMAGES):
            path = root / ds / f"s{i % 2}" / f"{ds}{i}.jpg"
            synthetic_jpeg(path, seed=100 * d + i, size=(64, 48))
    for i in range(8):
        synthetic_jpeg(root / "ukb" / f"ukbench{i:05d}.jpg", seed=500 + i, size=(64, 48))
    return root


def write_project(root: Path, images: Path, ukb: bool = False) -> Path:
    """A ``datasets.yaml`` under ``root`` (its own warehouse) over the images in ``images``;
    with ``ukb`` only the UKBench-like dataset ``ukb`` (PCA ``self-split``), whose index is
    followed by a refresh of PCA, descriptors, rankings and report."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": tiny_defaults(batch_size=4),
        "datasets": {
            ds: {"layout": "folder", "images": str(images / ds), "shard_by": "folder"}
            for ds in DATASETS
        },
    }
    if ukb:
        config["datasets"] = {
            "ukb": {"layout": "ukbench", "images": str(images / "ukb"), "pca_from": "self-split"}
        }
        config["methods"] = ["raw", "ofa"]
        config["search"] = {"n_pca": 2, "aggregated_classes": 8}
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def fresh_home(home: Path, yaml_text: str | None = None) -> Path:
    """An empty ``DAGSTER_HOME`` with the project's ``dagster.yaml`` (or ``yaml_text``)."""
    home.mkdir(parents=True)
    text = yaml_text or (REPO_ROOT / INSTANCE_YAML).read_text(encoding="utf-8")
    (home / "dagster.yaml").write_text(text, encoding="utf-8")
    return home


@dataclass
class Outcome:
    dataset: str
    returncode: int
    stdout: str
    stderr: str

    def result(self) -> dict:
        """The command's ``--json`` result (asserts it exited 0 without a traceback)."""
        detail = f"{self.dataset}: exit {self.returncode}\n{self.stderr[-4000:]}"
        assert self.returncode == 0, detail
        assert "Traceback" not in self.stderr, detail
        return json.loads(self.stdout.strip().splitlines()[-1])


def _env(home: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def _stopped_at_exit(procs: list[subprocess.Popen]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def index_at_once(
    config: Path,
    home: Path,
    datasets: Sequence[str],
    env: dict[str, str] | None = None,
    separate_homes: bool = False,
) -> list[Outcome]:
    """Start ``cw-pipeline index --dataset D --json`` for every D in ``datasets`` at the same
    moment (each in its own process group, all killed if the test fails) and wait for all.

    With ``separate_homes`` each command gets its own ``DAGSTER_HOME`` (``home/cmd<i>``, a copy
    of ``home/dagster.yaml``), as processes on different machines sharing one PostgreSQL."""
    procs: list[subprocess.Popen] = []
    logs: list[tuple[Path, Path]] = []
    with _stopped_at_exit(procs):
        for i, ds in enumerate(datasets):
            out, err = home / f"cmd{i}.out", home / f"cmd{i}.err"
            own = home
            if separate_homes:
                own = fresh_home(home / f"cmd{i}", (home / "dagster.yaml").read_text())
            cmd = [sys.executable, "-m", "cw_pipeline.cli", "index", "--dataset", ds]
            with out.open("w") as fo, err.open("w") as fe:
                procs.append(
                    subprocess.Popen(
                        [*cmd, "--config", str(config), "--json", "--quiet"],
                        cwd=REPO_ROOT,
                        env=_env(own, env),
                        stdout=fo,
                        stderr=fe,
                        start_new_session=True,
                    )
                )
            logs.append((out, err))
        deadline = time.monotonic() + COMMAND_TIMEOUT
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [
        Outcome(ds, p.returncode, out.read_text(), err.read_text())
        for ds, p, (out, err) in zip(datasets, procs, logs, strict=True)
    ]


def check_all_indexed(config: Path, outcomes: Sequence[Outcome]) -> None:
    """Every command exited 0 without a traceback, every dataset named is fully indexed."""
    results = [o.result() for o in outcomes]
    store = FeatureStore(load_config(config).warehouse)
    for ds in {o.dataset for o in outcomes}:
        mine = [r for r in results if r["dataset"] == ds]
        assert all(r["shards"] == 2 and r["images"] == IMAGES for r in mine), mine
        # Each shard was indexed by one of the commands (the others waited or found it done).
        done = {s for r in mine for s in r["indexed_shards"]}
        assert done == {"s0", "s1"}, mine
        rows = sum(
            store.read_table(store.shard_path("cam_features", ds, s), ["image_id"]).num_rows
            for s in ("s0", "s1")
        )
        assert rows == IMAGES, (ds, rows)
