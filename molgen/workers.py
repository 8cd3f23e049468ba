"""Per-molecule work (bond perception, RDKit, MMFF94) spread over processes: the same results, in the same order,
as one process gives.

Workers are never forked from the calling process (one that runs JAX holds threads a fork would copy half-way):
they are forked from a server process that starts fresh and imports numpy, RDKit and molgen's chemistry once
(``PRELOAD``; spawned one by one where the system has no fork server, or where it cannot start). The server costs
~0.5 s to start and judging a molecule ~0.5-1 ms, so a worker is started for every ``MIN_PER_WORKER`` molecules at
most.
``MOLGEN_WORKERS`` caps their number (default: one per usable core; 1 keeps all work in the calling process)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from typing import Callable, Iterable, Iterator

from molgen import MolgenError

MIN_PER_WORKER = 1000
STARTS_FIRST = "molgen.worker_hook"  # run by every worker as its main module, first (its excepthook)
SERVER_FIRST = "molgen.server_hook"  # imported by the fork server, first (its excepthook)
PRELOAD = [SERVER_FIRST, "molgen.evaluate", "molgen.chem.forcefield", "molgen.chem.rdkit_utils", "molgen.fidelity"]


@dataclasses.dataclass
class _Held:
    """A pool held with its queues (below)."""
    pool: object
    queues: tuple  # referenced here: a pool shut down drops its own references to them
    thread: object = None  # the pool's own thread, once it has started (a pool shut down no longer names it)

    def running(self) -> bool:
        """The pool's thread is alive, or it has not started and the pool has not been shut down."""
        return self.thread.is_alive() if self.thread is not None else not getattr(self.pool, "_shutdown_thread", True)


# The pools not shut down whole, with their queues, held so that a pool's own thread cannot be the one to collect
# the queues while a stopped command releases their semaphores and exits: it would be cut off with one released
# half-way, and the resource tracker would warn. Let go once that thread has ended (:func:`_let_go_of_ended`).
_HELD: list[_Held] = []


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """``MOLGEN_WORKERS`` when set (a positive integer), else :func:`usable_cores`."""
    env = os.environ.get("MOLGEN_WORKERS", "").strip()
    if not env:
        return usable_cores()
    if not env.isdigit() or int(env) < 1:
        raise MolgenError(f"MOLGEN_WORKERS={env!r}: give a positive number of processes (1: no extra process)")
    return int(env)


def workers_for(n_items: int, workers: int | None = 1) -> int:
    """How many processes to judge ``n_items`` molecules with: at most ``workers`` (None:
    :func:`default_workers`), one per ``MIN_PER_WORKER`` molecules, at least 1."""
    cap = default_workers() if workers is None else workers
    return max(1, min(cap, n_items // MIN_PER_WORKER))


def _start_worker(owner: int) -> None:
    """In each worker, first: Ctrl-C is the calling process's to handle; and the worker ends as soon as the process
    that made the pool (``owner``) has ended, however it ended. Killed (SIGTERM, SIGKILL), that process cannot shut
    its pool down, and its workers would wait on their task queue for ever, keeping the fork server alive too."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(owner,), daemon=True, name="molgen-owner-watch").start()


def _end_with(pid: int) -> None:
    """Never returns: ends this process once process ``pid`` has ended (a pidfd where the system has them, else
    asking every half second)."""
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the owner has already gone
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has ended
    else:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except OSError:  # alive, not ours to signal
                pass
            time.sleep(0.5)
    os._exit(1)


def map_chunks(fn: Callable, chunks: Iterable[tuple], workers: int = 1) -> Iterator:
    """``fn(*chunk)`` for every chunk, yielded in the chunks' order: in this process when ``workers`` <= 1, else in
    that many worker processes (``fn`` must then be a module-level function, its arguments and results picklable).
    ``fn`` must not live in the calling program's main module (:func:`_main_module_hidden`).
    Where no process can be started (no shared memory, no writable temporary folder) the work stays in this
    process. A chunk's exception is raised here; a worker that dies is a :class:`MolgenError`; when the caller
    stops early, the chunks not started are dropped and those running are not awaited (the workers end with the
    calling process)."""
    from concurrent.futures.process import BrokenProcessPool

    chunks = list(chunks) if workers > 1 else chunks
    pool = futures = None
    try:
        if workers > 1:
            with _main_module_hidden():
                pool, futures = _start(workers, fn, chunks)
        if futures is None:
            for chunk in chunks:
                yield fn(*chunk)
            return
        for f in futures:
            yield f.result()
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise MolgenError("a worker process ended without its results (out of memory?); MOLGEN_WORKERS=1 "
                          "keeps the work in one process") from None
    except BaseException:  # the caller stopped (Ctrl-C, SIGTERM, an error): the chunks still running are not awaited
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)  # its thread and workers have ended
    _let_go_of_ended()


def _let_go_of_ended() -> None:
    """Let go of the pools (and their queues: a few file descriptors each) whose own thread has ended: shut down
    whole, or stopped early and since ended, they are collected here, in this thread."""
    _HELD[:] = [held for held in _HELD if held.running()]


@contextlib.contextmanager
def _main_module_hidden():
    """While workers start, the calling program's main module is out of multiprocessing's sight: it would import
    it again in every worker (a script read from standard input cannot be), and the workers run molgen's own
    functions only. Every worker runs ``STARTS_FIRST`` as its main module instead, before it takes its pool's
    queues over. The processes start in ``_start``, in this thread."""
    from importlib.machinery import ModuleSpec

    main = sys.modules.get("__main__")
    stand_in = types.ModuleType("__main__")
    stand_in.__spec__ = ModuleSpec(STARTS_FIRST, None) if STARTS_FIRST else None
    sys.modules["__main__"] = stand_in
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start(workers: int, fn: Callable, chunks: list) -> tuple:
    """A pool of ``workers`` processes and the futures of every chunk, or (the pool or None, None) where no process
    can be started. Workers are spawned where the fork server cannot start: its socket's path must fit in 108
    bytes, and a long temporary folder's (``TMPDIR``) does not."""
    import multiprocessing

    methods = [m for m in ("forkserver", "spawn") if m in multiprocessing.get_all_start_methods()]
    pool = futures = None
    try:
        for method in methods:
            pool = _pool(workers, method)
            futures = _submit(pool, fn, chunks) if pool is not None else None
            if futures is not None:
                break
    except BaseException:  # stopped while its processes start
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool, futures


def _pool(workers: int, method: str = "forkserver"):
    """A pool of ``workers`` processes forked from a server that has imported ``PRELOAD`` (``method`` "forkserver")
    or spawned one by one ("spawn"); None where processes cannot be made."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(os.getpid(),))
    except (OSError, ImportError, NotImplementedError):
        return None
    _let_go_of_ended()
    _HELD.append(_Held(pool, (pool._call_queue, pool._result_queue)))
    return pool


def _submit(pool, fn: Callable, chunks: list) -> list | None:
    """The futures of every chunk; None (the pool shut down) where its processes cannot be started."""
    try:
        futures = [pool.submit(fn, *chunk) for chunk in chunks]
    except OSError:
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    for held in _HELD:
        if held.pool is pool:
            held.thread = getattr(pool, "_executor_manager_thread", None)
    return futures
