"""Jobs for the warm run launcher's tests (imported afresh by each forked run worker)."""

import os
import sys
import time

import dagster as dg

#: The module the tests' launcher preloads; this module never imports it.
PRELOAD_PROBE = "xml.dom.minidom"
#: Whether the preloaded module was already there when this module was imported.
PRELOADED_AT_IMPORT = PRELOAD_PROBE in sys.modules


@dg.op
def report_process(context: dg.OpExecutionContext) -> None:
    context.log_event(
        dg.AssetMaterialization(
            asset_key="launcher_probe",
            metadata={"pid": os.getpid(), "preloaded": PRELOADED_AT_IMPORT},
        )
    )


@dg.op
def wait_a_minute() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)


@dg.job(executor_def=dg.in_process_executor)
def probe_job() -> None:
    report_process()


@dg.job(executor_def=dg.in_process_executor)
def slow_job() -> None:
    wait_a_minute()
