"""A command started in the background of a non-interactive shell (SIGINT ignored) stays
terminable after a Dagster run, and so do the processes it starts afterwards.

Before: Dagster gives SIGTERM SIGINT's handler when a run ends, so SIGTERM became ignored
too; ``kill`` could not stop the command, and a run executed in a thread waited 30 s per
step for its compute-log ``tail`` processes, which then lived on for ever."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

#: After the CLI's entry point, one Dagster interrupt scope (what every run enters and leaves
#: in the main thread), then a child started from another thread is sent SIGTERM.
SCRIPT = """
import json, signal, subprocess, sys, threading
from dagster._utils.interrupts import capture_interrupts
from cw_pipeline.cli import main
if sys.argv[1] == "cli":
    main(["datasets", "--config", "/nonexistent/datasets.yaml"])
with capture_interrupts():
    pass
out = {"sigterm": str(signal.getsignal(signal.SIGTERM))}
def child():
    p = subprocess.Popen(["sleep", "30"])
    p.terminate()
    try:
        out["child"] = p.wait(3)
    except subprocess.TimeoutExpired:
        p.kill()
        out["child"] = "still running 3 s after SIGTERM"
t = threading.Thread(target=child)
t.start()
t.join()
print(json.dumps(out))
"""


def _run(mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # `cmd &` in sh
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_command_started_ignoring_sigint_stays_terminable_after_a_run() -> None:
    assert _run("cli") == {
        "sigterm": str(signal.default_int_handler),
        "child": -signal.SIGTERM,
    }


def test_without_the_cli_entry_point_sigterm_ends_up_ignored() -> None:
    """What the entry point prevents (Dagster's behaviour, checked so that the test above
    keeps testing something)."""
    got = _run("bare")
    assert got["sigterm"] == str(signal.SIG_IGN)
    assert got["child"] == "still running 3 s after SIGTERM"
