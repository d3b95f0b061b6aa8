"""The real test data, for a clone without ``../shared/data``: ``make test-data``
(``cw-pipeline download test-data``).

Builds ``data/test-data/`` (the tree the tests look for, :mod:`cw_pipeline_tests.real_data`):

- ``ukbench/jpg/ukbench00000.jpg`` … ``ukbench00599.jpg``: the first 600 images of UKBench
  (150 objects × 4 views), halved to 320×240. Read from the official ``ukbench.zip`` with HTTP
  ``Range`` requests for those members only (about 90 MB of its 1.5 GB); from a server without
  ``Range`` the whole archive is downloaded (resumable) and read locally. Each member is
  checked by the archive's CRC-32 and decoded before it is written.
- ``groundtruth/oxford5k/``, ``paris6k/`` (the official text files and ``gnd_*.pkl``) and
  ``groundtruth/revisited/gnd_r*.pkl``: fetched with :func:`~cw_pipeline.download.fetch`
  (resumable, verified) and checked file by file against ``test_data.sha256``.

It is built in ``data/.test-data.partial/`` (what a cut run already wrote is kept and not
fetched again) and renamed into place when every check passes. A machine that cannot reach a
host gets one line naming it, and the mirror option (``--mirror``, ``$CW_PIPELINE_MIRROR``)
applies to every source.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from cw_pipeline.download.archives import safe_extract
from cw_pipeline.download.errors import DownloadError, HostUnreachableError, IntegrityError
from cw_pipeline.download.plan import apply_mirror
from cw_pipeline.download.sources import TEST_DATA_GROUNDTRUTH, UKBENCH_URLS
from cw_pipeline.download.transfer import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    check_gnd,
    fetch,
    file_sha256,
)

UKBENCH_IMAGES = 600  #: the first 150 objects
UKBENCH_SIZE = (320, 240)
_MEMBER = re.compile(r"(?:^|/)ukbench(\d{5})\.jpg$", re.IGNORECASE)
CHECKSUMS = Path(__file__).with_name("test_data.sha256")
BLOCK = 1 << 20  #: bytes per Range request (members are read in order: few requests)


def expected_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """``relative path -> sha256`` of every ground-truth file (``sha256sum`` format)."""
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


class RangeReader(io.RawIOBase):
    """A remote file read with HTTP ``Range`` requests, one :data:`BLOCK` at a time (the
    last block kept): enough for :class:`zipfile.ZipFile` to read its directory and chosen
    members. A cut connection is retried; a server that ignores ``Range`` raises
    :class:`NoRangeSupport`."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 3) -> None:
        self.url, self.timeout, self.retries = url, timeout, retries
        self.pos = 0
        self.requests = 0
        self._block: tuple[int, bytes] = (-1, b"")
        first = self._get(0, 0)
        self.size = first[1]

    def _get(self, start: int, end: int) -> tuple[bytes, int]:
        headers = {"User-Agent": USER_AGENT, "Range": f"bytes={start}-{end}"}
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                request = urllib.request.Request(self.url, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if response.status != 206:
                        raise NoRangeSupport(f"{self.url} answers Range with {response.status}")
                    total = response.headers.get("Content-Range", "").rpartition("/")[2]
                    return response.read(), int(total)
            except urllib.error.HTTPError as exc:
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {self.url}") from None
            except urllib.error.URLError as exc:
                raise HostUnreachableError(
                    f"cannot reach {urllib.parse.urlsplit(self.url).netloc} ({exc.reason}) "
                    f"for {self.url}"
                ) from None
            except (TimeoutError, ConnectionError, http.client.HTTPException, ValueError) as exc:
                if attempt == self.retries:
                    raise DownloadError(f"{self.url}: {exc or type(exc).__name__}") from None
                time.sleep(min(2**attempt, 10))
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            start, data = self._block
            if not start <= self.pos < start + len(data):
                start = self.pos - self.pos % BLOCK
                data, _ = self._get(start, min(start + BLOCK, self.size) - 1)
                self._block = (start, data)
            chunk = data[self.pos - start : self.pos - start + len(view) - done]
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done


class NoRangeSupport(DownloadError):
    """The server sends whole files only."""


def _halved(data: bytes, name: str) -> bytes:
    """A UKBench image (640×480) at 320×240, JPEG; refuses what does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{name} in ukbench.zip is not a readable image: {exc}") from None
    if rgb.size == (2 * UKBENCH_SIZE[0], 2 * UKBENCH_SIZE[1]):
        small = rgb.reduce(2)
    else:
        small = rgb.resize(UKBENCH_SIZE, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=95)
    return out.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ukbench_members(archive: zipfile.ZipFile, count: int = UKBENCH_IMAGES) -> dict[int, str]:
    """Image number → member name, for the first ``count`` images; all must be there."""
    found = {}
    for name in archive.namelist():
        match = _MEMBER.search(name)
        if match and int(match.group(1)) < count:
            found.setdefault(int(match.group(1)), name)
    missing = [f"ukbench{n:05d}.jpg" for n in range(count) if n not in found]
    if missing:
        raise IntegrityError(
            f"ukbench.zip lacks {len(missing)} of its first {count} images ({missing[0]} …)"
        )
    return found


def extract_ukbench(source: BinaryIO | Path, out: Path, count: int = UKBENCH_IMAGES) -> int:
    """The first ``count`` UKBench images of the zip ``source`` into ``out`` at 320×240; the
    ones already there are kept. Returns how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zipfile.ZipFile(source) as archive:
            members = ukbench_members(archive, count)
            for n in sorted(members):
                target = out / f"ukbench{n:05d}.jpg"
                if target.is_file():
                    continue
                data = archive.read(members[n])  # checks the member's CRC-32
                _write_atomic(target, _halved(data, members[n]))
                written += 1
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"ukbench.zip: {exc}") from None
    return written


