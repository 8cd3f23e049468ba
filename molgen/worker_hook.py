"""Run first in every worker process of molgen's pools, never by molgen itself: a worker, forked by the fork server
or spawned, runs it as its main module before it takes its pool's queues over (``molgen.workers.STARTS_FIRST``).

A command stopped by Ctrl-C or SIGTERM releases its pool's named semaphores as it exits, without waiting on its
workers. A worker still starting then cannot open them, and Python would print its ``FileNotFoundError`` traceback
on the terminal of a command that has already gone. Such a worker now ends quietly; any other failure to start keeps
its traceback."""

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
    """``sys.excepthook`` of the workers: silent for a worker whose pool is gone."""
    if not _pool_released(kind, value, tb):
        _before(kind, value, tb)


sys.excepthook = quiet_if_pool_released
