"""Download the public benchmarks into the configured layout (no Dagster).

``cw-pipeline download NAME`` fetches one catalogue entry from its official sources (listed in
the paper notes) and leaves it where ``data/datasets.yaml`` expects it:

=============  ==============================================================================
``oxford5k``   ``oxbuild_images-v1.tgz`` (flat) + ground truth: ``gt_files_170407.tgz`` and
               ``gnd_oxford5k.pkl`` (layout ``oxford``) or the pickle alone (layout ``gnd``)
``paris6k``    ``paris_1-v1.tgz``, ``paris_2-v1.tgz`` (``paris/<landmark>/`` →
               ``<images>/<landmark>/``) + ``paris_120310.tgz`` and ``gnd_paris6k.pkl``
``roxford5k``  the Oxford images + ``gnd_roxford5k.pkl`` (layout ``revisited``)
``rparis6k``   the Paris images + ``gnd_rparis6k.pkl``
``flickr100k`` the first N (default 10, i.e. 100k images) ``revisitop1m.<i>.tar.gz`` archives
               of the Revisited 1M distractors, each into ``<images>/revisitop1m.<i>/``
=============  ==============================================================================

The text ground truth (``gt_files_170407.tgz``, ``paris_120310.tgz``) is not in the paper
notes' list; it comes from the same official VGG pages as the images, and the ``oxford`` /
``paris`` layouts of the shipped config read it. The distractors are the Revisited 1M images
(the original Oxford 100k Flickr set has no archive among the listed sources).

Targets: when the config file defines a dataset named NAME, its ``images`` and ``groundtruth``
are used (read with :func:`cw_pipeline.config.dataset_location`, which does not require them to
exist). Otherwise — the entries ship commented out — the *default layout* is used: the paths of
the commented entries in ``data/datasets.yaml``, relative to the config file's folder (or to
``root``); uncomment the entry afterwards.

Transfer: resumable, into ``<file>.part`` with HTTP ``Range`` requests (a cut connection is
retried from where it stopped, a later run resumes a kept ``.part``); the result is checked
against the server's length, against :data:`KNOWN` sizes/sha256 where they are known (nothing
is known for these sources yet: unknown values are skipped and the computed sha256 is
printed), ground-truth pickles are loaded with the restricted unpickler; then the file is
renamed atomically. Archives are extracted with :func:`safe_extract` into a temporary folder
beside the target and moved in; a hidden marker ``.<archive>.extracted`` makes later runs skip
them. All failures raise :class:`DownloadError` (an ``OSError``), whose message is one line.

Mirror (``--mirror URL`` or ``$CW_PIPELINE_MIRROR``): each source ``scheme://host/path`` is
fetched from ``URL/host/path`` — the tree ``wget -x`` (or ``wget --mirror``) writes, served by
any HTTP server.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import posixpath
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "ALIASES",
    "CATALOGUE",
    "DEFAULT_DISTRACTOR_ARCHIVES",
    "KNOWN",
    "MIRROR_ENV",
    "DownloadError",
    "DownloadPlan",
    "FetchResult",
    "HostUnreachableError",
    "IntegrityError",
    "Item",
    "Known",
    "UnsafeArchiveError",
    "apply_mirror",
    "describe_plan",
    "fetch",
    "plan_download",
    "resolve_mirror",
    "run_plan",
    "safe_extract",
]

logger = logging.getLogger(__name__)

#: Environment variable giving a mirror base URL (``--mirror`` wins over it).
MIRROR_ENV = "CW_PIPELINE_MIRROR"
DEFAULT_DISTRACTOR_ARCHIVES = 10  #: 10 x 10k images = the "100k" distractor set
MAX_DISTRACTOR_ARCHIVES = 100  #: revisitop1m.1 .. revisitop1m.100
DEFAULT_TIMEOUT = 30.0  #: seconds, for connecting and for each read
DEFAULT_RETRIES = 5  #: resumptions of a cut transfer within one run
DEFAULT_RETRY_WAIT = 1.0  #: seconds before the first resumption (doubles, at most 30)
CHUNK = 1 << 20
USER_AGENT = "cw-pipeline/0.1 (benchmark download)"

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_GND_CLASSIC = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
_GND_REVISITED = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg"


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class DownloadError(OSError):
    """A download that cannot be completed; ``str()`` is one line naming the file or URL."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "download failed"


