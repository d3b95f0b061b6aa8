"""What every ``cw-pipeline`` sub-command shares: the error a user can act on
(:class:`CLIError`, one line and exit status 2), the measured search defaults and the loopback
check of the commands that bind a server (``demo``, ``serve``)."""

from __future__ import annotations

import ipaddress
import logging

logger = logging.getLogger("cw_pipeline")

#: The measured default (see README, "Results on UKBench").
DEFAULT_METHOD = "ofa"
DEFAULT_N_PCA = 8

#: Where ``cw-pipeline demo`` and ``serve`` bind unless ``--host`` says otherwise.
DEFAULT_UI_HOST = "127.0.0.1"


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
