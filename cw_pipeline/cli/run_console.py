"""What a command that runs the pipeline in this process shows, and where the rest goes.

``cw-pipeline demo`` prints one line per finished step (the asset, its counts, its seconds) and
writes everything else — every Dagster event of its runs, Python warnings, the log of the
Dagster UI it serves — to one log file, named in its output:

* :class:`StepReporter` receives the runs' events (:func:`cw_pipeline.runtime.runs.run_events`);
* :func:`log_to_file` routes Python logging and warnings to the file for the command's duration;
* :func:`step_counts` and :func:`map_table` format what the terminal shows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["StepReporter", "log_to_file", "map_table", "step_counts", "terminal"]

#: Logger of the runs' events in the log file (never shown on the terminal).
EVENTS_LOGGER = "cw_pipeline.events"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def terminal(stream: TextIO) -> Iterator[TextIO]:
    """A stream writing where ``stream`` writes now, through a file descriptor of its own.

    While a step runs, Dagster captures the process's stdout and stderr (file descriptors 1
    and 2) into the run's compute logs, mirrored to the terminal only as its mirror keeps up:
    lines printed then through ``sys.stderr`` land in the compute log and may never reach the
    terminal. A duplicate of the descriptor, taken before, still points at the terminal. A
    stream without a descriptor (a test's StringIO) is used as it is."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        yield stream
        return
    stream.flush()
    own = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield own
    finally:
        own.close()


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} " + (word if n == 1 else plural or word + "s")


def step_counts(metadata: Mapping[str, Any]) -> str:
    """The counts of a materialization, from its metadata values: images, forward passes,
    reuse, rejects, queries, training images, the best mAP. Unknown keys are ignored."""
    m = metadata
    parts: list[str] = []
    if "forward_passes" in m:
        parts.append(_count(int(m.get("rows", 0)), "image"))
        parts.append(_count(int(m["forward_passes"]), "forward pass", "forward passes"))
        if int(m.get("reused", 0)):
            parts.append(f"{int(m['reused']):,} reused")
    elif "training_images" in m:
        parts.append(f"PCA learned on {_count(int(m['training_images']), 'image')}")
    elif "database_images" in m and "queries" in m:
        parts.append(
            f"{_count(int(m['queries']), 'query', 'queries')} x "
            f"{_count(int(m['database_images']), 'image')}"
        )
        if m.get("methods"):
            parts.append(_count(len(m["methods"]), "method"))
    elif "queries" in m:
        parts.append(_count(int(m["queries"]), "query", "queries"))
    elif "images" in m:
        parts.append(_count(int(m["images"]), "image"))
        if int(m.get("hashed", 0)):
            parts.append(f"{int(m['hashed']):,} hashed")
    maps = {k.split("/", 1)[1]: float(v) for k, v in m.items() if k.startswith("map/")}
    if maps:
        best = max(maps, key=lambda k: maps[k])
        parts.append(f"best mAP {maps[best]:.4f} ({best})")
    for key in ("rejected", "unreadable"):
        if int(m.get(key) or 0):
            parts.append(f"{int(m[key]):,} {key}")
    return ", ".join(parts)


@dataclass
class _Step:
    materialized: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    checks: list[tuple[str, str, bool, str]] = field(default_factory=list)


def _raw(value: Any) -> Any:
    """A metadata value's plain Python value."""
    return getattr(value, "value", value)


