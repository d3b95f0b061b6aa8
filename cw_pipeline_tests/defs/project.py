"""A small temporary project for the Dagster pipeline tests, and helpers to drive it.

Layout of a project folder (paths in its ``datasets.yaml`` are relative to it)::

    datasets.yaml
    alpha/jpg/part{1,2,3}/   demo-a in three sub-folders (``shard_by: folder``), PCA from beta
    alpha/gt/                demo-a's Oxford-style ground truth
    beta/jpg/, beta/gt/      demo-b (``shard_by: batch``, two shards), PCA from alpha
    gamma/jpg/               the demo distractors (``shard_by: batch``, two shards): the
                             distractor set of evaluation ``beta-gamma`` (nightly cron)
    delta/jpg/misc{1,2}/     six synthetic images (``shard_by: folder``), used by nothing else
    warehouse/, reports/     the feature store and the reports

48 + 48 + 12 + 6 images of 160 px. Every dataset runs with one torch thread (and the
fixtures keep BLAS on one thread): on a CPU shared with other processes, several threads spin
(seconds per image instead of ~15 ms).

Instances are ephemeral (in-memory SQLite): with an on-disk SQLite instance every Dagster event
costs a file commit, which makes a full index several times slower.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import yaml
from PIL import Image

from cw_pipeline.config import ProjectConfig, load_config
from cw_pipeline.defs.graph import build_definitions
from cw_pipeline.runtime.runs import IndexResult, index_dataset, refresh
from cw_pipeline.store import FeatureStore

DATASETS = ("alpha", "beta", "gamma", "delta")
#: alpha's shards (folders) and the demo-a instances in each (6 images per instance).
ALPHA_PARTS = {
    "part1": ("astronaut", "cat", "motorcycle"),
    "part2": ("pagoda", "coins", "moon"),
    "part3": ("retina", "page"),
}
DELTA_PARTS = ("misc1", "misc2")
DISTRACTOR_EVAL = "beta-gamma"
NIGHTLY = "0 3 * * *"
METHODS = ["raw", "raw+pca", "ofa", "ofa+qe5"]
FIXED = "fixed:160x160"


def project_yaml(resize: str = FIXED, reproject_at_once: int | None = 0) -> dict:
    """The test project's configuration. ``reproject_at_once`` 0 (default): gamma is
    re-projected at the evaluation's cron, as a 100k set would be; None: the default (gamma's
    36 images re-projected as soon as beta's PCA changes)."""
    evaluation = {"dataset": "beta", "distractors": ["gamma"], "schedule": NIGHTLY}
    if reproject_at_once is not None:
        evaluation["reproject_at_once"] = reproject_at_once
    return {
        "warehouse": "warehouse",
        "reports": "reports",
        "defaults": {
            "backbone": "efficientnet_lite0",
            "resize": resize,
            "stored_classes": 16,
            "batch_size": 16,
            "device": "cpu",
            "num_threads": 1,
        },
        "datasets": {
            "alpha": {
                "layout": "oxford",
                "images": "alpha/jpg",
                "groundtruth": "alpha/gt",
                "pca_from": "beta",
                "shard_by": "folder",
                "query_protocol": "crop",
            },
            "beta": {
                "layout": "oxford",
                "images": "beta/jpg",
                "groundtruth": "beta/gt",
                "pca_from": "alpha",
                "shard_by": "batch",
                "shard_size": 30,
                "query_protocol": "crop",
            },
            "gamma": {
                "layout": "folder",
                "images": "gamma/jpg",
                "shard_by": "batch",
                "shard_size": 6,
            },
            "delta": {"layout": "folder", "images": "delta/jpg", "shard_by": "folder"},
        },
        "evaluations": {DISTRACTOR_EVAL: evaluation},
        "methods": METHODS,
        "search": {"n_pca": 4, "aggregated_classes": 16},
    }