class HostUnreachableError(DownloadError):
    """The host of a URL could not be reached (refused, unknown name, timeout)."""


class IntegrityError(DownloadError):
    """A downloaded file has the wrong size or checksum, or is not what it should be."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the target folder or is a device, FIFO or odd link."""


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """Verified facts about a source file; None = unknown (that check is skipped)."""

    size: int | None = None
    sha256: str | None = None


#: Known sizes / sha256 by official URL. Empty on purpose: no value here has been verified
#: against the official files (they cannot be reached from where this was written), and a
#: wrong value would reject a good download. Each download prints its size and sha256; add
#: them here once checked against a second copy.
KNOWN: dict[str, Known] = {}


@dataclass(frozen=True)
class _ArchiveSource:
    url: str
    flatten: bool = False  # every file to the target's top level (names must be unique)
    strip_prefix: str | None = None  # leading folder removed where present (``paris/``)


@dataclass(frozen=True)
class _Entry:
    description: str
    default_layout: str
    layouts: tuple[str, ...]  # layouts whose files this entry provides
    default_images: str  # relative to the root (the config file's folder)
    default_groundtruth: str | None
    images: tuple[_ArchiveSource, ...] = ()
    gt_archive: _ArchiveSource | None = None  # Oxford-style text files (folder layouts)
    gnd_pickle: str | None = None  # gnd_*.pkl URL
    distractors: bool = False


_OXFORD_IMAGES = (_ArchiveSource(f"{_OXFORD}/oxbuild_images-v1.tgz", flatten=True),)
_PARIS_IMAGES = (
    _ArchiveSource(f"{_PARIS}/paris_1-v1.tgz", strip_prefix="paris"),
    _ArchiveSource(f"{_PARIS}/paris_2-v1.tgz", strip_prefix="paris"),
)

#: What each downloadable name fetches; the default paths are those of the commented-out
#: entries in ``data/datasets.yaml``.
CATALOGUE: dict[str, _Entry] = {
    "oxford5k": _Entry(
        "Oxford Buildings: 5,063 images, 55 queries",
        "oxford",
        ("oxford", "paris", "gnd"),
        "oxford5k/jpg",
        "groundtruth/oxford5k",
        images=_OXFORD_IMAGES,
        gt_archive=_ArchiveSource(f"{_OXFORD}/gt_files_170407.tgz", flatten=True),
        gnd_pickle=f"{_GND_CLASSIC}/oxford5k/gnd_oxford5k.pkl",
    ),
    "paris6k": _Entry(
        "Paris: 6,412 images in landmark folders, 55 queries",
        "paris",
        ("paris", "oxford", "gnd"),
        "paris6k/jpg",
        "groundtruth/paris6k",
        images=_PARIS_IMAGES,
        gt_archive=_ArchiveSource(f"{_PARIS}/paris_120310.tgz", flatten=True),
        gnd_pickle=f"{_GND_CLASSIC}/paris6k/gnd_paris6k.pkl",
    ),
    "roxford5k": _Entry(
        "Revisited Oxford: the Oxford images, 70 queries (Easy/Medium/Hard)",
        "revisited",
        ("revisited", "gnd"),
        "oxford5k/jpg",
        "groundtruth/revisited/gnd_roxford5k.pkl",
        images=_OXFORD_IMAGES,
        gnd_pickle=f"{_GND_REVISITED}/roxford5k/gnd_roxford5k.pkl",
    ),
    "rparis6k": _Entry(
        "Revisited Paris: the Paris images, 70 queries (Easy/Medium/Hard)",
        "revisited",
        ("revisited", "gnd"),
        "paris6k/jpg",
        "groundtruth/revisited/gnd_rparis6k.pkl",
        images=_PARIS_IMAGES,
        gnd_pickle=f"{_GND_REVISITED}/rparis6k/gnd_rparis6k.pkl",
    ),
    "flickr100k": _Entry(
        "distractors: the first N x 10k images of Revisited 1M (default N = 10)",
        "folder",
        ("folder",),
        "flickr100k/jpg",
        None,
        distractors=True,
    ),
}