class StepReporter:
    """Listener of runs' events (:func:`cw_pipeline.runtime.runs.run_events`): one line per finished
    step on ``out``, every event to the ``cw_pipeline.events`` logger (the log file).

    A line reads ``[  12.3 s] demo-a/cam_features [b000]: 56 images, 56 forward passes (4.9 s)``:
    the seconds since ``start``, the asset (and partition), its counts, the step's own seconds.
    Steps of checks alone print only when a check fails; a failed step prints its error's first
    line.
    """

    def __init__(self, out: TextIO, start: float | None = None) -> None:
        self.out = out
        self.start = time.perf_counter() if start is None else start
        self.steps = 0  #: steps finished
        self.failed: list[str] = []  #: lines of failed steps and checks
        self._pending: dict[tuple[str, str], _Step] = {}
        self._planned: dict[tuple[str, str], str] = {}  #: (run, step) -> asset key
        self._log = logging.getLogger(EVENTS_LOGGER)

    def __call__(self, entry: Any) -> None:
        """Handle one ``EventLogEntry``."""
        self._write_log(entry)
        event = entry.dagster_event
        if event is None or not entry.step_key:
            return
        step = self._pending.setdefault((entry.run_id, entry.step_key), _Step())
        kind = event.event_type_value
        if kind == "ASSET_MATERIALIZATION_PLANNED":
            key = event.event_specific_data.asset_key.to_user_string()
            self._planned.setdefault((entry.run_id, entry.step_key), key)
        elif kind == "ASSET_MATERIALIZATION":
            mat = entry.asset_materialization
            meta = {k: _raw(v) for k, v in (mat.metadata or {}).items()}
            step.materialized.append((mat.asset_key.to_user_string(), mat.partition, meta))
        elif kind == "ASSET_CHECK_EVALUATION":
            ev = entry.asset_check_evaluation
            step.checks.append(
                (ev.asset_key.to_user_string(), ev.check_name, bool(ev.passed), ev.severity.value)
            )
        elif kind == "STEP_SUCCESS":
            del self._pending[(entry.run_id, entry.step_key)]
            self._finished(step, event.event_specific_data.duration_ms / 1000.0)
        elif kind == "STEP_FAILURE":
            del self._pending[(entry.run_id, entry.step_key)]
            error = event.event_specific_data.error
            while error is not None and error.cause is not None:  # the user code's error
                error = error.cause
            message = (error.message if error is not None else entry.message).strip()
            what = self._planned.get((entry.run_id, entry.step_key), entry.step_key)
            line = f"{what} FAILED: {message.splitlines()[0] if message else ''}"
            self.failed.append(line)
            self._print(line)

    def _finished(self, step: _Step, seconds: float) -> None:
        self.steps += 1
        bad = [c for c in step.checks if not c[2]]
        for key, name, _, severity in bad:
            self.failed.append(f"check {name} of {key} failed ({severity})")
        if step.materialized:
            for key, partition, meta in step.materialized:
                label = key + (f" [{partition}]" if partition else "")
                counts = step_counts(meta)
                self._print(f"{label}: {counts} ({seconds:.1f} s)" if counts else label)
        for key, name, _, severity in bad:
            self._print(f"{key}: check {name} FAILED ({severity.lower()})")

    def _print(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:6.1f} s] {text}".rstrip(), file=self.out, flush=True)

    def _write_log(self, entry: Any) -> None:
        event = entry.dagster_event
        kind = event.event_type_value if event is not None else "LOG"
        message = entry.message
        if event is not None and kind == "STEP_FAILURE" and event.event_specific_data.error:
            message += "\n" + event.event_specific_data.error.to_string()
        self._log.info(
            "%s run %s %s %s: %s",
            logging.getLevelName(entry.level),
            entry.run_id[:8],
            entry.step_key or "-",
            kind,
            message,
        )


@contextlib.contextmanager
def log_to_file(path: Path, terminal_level: int = logging.WARNING) -> Iterator[Path]:
    """While active, Python logging at INFO and up, the runs' events and every Python warning
    go to ``path`` (replaced; its folder is created); the terminal shows only records of
    ``cw_pipeline`` at ``terminal_level`` and up, never Dagster's or the runs' events."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    # Appending: Dagster's runs call logging.config.dictConfig, which closes every handler; a
    # closed "a" handler reopens at its next record (a "w" one would drop them all).
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    events = logging.getLogger(EVENTS_LOGGER)
    py_warnings = logging.getLogger("py.warnings")
    saved_root = (root.level, [(h, h.level, list(h.filters)) for h in root.handlers])
    saved_events = (events.level, events.propagate)
    saved_warnings = py_warnings.propagate

    def terminal_filter(record: logging.LogRecord) -> bool:
        return record.name.startswith("cw_pipeline") and record.levelno >= terminal_level

    root.setLevel(logging.INFO)
    alembic = logging.getLogger("alembic")
    saved_alembic = alembic.level
    alembic.setLevel(logging.WARNING)  # schema checks at every open of the instance
    for h in root.handlers:
        h.addFilter(terminal_filter)
    root.addHandler(handler)
    events.setLevel(logging.INFO)
    events.propagate = False
    events.addHandler(handler)
    py_warnings.propagate = False
    py_warnings.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield path
    finally:
        logging.captureWarnings(False)
        py_warnings.removeHandler(handler)
        py_warnings.propagate = saved_warnings
        events.removeHandler(handler)
        events.setLevel(saved_events[0])
        events.propagate = saved_events[1]
        root.removeHandler(handler)
        root.setLevel(saved_root[0])
        alembic.setLevel(saved_alembic)
        for h, _, filters in saved_root[1]:
            h.filters[:] = filters
        handler.close()


def map_table(reports: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The mAP of every method (rows) in every evaluation (columns), aligned, as Markdown.

    ``reports`` maps an evaluation to its results (``{"method", "map", ...}`` each); a method
    an evaluation lacks shows ``–``."""
    evaluations = sorted(reports)
    methods: list[str] = []
    for ev in evaluations:
        for r in reports[ev]:
            if r["method"] not in methods:
                methods.append(r["method"])
    values = {(ev, r["method"]): float(r["map"]) for ev in evaluations for r in reports[ev]}
    header = ["method", *evaluations]
    rows = [
        [m, *(f"{values[(ev, m)]:.4f}" if (ev, m) in values else "–" for ev in evaluations)]
        for m in methods
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
