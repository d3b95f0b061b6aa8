"""``make test`` sets itself up: ``.ci/test-deps`` (``make test-deps``, a prerequisite of
``test``) installs the system packages the tests use with apt-get when they are missing, and
``.ci/run`` only runs ``make test``.

The script runs here against fake commands on a PATH of their own (``apt-get``, ``sudo``,
``id``, ``redis-server``, ``make``) that record their arguments: nothing is installed or
uninstalled.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DEPS = REPO / ".ci" / "test-deps"
CI_RUN = REPO / ".ci" / "run"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Machine:
    """A fake machine: a PATH holding only bash, env and the fakes, a Chromium path and a
    PostgreSQL root that exist or not, and a log of the fakes' calls."""

    def __init__(self, root: Path, *, uid: int = 0) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        self.log.touch()
        for tool in ("bash", "env"):
            real = shutil.which(tool)
            assert real, tool
            (self.bin / tool).symlink_to(real)
        _script(self.bin / "id", f'[ "$1" = -u ] && echo {uid}\n')
        self.chromium = root / "chromium"
        self.pg_root = root / "postgresql"

    def install(self, *what: str) -> None:
        """Make these present: chromium, redis-server, postgresql."""
        for name in what:
            if name == "chromium":
                _script(self.chromium, "")
            elif name == "redis-server":
                _script(self.bin / "redis-server", "")
            elif name == "postgresql":
                for tool in ("postgres", "initdb"):
                    (self.pg_root / "15" / "bin").mkdir(parents=True, exist_ok=True)
                    _script(self.pg_root / "15" / "bin" / tool, "")

    def fake(self, name: str, exit_code: int = 0, run_args: bool = False) -> None:
        """A command that logs ``name ARGS`` (and the DEBIAN_FRONTEND it saw), then exits
        with ``exit_code`` (or, with ``run_args``, runs its arguments, like sudo)."""
        tail = 'exec "$@"\n' if run_args else f"exit {exit_code}\n"
        _script(
            self.bin / name,
            f'echo "{name} $* (DEBIAN_FRONTEND=$DEBIAN_FRONTEND)" >> "{self.log}"\n' + tail,
        )

    def run(self, script: Path = TEST_DEPS, *args: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": str(self.bin),
            "HOME": str(self.root),
            "CW_CHROMIUM": str(self.chromium),
            "CW_POSTGRES_ROOT": str(self.pg_root),
        }
        return subprocess.run(
            [str(self.bin / "bash"), str(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_nothing_missing_is_silent_and_installs_nothing(machine: Machine) -> None:
    machine.install("chromium", "redis-server", "postgresql")
    machine.fake("apt-get")
    proc = machine.run()
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert machine.calls() == []


def test_missing_packages_are_installed_with_apt_get_as_root(machine: Machine) -> None:
    machine.install("redis-server")
    machine.fake("apt-get")
    proc = machine.run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert (
        proc.stderr.strip() == "test-deps: installing chromium postgresql (apt-get) for the tests"
    )
    assert machine.calls() == [
        "apt-get -y -qq install chromium postgresql (DEBIAN_FRONTEND=noninteractive)"
    ]


def test_not_root_goes_through_sudo(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=1000)
    machine.install("chromium", "postgresql")
    machine.fake("apt-get")
    machine.fake("sudo", run_args=True)
    proc = machine.run()
    assert proc.returncode == 0, proc.stderr
    assert machine.calls() == [
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -qq install redis-server "
        "(DEBIAN_FRONTEND=)",
        "apt-get -y -qq install redis-server (DEBIAN_FRONTEND=noninteractive)",
    ]


def test_a_failed_install_updates_the_package_lists_and_retries(machine: Machine) -> None:
    machine.install("chromium", "postgresql")
    # apt-get fails until `update` has run (no package lists on a fresh machine)
    _script(
        machine.bin / "apt-get",
        f'echo "apt-get $*" >> "{machine.log}"\n'
        f'case "$*" in *update*) : > "{machine.root}/updated" ;; esac\n'
        f'[ -e "{machine.root}/updated" ]\n',
    )
    proc = machine.run()
    assert proc.returncode == 0, proc.stderr
    assert machine.calls() == [
        "apt-get -y -qq install redis-server",
        "apt-get -y -qq update",
        "apt-get -y -qq install redis-server",
    ]


def test_an_install_that_keeps_failing_fails_loudly(machine: Machine) -> None:
    machine.fake("apt-get", exit_code=100)
    proc = machine.run()
    assert proc.returncode == 1
    assert "test-deps: apt-get could not install chromium redis-server postgresql" in proc.stderr


def test_without_apt_get_it_fails_with_what_to_install(machine: Machine) -> None:
    machine.install("chromium")
    proc = machine.run()
    assert proc.returncode == 1 and proc.stdout == ""
    message = proc.stderr.strip()
    assert message.startswith(
        "test-deps: the tests need redis-server postgresql and apt-get is not available here"
    ), message
    assert str(machine.pg_root) in message and "then run make test again" in message
    assert machine.calls() == []


def test_not_root_without_sudo_says_what_to_run(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=1000)
    machine.install("redis-server", "postgresql")
    machine.fake("apt-get")
    proc = machine.run()
    assert proc.returncode == 1
    assert "run 'apt-get install chromium' as root" in proc.stderr
    assert machine.calls() == []


def test_dry_run_says_what_it_would_run_and_runs_nothing(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=1000)
    machine.fake("apt-get")
    machine.fake("sudo", run_args=True)
    proc = machine.run(TEST_DEPS, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "test-deps: would install chromium redis-server postgresql: sudo env "
        "DEBIAN_FRONTEND=noninteractive apt-get -y -qq install chromium redis-server postgresql"
    )
    assert machine.calls() == []
    assert machine.run(TEST_DEPS, "--bogus").returncode == 2


def test_ci_run_is_the_readme_test_command(machine: Machine) -> None:
    """.ci/run installs nothing itself: it runs `make test`, which does, with missing real
    test data made a failure ($CW_REQUIRE_TEST_DATA)."""
    _script(
        machine.bin / "make",
        f'echo "make $* (CW_REQUIRE_TEST_DATA=$CW_REQUIRE_TEST_DATA)" >> "{machine.log}"\n',
    )
    machine.fake("apt-get")
    proc = machine.run(CI_RUN)
    assert proc.returncode == 0, proc.stderr
    assert machine.calls() == ["make test (CW_REQUIRE_TEST_DATA=1)"]


def test_make_test_installs_the_system_packages_before_pytest() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    proc = subprocess.run(
        ["make", "--dry-run", "--always-make", "test"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    deps = next(i for i, line in enumerate(lines) if line.strip() == ".ci/test-deps")
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert deps < pytest_line, proc.stdout
