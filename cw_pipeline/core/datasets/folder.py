"""Plain image folders: a deterministic scan that lists and ``stat``-s entries (never opens
them), follows symlinks that stay inside the folder, and reports what it skipped and why."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cw_pipeline.core.datasets.model import DEFAULT_IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

#: What ``stat`` says a directory entry is, for messages (regular files and folders aside).
_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "folder"),
    (stat.S_ISLNK, "symlink"),
)


def file_kind(mode: int) -> str:
    """``"regular file"``, ``"folder"``, ``"FIFO"``, ``"socket"``, … for a ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "special file")


def shown_name(name: str) -> str:
    """``name`` as text that can be stored and printed: bytes that are not UTF-8 (decoded by
    Python as surrogate escapes) become ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _message_name(name: str) -> str:
    """:func:`shown_name` with control characters as ``\\xNN`` too (one line in messages)."""
    return "".join(
        ch if ord(ch) >= 32 and ord(ch) != 127 else f"\\x{ord(ch):02x}" for ch in shown_name(name)
    )


def name_problem(relpath: str) -> str | None:
    """Why a relative path cannot be an image id (None when it can).

    Image ids are stored as UTF-8 text, printed in logs and reports and written one per line
    in ground-truth lists, and they may not hold backslashes (see :func:`check_image_id`): so
    names that are not UTF-8, hold a backslash or a control character are refused.
    """
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (image ids are UTF-8 text)"
    if "\\" in relpath:
        return "its name contains a backslash, which image ids may not hold"
    bad = next((ch for ch in relpath if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        return f"its name contains the control character U+{ord(bad):04X}"
    return None


@dataclass(frozen=True)
class ScannedFile:
    """A file of an image folder that has an image extension.

    ``relpath`` and ``image_id`` are the names as Python decodes them (not-UTF-8 bytes as
    surrogate escapes, see :func:`shown_name`). ``error`` says why the file cannot be indexed
    (not a regular file, vanished, unrepresentable name); such a file is never opened.
    """

    image_id: str
    relpath: str
    size: int
    mtime_ns: int
    error: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """An entry of an image folder that is not an image candidate, and why."""

    relpath: str
    reason: str


@dataclass
class FolderScan:
    """The result of :func:`scan_folder`: image candidates (sorted) and skipped entries."""

    files: list[ScannedFile]
    skipped: list[SkippedFile]

    @property
    def images(self) -> list[ScannedFile]:
        """The candidates that can be read (no ``error``)."""
        return [f for f in self.files if f.error is None]


def skipped_summary(skipped: Sequence[SkippedFile], *, names: int = 5) -> str:
    """``"3 files (2 unsupported extension .gif, 1 not a regular file (FIFO)): a.gif, …"``;
    empty when nothing was skipped. ``names`` file names are listed at most."""
    if not skipped:
        return ""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    reasons = ", ".join(
        f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    listed = ", ".join(shown_name(s.relpath) for s in skipped[:names])
    more = f" and {len(skipped) - names} more" if len(skipped) > names else ""
    noun = "file" if len(skipped) == 1 else "files"
    return f"{len(skipped)} {noun} ({reasons}): {listed}{more}"


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class _Walk:
    """The state of one :func:`scan_folder` walk: what was found, skipped and visited."""

    root: Path
    real_root: Path
    exts: set[str]
    flat: bool
    found: list[ScannedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    visited: set[Path] = field(default_factory=set)
    stack: list[tuple[Path, tuple[str, ...]]] = field(default_factory=list)

    def list_folder(self, folder: Path, rel_parts: tuple[str, ...]) -> list[os.DirEntry[str]]:
        """The entries of ``folder`` by name; a sub-folder that vanished is skipped (empty)."""
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if not rel_parts:
                raise
            logger.warning("skipping folder %s: it vanished after the listing", folder)
            self.skipped.append(
                SkippedFile("/".join(rel_parts), "folder vanished after the listing")
            )
            return []

    def entry(self, entry: os.DirEntry[str], rel_parts: tuple[str, ...]) -> None:
        """Record one directory entry: a candidate, a skipped entry or a folder to descend."""
        parts = (*rel_parts, entry.name)
        rel = "/".join(parts)
        if entry.name.startswith("."):
            self.skipped.append(SkippedFile(rel, "hidden name"))
            return
        path = Path(entry.path)
        ext = Path(entry.name).suffix.lower()
        candidate = ext in self.exts
        shown = self.root / _message_name(rel)
        link = entry.is_symlink()
        target = None
        if link:
            target = self._follow(path, rel, shown, candidate)
            if target is None:
                return
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            self._unstatable(exc, rel_parts, entry.name, shown, candidate)
            return
        if stat.S_ISDIR(st.st_mode):
            real = target if target is not None else path.resolve()
            if real in self.visited:
                logger.warning("skipping %s: folder %s already scanned", shown, real)
                return
            self.visited.add(real)
            self.stack.append((path, parts))
            return
        self._file(st, rel_parts, entry.name, shown, ext, candidate, link)

    def _follow(self, path: Path, rel: str, shown: Path, candidate: bool) -> Path | None:
        """A symlink's target; None (skipped) when broken or looping; ValueError when an image
        or folder link leaves the root."""
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            logger.warning("skipping broken or looping symlink %s (%s)", shown, exc)
            self.skipped.append(SkippedFile(rel, "broken or looping symlink"))
            return None
        if not _is_within(target, self.real_root) and (candidate or target.is_dir()):
            raise ValueError(
                f"symlink {shown} points outside the image folder {self.root}: {target}"
            )
        return target

    def _unstatable(
        self,
        exc: OSError,
        rel_parts: tuple[str, ...],
        name: str,
        shown: Path,
        candidate: bool,
    ) -> None:
        """An entry whose ``stat`` failed: a candidate with an error, else skipped."""
        rel = "/".join((*rel_parts, name))
        if not candidate:
            self.skipped.append(SkippedFile(rel, "vanished or unreadable entry"))
            return
        what = "cannot stat it"
        if isinstance(exc, FileNotFoundError):
            what = "it vanished after the listing"
        error = f"cannot load image '{shown}': {what} ({exc.strerror or exc})"
        self.found.append(_candidate(rel_parts, name, rel, self.flat, -1, -1, error))

    def _file(
        self,
        st: os.stat_result,
        rel_parts: tuple[str, ...],
        name: str,
        shown: Path,
        ext: str,
        candidate: bool,
        link: bool,
    ) -> None:
        """A non-folder entry: a candidate (with an error when unreadable) or skipped."""
        rel = "/".join((*rel_parts, name))
        kind = file_kind(st.st_mode)
        via = ", through a symlink" if link else ""
        if not candidate:
            reason = (
                f"not a regular file ({kind})"
                if kind != "regular file"
                else f"unsupported extension {ext}"
                if ext
                else "no extension"
            )
            self.skipped.append(SkippedFile(rel, reason))
            return
        error = None
        if kind != "regular file":
            error = (
                f"cannot load image '{shown}': not a regular file ({kind}{via}); only "
                "regular files are read"
            )
        elif (problem := name_problem(rel)) is not None:
            error = f"cannot load image '{shown}': {problem}"
        self.found.append(
            _candidate(rel_parts, name, rel, self.flat, int(st.st_size), int(st.st_mtime_ns), error)
        )


def _check_unique(found: Sequence[ScannedFile]) -> None:
    """Raise ValueError naming both files when two readable candidates share an image id."""
    by_id: dict[str, str] = {}
    for f in found:
        if f.error is not None:
            continue
        if f.image_id in by_id:
            raise ValueError(
                f"image id {f.image_id!r} is not unique: {by_id[f.image_id]!r} and {f.relpath!r}"
            )
        by_id[f.image_id] = f.relpath


def scan_folder(
    root: Path | str,
    extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
    *,
    flat: bool = False,
) -> FolderScan:
    """Every entry under ``root``: image candidates with ``stat`` data, and what was skipped.

    Nothing is opened: entries are listed and ``stat``-ed only, so no FIFO, device or socket
    can block the scan. A candidate is an entry whose extension is in ``extensions``
    (case-insensitive) and that is not a folder; one that is not a regular file (after
    following a symlink), that vanished between the listing and its ``stat``, or whose name
    cannot be an image id (:func:`name_problem`) carries an ``error`` and is never read. Any
    other entry is skipped with its reason: hidden names (files and folders starting with
    ``.``), broken or looping symlinks, other extensions, non-regular files, a sub-folder that
    vanished before it was listed.

    ``image_id`` is the relative path without extension (``"shard1/img"``), or the bare file
    stem with ``flat=True``. Ids of readable candidates must be unique. Symlinks resolving
    inside ``root`` are followed (each real folder once, so loops end); one to an image or
    folder outside ``root`` raises ValueError naming it.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder not found: {root_path}")
    real_root = root_path.resolve()
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    walk = _Walk(root_path, real_root, exts, flat, visited={real_root}, stack=[(root_path, ())])
    while walk.stack:
        folder, rel_parts = walk.stack.pop()
        for entry in walk.list_folder(folder, rel_parts):
            walk.entry(entry, rel_parts)
    walk.found.sort(key=lambda f: f.relpath)
    walk.skipped.sort(key=lambda s: s.relpath)
    _check_unique(walk.found)
    return FolderScan(walk.found, walk.skipped)


def _candidate(
    rel_parts: tuple[str, ...],
    name: str,
    rel: str,
    flat: bool,
    size: int,
    mtime_ns: int,
    error: str | None,
) -> ScannedFile:
    stem = Path(name).stem
    image_id = stem if flat else "/".join((*rel_parts, stem))
    return ScannedFile(image_id, rel, size, mtime_ns, error)


def scan_image_folder(
    root: Path | str,
    extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
    *,
    flat: bool = False,
) -> list[tuple[str, str]]:
    """The readable images under ``root`` as sorted ``(image_id, relative posix path)`` pairs.

    :func:`scan_folder`'s candidates without an ``error``; the others are logged as warnings
    and left out. A plain folder carries no ground truth (distractors).
    """
    scan = scan_folder(root, extensions, flat=flat)
    for f in scan.files:
        if f.error is not None:
            logger.warning("skipping %s", f.error)
    return [(f.image_id, f.relpath) for f in scan.images]
