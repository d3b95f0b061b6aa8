"""Planning a download: which files a catalogue entry needs, where the datasets YAML (or the
default layout) puts them, a mirror applied to their URLs (:func:`plan_download`), and the
human description of a plan (:func:`describe_plan`).

Targets: when the config file defines a dataset named like the entry, its ``images`` and
``groundtruth`` are used (read with :func:`cw_pipeline.config.dataset_location`, which does not
require them to exist). Otherwise — the entries ship commented out — the *default layout* is
used: the paths of the commented entries in ``data/datasets.yaml``, relative to the config
file's folder (or to ``root``); uncomment the entry afterwards.

Mirror (``--mirror URL`` or ``$CW_PIPELINE_MIRROR``): each source ``scheme://host/path`` is
fetched from ``URL/host/path`` — the tree ``wget -x`` (or ``wget --mirror``) writes, served by
any HTTP server."""

from __future__ import annotations

import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cw_pipeline.config import dataset_location, default_config_path
from cw_pipeline.core.datasets.layouts import GT_FOLDER_LAYOUTS
from cw_pipeline.download.sources import (
    ALIASES,
    CATALOGUE,
    DEFAULT_DISTRACTOR_ARCHIVES,
    KNOWN,
    MAX_DISTRACTOR_ARCHIVES,
    REVISITOP1M_URL,
    ArchiveSource,
    Entry,
    Known,
)
from cw_pipeline.download.transfer import size_text

#: Environment variable giving a mirror base URL (``--mirror`` wins over it).
MIRROR_ENV = "CW_PIPELINE_MIRROR"


@dataclass(frozen=True)
class Item:
    """One file to fetch: a plain file saved at ``dest``, or an archive saved at ``dest``
    (the download cache) and extracted into ``extract_to``."""

    url: str  #: the URL fetched (mirror applied)
    source: str  #: the official URL
    dest: Path
    kind: Literal["file", "archive"]
    extract_to: Path | None = None
    flatten: bool = False
    strip_prefix: str | None = None
    check: Literal["gnd"] | None = None  #: content check before the file is kept
    known: Known = field(default_factory=Known)

    @property
    def marker(self) -> Path | None:
        """The archive's extraction marker (hidden: the image scanner skips it)."""
        if self.extract_to is None:
            return None
        return self.extract_to / f".{self.dest.name}.extracted"

    @property
    def done(self) -> bool:
        return self.marker.is_file() if self.marker is not None else self.dest.is_file()


@dataclass(frozen=True)
class DownloadPlan:
    """What :func:`run_plan` fetches for one name, and where it lands."""

    name: str
    layout: str
    images: Path
    groundtruth: Path | None
    items: tuple[Item, ...]
    config: Path  #: the config file consulted
    configured: bool  #: True when the targets come from a config entry (else default layout)
    cache: Path  #: where archives are downloaded


def resolve_mirror(explicit: str | None) -> str | None:
    """``explicit`` (``--mirror``), else ``$CW_PIPELINE_MIRROR``, else None; checked."""
    mirror = explicit if explicit else os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return None
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        origin = "--mirror" if explicit else f"${MIRROR_ENV}"
        raise ValueError(
            f"{origin} must be an http(s) URL such as http://host:8000/, got {mirror!r}"
        )
    return mirror


def apply_mirror(url: str, mirror: str | None) -> str:
    """``scheme://host/path`` → ``<mirror>/host/path`` (the ``wget -x`` tree); unchanged
    without a mirror. A query string is kept."""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    base = mirror.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"{base}/{parts.netloc}{parts.path}{query}"


