"""A run launcher whose run workers start warm: forked from a server with the libraries loaded.

Dagster's default launcher asks the code server to start each run, and the code server spawns
a fresh interpreter for it (``multiprocessing`` "spawn"): every run imports torch, Dagster,
pandas, pyarrow... again. On the 2-core reference machine that is about 3 CPU-seconds per run,
most of the fixed cost of an incremental change (two runs: the folder sensor's indexing run
and automation's refresh run; see ``benchmarks/daemon_latency.py``).

:class:`WarmRunLauncher` keeps one ``multiprocessing`` *forkserver* that has imported the
third-party libraries (:data:`DEFAULT_PRELOAD`, or ``preload`` in ``dagster.yaml``) and forks
each run worker from it. The project's own code is *not* preloaded: every run imports
``cw_pipeline`` and loads the definitions afresh, so an edited ``datasets.yaml`` or a new
version of the code is picked up exactly as with the default launcher. A worker runs the run
the way ``dagster api execute_run`` does (same engine events, same failure handling); it tags
the run with its process (:mod:`cw_pipeline.runtime.recovery`), so termination from the UI
(SIGINT: Dagster cancels the run) and dead-run recovery work as before.

Runs of a code location that this process cannot execute itself (another interpreter, a
working directory that is not here: a container, a remote code server) go to Dagster's
default launcher. :class:`WarmQueuedRunCoordinator` starts the forkserver when the daemon
starts, not at the first run. Configure both in ``dagster.yaml``::

    run_coordinator:
      module: cw_pipeline.runtime.launcher
      class: WarmQueuedRunCoordinator
    run_launcher:
      module: cw_pipeline.runtime.launcher
      class: WarmRunLauncher

This module imports only Dagster: it is loaded by the daemon and the webserver.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from multiprocessing import forkserver
from typing import Any

import dagster as dg
from dagster._core.launcher import LaunchRunContext
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._serdes import ConfigurableClassData

from cw_pipeline.runtime.recovery import process_alive, process_tags
from cw_pipeline.runtime.run_tags import HOST_TAG, LAUNCHER_TAG, PID_START_TAG, PID_TAG, process_of

#: Libraries every run of this project imports (the run worker's start-up cost), preloaded
#: in the forkserver. Missing ones are skipped.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "dagster",
    "dagster._cli.api",
    "dagster._core.storage.sqlite_storage",
    "numpy",
    "torch",
    "pandas",
    "pyarrow",
    "pyarrow.parquet",
    "pyarrow.dataset",
    "PIL.Image",
    "scipy.ndimage",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "pydantic",
    "fsspec",
)

__all__ = [
    "DEFAULT_PRELOAD",
    "WarmQueuedRunCoordinator",
    "WarmRunLauncher",
    "is_daemon_process",
    "run_worker",
]


def run_worker(run_id: str, instance_ref: Any) -> None:
    """Execute run ``run_id`` in this process, as ``dagster api execute_run`` does, after
    tagging it with this process (for termination and dead-run recovery)."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts(), dg.DagsterInstance.from_ref(instance_ref) as instance:
        instance.add_run_tags(run_id, process_tags())
        code = _execute_run_command_body(
            run_id, instance, lambda _event: None, set_exit_code_on_failure=False
        )
    sys.exit(code)


class WarmRunLauncher(DefaultRunLauncher):
    """Start run workers from a forkserver that has the libraries loaded (see module doc)."""

    def __init__(
        self, preload: Sequence[str] | None = None, inst_data: ConfigurableClassData | None = None
    ):
        super().__init__(inst_data=inst_data)
        self._preload = list(DEFAULT_PRELOAD if preload is None else preload)
        self._context: Any = None
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.Lock()

    @classmethod
    def config_type(cls) -> dict[str, Any]:  # type: ignore[override]
        return {"preload": dg.Field([str], is_required=False)}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> WarmRunLauncher:
        return cls(preload=config_value.get("preload"), inst_data=inst_data)

    # ------------------------------------------------------------------ launching

    def _forkserver(self) -> Any:
        with self._lock:
            if self._context is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(self._preload)
                self._context = ctx
            return self._context

    def warm(self) -> None:
        """Start the forkserver now (it imports the preloaded libraries), not at the first run."""
        self._forkserver()
        forkserver.ensure_running()

    @staticmethod
    def runs_here(run: dg.DagsterRun) -> bool:
        """Whether this process can execute ``run`` itself: its code location runs with this
        interpreter, from a directory of this machine."""
        origin = run.job_code_origin
        if origin is None:
            return False
        loadable = origin.repository_origin
        executable = loadable.executable_path
        if not executable or os.path.realpath(executable) != os.path.realpath(sys.executable):
            return False
        workdir = getattr(loadable.code_pointer, "working_directory", None)
        return workdir is None or os.path.isdir(workdir)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if not self.runs_here(run):
            super().launch_run(context)
            return
        self._instance.add_run_tags(run.run_id, {LAUNCHER_TAG: "warm"})
        worker = self._forkserver().Process(
            target=run_worker,
            args=(run.run_id, self._instance.get_ref()),
            name=f"dagster-run-{run.run_id[:8]}",
        )
        worker.start()
        with self._lock:
            # Reap the workers that ended (their exit status is in the run's events).
            for run_id, proc in list(self._workers.items()):
                if not proc.is_alive():
                    proc.join(0)
                    del self._workers[run_id]
            self._workers[run.run_id] = worker

    # ------------------------------------------------------------------ termination

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id) if self.has_instance else None
        if run is None or run.is_finished:
            return False
        if run.tags.get(LAUNCHER_TAG) != "warm":
            return super().terminate(run_id)
        self._instance.report_run_canceling(run)
        process = process_of(run.tags)
        pid = process.get(PID_TAG)
        if process.get(HOST_TAG) != socket.gethostname() or pid is None:
            self._instance.report_engine_event(
                "Run worker not known on this host yet: it stops when it sees the run canceling.",
                run,
                cls=self.__class__,
            )
            return False
        if not process_alive(int(pid), process.get(PID_START_TAG)):
            return False
        os.kill(int(pid), signal.SIGINT)  # Dagster's interrupt: the run is canceled
        return True

    def join(self, timeout: float = 30) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for proc in workers:
            proc.join(timeout)
        super().join(timeout)


def is_daemon_process(argv0: str | None = None) -> bool:
    """Whether this process is ``dagster-daemon`` (``dagster-daemon run``, or
    ``python -m dagster._daemon run`` as ``dagster dev`` / ``dg dev`` start it)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = argv0.replace(os.sep, "/")
    return os.path.basename(path) == "dagster-daemon" or path.endswith(
        "dagster/_daemon/__main__.py"
    )


class WarmQueuedRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator (same settings: the instance's ``concurrency`` block)
    that, in the daemon, starts :class:`WarmRunLauncher`'s forkserver when the daemon starts:
    the daemon reads the run queue's settings at once, while the launcher is only loaded at the
    first run, which would otherwise pay for the libraries' import."""

    def register_instance(self, instance: dg.DagsterInstance) -> None:
        super().register_instance(instance)
        if not is_daemon_process():
            return
        launcher = instance.run_launcher
        if isinstance(launcher, WarmRunLauncher):
            threading.Thread(target=launcher.warm, name="warm-forkserver", daemon=True).start()
