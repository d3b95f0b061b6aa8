"""What is indexed: the configured datasets and the state of their materialized index.

Read from the configuration, the image folders (``stat`` only) and the feature store; no
Dagster instance. A dataset's state is one of:

* ``not indexed`` — no feature shard is stored;
* ``stale`` — files of an indexed shard were added, changed or removed since it was indexed
  (its stat fingerprint differs from the one stored with its manifest), its features were
  computed with other extraction settings, the shard plan changed (``shard_size``), or its
  descriptors do not cover exactly the indexed images;
* ``partial`` — shards on disk have no features yet, or a dataset with ground truth has
  features but no PCA model or descriptors;
* ``indexed`` — everything on disk is indexed and current;
* ``disabled`` — an optional dataset switched off by the configuration (folder missing).

Entries of a folder that are not image candidates (other extensions such as ``.gif``, hidden
names, non-regular files, broken symlinks) are counted in ``skipped`` and named, with their
reasons, in the notes.

Shards whose files are all gone are not counted (their stored files stay in the store
after re-indexing; only the Dagster instance knows they were dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.compute.published import current_index, current_pca, descriptors_file, has_pca
from cw_pipeline.compute.shards import (
    FileStat,
    fingerprint,
    scan,
    shard_files,
    stored_code_version,
    stored_fingerprint,
)
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig, default_config_path
from cw_pipeline.config.models import DEFAULT_EVALUATION_CRON
from cw_pipeline.core.datasets import skipped_summary
from cw_pipeline.store import (
    FEATURES,
    FeatureStore,
    distractor_descriptors_folder,
    features_path,
    plan_path,
    rejected_path,
    shard_folder,
    shard_name_from_path,
)

__all__ = [
    "STATES",
    "DatasetStatus",
    "dataset_status",
    "format_table",
    "index_command",
    "list_datasets",
    "stored_shards",
]

STATES = ("not indexed", "stale", "partial", "indexed", "disabled")


def index_command(config: ProjectConfig, dataset: str) -> str:
    """The command that indexes ``dataset`` (``--config`` when not the default file)."""
    cmd = f"cw-pipeline index --dataset {dataset}"
    try:
        default = default_config_path().resolve()
    except OSError:
        default = None
    if Path(config.source).resolve() != default:
        cmd += f" --config {config.source}"
    return cmd


def stored_shards(store: FeatureStore, kind: str, dataset: str) -> list[str]:
    """Names of the shards of ``dataset`` stored under ``kind`` (e.g. ``cam_features``)."""
    return sorted(shard_name_from_path(rel) for rel in store.list(shard_folder(kind, dataset)))


def _rows(store: FeatureStore, rel: str) -> int:
    return store.read_table(rel, ["image_id"]).num_rows


def _ids(store: FeatureStore, rel: str) -> list[str]:
    return store.read_table(rel, ["image_id"]).column("image_id").to_pylist()


@dataclass
class DatasetStatus:
    """One dataset: where its images are, how many are indexed, and the index's state."""

    name: str
    layout: str
    folder: str
    state: str
    images_on_disk: int = 0
    images_indexed: int = 0
    rejected: int = 0
    skipped: int = 0  #: entries of the folder that are not image candidates (see notes)
    shards_on_disk: int = 0
    shards_indexed: int = 0
    new_shards: list[str] = field(default_factory=list)
    changed_shards: list[str] = field(default_factory=list)
    pca: bool | None = None  #: None: the dataset has no PCA of its own (layout folder)
    descriptors: bool = False
    descriptor_images: int = 0
    distractor_of: list[str] = field(default_factory=list)  #: evaluations with descriptors
    #: how a distractor set's descriptors follow a change of each evaluation's PCA
    refreshes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hint: str = ""  #: what to run, when the state is not ``indexed``

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folder_files(ds: DatasetConfig, st: DatasetStatus) -> list[FileStat]:
    """The image files in ``ds``'s folder (by ``stat``), noting what was skipped or missing."""
    if not ds.images.is_dir():
        st.notes.append(f"image folder not found: {ds.images}")
        return []
    found = scan(ds)
    st.skipped = len(found.skipped)
    if found.skipped:
        st.notes.append(f"skipped: {skipped_summary(found.skipped)}")
    return found.files


def _shard_states(
    store: FeatureStore,
    ds: DatasetConfig,
    files: list[FileStat],
    stored: list[str],
    st: DatasetStatus,
) -> tuple[bool, bool, set[str]]:
    """Compare the stored feature shards with the folder's: (stale, partial, indexed ids)."""
    indexed_ids: set[str] = set()
    if ds.shard_by == "batch":
        rel = plan_path(ds.name)
        plan = store.read_json(rel) if store.exists(rel) else None
        if plan is None or plan.get("shard_size") != ds.shard_size:
            # shard_files would write a new plan: leave that to indexing.
            st.changed_shards = list(stored)
            st.notes.append("the shard plan changed (shard_size): every shard is re-indexed")
            return True, False, indexed_ids
    shards = shard_files(ds, files, store)
    st.shards_on_disk = len(shards)
    code_version = feature_code_version(ds)
    st.new_shards = [s for s in shards if s not in stored]
    for s in (s for s in stored if s in shards):
        ids = _ids(store, features_path(ds.name, s))
        st.images_indexed += len(ids)
        st.shards_indexed += 1
        indexed_ids.update(ids)
        rejected = rejected_path(ds.name, s)
        if store.exists(rejected):
            st.rejected += len(_ids(store, rejected))
        if stored_fingerprint(store, ds, s) != fingerprint(shards[s]):
            st.changed_shards.append(s)
        elif stored_code_version(store, ds, s) != code_version:
            st.changed_shards.append(s)
            st.notes.append(f"shard {s}: features from other extraction settings")
    if st.changed_shards:
        st.notes.append(f"changed since indexing: {', '.join(st.changed_shards)}")
    if st.new_shards:
        st.notes.append(f"shards not indexed yet: {', '.join(st.new_shards)}")
    return bool(st.changed_shards), bool(st.new_shards), indexed_ids