def _ukbench(
    out: Path, cache: Path, mirror: str | None, timeout: float, say: Callable[[str], None]
) -> None:
    folder = out / "ukbench" / "jpg"
    if all((folder / f"ukbench{n:05d}.jpg").is_file() for n in range(UKBENCH_IMAGES)):
        return
    errors = []
    for official in UKBENCH_URLS:
        url = apply_mirror(official, mirror)
        try:
            reader = RangeReader(url, timeout)
        except NoRangeSupport:
            say(f"test-data: {url} sends whole files: fetching all of ukbench.zip (resumable)")
            result = fetch(url, cache / "ukbench.zip", timeout=timeout, progress=False)
            n = extract_ukbench(result.path, folder)
        except DownloadError as exc:  # unreachable, HTTP errors: try the next source
            errors.append(str(exc))
            continue
        else:
            say(f"test-data: reading {UKBENCH_IMAGES} images of {url} ({reader.size:,} bytes)")
            n = extract_ukbench(reader, folder)
            say(f"test-data: {reader.requests} range requests")
        say(f"test-data: ukbench: {n} images written to {folder}")
        return
    raise HostUnreachableError("ukbench.zip could not be fetched: " + "; ".join(errors))


def _groundtruth(
    out: Path, cache: Path, mirror: str | None, timeout: float, say: Callable[[str], None]
) -> None:
    for folder, urls in TEST_DATA_GROUNDTRUTH.items():
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        for official in urls:
            name = official.rsplit("/", 1)[1]
            url = apply_mirror(official, mirror)
            if name.endswith(".pkl"):
                if not (target / name).is_file():
                    say(f"test-data: fetching {url}")
                    fetch(url, target / name, check=check_gnd, timeout=timeout)
                continue
            marker = target / f".{name}.extracted"
            if marker.is_file():
                continue
            say(f"test-data: fetching {url}")
            result = fetch(url, cache / name, timeout=timeout)
            safe_extract(result.path, target, flatten=True, marker=marker)
            result.path.unlink(missing_ok=True)


