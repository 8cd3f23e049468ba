"""Imported by molgen's fork server, first (``molgen.workers.PRELOAD``), never by molgen itself.

A command stopped by Ctrl-C or SIGTERM while it asks the fork server for a worker leaves the server reading a
request cut short; Python would print the server's ``EOFError`` traceback on the terminal of a command that has
already gone. The server now ends quietly; any other failure keeps its traceback. (The workers forked from it run
``molgen.worker_hook`` as their main module, which must not be imported before: hence a module of its own.)"""

from __future__ import annotations

import sys

_before = sys.excepthook


def _request_cut_short(kind, value, tb) -> bool:
    """Whether the exception is the fork server's, reading a request for a worker from a command that has gone."""
    if not issubclass(kind, (EOFError, ConnectionError)):
        return False
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "main" and code.co_filename.endswith("forkserver.py"):
            return True
        tb = tb.tb_next
    return False


def quiet_if_command_gone(kind, value, tb) -> None:
    """``sys.excepthook`` of the fork server: silent for a request cut short by its command's end."""
    if not _request_cut_short(kind, value, tb):
        _before(kind, value, tb)


sys.excepthook = quiet_if_command_gone