def _canonical(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in CATALOGUE:
        names = ", ".join([*CATALOGUE, *ALIASES])
        raise ValueError(f"no download source for {name!r} (downloadable: {names})")
    return key


def plan_download(
    name: str,
    *,
    config: Path | str | None = None,
    root: Path | str | None = None,
    mirror: str | None = None,
    distractor_archives: int | None = None,
    cache: Path | str | None = None,
) -> DownloadPlan:
    """The files to fetch for ``name`` (a catalogue name or alias) and their targets.

    With ``root``, the default layout under ``root`` is used whatever the config says;
    otherwise the config entry named like the catalogue entry if there is one (its layout
    must be one the entry provides), else the default layout under the config file's folder.
    ``cache`` (default ``<root>/downloads``) holds archives while they download.
    """
    key = _canonical(name)
    entry = CATALOGUE[key]
    config_path = Path(config) if config is not None else default_config_path()
    _check_distractor_archives(entry, name, distractor_archives)
    location = None if root is not None else dataset_location(key, config_path)
    if location is not None:
        if location.layout not in entry.layouts:
            raise ValueError(
                f"{config_path}: dataset {key!r} has layout {location.layout!r}; the download "
                f"provides layout {' or '.join(repr(x) for x in entry.layouts)}"
            )
        layout, images, groundtruth = location.layout, location.images, location.groundtruth
        base = config_path.absolute().parent
    else:
        base = Path(root).absolute() if root is not None else config_path.absolute().parent
        layout = entry.default_layout
        images = base / entry.default_images
        groundtruth = base / entry.default_groundtruth if entry.default_groundtruth else None
    cache_dir = Path(cache).absolute() if cache is not None else base / "downloads"
    if entry.distractors:
        n = distractor_archives or DEFAULT_DISTRACTOR_ARCHIVES
        sources = [
            ArchiveSource(f"{REVISITOP1M_URL}/revisitop1m.{i}.tar.gz") for i in range(1, n + 1)
        ]
        items = [
            _archive(src, images / f"revisitop1m.{i}", cache_dir, mirror)
            for i, src in enumerate(sources, start=1)
        ]
    else:
        if groundtruth is None:
            raise ValueError(f"{config_path}: dataset {key!r} has no 'groundtruth' entry")
        items = _benchmark_items(entry, layout, images, groundtruth, cache_dir, mirror)
    return DownloadPlan(
        name=key,
        layout=layout,
        images=images,
        groundtruth=groundtruth,
        items=tuple(items),
        config=config_path,
        configured=location is not None,
        cache=cache_dir,
    )


def _check_distractor_archives(entry: Entry, name: str, count: int | None) -> None:
    """ValueError unless ``count`` (``--distractor-archives``) is unset, or fits ``entry``."""
    if count is None:
        return
    if not entry.distractors:
        raise ValueError(f"--distractor-archives applies to flickr100k only, not {name!r}")
    if not 1 <= count <= MAX_DISTRACTOR_ARCHIVES:
        raise ValueError(
            f"--distractor-archives must be in 1..{MAX_DISTRACTOR_ARCHIVES}, got {count}"
        )


def _known(url: str) -> Known:
    """What is known about the source file at ``url`` (nothing, by default)."""
    return KNOWN.get(url, Known())


def _archive(src: ArchiveSource, into: Path, cache_dir: Path, mirror: str | None) -> Item:
    """The item fetching ``src`` into ``cache_dir`` and extracting it into ``into``."""
    filename = posixpath.basename(urllib.parse.urlsplit(src.url).path)
    return Item(
        url=apply_mirror(src.url, mirror),
        source=src.url,
        dest=cache_dir / filename,
        kind="archive",
        extract_to=into,
        flatten=src.flatten,
        strip_prefix=src.strip_prefix,
        known=_known(src.url),
    )


def _benchmark_items(
    entry: Entry, layout: str, images: Path, groundtruth: Path, cache_dir: Path, mirror: str | None
) -> list[Item]:
    """The image archives, the ground-truth archive (text layouts) and the ``gnd`` pickle."""
    items = [_archive(src, images, cache_dir, mirror) for src in entry.images]
    if layout in GT_FOLDER_LAYOUTS:  # a folder of text files (+ the pickle beside them)
        assert entry.gt_archive is not None
        items.append(_archive(entry.gt_archive, groundtruth, cache_dir, mirror))
        pkl_dest = groundtruth / posixpath.basename(entry.gnd_pickle or "")
    else:
        pkl_dest = groundtruth
    assert entry.gnd_pickle is not None
    items.append(
        Item(
            url=apply_mirror(entry.gnd_pickle, mirror),
            source=entry.gnd_pickle,
            dest=pkl_dest,
            kind="file",
            check="gnd",
            known=_known(entry.gnd_pickle),
        )
    )
    return items


def describe_plan(plan: DownloadPlan) -> list[str]:
    """Human-readable lines: targets, then each file's URL, destination and state."""
    where = (
        f"entry in {plan.config}"
        if plan.configured
        else f"default layout; not configured in {plan.config}"
    )
    lines = [f"{plan.name}: layout {plan.layout} ({where})", f"  images        {plan.images}"]
    if plan.groundtruth is not None:
        lines.append(f"  ground truth  {plan.groundtruth}")
    todo = 0
    for item in plan.items:
        part = item.dest.with_name(item.dest.name + ".part")
        if item.done:
            state = "done"
        elif item.kind == "archive" and item.dest.is_file():
            state = "extract"
            todo += 1
        elif part.is_file():
            state = f"resume at {size_text(part.stat().st_size)}"
            todo += 1
        else:
            state = "fetch"
            todo += 1
        action = f"-> {item.dest}"
        if item.extract_to is not None:
            how = "flat" if item.flatten else "keeping folders"
            action += f", extract ({how}) into {item.extract_to}"
        checks = []
        if item.known.size is not None:
            checks.append(f"size {item.known.size}")
        if item.known.sha256 is not None:
            checks.append(f"sha256 {item.known.sha256[:12]}…")
        check = ", ".join(checks) or "length from the server only (no known size/sha256)"
        lines.append(f"  [{state}] {item.url}")
        lines.append(f"      {action}; checks: {check}")
    lines.append(f"{todo} of {len(plan.items)} files to fetch or extract")
    return lines
