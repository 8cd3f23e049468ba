"""Compile benchmarks/train_step.py's measurements before they run, in parallel processes, into one JAX compilation
cache: each measurement (a process of its own, one after another) then loads its program instead of compiling it.
On an H200 a 256 x 9 measurement's first chunk took 18-24 s, tracing and compiling included
(benchmarks/results/2026-11-30_h200_train_step.log); the GPU machine's 16 cores compile several programs at once.

    python benchmarks/precompile.py --runs edm:2048:bf16:fused,edm:256:tf32:packed --cache DIR \\
        [--jobs 6] [--budget 90] [train_step.py's options, e.g. --chunk 50]

At most --jobs processes at a time, in the order of --runs (the first measurements first). When --budget seconds
have passed, the processes still compiling are stopped and no more are started: those measurements compile for
themselves, as without this step. Run it before the measurements, never beside one: compiling also uses the
device (XLA times candidate kernels on it), and it would slow what is being timed. One line per run:

    COMPILED molgen <preset> batch=<B> precision=<p> layout=<l> compile_s=<s>
    STOPPED molgen <run> (budget of <s> s spent) | SKIPPED molgen <run> (...) | FAILED molgen <run> (...)

then `PRECOMPILED <n> of <m> in <s> s`. Measure with the same options and `--cache DIR`
(scripts/gpu_teacher.sh does).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start(run: str, cache: str, extra: list[str], log) -> subprocess.Popen:
    """A train_step.py --compile-only process for ``run``, in a process group of its own (so that stopping it
    stops everything it started); it shares the device's memory with the others instead of reserving most of it."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [sys.executable, str(Path(__file__).with_name("train_step.py")), "--runs", run, "--cache", cache,
           "--compile-only", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def report(run: str, rc: int, log) -> str:
    """The run's COMPILED line, or a FAILED line with the last line it wrote."""
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    done = [line for line in lines if line.startswith(("COMPILED", "FAILED"))]
    if done:
        return done[-1]
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return f"FAILED molgen {run} (exit {rc}: {last.strip()[:200]})"


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def precompile(runs: list[str], cache: str, jobs: int, budget: float, extra: list[str], poll: float = 0.2) -> int:
    """Compile ``runs`` (at most ``jobs`` at a time, within ``budget`` seconds), printing a line per run; the
    number compiled."""
    t0, pending, active, compiled = time.monotonic(), list(runs), {}, 0
    try:
        while pending or active:
            while pending and len(active) < jobs and time.monotonic() - t0 < budget:
                run, log = pending.pop(0), tempfile.TemporaryFile()
                active[run] = (start(run, cache, extra, log), log)
            for run, (proc, log) in list(active.items()):
                if proc.poll() is not None:
                    line = report(run, proc.returncode, log)
                    compiled += line.startswith("COMPILED")
                    print(line, flush=True)
                    log.close()
                    del active[run]
            if time.monotonic() - t0 >= budget:
                for run, (proc, log) in active.items():
                    stop(proc)
                    log.close()
                    print(f"STOPPED molgen {run} (budget of {budget:g} s spent)", flush=True)
                active.clear()
                for run in pending:
                    print(f"SKIPPED molgen {run} (budget of {budget:g} s spent)", flush=True)
                break
            time.sleep(poll)
    finally:  # Ctrl-C or an error here: no compiler left running on the device
        for proc, _ in active.values():
            stop(proc)
    print(f"PRECOMPILED {compiled} of {len(runs)} in {time.monotonic() - t0:.0f} s", flush=True)
    return compiled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="train_step.py's --runs: PRESET:BATCH:PRECISION[:LAYOUT],...")
    ap.add_argument("--cache", required=True, help="the compilation cache folder the measurements will use")
    ap.add_argument("--jobs", type=int, default=6, help="processes compiling at once")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; then stop")
    args, extra = ap.parse_known_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` too stops the compiling processes
    precompile([r for r in args.runs.split(",") if r], args.cache, max(1, args.jobs), args.budget, extra)


if __name__ == "__main__":
    main()