#: Other accepted names.
ALIASES: dict[str, str] = {"distractors": "flickr100k", "revisitop1m": "flickr100k"}


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------


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
    from cw_pipeline.config import dataset_location, default_config_path

    key = _canonical(name)
    entry = CATALOGUE[key]
    config_path = Path(config) if config is not None else default_config_path()
    if distractor_archives is not None:
        if not entry.distractors:
            raise ValueError(f"--distractor-archives applies to flickr100k only, not {name!r}")
        if not 1 <= distractor_archives <= MAX_DISTRACTOR_ARCHIVES:
            raise ValueError(
                f"--distractor-archives must be in 1..{MAX_DISTRACTOR_ARCHIVES}, "
                f"got {distractor_archives}"
            )

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

    def known(url: str) -> Known:
        return KNOWN.get(url, Known())

    def archive(src: _ArchiveSource, into: Path) -> Item:
        filename = posixpath.basename(urllib.parse.urlsplit(src.url).path)
        return Item(
            url=apply_mirror(src.url, mirror),
            source=src.url,
            dest=cache_dir / filename,
            kind="archive",
            extract_to=into,
            flatten=src.flatten,
            strip_prefix=src.strip_prefix,
            known=known(src.url),
        )

    items: list[Item] = []
    if entry.distractors:
        n = distractor_archives or DEFAULT_DISTRACTOR_ARCHIVES
        for i in range(1, n + 1):
            src = _ArchiveSource(f"{_R1M}/revisitop1m.{i}.tar.gz")
            items.append(archive(src, images / f"revisitop1m.{i}"))
    else:
        items += [archive(src, images) for src in entry.images]
        if groundtruth is None:
            raise ValueError(f"{config_path}: dataset {key!r} has no 'groundtruth' entry")
        if layout in ("oxford", "paris"):  # a folder of text files (+ the pickle beside them)
            assert entry.gt_archive is not None
            items.append(archive(entry.gt_archive, groundtruth))
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
                known=known(entry.gnd_pickle),
            )
        )
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