def tiny_defaults(batch_size: int = 4) -> dict:
    """Extraction defaults of the tiny crash and concurrency projects (64×64, N_C = 8)."""
    return {
        "backbone": "efficientnet_lite0",
        "resize": "fixed:64x64",
        "stored_classes": 8,
        "batch_size": batch_size,
        "device": "cpu",
        "num_threads": 1,
    }


def write_config(root: Path, resize: str = FIXED, reproject_at_once: int | None = 0) -> Path:
    path = root / "datasets.yaml"
    text = yaml.safe_dump(project_yaml(resize, reproject_at_once), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def synthetic_jpeg(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A random but structured JPEG (blocks of colour plus noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((h // 6 + 1, w // 8 + 1, 1), dtype=np.uint8))[:h, :w]
    noise = rng.integers(-20, 21, img.shape)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)
    return path


def truncated_jpeg(path: Path, seed: int) -> Path:
    """A JPEG cut in half: its header parses, its pixels do not decode."""
    synthetic_jpeg(path, seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _alpha_part(stem: str) -> str:
    instance = stem.rsplit("_", 1)[0]
    return next(part for part, names in ALPHA_PARTS.items() if instance in names)


def build_project(root: Path, demo: Path) -> Path:
    """Write a fresh project under ``root`` from a generated demo; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    for src in sorted((demo / "demo-a" / "jpg").glob("*.jpg")):
        dst = root / "alpha" / "jpg" / _alpha_part(src.stem) / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    shutil.copytree(demo / "demo-a" / "gt", root / "alpha" / "gt")
    shutil.copytree(demo / "demo-b" / "jpg", root / "beta" / "jpg")
    shutil.copytree(demo / "demo-b" / "gt", root / "beta" / "gt")
    shutil.copytree(demo / "demo-distractors" / "jpg", root / "gamma" / "jpg")
    for k, sub in enumerate(DELTA_PARTS):
        for i in range(3):
            synthetic_jpeg(root / "delta" / "jpg" / sub / f"d{k}_{i}.jpg", seed=1000 + 10 * k + i)
    return write_config(root)


# --------------------------------------------------------------------------- the project


@dataclass
class Project:
    """A project folder with its config, definitions and Dagster instance."""

    root: Path
    config: ProjectConfig
    defs: dg.Definitions
    instance: dg.DagsterInstance
    index_results: dict[str, IndexResult] = field(default_factory=dict)  #: the full index
    refreshed: list[str] = field(default_factory=list)  #: what its refresh materialized

    @property
    def store(self) -> FeatureStore:
        return FeatureStore(self.config.warehouse)

    def reload(self) -> Project:
        """Config and definitions re-read from the YAML (after it was edited)."""
        config = load_config(self.root / "datasets.yaml")
        return Project(self.root, config, build_definitions(config), self.instance)

    def index(self, name: str) -> IndexResult:
        return index_dataset(self.defs, self.instance, self.config, name, self.store)

    def index_all(self) -> dict[str, IndexResult]:
        return {name: self.index(name) for name in DATASETS}

    def images(self, name: str) -> Path:
        return self.config.dataset(name).images

    def features(self, name: str, shard: str):
        return self.store.read_table(self.store.shard_path("cam_features", name, shard))

    def materialization_count(self, key: str, partition: str | None = None) -> int:
        flt = dg.AssetRecordsFilter(
            asset_key=dg.AssetKey.from_user_string(key),
            asset_partitions=None if partition is None else [partition],
        )
        return len(self.instance.fetch_materializations(flt, limit=1000).records)


def open_project(root: Path, instance: dg.DagsterInstance | None = None) -> Project:
    config = load_config(root / "datasets.yaml")
    return Project(
        root, config, build_definitions(config), instance or dg.DagsterInstance.ephemeral()
    )


# --------------------------------------------------------------------------- saved states


def copy_instance(
    source: dg.DagsterInstance, moved: tuple[Path, Path] | None = None
) -> dg.DagsterInstance:
    """A new ephemeral instance holding a copy of ``source``'s runs, events, asset records,
    checks and key-value store (SQLite's backup of its two in-memory databases).

    ``moved`` (old, new): the project was copied from ``old`` to ``new``; paths under ``old``
    in the copy's records (metadata such as a report's folder) are rewritten to ``new``, so
    the copy reads as if the project had been indexed where it now is.
    """
    copy = dg.DagsterInstance.ephemeral()
    for src, dst in (
        (source.run_storage, copy.run_storage),
        (source.event_log_storage, copy.event_log_storage),
    ):
        # the connection each in-memory storage holds for its life (it keeps the database)
        db = dst._held_conn.connection.dbapi_connection  # type: ignore[attr-defined]
        src._held_conn.connection.dbapi_connection.backup(db)  # type: ignore[attr-defined]
        if moved is not None:
            _rewrite_text(db, str(moved[0]), str(moved[1]))
    copy.event_log_storage._storage_id = source.event_log_storage._storage_id  # type: ignore[attr-defined]
    return copy


def _rewrite_text(db: sqlite3.Connection, old: str, new: str) -> None:
    """``old`` replaced by ``new`` in every text column of every table of ``db``."""
    assert '"' not in old + new and "\\" not in old + new, "paths that JSON would escape"
    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    with db:
        for (table,) in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], column[2].upper()
                if kind and not any(t in kind for t in ("TEXT", "CHAR", "CLOB")):
                    continue
                db.execute(
                    f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                    f'WHERE instr("{name}", ?) > 0',
                    (old, new, old),
                )


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (ns): what a test may not change."""
    return {
        str(p.relative_to(root)): (st.st_size, st.st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and (st := p.stat())
    }


@dataclass
class SavedState:
    """A project brought to some state once (its folder and its instance), copied for each
    test that starts from it: the copy is the state, without the minutes of indexing."""

    project: Project
    files: dict[str, tuple[int, int]]

    def assert_unchanged(self) -> None:
        """Fails when a test wrote into the saved project's folder."""
        root = self.project.root
        assert tree_state(root) == self.files, f"a test wrote into the saved project {root}"

    def copy_to(self, root: Path) -> Project:
        """The saved project copied to ``root`` (files with their mtimes, and the instance)."""
        self.assert_unchanged()
        shutil.copytree(self.project.root, root, symlinks=True)
        project = open_project(
            root, copy_instance(self.project.instance, (self.project.root, root))
        )
        project.index_results = dict(self.project.index_results)
        project.refreshed = list(self.project.refreshed)
        return project


class SavedStates:
    """Project states built at most once per test process (see :class:`SavedState`):

    ``indexed``   every dataset indexed (``index --no-refresh``), nothing downstream;
    ``refreshed`` ``indexed`` then every stale asset refreshed, the cron-gated ones too.
    """

    def __init__(self, workdir: Path, demo: Path) -> None:
        self.workdir, self.demo = workdir, demo
        self._saved: dict[str, SavedState] = {}

    def project(self, state: str, root: Path) -> Project:
        """A new project at ``root`` in ``state``."""
        if state not in self._saved:
            self._saved[state] = self._build(state)
        return self._saved[state].copy_to(root)

    def _build(self, state: str) -> SavedState:
        where = self.workdir / state
        if state == "indexed":
            build_project(where, self.demo)
            project = open_project(where)
            project.index_results = project.index_all()
        elif state == "refreshed":
            project = self.project("indexed", where)
            project.refreshed = refresh(project.defs, project.instance, include_cron=True)
        else:
            raise ValueError(f"unknown project state {state!r}")
        return SavedState(project, tree_state(where))

    def check_unchanged(self) -> None:
        """Fails naming the saved project a test wrote into."""
        for saved in self._saved.values():
            saved.assert_unchanged()


def check_evaluations(instance: dg.DagsterInstance) -> list[tuple[object, str | None]]:
    """Every asset check evaluation recorded in ``instance`` (oldest first), with the shard of
    the run that evaluated it (checks are declared per asset, so the evaluation itself carries
    no partition)."""
    with warnings.catch_warnings():  # deprecated in 2.0, no replacement for check events yet
        warnings.simplefilter("ignore", DeprecationWarning)
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION),
            ascending=True,
        )
    out = []
    for r in records:
        run = instance.get_run_by_id(r.event_log_entry.run_id)
        shard = run.tags.get("dagster/partition") if run is not None else None
        out.append((r.event_log_entry.dagster_event.event_specific_data, shard))
    return out


# --------------------------------------------------------------------------- automation


def requested(result, defs: dg.Definitions) -> set[str]:
    """What an automation evaluation requests, as ``key`` / ``key[partition]`` strings."""
    out = set()
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        for pk in result.get_requested_partitions(key):
            out.add(key.to_user_string() + (f"[{pk}]" if pk is not None else ""))
    return out


def materialize(project: Project, keys: Iterable[str], partition: str | None = None):
    return dg.materialize(
        list(project.defs.assets or []),
        instance=project.instance,
        resources=project.defs.resources,
        selection=dg.AssetSelection.assets(*(dg.AssetKey.from_user_string(k) for k in keys)),
        partition_key=partition,
    )


def next_noon() -> dt.datetime:
    """Tomorrow 12:00 UTC: far from the 03:00 cron ticks, whenever the tests run."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(hour=12, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)


@dataclass
class Automation:
    """Declarative automation evaluated like the automation sensor: a cursor kept from tick to
    tick, on a controlled clock (see :func:`next_noon`)."""

    project: Project
    now: dt.datetime = field(default_factory=next_noon)
    cursor: object = None
    last: set[str] = field(default_factory=set)

    def tick(self, at: dt.datetime | None = None) -> set[str]:
        self.now = at or self.now + dt.timedelta(minutes=1)
        res = dg.evaluate_automation_conditions(
            defs=self.project.defs,
            instance=self.project.instance,
            cursor=self.cursor,  # type: ignore[arg-type]
            evaluation_time=self.now,
        )
        self.cursor = res.cursor
        self.last = requested(res, self.project.defs)
        return self.last

    def start(self) -> set[str]:
        """The first evaluation of a new sensor: the conditions compare data versions and
        keep no state, so it already requests whatever is stale; returns its requests."""
        assert self.cursor is None
        return self.tick()

    def execute(self) -> None:
        """Materialize what the last tick requested (partitioned assets first, like refresh)."""
        by_partition: dict[str | None, list[str]] = {}
        for item in self.last:
            key, _, rest = item.partition("[")
            by_partition.setdefault(rest[:-1] if rest else None, []).append(key)
        for pk in sorted(by_partition, key=lambda p: (p is None, p or "")):
            assert materialize(self.project, by_partition[pk], pk).success

    def rounds(self, max_rounds: int = 6) -> list[set[str]]:
        """Tick and execute until a tick requests nothing; returns each round's requests."""
        out = []
        for _ in range(max_rounds):
            got = self.tick()
            if not got:
                return out
            out.append(got)
            self.execute()
        raise AssertionError(f"automation still requesting after {max_rounds} rounds: {out}")


#: What a change of alpha's features (a new image that is not a query) makes stale, first
#: tick, in one run: alpha's own downstream assets, and what is built on the PCA that beta
#: learns from alpha (beta's PCA, descriptors, rankings); not alpha's query features (its
#: queries' images did not change), not alpha's PCA (learned on beta), not the cron-gated
#: evaluation with distractors, and nothing of gamma or delta themselves.
ALPHA_DOWNSTREAM = {
    "alpha/descriptors",
    "alpha/rankings",
    "alpha/map_report",
    "beta/pca_model",
    "beta/descriptors",
    "beta/rankings",
    "beta/map_report",
}
