"""Network calls followed as they finish (molgen.calls): progress counts finished calls, and a signal acts during
a call's computation, not after every queued call has finished."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import tiny_models

from molgen.calls import Calls, wait_ready


class Result:
    """A stand-in for a JAX array being computed: ready once ``ready`` is set; counts the looks at it."""

    def __init__(self, ready=False):
        self.ready, self.looks = ready, 0

    def is_ready(self):
        self.looks += 1
        return self.ready


def test_a_call_counts_when_its_result_is_ready_and_the_next_is_queued():
    told, a, b = [], Result(), Result()
    calls = Calls(told.append)
    calls(a)  # queued: nothing done yet, and nothing waited for
    assert told == [] and a.looks == 0
    threading.Timer(0.2, lambda: setattr(a, "ready", True)).start()
    calls(b)  # the next one queued: waits for the first, which finishes while it waits
    assert told == [1] and a.ready and b.looks == 0
    b.ready = True
    calls.finish()
    calls.finish()  # nothing left to wait for
    assert told == [1, 1]
    Calls()(Result(ready=True))  # no progress to tell


def test_a_signal_interrupts_the_wait_for_a_result():
    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        never = Result()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.time()
        with pytest.raises(Stop):
            wait_ready({"x": never, "y": None})
        assert time.time() - t0 < 60 and never.looks > 1  # the handler ran while the result was still awaited
    finally:
        signal.signal(signal.SIGUSR1, previous)


# `molgen sample` whose network call takes half an hour (~2e6 products of 256 x 256 matrices added to it; a
# program XLA deems that costly runs after its call returns, as the network's do; a cheap one, or one with a
# host callback, would run inside the call)
HELD = """
import pathlib, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test runner may ignore Ctrl-C)
import jax, jax.numpy as jnp
import molgen.sample
from molgen.networks import network

queued = pathlib.Path(sys.argv[1])

def spin(v):
    m = jnp.full((256, 256), v / 256)
    return jnp.sum(jax.lax.fori_loop(0, 2_000_000, lambda i, a: jnp.tanh(a @ a), m))

def held(apply):
    def f(params, x, *a):
        first, *rest = apply(params, x, *a)
        return (first + 0 * spin(jnp.sum(first)), *rest)
    return f

def marked(step):  # the file tells the test that the call is queued
    def f(*a):
        out = step(*a)
        queued.touch()
        return out
    return f

molgen.sample._prepared = lambda s, cfg, formula=None: marked(s.prepare(cfg, held(network(cfg)[1])))
sys.argv = ["molgen", "sample", "--model", sys.argv[2], "-n", "3", "--steps", "2", "-o", sys.argv[3]]
from molgen.cli import main
main()
"""


def test_ctrl_c_or_sigterm_stops_sampling_during_a_network_call(tmp_path):
    """The call in flight is not waited for, nor the calls queued behind it: one line, exit code 130 (Ctrl-C) or
    143 (SIGTERM), no output file."""
    from molgen.models import save_model

    _, cons, _ = tiny_models()
    save_model(tmp_path / "m", cons.cfg, cons.params)
    (tmp_path / "held.py").write_text(HELD)
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        d = tmp_path / sig.name
        d.mkdir()
        runs[sig] = (d, subprocess.Popen([sys.executable, str(tmp_path / "held.py"), str(d / "started"),
                                          str(tmp_path / "m"), str(d / "out.sdf")], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    try:
        for sig, (d, p) in runs.items():
            deadline = time.time() + 180
            while not (d / "started").exists() and p.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert (d / "started").exists(), p.communicate(timeout=30)
            p.send_signal(sig)
            _, err = p.communicate(timeout=120)
            how = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
            assert p.returncode == 128 + sig and err.strip().splitlines()[-1] == (
                f"{how}: molgen sample stopped (a file molgen writes is written whole or not at all)"), err
            assert "Traceback" not in err and not (d / "out.sdf").exists()
    finally:
        for _, p in runs.values():
            p.kill()
