"""The logs of a training run: metrics.jsonl (every LOG_EVERY steps and at every chunk's end), train.log (the
run's messages and a progress line now and then, with their times), and the progress shown to the user: a bar on
a terminal, else the same lines as train.log."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from molgen import MolgenError
from molgen.display import LINE_EVERY_S, hms
from molgen.io_utils import naming_errors
from molgen.rundir import METRICS_NAME

LOG_EVERY = 25  # steps per line of metrics.jsonl
LOG_NAME = "train.log"


def run_header(cfg, start: int, end: int, devices: str) -> str:
    """train.log's line at each start of a run: what trains, from where, with what (and JAX's version and
    XLA_FLAGS, which decide how the step compiles)."""
    import jax

    from molgen import __version__

    o = cfg.optim
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return (f"molgen {__version__}, {cfg.objective}: steps {start} -> {end}, batch {o.batch_size}, lr {o.lr}, "
            f"{o.precision} {o.layout}, seed {cfg.seed}, {devices}" + (f", init {cfg.init}" if cfg.init else "")
            + f", jax {jax.__version__}" + (f", XLA_FLAGS {flags}" if flags else ""))


class RunText:
    """train.log in the run folder: each message with its UTC time, appended (a resumed run continues it); calling
    it also shows the message (``show``). Only the process that writes the run's files writes it."""

    def __init__(self, run_dir: Path, show=print, writes: bool = True):
        self.path, self.show, self.writes = Path(run_dir) / LOG_NAME, show, writes

    def __call__(self, text: str) -> None:
        self.write(text)
        self.show(text)

    def write(self, text: str) -> None:
        if self.writes and self.path.parent.is_dir():
            with naming_errors(self.path), open(self.path, "a") as f:  # a full disk's error names the file
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}  {text}\n")


class Diverged(MolgenError):
    """The loss is no longer a finite number: the run stops, its last checkpoint kept."""


class MetricsLog:
    """metrics.jsonl (every LOG_EVERY steps and at every chunk's end; steps/s there is the chunk's, checkpoints
    and evaluations at its start included) and the progress: a line (step, loss, steps/s since the line before,
    time left: to the last step, or to the end of the time budget ``max_seconds`` if that comes first)
    at most every LINE_EVERY_S (molgen.display) into ``log`` (a :class:`RunText`, or any callable), shown too
    unless a bar (``progress="bar"``) shows it. Only the process that writes the run's files (``writes``) shows progress."""

    def __init__(self, run_dir: Path, start: int, end: int, progress: str | None, log, mode: str,
                 writes: bool = True, max_seconds: float | None = None):
        self.file = open(run_dir / METRICS_NAME, "a") if writes else None
        self.t0 = self.t_last = self.t_line = time.time()
        self.s_line = start  # the step of the line before: a line's rate is the mean since then, not one chunk's
        self.stop_by = None if max_seconds is None else self.t0 + max_seconds  # the run's time budget, if any
        self.s_last, self.start, self.end, self.log = start, start, end, log
        self.display = progress if writes else None
        self.bar = self.task = None
        if self.display == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} step/s"),
                                TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(f"train {mode}", total=end, completed=start, loss=float("nan"), rate=0.0)

    def started(self, last: int) -> None:
        """The first chunk compiled and running, up to step ``last``: a line, so that a log shows the run at work
        before that chunk ends (compiling and a chunk of a large network take minutes on a CPU)."""
        self._line(f"steps {self.start + 1}-{last} running (compiled and started in {time.time() - self.t0:.1f} s)")

    def write(self, first: int, metrics, val_loss: float | None = None, val_loss_trained: float | None = None) -> None:
        m = {k: np.asarray(v) for k, v in metrics.items()}
        n = len(m["loss"])
        bad = np.flatnonzero(~np.isfinite(m["loss"]))
        if len(bad):
            raise Diverged(f"loss became {m['loss'][bad[0]]} at step {first + bad[0] + 1}")
        now, done = time.time(), first + n
        rate = (done - self.s_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.s_last = now, done
        for k in range(n):
            if (first + k + 1) % LOG_EVERY and k != n - 1:
                continue
            rec = {"step": first + k + 1, "time": round(now - self.t0, 2), "steps_per_s": round(rate, 3),
                   **{name: float(v[k]) for name, v in m.items()}}
            if k == n - 1 and val_loss is not None:
                rec["val_loss"] = val_loss
            if k == n - 1 and val_loss_trained is not None:
                rec["val_loss_trained"] = val_loss_trained
            if self.file is not None:
                self._append(json.dumps(rec) + "\n")
        if self.file is not None:
            self._append("")
        self._show(done, float(m["loss"][n - 1]), rate, now)
        if val_loss is not None:
            trained = "" if val_loss_trained is None else f", trained parameters {val_loss_trained:.4f}"
            self._line(f"step {done}/{self.end}  validation loss (EMA) {val_loss:.4f}{trained}")

    def _append(self, text: str) -> None:
        """Append to metrics.jsonl (flushed when ``text`` is empty); a full disk's error names the file."""
        with naming_errors(self.file.name):
            self.file.write(text) if text else self.file.flush()

    def _show(self, done: int, loss: float, rate: float, now: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss, rate=rate)
        if now - self.t_line >= LINE_EVERY_S or done == self.end:
            rate = (done - self.s_line) / max(now - self.t_line, 1e-9)
            self.t_line, self.s_line = now, done
            overall = (done - self.start) / max(now - self.t0, 1e-9)
            left, why = (self.end - done) / max(overall, 1e-9), ""
            if self.stop_by is not None and self.stop_by - now < left:
                left, why = self.stop_by - now, " (time budget)"
            line = f"step {done}/{self.end}  loss {loss:.4f}  {rate:.2f} steps/s  {hms(left)} left{why}"
            self._line(line)

    def _line(self, line: str) -> None:
        if self.display == "lines":
            self.log(line)
        elif isinstance(self.log, RunText):
            self.log.write(line)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # what a full disk refused was told when it was written
                self.file.close()
        if self.bar is not None:
            self.bar.stop()

