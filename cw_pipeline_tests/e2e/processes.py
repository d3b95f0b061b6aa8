"""Servers the end-to-end tests start: a free port, and stopping a process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(
    proc: subprocess.Popen | None,
    grace: float = 60,
    sig: signal.Signals = signal.SIGTERM,
    exit_first: float = 0,
) -> None:
    """End the process group started with ``proc`` (it and its children): wait
    ``exit_first`` seconds for it to exit by itself, then send ``sig`` to the group, then
    SIGKILL if it has not ended ``grace`` seconds later."""
    if proc is None:
        return
    if exit_first:
        try:
            proc.wait(exit_first)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=30)
