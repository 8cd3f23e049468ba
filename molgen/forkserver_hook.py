"""Imported by the fork server of molgen's worker pools (first in ``molgen.workers.PRELOAD``), never by molgen
itself: the workers forked from it inherit what it sets here.

A command stopped by Ctrl-C or SIGTERM releases its pool's named semaphores as it exits, without waiting on its
workers. A worker the fork server was still starting then cannot open them, and Python would print its
``FileNotFoundError`` traceback on the terminal of a command that has already gone. Such a worker now ends quietly;
any other failure to start keeps its traceback."""

from __future__ import annotations

import sys

_before = sys.excepthook


def _pool_released(kind, value, tb) -> bool:
    """Whether the exception is a semaphore that could not be opened while a worker took its pool's queues over."""
    if not issubclass(kind, FileNotFoundError):
        return False
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "__setstate__" and code.co_filename.endswith("synchronize.py"):
            return True
        tb = tb.tb_next
    return False


def quiet_if_pool_released(kind, value, tb) -> None:
    """``sys.excepthook`` of the fork server and its workers: silent for a worker whose pool is gone."""
    if not _pool_released(kind, value, tb):
        _before(kind, value, tb)


sys.excepthook = quiet_if_pool_released
