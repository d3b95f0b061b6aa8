"""A throw-away PostgreSQL server on 127.0.0.1 for the tests of Dagster's Postgres storage.

Debian's ``postgresql`` package (``apt-get install postgresql``; ``make test`` installs it, see
``.ci/test-deps``) puts the server binaries under ``/usr/lib/postgresql/<version>/bin``
(``$CW_POSTGRES_ROOT`` names another root). :func:`postgres_server` makes a
cluster in a temporary folder (``initdb``, password authentication), starts ``postgres`` on a
free loopback port with its unix socket in that folder — as the ``postgres`` user when the
tests run as root, which the server refuses — and stops it by its process group at the end,
also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cw_pipeline_tests.e2e.processes import free_port, stop_group

INSTALL_HINT = "install Debian's PostgreSQL server: apt-get install postgresql (make test does)"
#: Where the server binaries are looked for: ``<root>/<version>/bin`` (as in .ci/test-deps).
POSTGRES_ROOT = Path(os.environ.get("CW_POSTGRES_ROOT") or "/usr/lib/postgresql")
USER = "cw"
PASSWORD = "cw-test-password"


def server_bin() -> Path:
    """The newest ``<POSTGRES_ROOT>/<version>/bin`` holding ``initdb`` and ``postgres``;
    fails the test (never skips) with how to install them when there is none."""
    found = sorted(
        POSTGRES_ROOT.glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    found = [p.parent for p in found if (p.parent / "postgres").exists()]
    if not found:
        pytest.fail(
            f"PostgreSQL server binaries (initdb, postgres) not found under "
            f"{POSTGRES_ROOT}/<version>/bin: {INSTALL_HINT}",
            pytrace=False,
        )
    return found[-1]


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    bindir: Path
    socket_dir: Path
    pid: int

    def env(self, db_name: str) -> dict[str, str]:
        """The ``DAGSTER_PG_*`` variables that :data:`DAGSTER_YAML_STORAGE` reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": db_name,
        }

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (over TCP, with the password)."""
        where = ["-h", self.host, "-p", str(self.port), "-U", self.user]
        subprocess.run(
            [str(self.bindir / "createdb"), *where, name],
            env=dict(os.environ, PGPASSWORD=self.password),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return name


#: The ``storage:`` block of a ``dagster.yaml`` on PostgreSQL, credentials from the environment
#: (the example of docs/deployment.md). ``scheme`` names the psycopg2 driver that
#: ``dagster-postgres`` installs (and whose errors it retries): SQLAlchemy 2.1 would otherwise
#: load psycopg 3 for ``postgresql://``, which is not installed.
DAGSTER_YAML_STORAGE = """\
storage:
  postgres:
    postgres_db:
      scheme: postgresql+psycopg2
      hostname: {env: DAGSTER_PG_HOST}
      port: {env: DAGSTER_PG_PORT}
      username: {env: DAGSTER_PG_USERNAME}
      password: {env: DAGSTER_PG_PASSWORD}
      db_name: {env: DAGSTER_PG_DB}
"""


def _as_server_user() -> tuple[list[str], int | None]:
    """The command prefix running a server binary, and the uid owning its files."""
    if os.geteuid() != 0:
        return [], None
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.fail(f"running as root and there is no 'postgres' user: {INSTALL_HINT}")
    return ["runuser", "-u", "postgres", "--"], uid


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server on 127.0.0.1 (user ``cw``, password authentication) in a
    temporary folder, stopped and removed at the end."""
    bindir = server_bin()
    prefix, uid = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="cw-pg-"))
    proc: subprocess.Popen | None = None
    try:
        data, sockets = root / "data", root / "sock"
        sockets.mkdir()
        pwfile = root / "pwfile"
        pwfile.write_text(PASSWORD + "\n", encoding="utf-8")
        if uid is not None:
            for p in (root, sockets, pwfile):
                os.chown(p, uid, -1)
        initdb = ["-D", str(data), "-U", USER, "--pwfile", str(pwfile), "--auth", "scram-sha-256"]
        subprocess.run(
            [*prefix, str(bindir / "initdb"), *initdb, "--no-sync", "--encoding", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = free_port()
        log = (root / "server.log").open("w")
        if uid is not None:
            os.chown(root / "server.log", uid, -1)
        where = ["-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(sockets)]
        settings = ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]
        proc = subprocess.Popen(
            [*prefix, str(bindir / "postgres"), *where, *settings],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "server.log").read_text(errors="replace")
                pytest.fail(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{text[-3000:]}")
            time.sleep(0.2)
        yield PostgresServer("127.0.0.1", port, USER, PASSWORD, bindir, sockets, proc.pid)
    finally:
        if proc is not None:
            stop_group(proc, grace=30, sig=signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)
