"""Jobs for the warm run launcher's tests (imported afresh by each forked run worker)."""

import os
import sys
import threading
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
def forward_passes(context: dg.OpExecutionContext) -> None:
    """Runs the CNN the way the features asset does and reports what the kernel saw."""
    import resource

    import torch

    from cw_pipeline.core import allocator
    from cw_pipeline.core.extract import FeatureExtractor

    fe = FeatureExtractor(num_threads=1)
    batch = torch.rand(8, 3, 480, 640)
    passes = []
    for _ in range(5):  # the first passes grow the heap to its layout (or map their buffers)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fe.backbone.forward(batch)
        passes.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = min(passes[2:])  # once the heap has settled
    context.log_event(
        dg.AssetMaterialization(
            asset_key="launcher_cnn_probe",
            metadata={
                "pid": os.getpid(),
                "page_faults": faults,
                "page_faults_per_pass": str(passes),
                "main_thread": threading.current_thread() is threading.main_thread(),
                **allocator.state().as_metadata(),
            },
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
def cnn_job() -> None:
    forward_passes()


@dg.job(executor_def=dg.in_process_executor)
def slow_job() -> None:
    wait_a_minute()