def dataset_status(config: ProjectConfig, store: FeatureStore, ds: DatasetConfig) -> DatasetStatus:
    """The state of one dataset's index (see the module docstring)."""
    st = DatasetStatus(name=ds.name, layout=ds.layout, folder=str(ds.images), state="indexed")
    files = _folder_files(ds, st)
    st.images_on_disk = len(files)
    stored = stored_shards(store, FEATURES, ds.name)
    stale = partial = False
    indexed_ids: set[str] = set()
    if stored:
        stale, partial, indexed_ids = _shard_states(store, ds, files, stored, st)
    if ds.has_groundtruth:
        st.pca = has_pca(current_pca(store, ds), ds)
        index = current_index(store, ds)
        st.descriptors = index is not None
        if index is not None:
            rel = descriptors_file(index, "ofa")
            described = set(_ids(store, rel))
            st.descriptor_images = len(described)
            if stored and not stale and described != indexed_ids:
                stale = True
                st.notes.append("the descriptors do not cover exactly the indexed images")
        if stored and not st.pca:
            partial = True
            st.notes.append(f"no PCA model yet (learned on {ds.pca_from})")
        if stored and not st.descriptors:
            partial = True
            st.notes.append("no descriptors yet")
    else:
        for ev in config.evaluations_for(ds.name):
            prefix = distractor_descriptors_folder(ev.name, ds.name)
            if ds.name in ev.distractors and store.list(prefix):
                st.distractor_of.append(ev.name)
            if ds.name in ev.distractors:
                st.refreshes.append(_reprojection(ev, ds.name, st.images_indexed))
        st.descriptors = bool(st.distractor_of)
    if not stored:
        st.state = "not indexed"
    else:
        st.state = "stale" if stale else "partial" if partial else "indexed"
    if st.state != "indexed":
        st.hint = _hint(config, store, ds, st)
    return st


def _reprojection(ev: EvaluationConfig, dname: str, images: int) -> str:
    """How the distractor descriptors of ``dname`` under ``ev`` follow a change of its PCA."""
    if images <= ev.reproject_at_once:
        when = "at once"
        why = (
            f"{images:,} images <= reproject_at_once {ev.reproject_at_once:,}; its rankings "
            "project them in the same refresh"
        )
    else:
        cron = ev.schedule or DEFAULT_EVALUATION_CRON
        when = f"after the cron tick '{cron}' of {ev.name}'s schedule"
        why = f"{images:,} images > reproject_at_once {ev.reproject_at_once:,}; its rankings wait"
    return f"distractors of {ev.name}: re-projected {when} when {ev.dataset}'s PCA changes ({why})"


def _hint(config: ProjectConfig, store: FeatureStore, ds: DatasetConfig, st: DatasetStatus) -> str:
    """The command(s) that bring a dataset's index up to date."""
    todo = []
    paired = config.paired(ds.name) if ds.has_groundtruth else None
    if paired is not None and paired.name != ds.name and not st.pca:
        if not stored_shards(store, "cam_features", paired.name):
            todo.append(index_command(config, paired.name))
    todo.append(index_command(config, ds.name))
    return " && ".join(todo)


def list_datasets(config: ProjectConfig, store: FeatureStore | None = None) -> list[DatasetStatus]:
    """Every configured dataset (disabled ones last), with its index state."""
    store = store or FeatureStore(config.warehouse)
    out = [dataset_status(config, store, ds) for _, ds in sorted(config.datasets.items())]
    for name, reason in sorted(config.disabled_datasets.items()):
        out.append(DatasetStatus(name=name, layout="", folder="", state="disabled", notes=[reason]))
    return out


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def format_table(statuses: list[DatasetStatus]) -> str:
    """A human table of dataset states, then notes and the command to run where needed."""
    header = ("dataset", "layout", "state", "on disk", "indexed", "rejected", "pca", "descr.")
    rows = [(*header, "folder")]
    for s in statuses:
        descr = _yes_no(s.descriptors)
        if s.distractor_of:
            descr = f"yes ({', '.join(s.distractor_of)})"
        counts = (s.images_on_disk, s.images_indexed, s.rejected)
        rows.append((s.name, s.layout, s.state, *map(str, counts), _yes_no(s.pca), descr, s.folder))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5}
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    for s in statuses:
        if s.notes or s.hint:
            lines.append(f"{s.name}: {s.state}")
        elif s.refreshes:
            lines.append(f"{s.name}:")
        lines += [f"  {note}" for note in s.notes]
        lines += [f"  {line}" for line in s.refreshes]
        if s.hint:
            lines.append(f"  run: {s.hint}")
    return "\n".join(lines)