def _size_text(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


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
            state = f"resume at {_size_text(part.stat().st_size)}"
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


# --------------------------------------------------------------------------------------------
# transfer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    path: Path
    size: int
    sha256: str
    resumed_from: int  #: bytes already in ``.part`` when the call started
    attempts: int  #: HTTP requests made


class _Interrupted(Exception):
    """The body stopped before its announced length (retry with a Range request)."""


class _Restart(Exception):
    """The server cannot continue the ``.part`` (e.g. 416): start over."""


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _reason_text(reason: Any, timeout: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "host name not found"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    text = getattr(reason, "strerror", None) or str(reason)
    return text.replace("\n", " ")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` → (START, TOTAL), None where absent."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span.strip() == "*" else int(span.split("-", 1)[0])
    return start, None if total.strip() in ("", "*") else int(total)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _transfer(url: str, part: Path, timeout: float, bar: Any) -> int | None:
    """One request: append to ``part`` from its current size; returns the total length."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total == offset:  # the .part is already complete
                return total
            raise _Restart(f"the server cannot resume at byte {offset}") from None
        exc.close()
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from None
    except urllib.error.URLError as exc:
        where = f"; {part} kept, run again to resume" if offset else ""
        reason = _reason_text(exc.reason, timeout)
        raise HostUnreachableError(
            f"cannot reach {_host(url)} ({reason}) for {url}{where}"
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Interrupted(f"no response ({exc or type(exc).__name__})") from None

    with response:
        status = response.status
        if status == 206 and offset:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"the server resumed at byte {start}, not {offset}")
            mode = "ab"
        elif status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            offset, mode = 0, "wb"  # a fresh transfer (or the server ignored Range)
        else:
            raise DownloadError(f"unexpected HTTP {status} for {url}")
        bar.total = total
        bar.n = offset
        bar.refresh()
        with part.open(mode) as fh:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                    raise _Interrupted(str(exc) or type(exc).__name__) from None
                if not chunk:
                    break
                fh.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")
    return total


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold ``<dest>.lock`` (flock) so that two runs never append to the same ``.part``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no guard
        yield
        return
    lock_path = dest.with_name(dest.name + ".lock")
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another download of {dest.name} is running ({lock_path} is locked)"
            ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _check_gnd(path: Path) -> None:
    from cw_pipeline.core.datasets import load_gnd_pickle

    load_gnd_pickle(path)


_CHECKS: dict[str, Callable[[Path], None]] = {"gnd": _check_gnd}


def fetch(
    url: str,
    dest: Path | str,
    *,
    size: int | None = None,
    sha256: str | None = None,
    check: Callable[[Path], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int | None = None,
    retry_wait: float | None = None,
    progress: bool = False,
    progress_stream: IO[str] | None = None,
    label: str | None = None,
) -> FetchResult:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming what a ``.part`` holds.

    A transfer cut short is resumed with a ``Range`` request up to ``retries`` times (default
    :data:`DEFAULT_RETRIES`); after that the ``.part`` is kept for the next call. The result
    must match the server's length, ``size`` and ``sha256`` when given, and pass ``check``
    (which raises ValueError/OSError on bad content); a file failing these is deleted and
    :class:`IntegrityError` raised. Then ``.part`` is renamed to ``dest`` atomically. A
    ``.part`` the server cannot continue (longer than the file, say) is started over once.
    ``<dest>.lock`` keeps a second process from writing the same ``.part`` meanwhile.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        return _fetch_locked(
            url,
            dest,
            size=size,
            sha256=sha256,
            check=check,
            timeout=timeout,
            retries=DEFAULT_RETRIES if retries is None else retries,
            retry_wait=DEFAULT_RETRY_WAIT if retry_wait is None else retry_wait,
            progress=progress,
            progress_stream=progress_stream,
            label=label,
        )


def _fetch_locked(
    url: str,
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    check: Callable[[Path], None] | None,
    timeout: float,
    retries: int,
    retry_wait: float,
    progress: bool,
    progress_stream: IO[str] | None,
    label: str | None,
) -> FetchResult:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    resumed_from = part.stat().st_size if part.exists() else 0
    attempts = failures = restarts = 0
    bar = tqdm(
        desc=label or dest.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        file=progress_stream if progress_stream is not None else sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )
    try:
        while True:
            attempts += 1
            try:
                total = _transfer(url, part, timeout, bar)
                break
            except _Restart as exc:  # once: the .part does not fit the remote file
                restarts += 1
                if restarts > 1:
                    raise DownloadError(f"{url}: {exc}, again after starting over") from None
                logger.warning("%s: %s; starting over", url, exc)
                part.unlink(missing_ok=True)
                continue
            except _Interrupted as exc:
                reason = str(exc)
            failures += 1
            if failures > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"download of {url} interrupted ({reason}) after {attempts} requests; "
                    f"{_size_text(have)} kept in {part}, run again to resume"
                )
            logger.info("%s: %s; resuming (%d/%d)", url, reason, failures, retries)
            time.sleep(min(retry_wait * 2 ** (failures - 1), 30.0))
    finally:
        bar.close()

    actual = part.stat().st_size
    problem = None
    if total is not None and actual != total:
        problem = f"{actual} bytes, but the server announced {total}"
    elif size is not None and actual != size:
        problem = f"{actual} bytes, expected {size}"
    digest = _sha256(part)
    if problem is None and sha256 is not None and digest != sha256.lower():
        problem = f"sha256 {digest} does not match the expected {sha256.lower()}"
    if problem is None and check is not None:
        try:
            check(part)
        except (ValueError, OSError) as exc:
            problem = f"not a valid file: {exc}"
    if problem is not None:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{url}: {problem}; refused (the partial file was deleted)")
    os.replace(part, dest)
    return FetchResult(dest, actual, digest, resumed_from, attempts)


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------


def _member_path(name: str, archive: Path) -> str:
    """The member's normalized relative POSIX path; refuses absolute paths and ``..``."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refused")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refused")
    return "/".join(p for p in parts if p not in ("", "."))


def _inside(rel: str) -> bool:
    norm = posixpath.normpath(rel) if rel else "."
    return not (norm == ".." or norm.startswith("../") or norm.startswith("/"))


def _check_member(m: tarfile.TarInfo, rel: str, links: set[str], archive: Path) -> None:
    parents = rel.split("/")[:-1]
    for i in range(1, len(parents) + 1):
        if "/".join(parents[:i]) in links:
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} lies under the link {'/'.join(parents[:i])!r}; "
                "refused"
            )
    if m.isreg() or m.isdir():
        return
    if m.issym() or m.islnk():
        target = m.linkname
        if target.startswith(("/", "\\")) or (len(target) > 1 and target[1] == ":"):
            raise UnsafeArchiveError(
                f"{archive}: link {m.name!r} points to the absolute path {target!r}; refused"
            )
        # symlinks resolve from their folder, hard links from the archive root
        joined = posixpath.join(posixpath.dirname(rel), target) if m.issym() else target
        if not _inside(joined):
            raise UnsafeArchiveError(
                f"{archive}: link {m.name!r} points outside the target ({target!r}); refused"
            )
        if m.islnk():
            _check_hardlink_target(posixpath.normpath(target), links, m, archive)
        return
    kind = "FIFO" if m.isfifo() else "device" if m.isdev() else f"member of type {m.type!r}"
    raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a {kind}; refused")


def _check_hardlink_target(target: str, links: set[str], m: tarfile.TarInfo, archive: Path) -> None:
    parts = target.split("/")
    for i in range(1, len(parts) + 1):
        if "/".join(parts[:i]) in links:
            raise UnsafeArchiveError(
                f"{archive}: hard link {m.name!r} goes through the link {'/'.join(parts[:i])!r}; "
                "refused"
            )


def _destination(rel: str, flatten: bool, strip: str | None) -> str | None:
    """Where an extracted path goes under the target (None: it is a folder to drop)."""
    if strip is not None and (rel == strip or rel.startswith(strip + "/")):
        rel = rel[len(strip) + 1 :]
    if not rel:
        return None
    return rel.rsplit("/", 1)[-1] if flatten else rel


def safe_extract(
    archive: Path | str,
    target: Path | str,
    *,
    flatten: bool = False,
    strip_prefix: str | None = None,
    marker: Path | str | None = None,
    marker_info: dict[str, Any] | None = None,
) -> int:
    """Extract a tar archive (any compression) into ``target``; returns the files placed.

    Every member is checked before anything is written: absolute paths, ``..``, devices,
    FIFOs and other special files are refused; symbolic and hard links must stay inside the
    target and no member may lie under a link. Members are extracted into a temporary
    folder beside ``target`` (with the ``data`` filter, which also drops unsafe modes, where
    Python has it) and only moved into ``target`` once the whole archive passed, so a refused
    archive leaves ``target`` untouched. ``flatten`` puts every file at the top level (names
    must be unique; symlinks refused); ``strip_prefix`` removes a leading folder. ``marker``
    is written last (JSON with ``marker_info`` and the file count).
    """
    archive, target = Path(archive), Path(target)
    strip = strip_prefix.strip("/") if strip_prefix else None
    made = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # deepest 1st
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{target.name}-", dir=target.parent))
    ok = False
    data_filter = getattr(tarfile, "data_filter", None)
    try:
        links: set[str] = set()
        placed: dict[str, str] = {}  # destination -> member
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(f"{archive}: not a readable tar archive ({exc})") from None
        with tar:
            try:
                for m in tar:
                    rel = _member_path(m.name, archive)
                    if not rel:
                        continue
                    _check_member(m, rel, links, archive)
                    dest = _destination(rel, flatten, strip)
                    if m.issym():
                        if flatten:
                            raise UnsafeArchiveError(
                                f"{archive}: symlink {m.name!r} in an archive extracted flat; "
                                "refused"
                            )
                        links.add(rel)
                    if dest is not None and not m.isdir():
                        if dest in placed:
                            raise IntegrityError(
                                f"{archive}: members {placed[dest]!r} and {m.name!r} both "
                                f"extract to {dest!r}"
                            )
                        placed[dest] = rel
                    m.name = rel
                    if data_filter is not None:  # also drops setuid bits and owners
                        tar.extract(m, tmp, set_attrs=not m.isdir(), filter="data")
                    else:  # Python < 3.11.4: the checks above guard; no modes or owners
                        tar.extract(m, tmp, set_attrs=False)
            except UnsafeArchiveError:
                raise
            except tarfile.TarError as exc:
                if isinstance(exc, getattr(tarfile, "FilterError", ())):  # the data filter
                    raise UnsafeArchiveError(f"{archive}: {exc}; refused") from None
                raise IntegrityError(f"{archive}: corrupt archive ({exc})") from None
            except (EOFError, KeyError, zlib.error) as exc:  # KeyError: hard link to nothing
                raise IntegrityError(f"{archive}: corrupt archive ({exc})") from None
        target.mkdir(parents=True, exist_ok=True)
        for dest, rel in placed.items():
            out = target / dest
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, out)
        if marker is not None:
            info = {**(marker_info or {}), "archive": archive.name, "files": len(placed)}
            tmp_marker = Path(marker).with_name(Path(marker).name + ".tmp")
            tmp_marker.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp_marker, marker)
        ok = True
        return len(placed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:  # a refused archive leaves no trace, not even the folders made for it
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break


# --------------------------------------------------------------------------------------------
# running a plan
# --------------------------------------------------------------------------------------------


def run_plan(
    plan: DownloadPlan,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    keep_archives: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int | None = None,
) -> dict[str, Any]:
    """Fetch, verify and extract every item not yet done; returns a summary.

    Archives are deleted after a successful extraction unless ``keep_archives``; ``log``
    (None: silent) receives one line per step.
    """
    say = log or (lambda _line: None)
    fetched: list[dict[str, Any]] = []
    skipped = 0
    extracted_files = 0
    for item in plan.items:
        if item.done:
            skipped += 1
            continue
        if not (item.kind == "archive" and item.dest.is_file()):
            say(f"{plan.name}: fetching {item.url}")
            res = fetch(
                item.url,
                item.dest,
                size=item.known.size,
                sha256=item.known.sha256,
                check=_CHECKS[item.check] if item.check else None,
                timeout=timeout,
                retries=retries,
                progress=progress,
            )
            verified = "size and sha256 verified" if item.known.sha256 else "no known sha256"
            resumed = f", resumed at {_size_text(res.resumed_from)}" if res.resumed_from else ""
            say(
                f"{plan.name}: {item.dest.name}: {_size_text(res.size)}{resumed}, "
                f"sha256 {res.sha256} ({verified})"
            )
            fetched.append({"url": item.url, "path": str(res.path), "sha256": res.sha256})
            digest = res.sha256
        else:
            digest = _sha256(item.dest)
        if item.kind == "archive":
            assert item.extract_to is not None and item.marker is not None
            say(f"{plan.name}: extracting {item.dest.name} into {item.extract_to}")
            n = safe_extract(
                item.dest,
                item.extract_to,
                flatten=item.flatten,
                strip_prefix=item.strip_prefix,
                marker=item.marker,
                marker_info={"url": item.source, "sha256": digest},
            )
            extracted_files += n
            say(f"{plan.name}: {n} files from {item.dest.name}")
            if not keep_archives:
                item.dest.unlink(missing_ok=True)
    summary = {
        "name": plan.name,
        "layout": plan.layout,
        "images": str(plan.images),
        "groundtruth": None if plan.groundtruth is None else str(plan.groundtruth),
        "fetched": fetched,
        "extracted_files": extracted_files,
        "already_done": skipped,
        "configured": plan.configured,
    }
    if plan.configured:
        say(f"{plan.name}: ready ({plan.config})")
    else:
        say(
            f"{plan.name}: ready; uncomment its entry in {plan.config} (images: {plan.images}"
            + (f", groundtruth: {plan.groundtruth}" if plan.groundtruth else "")
            + ")"
        )
    return summary
