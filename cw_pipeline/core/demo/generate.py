"""Writing the demo: each dataset folder is built in memory, written into a temporary sibling
folder with a manifest (parameters, every file's size and sha1) and renamed into place; a
folder that exists is the user's from then on and is never modified without ``regenerate``,
nor ever when it holds files the generator did not write unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cw_pipeline.core.demo.data import demo_instances
from cw_pipeline.core.demo.render import build_distractors, build_half

logger = logging.getLogger(__name__)

#: Bump whenever the generator's output changes: existing demos are then regenerated.
DEMO_VERSION = 2
#: The dataset folders :func:`generate_demo` writes under its root.
DEMO_DATASETS: tuple[str, ...] = ("demo-a", "demo-b", "demo-distractors")

_MANIFEST = "manifest.json"
_GENERATOR = "cw_pipeline.core.demo"  # recorded in manifests (not __name__: may be __main__)


@dataclass(frozen=True)
class DemoDataset:
    """One generated demo folder."""

    name: str
    folder: Path  #: ``root/<name>``
    images: Path  #: ``root/<name>/jpg``
    groundtruth: Path | None  #: ``root/<name>/gt`` (None for the distractors)
    n_images: int
    n_queries: int
    instances: tuple[str, ...]
    generated: bool  #: False when an identical complete folder was already there
    #: what this call did: "generated" (missing), "regenerated" (--regenerate: other
    #: parameters), "kept" (the user's folder, or already what these parameters give)
    status: str = "kept"


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`generate_demo` produced (or found complete)."""

    root: Path
    seed: int
    views: int
    size: int
    datasets: dict[str, DemoDataset]

    @property
    def n_images(self) -> int:
        return sum(d.n_images for d in self.datasets.values())

    @property
    def n_instances(self) -> int:
        return sum(len(d.instances) for d in self.datasets.values())

    @property
    def generated(self) -> tuple[str, ...]:
        """Names of the datasets written by this call."""
        return tuple(n for n, d in self.datasets.items() if d.generated)


def _params(name: str, *, seed: int, views: int, size: int, n_distractors: int) -> dict[str, Any]:
    params: dict[str, Any] = {"version": DEMO_VERSION, "dataset": name, "seed": seed, "size": size}
    if name == "demo-distractors":
        params["n_distractors"] = n_distractors
    else:
        params["views"] = views
    return params


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    """True when ``folder`` holds a manifest with ``params`` and all its files, sizes intact."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("params") != params:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    for rel, entry in files.items():
        try:
            if (folder / rel).stat().st_size != entry["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _changes(folder: Path) -> dict[str, list[str]]:
    """How ``folder`` differs, file by file and by content (sha1), from what the generator
    wrote there: ``added`` (not in its manifest: every file when there is no generator
    manifest), ``edited`` (another sha1, or no longer a plain file) and ``missing``."""
    manifest = _read_manifest(folder)
    listed: dict[str, Any] = {}
    if manifest is not None and manifest.get("generator") == _GENERATOR:
        files = manifest.get("files")
        listed = files if isinstance(files, dict) else {}
    added, edited, seen = [], [], set()
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == _MANIFEST and listed:
            continue
        entry = listed.get(rel)
        if not isinstance(entry, dict):
            added.append(rel)
            continue
        seen.add(rel)
        if path.is_symlink() or not path.is_file():
            edited.append(rel)
        elif hashlib.sha1(path.read_bytes()).hexdigest() != entry.get("sha1"):
            edited.append(rel)
    missing = sorted(r for r in listed if r not in seen)
    return {"added": added, "edited": edited, "missing": missing}


def _foreign_files(folder: Path) -> list[str]:
    """Files under ``folder`` that this generator did not write (or that changed since)."""
    changes = _changes(folder)
    return sorted(changes["added"] + changes["edited"])


def _describe_changes(changes: dict[str, list[str]]) -> str:
    parts = []
    for kind in ("added", "edited", "missing"):
        names = changes[kind]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{kind}: {shown}")
    return "; ".join(parts)


class DemoRefusedError(FileExistsError):
    """``regenerate`` found demo folders that are not the generator's unchanged output: nothing
    was touched. ``outcomes``: each checked folder's name -> what would have been done, or why
    it was refused."""

    def __init__(self, root: Path, outcomes: dict[str, str]):
        self.outcomes = outcomes
        lines = "; ".join(f"{name}: {what}" for name, what in outcomes.items())
        super().__init__(
            f"{root}: refusing to regenerate the demo, nothing touched ({lines}). The demo "
            "generator did not write those files as they are: they are yours. Move them away, "
            "or choose another demo root"
        )


def _differences(folder: Path, params: dict[str, Any]) -> str:
    """How a kept demo folder differs from what the generator would write (for the log)."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("generator") != _GENERATOR:
        return "it has no manifest from the generator"
    parts = []
    if manifest.get("params") != params:
        parts.append(f"generated with {manifest.get('params')}, not {params}")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    missing = [r for r in files if not (folder / r).exists()]
    foreign = _foreign_files(folder)
    if foreign:
        parts.append(f"{len(foreign)} file(s) added or edited")
    if missing:
        parts.append(f"{len(missing)} file(s) removed")
    return "; ".join(parts) or "nothing"


