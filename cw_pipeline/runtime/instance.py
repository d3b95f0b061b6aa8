"""Opening the Dagster instance, and writing to it, safely from several processes at once.

Several ``cw-pipeline`` commands may start at the same moment on one ``$DAGSTER_HOME``:

* **Creating the storage.** The first open of an embedded (SQLite) instance creates its
  databases and stamps their schema version; two processes doing that at once fail
  (``UNIQUE constraint failed: alembic_version.version_num``, ``table … already exists``) or,
  worse, stamp a database twice so that it never opens again (``Version table
  'alembic_version' has more than one head present``). :func:`open_instance` opens the
  instance under an exclusive lock file in ``$DAGSTER_HOME`` (``.cw_pipeline_instance.lock``),
  saying when it waits for another command, and retries the SQLite errors of a busy database
  with a bounded backoff.
* **Adding partitions.** Dagster's ``add_dynamic_partitions`` reads the existing keys, then
  inserts the others: a key another process inserted in between fails the insert.
  :func:`add_partitions` re-reads and carries on.

Where several processes write all the time (daemon, UI, commands, workers), use PostgreSQL
storage (``dagster-postgres``, docs/deployment.md): it serialises writers itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # Dagster is imported where an instance is opened (the CLI imports this early)
    import dagster as dg

logger = logging.getLogger(__name__)

#: The project's instance settings (run limits, the ``cnn`` pool, run monitoring), relative to
#: the project root; ``make`` and the CLI copy it into a new ``$DAGSTER_HOME``. It is not at the
#: top level: ``dg dev`` and ``dagster dev`` warn that a ``dagster.yaml`` in the folder they
#: run in, other than ``$DAGSTER_HOME``, is ignored.
INSTANCE_YAML = Path("deploy") / "dagster.yaml"

#: The lock file, in ``$DAGSTER_HOME``, held while a command opens (and maybe creates) the
#: instance's storage.
LOCK_NAME = ".cw_pipeline_instance.lock"
#: Seconds a command waits for the lock before giving up with an error naming the lock file.
LOCK_TIMEOUT_SECONDS = 600.0
#: Attempts of an operation that hits a busy SQLite database (waits 0.5, 1, 2, 4, 8, 8 … s).
RETRY_ATTEMPTS = 8

#: Messages of the storage errors another process's concurrent write causes, which clear by
#: themselves: retried.
_TRANSIENT = re.compile(
    r"database is locked|database table is locked|unique constraint failed: alembic_version"
    r"|(table|relation|index) \S+ already exists"
    r"|could not obtain lock|deadlock detected|current transaction is aborted"
    r"|duplicate key value violates unique constraint \"concurrency_limits"
)

T = TypeVar("T")


def keep_terminable() -> None:
    """Let SIGINT interrupt this process even where it was started ignoring it (a background
    job of a non-interactive shell ignores SIGINT and SIGQUIT).

    Dagster gives SIGTERM SIGINT's handler whenever a run in this process ends: with SIGINT
    ignored, SIGTERM becomes ignored too, for this process and every process it starts (an
    ignored signal stays ignored through ``exec``), so such a command could not be stopped,
    and Dagster's compute-log ``tail`` processes would neither stop nor let their run end
    for 30 s. Dagster replaces SIGINT's handler during each run anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # handlers are the main thread's to set
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class InstanceBusyError(RuntimeError):
    """The instance's storage stayed busy (or locked) longer than this process waits."""


def is_transient_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage error that another process's concurrent write causes
    (a busy SQLite database, a schema being created by another process)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__ or ""
        if module.startswith(("sqlalchemy", "sqlite3", "psycopg2", "alembic")):
            if _TRANSIENT.search(str(e).lower()):
                return True
        e = e.__cause__ or e.__context__
    return False