def _bad(name: str, message: str) -> IntegrityError:
    exc = IntegrityError(message)
    exc.filename = name  # relative to the folder verified
    return exc


def verify(out: Path, sums: dict[str, str] | None = None) -> None:
    """Every ground-truth file against ``sums`` (default: :data:`CHECKSUMS`), and the UKBench
    images' count."""
    for name, digest in (expected_checksums() if sums is None else sums).items():
        path = out / name
        if not path.is_file():
            raise _bad(name, f"test data: {name} is missing after the download")
        got = file_sha256(path)
        if got != digest:
            raise _bad(
                name, f"test data: {name} has sha256 {got}, expected {digest} (the official file's)"
            )
    images = sorted((out / "ukbench" / "jpg").glob("ukbench*.jpg"))
    if len(images) != UKBENCH_IMAGES:
        raise IntegrityError(f"test data: {len(images)} UKBench images, {UKBENCH_IMAGES} expected")


def describe(dest: Path, mirror: str | None = None) -> list[str]:
    """What :func:`fetch_test_data` would fetch, and where it builds the data."""
    lines = [f"test-data: into {dest} (built in {dest.with_name('.' + dest.name + '.partial')})"]
    for folder, urls in TEST_DATA_GROUNDTRUTH.items():
        lines += [f"  {folder}/: {apply_mirror(url, mirror)}" for url in urls]
    lines += [
        f"  ukbench/jpg/: the first {UKBENCH_IMAGES} images of {apply_mirror(url, mirror)}"
        + ("" if k == 0 else " (if the one above fails)")
        for k, url in enumerate(UKBENCH_URLS)
    ]
    lines.append(f"  checked against {CHECKSUMS.name} ({len(expected_checksums())} files)")
    return lines


def fetch_test_data(
    dest: Path,
    *,
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] | None = print,
    sums: dict[str, str] | None = None,
) -> Path:
    """Build ``dest`` (``data/test-data``) from the public sources; returns it. Nothing is
    done when it is already complete. ``sums``: the expected ground-truth checksums (default:
    :data:`CHECKSUMS`)."""
    say = log or (lambda _line: None)
    if dest.is_dir():
        try:
            verify(dest, sums)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; remove {dest} and run this again") from None
        say(f"test-data: {dest} is complete")
        return dest
    partial = dest.with_name(f".{dest.name}.partial")
    cache = dest.with_name(f".{dest.name}.downloads")
    partial.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        _groundtruth(partial, cache, mirror, timeout, say)
        _ukbench(partial, cache, mirror, timeout, say)
    except HostUnreachableError as exc:
        raise HostUnreachableError(
            f"{exc}. Offline? What was fetched is kept in {partial} and the next run goes on "
            "from there; a mirror (--mirror, $CW_PIPELINE_MIRROR) or a copy of the data named by "
            "$CW_SHARED_DATA works too. Without the data the real-data tests are skipped."
        ) from None
    try:
        verify(partial, sums)
    except IntegrityError as exc:
        if exc.filename:  # fetched again next time: the file, and its folder's archives
            (partial / exc.filename).unlink(missing_ok=True)
            for marker in (partial / exc.filename).parent.glob(".*.extracted"):
                marker.unlink()
        raise IntegrityError(f"{exc}; the next run fetches it again") from None
    (partial / "README.md").write_text(
        "Real test data fetched by `make test-data` (cw_pipeline/download/test_data.py): the\n"
        "first 600 UKBench images at 320x240 and the official Oxford/Paris ground truth.\n"
        "Research-use data; see each source's terms.\n",
        encoding="utf-8",
    )
    os.replace(partial, dest)
    shutil.rmtree(cache, ignore_errors=True)
    say(f"test-data: ready in {dest}")
    return dest
