"""What ``cw-pipeline demo`` prints while it runs the pipeline (:mod:`cw_pipeline.cli.run_console`):
one line per finished step with its counts and seconds, Dagster's events and Python warnings in
the log file only, and the mAP table."""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import dagster as dg
import pytest

from cw_pipeline.cli.run_console import StepReporter, log_to_file, map_table, step_counts
from cw_pipeline.runtime.runs import _materialize, console_log_level, run_events


def test_step_counts_read_the_assets_metadata() -> None:
    assert step_counts({"images": 56, "hashed": 56, "unreadable": 0}) == "56 images, 56 hashed"
    assert step_counts({"rows": 56, "forward_passes": 1, "reused": 55, "rejected": 2}) == (
        "56 images, 1 forward pass, 55 reused, 2 rejected"
    )
    assert step_counts({"training_images": 1, "models": 2}) == "PCA learned on 1 image"
    assert step_counts({"queries": 8, "database_images": 96, "methods": ["raw", "ofa"]}) == (
        "8 queries x 96 images, 2 methods"
    )
    assert step_counts({"queries": 1, "seconds": 0.4}) == "1 query"
    assert step_counts({"map/raw": 0.88471, "map/ofa": 0.85, "cpu_seconds": 3}) == (
        "best mAP 0.8847 (raw)"
    )
    assert step_counts({"cpu_seconds": 1.0, "path": "x"}) == ""


def test_map_table_has_a_column_per_evaluation_and_a_row_per_method() -> None:
    table = map_table(
        {
            "demo-b": [{"method": "raw", "map": 0.9194}, {"method": "ofa", "map": 0.88415}],
            "demo-a": [{"method": "raw", "map": 0.9}],
        }
    )
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" method ", " demo-a ", " demo-b "]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["raw", "0.9000", "0.9194"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["ofa", "–", "0.8841"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert set(lines[1]) == {"|", "-"}


# --------------------------------------------------------------------------- a real run


@dg.asset(
    key=["tiny", "images"],
    check_specs=[
        dg.AssetCheckSpec("finite", asset=["tiny", "images"]),
        dg.AssetCheckSpec("no_rejected", asset=["tiny", "images"]),
    ],
)
def tiny_images(context) -> dg.MaterializeResult:
    warnings.warn("a library's warning", UserWarning, stacklevel=1)
    logging.getLogger("cw_pipeline.tiny").warning("a warning of the project")
    logging.getLogger("dagster.tiny").warning("a warning of Dagster's")
    context.log.info("an event of the run")
    return dg.MaterializeResult(
        metadata={"rows": 3, "forward_passes": 3, "reused": 0, "seconds": 0.1},
        check_results=[
            dg.AssetCheckResult(check_name="finite", passed=True),
            dg.AssetCheckResult(
                check_name="no_rejected", passed=False, severity=dg.AssetCheckSeverity.WARN
            ),
        ],
    )


@dg.asset(key=["tiny", "broken"], deps=[["tiny", "images"]])
def tiny_broken() -> None:
    raise RuntimeError("the report could not be written")


@pytest.fixture
def terminal():
    """A stderr-like handler on the root logger (what ``logging.basicConfig`` installs)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def test_one_line_per_step_and_everything_else_in_the_log_file(tmp_path: Path, terminal) -> None:
    defs = dg.Definitions(assets=[tiny_images, tiny_broken])
    out = io.StringIO()
    reporter = StepReporter(out)
    log = tmp_path / "logs" / "demo.log"
    log.parent.mkdir()
    log.write_text("an older demo's log\n")
    with (
        dg.instance_for_test() as instance,
        log_to_file(log),
        console_log_level("CRITICAL", evaluator=False),
        run_events(reporter),
    ):
        _materialize(defs, instance, [dg.AssetKey(["tiny", "images"])])
        with pytest.raises(RuntimeError, match="the report could not be written"):
            _materialize(defs, instance, [dg.AssetKey(["tiny", "broken"])])

    lines = out.getvalue().splitlines()
    step = r"\[ +\d+\.\d s\] tiny/images: 3 images, 3 forward passes \(\d+\.\d s\)"
    assert re.fullmatch(step, lines[0]), lines
    assert lines[1].endswith("tiny/images: check no_rejected FAILED (warn)"), lines
    assert lines[2].endswith("tiny/broken FAILED: RuntimeError: the report could not be written"), (
        lines
    )
    assert len(lines) == 3 and reporter.steps == 1
    assert reporter.failed == [
        "check no_rejected of tiny/images failed (WARN)",
        "tiny/broken FAILED: RuntimeError: the report could not be written",
    ]
    # the terminal: the project's warning only; Dagster's, the runs' events and Python's
    # warnings are in the file
    shown = terminal.getvalue()
    assert shown.splitlines() == ["a warning of the project"], shown
    text = log.read_text(encoding="utf-8")
    assert "an older demo's log" not in text  # replaced
    for expected in (
        "DEBUG run ",
        "tiny__images STEP_SUCCESS",
        "ASSET_CHECK_EVALUATION",
        "an event of the run",
        "UserWarning: a library's warning",
        "a warning of Dagster's",
        "STEP_FAILURE",
        "RuntimeError: the report could not be written",  # the traceback
    ):
        assert expected in text, expected
    # afterwards logging is as it was
    handlers = logging.getLogger().handlers
    assert not any(getattr(h, "baseFilename", None) == str(log) for h in handlers), handlers
    assert logging.getLogger("py.warnings").propagate