def _write_atomically(root: Path, name: str, files: dict[str, bytes], manifest: dict) -> None:
    """Write ``files`` + manifest into a temporary sibling of ``root/name``, then rename."""
    final = root / name
    tmp = root / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        for rel, data in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if name != "demo-distractors":
            (tmp / "gt").mkdir(exist_ok=True)
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (tmp / _MANIFEST).write_text(text, encoding="utf-8")
        old: Path | None = None
        if final.exists():
            old = root / f".{name}.{uuid.uuid4().hex}.old"
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first: keep its copy if it is what we wanted.
            if not _is_complete(final, manifest["params"]):
                raise
            logger.info("demo %s: written concurrently by another process", final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def generate_demo(
    root: Path | str,
    *,
    seed: int = 0,
    views: int = 5,
    size: int = 320,
    n_distractors: int = 40,
    only: Iterable[str] | None = None,
    regenerate: bool = False,
) -> DemoInfo:
    """Build the demo benchmark under ``root``: only dataset folders that do not exist yet.

    Args:
        root: parent folder of ``demo-a/``, ``demo-b/`` and ``demo-distractors/``.
        seed: seeds every random transform; output is byte-identical for equal parameters.
        views: positive views per instance besides the query (at least 4); a third of them
            (at least one) are hard and listed in ``_ok.txt``.
        size: longer side of the query images in pixels (views are 75-100% of it).
        n_distractors: number of distractor images.
        only: generate just these datasets (names from :data:`DEMO_DATASETS`).

        regenerate: rebuild dataset folders written by the generator for other parameters
            (another ``DEMO_VERSION``, seed, views...). Every file is compared by sha1 with
            the folder's generator manifest: when any folder has a file added, edited or
            missing, nothing is touched and :class:`DemoRefusedError` says, for each folder,
            what would have been done or which files refused it.

    A dataset folder that exists is the user's data from then on: without ``regenerate`` it
    is never modified, whatever it holds (images added, edited or deleted are indexed as
    they are); only a missing or empty folder is generated. Nothing is ever deleted except
    files this generator wrote itself, unchanged, and only with ``regenerate``. Each dataset's
    ``status`` says what was done (generated, regenerated, kept).
    """
    root = Path(root)
    names = _check_arguments(views, size, n_distractors, only)
    root.mkdir(parents=True, exist_ok=True)
    params = {
        name: _params(name, seed=seed, views=views, size=size, n_distractors=n_distractors)
        for name in DEMO_DATASETS
        if name in names
    }
    plan = {name: _plan(root / name, p, regenerate=regenerate) for name, p in params.items()}
    if any(what.startswith("refused") for what in plan.values()):
        raise DemoRefusedError(root, plan)
    out: dict[str, DemoDataset] = {}
    for name, what in plan.items():
        if what in ("generated", "regenerated"):
            _write_dataset(root, name, params[name])
        status = what if what in ("generated", "regenerated") else "kept"
        out[name] = _dataset_info(root / name, name, status)
    return DemoInfo(root=root, seed=seed, views=views, size=size, datasets=out)


def _check_arguments(
    views: int, size: int, n_distractors: int, only: Iterable[str] | None
) -> tuple[str, ...]:
    """The dataset names to generate; ValueError naming the first bad argument."""
    if views < 4:
        raise ValueError(f"views must be >= 4, got {views}")
    if not 64 <= size <= 4096:
        raise ValueError(f"size must be in 64..4096, got {size}")
    if n_distractors < 0:
        raise ValueError(f"n_distractors must be >= 0, got {n_distractors}")
    names = DEMO_DATASETS if only is None else tuple(only)
    unknown = sorted(set(names) - set(DEMO_DATASETS))
    if unknown:
        raise ValueError(f"unknown demo dataset(s) {unknown}; expected some of {DEMO_DATASETS}")
    return names


def _plan(folder: Path, params: dict[str, Any], *, regenerate: bool) -> str:
    """What to do with a demo folder: ``generated`` (missing or empty), ``kept`` (without
    ``regenerate`` whatever it holds; with it, when it is already what ``params`` give), or,
    with ``regenerate``, ``regenerated`` (the generator's unchanged files for other
    parameters) or ``refused (...)`` naming every file added, edited (by sha1) or missing."""
    exists = folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    if not exists:
        return "generated"
    if not regenerate:
        if not _is_complete(folder, params):
            logger.info(
                "demo %s kept as it is (%s); `cw-pipeline demo --regenerate` rebuilds it "
                "when it holds only generated files",
                folder,
                _differences(folder, params),
            )
        return "kept"
    changes = _changes(folder) if folder.is_dir() else {"added": [folder.name]}
    changes = {k: changes.get(k, []) for k in ("added", "edited", "missing")}
    if any(changes.values()):
        return f"refused ({_describe_changes(changes)})"
    manifest = _read_manifest(folder) or {}
    return "kept" if manifest.get("params") == params else "regenerated"


def _write_dataset(root: Path, name: str, params: dict[str, Any]) -> None:
    """Build one demo folder in memory and write it with its manifest, atomically."""
    seed, size = params["seed"], params["size"]
    if name == "demo-distractors":
        files, n_queries = build_distractors(seed=seed, size=size, count=params["n_distractors"])
    else:
        files, n_queries = build_half(name, seed=seed, views=params["views"], size=size)
    manifest = {
        "generator": _GENERATOR,
        "params": params,
        "instances": list(demo_instances().get(name, ())),
        "n_queries": n_queries,
        "files": {
            rel: {"bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}
            for rel, data in sorted(files.items())
        },
    }
    _write_atomically(root, name, files, manifest)
    logger.info("demo: wrote %s (%d files)", root / name, len(files))


def _dataset_info(folder: Path, name: str, status: str) -> DemoDataset:
    """What ``folder`` holds now, from its manifest and its ``jpg/`` files."""
    manifest = _read_manifest(folder) or {}
    n_images = sum(1 for p in (folder / "jpg").glob("*.jpg") if p.is_file())
    has_gt = name != "demo-distractors"
    return DemoDataset(
        name=name,
        folder=folder,
        images=folder / "jpg",
        groundtruth=folder / "gt" if has_gt else None,
        n_images=n_images,
        n_queries=int(manifest.get("n_queries", 0)),
        instances=tuple(manifest.get("instances", ())),
        generated=status != "kept",
        status=status,
    )


def main() -> None:  # pragma: no cover - convenience: python -m cw_pipeline.core.demo ROOT
    """Generate the demo under ``argv[1]`` (default ``data/demo``) and print what it holds."""
    logging.basicConfig(level=logging.INFO)
    info = generate_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
    for d in info.datasets.values():
        print(f"{d.name}: {d.n_images} images, {d.n_queries} queries -> {d.images}")
