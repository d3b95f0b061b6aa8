"""Fetching one file (:func:`fetch`): resumable HTTP(S) transfers into a ``.part`` file under an
exclusive lock, checked against the server's length and the known size and sha256, retried
with back-off, and the content checks of particular files (a ground-truth pickle).

A cut connection is retried from where it stopped (HTTP ``Range``), a later run resumes a kept
``.part``; unknown sizes and sha256 (:data:`~cw_pipeline.download.sources.KNOWN`) are skipped
and the computed sha256 is printed; ground-truth pickles are loaded with the restricted
unpickler; then the file is renamed into place atomically."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from cw_pipeline.core.datasets import load_gnd_pickle
from cw_pipeline.download.errors import DownloadError, HostUnreachableError, IntegrityError

logger = logging.getLogger("cw_pipeline.download")

DEFAULT_TIMEOUT = 30.0  #: seconds, for connecting and for each read
DEFAULT_RETRIES = 5  #: resumptions of a cut transfer within one run
DEFAULT_RETRY_WAIT = 1.0  #: seconds before the first resumption (doubles, at most 30)
CHUNK = 1 << 20
USER_AGENT = "cw-pipeline/0.1 (benchmark download)"


def size_text(n: float) -> str:
    """``n`` bytes in the largest binary unit below it (``12.3 MiB``)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


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


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
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


def check_gnd(path: Path) -> None:
    """Refuse a file that is not a readable ground-truth pickle."""
    load_gnd_pickle(path)


CHECKS: dict[str, Callable[[Path], None]] = {"gnd": check_gnd}


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
                    f"{size_text(have)} kept in {part}, run again to resume"
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
    digest = file_sha256(part)
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
