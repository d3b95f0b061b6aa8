"""Safe archive extraction (:func:`safe_extract`): every tar member checked before anything is
written (absolute paths, ``..``, devices, links leaving the target), extraction into a
temporary folder beside the target, moved into place only once the whole archive passed. A
hidden marker ``.<archive>.extracted`` makes later runs skip an extracted archive."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

from cw_pipeline.download.errors import IntegrityError, UnsafeArchiveError


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
    try:
        placed = _extract_checked(archive, tmp, flatten, strip)
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


def _extract_checked(archive: Path, tmp: Path, flatten: bool, strip: str | None) -> dict[str, str]:
    """Check and extract every member of ``archive`` into ``tmp``: destination under the
    target -> member path in ``tmp``. UnsafeArchiveError / IntegrityError naming the member."""
    data_filter = getattr(tarfile, "data_filter", None)
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
                            f"{archive}: symlink {m.name!r} in an archive extracted flat; refused"
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
    return placed
