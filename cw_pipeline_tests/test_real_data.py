"""Where the real-data tests find their data, and what a clone without it does
(:mod:`cw_pipeline_tests.real_data`): skipped with one line saying how many and how to enable
them, a failure under ``$CW_REQUIRE_TEST_DATA`` (CI) or with a wrong ``$CW_SHARED_DATA``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cw_pipeline_tests import real_data

REPO = real_data.REPO_ROOT
#: Real-data tests (and others) the clone runs: the ground-truth readers and the configuration.
SAMPLE = ["cw_pipeline_tests/core/test_datasets.py", "cw_pipeline_tests/test_config.py"]


def _complete(folder: Path) -> Path:
    for part in real_data.REQUIRED:
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_bytes(b"x")
    return folder


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(real_data.PATH_ENV, raising=False)
    monkeypatch.delenv(real_data.REQUIRE_ENV, raising=False)


def test_the_search_order(tmp_path: Path, monkeypatch, no_env) -> None:
    repo = tmp_path / "work" / "repo"
    shared = tmp_path / "work" / "shared" / "data"
    inside = repo / "data" / "test-data"
    repo.mkdir(parents=True)
    assert real_data.locate(repo) == real_data.Located(None)
    _complete(inside)
    assert real_data.locate(repo).path == inside.resolve()
    _complete(shared)
    assert real_data.locate(repo).path == shared.resolve()
    explicit = _complete(tmp_path / "elsewhere")
    monkeypatch.setenv(real_data.PATH_ENV, str(explicit))
    assert real_data.locate(repo).path == explicit.resolve()


def test_an_incomplete_folder_is_passed_over(tmp_path: Path, no_env) -> None:
    repo = tmp_path / "work" / "repo"
    shared = _complete(tmp_path / "work" / "shared" / "data")
    (shared / "ukbench" / "jpg" / "ukbench00599.jpg").unlink()  # an interrupted copy
    inside = _complete(repo / "data" / "test-data")
    assert real_data.locate(repo).path == inside.resolve()
    assert real_data.missing_parts(shared) == ["ukbench/jpg/ukbench00599.jpg"]


def test_a_wrong_cw_shared_data_is_an_error_never_a_skip(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    _complete(repo / "data" / "test-data")
    monkeypatch.setenv(real_data.PATH_ENV, str(tmp_path / "typo"))
    located = real_data.locate(repo)
    assert located.path is None
    assert f"{tmp_path / 'typo'} is not a folder" in located.error
    half = tmp_path / "half"
    (half / "groundtruth").mkdir(parents=True)
    monkeypatch.setenv(real_data.PATH_ENV, str(half))
    assert "lacks ukbench/jpg/ukbench00000.jpg" in real_data.locate(repo).error


def _clone(root: Path) -> Path:
    """The repository's files (tracked or not ignored, as in this working tree) in
    ``root/clone``, with nothing beside it: no ``../shared``, no ``data/test-data``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    clone = root / "clone"
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            (clone / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / os.fsdecode(name))
    assert not (root / "shared").exists()
    return clone


def _pytest(clone: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTEST") and k not in (real_data.PATH_ENV, real_data.REQUIRE_ENV)
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *SAMPLE],
        cwd=clone,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _counts(output: str) -> dict[str, int]:
    last = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|error)", last)}


def test_a_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    """Skipped, summed in one line with the command that enables them; a failure in CI."""
    clone = _clone(tmp_path)
    proc = _pytest(clone)
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = _counts(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if real_data.SKIP_TAG in line]
    assert len(lines) == 1, proc.stdout[-3000:]
    skipped = int(lines[0].split()[0])
    assert skipped == counts["skipped"] > 10 and counts["passed"] > 10
    assert "run `make test-data` to enable them" in lines[0]

    ci = _pytest(clone, **{real_data.REQUIRE_ENV: "1"})
    assert ci.returncode == 1, ci.stdout[-3000:]
    ci_counts = _counts(ci.stdout)
    assert "skipped" not in ci_counts and ci_counts["error"] == skipped
    assert real_data.required_reason() in ci.stdout

    wrong = _pytest(clone, **{real_data.PATH_ENV: str(tmp_path / "nowhere")})
    assert wrong.returncode == 1 and _counts(wrong.stdout)["error"] == skipped
    assert f"{tmp_path / 'nowhere'} is not a folder" in wrong.stdout


def test_a_clone_reads_data_test_data(tmp_path: Path, shared_data: Path) -> None:
    """``make test-data``'s folder inside the clone enables every real-data test."""
    clone = _clone(tmp_path)
    (clone / "data" / "test-data").symlink_to(shared_data, target_is_directory=True)
    proc = _pytest(clone, **{real_data.REQUIRE_ENV: "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "skipped" not in _counts(proc.stdout)
    assert real_data.SKIP_TAG not in proc.stdout
