"""What every ``cw-pipeline`` sub-command shares: the error a user can act on
(:class:`CLIError`, one line and exit status 2), the measured search defaults and the loopback
check of the commands that bind a server (``demo``, ``serve``)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading

logger = logging.getLogger("cw_pipeline")

#: The measured default (see README, "Results on UKBench").
DEFAULT_METHOD = "ofa"
DEFAULT_N_PCA = 8

#: Where ``cw-pipeline demo`` and ``serve`` bind unless ``--host`` says otherwise.
DEFAULT_UI_HOST = "127.0.0.1"


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


class CLIError(Exception):
    """An error the user can act on: printed as one line, exit status 2."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface only (``localhost``, 127.x, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
