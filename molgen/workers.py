"""Per-molecule work (bond perception, RDKit, MMFF94) spread over processes: the same results, in the same order,
as one process gives.

Workers are fresh processes (spawned, never forked: a process that runs JAX holds threads a fork would copy
half-way) that import only numpy, RDKit and molgen's chemistry. Starting one costs ~0.4 s and judging a molecule
~1 ms, so a worker is started for every ``MIN_PER_WORKER`` molecules at most. ``MOLGEN_WORKERS`` caps their
number (default: one per usable core; 1 keeps all work in the calling process)."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

from molgen import MolgenError

MIN_PER_WORKER = 1000
PRELOAD = ["molgen.evaluate", "molgen.chem.forcefield", "molgen.chem.rdkit_utils", "molgen.fidelity"]


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


def _ignore_interrupt() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the calling process's to handle


def map_chunks(fn: Callable, chunks: Iterable[tuple], workers: int = 1) -> Iterator:
    """``fn(*chunk)`` for every chunk, yielded in the chunks' order: in this process when ``workers`` <= 1, else in
    that many worker processes (``fn`` must then be a module-level function, its arguments and results picklable).
    A chunk's exception is raised here; when the caller stops early, the chunks not started are dropped."""
    if workers <= 1:
        for chunk in chunks:
            yield fn(*chunk)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_interrupt) as pool:
        futures = [pool.submit(fn, *chunk) for chunk in chunks]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()