def retry_busy(
    fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS, first_delay: float = 0.5
) -> T:
    """``fn()``, retried with a doubling delay (at most 8 s) while it fails with a transient
    storage error (:func:`is_transient_storage_error`); each wait is logged (WARNING) with
    ``what``. The last failure is raised as :class:`InstanceBusyError` naming ``what``."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient_storage_error(exc):
                raise
            if attempt == attempts:
                raise InstanceBusyError(
                    f"{what}: the Dagster instance's storage was still busy after {attempts} "
                    f"attempts ({_first_line(exc)}); with several processes writing at once "
                    "use PostgreSQL storage (docs/deployment.md)"
                ) from exc
            logger.warning(
                "%s: the Dagster instance's storage is busy with another process (%s): "
                "waiting %.1f s, then retrying (attempt %d of %d)",
                what,
                _first_line(exc),
                delay,
                attempt + 1,
                attempts,
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def instance_lock(home: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[Path]:
    """Hold the exclusive lock file ``<home>/.cw_pipeline_instance.lock`` (``fcntl``; released
    when the process dies). Logs once when another command holds it; raises
    :class:`InstanceBusyError` naming the file after ``timeout`` seconds."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.warning(
                        "another cw-pipeline command is opening the Dagster instance in %s "
                        "(lock %s): waiting for it",
                        home,
                        path,
                    )
                    waited = True
                if time.monotonic() > deadline:
                    raise InstanceBusyError(
                        f"{path}: still locked by another process after {timeout:.0f} s "
                        "(another cw-pipeline command opening the Dagster instance)"
                    ) from None
                time.sleep(0.1)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def open_instance(
    home: Path, timeout: float = LOCK_TIMEOUT_SECONDS, pools: Sequence[str] = ()
) -> dg.DagsterInstance:
    """The Dagster instance of ``home`` (a ``DAGSTER_HOME``), opened (and, the first time,
    created) by one command at a time (:func:`instance_lock`), with busy-database errors
    retried (:func:`retry_busy`).

    The limits of ``pools`` are initialised to the instance's default here, once, with retries:
    Dagster does it when a step first claims a slot, and on PostgreSQL two processes doing that
    at once fail (``current transaction is aborted`` after a duplicate key)."""
    import dagster as dg

    what = f"opening the Dagster instance in {home}"

    def attempt() -> dg.DagsterInstance:
        # A fresh instance each attempt: after an error, a PostgreSQL connection stays in an
        # aborted transaction ("current transaction is aborted") until it is thrown away.
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            storage = instance.event_log_storage
            for pool in pools:
                if pool not in storage.get_concurrency_keys():
                    storage.initialize_concurrency_limit_to_default(pool)
        except BaseException:
            instance.dispose()
            raise
        return instance

    with instance_lock(home, timeout):
        migrate_instance_settings(home)
        return retry_busy(attempt, what)


#: Modules that instance settings written by earlier versions name, and where they live now
#: (the run launcher and coordinator moved from ``cw_pipeline.launcher`` to
#: ``cw_pipeline.runtime.launcher``).
MOVED_MODULES = {"cw_pipeline.launcher": "cw_pipeline.runtime.launcher"}

_MODULE_LINE = re.compile(r"^(?P<head>\s*module:\s*)(?P<module>[\w.]+)(?P<tail>\s*(#.*)?)$", re.M)


def migrate_instance_settings(home: Path) -> bool:
    """Rewrite the ``module:`` lines of ``<home>/dagster.yaml`` that name a module of
    :data:`MOVED_MODULES` (a ``$DAGSTER_HOME`` set up by an earlier version), leaving every
    other line as it is. Written to a temporary file, then renamed. Returns whether the
    file changed."""
    path = Path(home) / "dagster.yaml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False

    def moved(m: re.Match[str]) -> str:
        module = MOVED_MODULES.get(m["module"], m["module"])
        return f"{m['head']}{module}{m['tail']}"

    new = _MODULE_LINE.sub(moved, text)
    if new == text:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    logger.warning(
        "%s: renamed the moved modules %s in the instance settings",
        path,
        ", ".join(f"{was} -> {now}" for was, now in MOVED_MODULES.items()),
    )
    return True


def add_partitions(instance: dg.DagsterInstance, name: str, keys: Sequence[str]) -> None:
    """Add the dynamic partitions ``keys`` of ``name`` that do not exist yet. A key that
    another process adds at the same moment is not an error (the insert's integrity error is
    caught, the keys re-read, and only those still missing added again)."""
    from sqlalchemy.exc import IntegrityError

    missing = list(keys)
    for _ in range(RETRY_ATTEMPTS):
        have = set(retry_busy(lambda: instance.get_dynamic_partitions(name), name))
        missing = [k for k in missing if k not in have]
        if not missing:
            return
        try:
            todo = list(missing)
            retry_busy(lambda: instance.add_dynamic_partitions(name, todo), name)  # noqa: B023
            return
        except IntegrityError as exc:
            logger.info("%s: partitions added by another process meanwhile (%s)", name, exc)
    raise InstanceBusyError(
        f"{name}: could not add partitions {missing}: other processes kept adding partitions "
        "at the same time"
    )
