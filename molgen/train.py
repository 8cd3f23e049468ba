"""One training loop for every objective: jitted, data-parallel chunks of steps, EMA, orbax checkpoints, JSONL logs.

The hot path never packs a batch on the host: the training set lives on the device(s) (:mod:`molgen.data.device`),
the host draws only the molecule indices of the next ``chunk`` steps, and one jitted call runs them all
(``lax.scan``: assemble each batch by gathers, loss, gradient, Adam, EMA), so the host meets the device once per
chunk. Checkpoints, logs, the time limit and Ctrl-C act at chunk boundaries (multiples of ``chunk`` steps).

Determinism: the batch at step s depends only on (seed, s) and the step's random key is
``fold_in(PRNGKey(seed), s)``, so a run resumed from a checkpoint continues exactly as if uninterrupted, whatever
the chunk length. Data parallelism: each batch is split into one packed graph per device (molecules
``ids[d::devices]``), stacked on a leading axis that is sharded over a 1-D device mesh; parameters are replicated.
With one device the same code runs unchanged. Precision: :func:`molgen.networks.network`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molgen import MolgenError
from molgen.calls import wait_ready
from molgen.config import RunConfig
from molgen.data.batching import BatchSampler, make_batch
from molgen.failures import first_line, is_out_of_memory, stopped_by
from molgen.io_utils import check_room
from molgen.networks import resolve_precision
from molgen.parallel import agree, global_put, is_main, local_value, make_mesh, put_batch
from molgen.rundir import (METRICS_NAME, check_run_dir, cut_metrics, remove_unfinished_checkpoints, resumed_plan,
                           save_plan)
from molgen.runlog import Diverged, MetricsLog, RunText, run_header
from molgen.state import (CONFIG_NAME, TrainState, checkpoint_manager, init_state,
                          restore_checkpoint, save_checkpoint, state_shapes)
from molgen.steps import check_devices, make_train_chunk, program_config, resolve_layout, step_programs


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    state: TrainState | None  # None: stopped at once before any checkpoint was written
    interrupted: str  # the signal that stopped the run, SIGINT (Ctrl-C) or SIGTERM; "" when none did
    steps_per_s: float
    step: int  # the state's


CHUNK = 50  # optimiser steps per host round-trip


def _aligned(every: int, chunk: int) -> int:
    """``every`` rounded up to a multiple of the chunk (checkpoints and evaluations fall on chunk boundaries)."""
    return max(chunk, -(-every // chunk) * chunk) if every else 0


def open_run(cfg: RunConfig, run_dir: Path, resume: bool, init_params=None, log=print):
    """(config, checkpoint manager, state) of a run accepted to start or continue in ``run_dir``. Nothing is
    written before the checks pass; a resumed run's metrics.jsonl is cut back to its checkpoint's step."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    cfg = cfg.with_optim(precision=resolve_precision(cfg.optim.precision), layout=resolve_layout(cfg.optim.layout))
    shapes = state_shapes(cfg)
    # a checkpoint holds at least the parameters and their EMA (and the optimiser's moments, which it may compress):
    # a disk without that room is refused now, not when the first checkpoint is written
    least = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves((shapes.params, shapes.ema)))
    check_room(run_dir, least, "--out", "a checkpoint takes", is_folder=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in remove_unfinished_checkpoints(run_dir) if is_main() else ():
        log(f"removed checkpoints/{name}: a checkpoint left unfinished (the run was killed while saving it)")
    mgr = checkpoint_manager(run_dir, cfg.optim.keep)
    if resume:
        state = restore_checkpoint(mgr, shapes)
        if is_main():
            cut_metrics(run_dir / METRICS_NAME, int(local_value(state.step)))
        log(f"resumed from step {int(local_value(state.step))} in {run_dir}")
    else:
        state = init_state(cfg, init_params)
    if is_main():
        cfg.save(run_dir / CONFIG_NAME)
    return cfg, mgr, state


class Feed:
    """The run's training molecules on the device and, per chunk, the rows of its steps' batches."""

    def __init__(self, ds, cfg: RunConfig, mesh: Mesh, start: int, end: int, chunk: int, plan_state=None):
        from molgen.data.device import dense_set, make_plan

        ids = ds.split("train")
        self.n_shards, self.chunk, self.end = mesh.devices.size, chunk, end
        self.sampler = BatchSampler(ids, cfg.optim.batch_size, cfg.seed)
        self.dset = global_put(dense_set(ds, ids), NamedSharding(mesh, P()))
        self.row_of = np.full(len(ds.n_atoms), -1, np.int64)  # data-set index -> row of the dense set
        self.row_of[ids] = np.arange(len(ids))
        self.plan = make_plan(resolve_layout(cfg.optim.layout), ds.n_atoms, self.sampler, self.n_shards, start,
                              plan_state)
        self.sharding = NamedSharding(mesh, P(None, "data"))

    def prepare(self, first: int):
        """(steps, static shape, rows on the device) of the chunk starting at step ``first``."""
        n = min(self.chunk - first % self.chunk, self.end - first)  # chunks end on multiples of `chunk`
        idx = np.stack([self.sampler.indices(first + min(k, n - 1)) for k in range(self.chunk)])
        by_shard = idx.reshape(self.chunk, -1, self.n_shards).transpose(0, 2, 1)  # shard d: ids[d::D]
        rows = self.plan.arrange(self.row_of[by_shard], by_shard)
        return n, self.plan.shape_for(idx[:n]), global_put(rows.astype(np.int32), self.sharding)


VAL_MOLECULES, VAL_BATCH = 1024, 256


class Validation:
    """The validation loss of a run's parameters (its EMA's, and the trained ones'): the first ``VAL_MOLECULES``
    validation molecules in fixed batches of ``VAL_BATCH``, each with its own fixed key, so the figure depends on
    the parameters alone (runs with different batch sizes compare directly). The two side by side show an EMA
    (what is exported) that averages weights which move too fast to be averaged: its loss above the trained one.
    Data too small for a validation split: its first 64 training molecules, which ``log`` is told."""

    def __init__(self, ds, cfg: RunConfig, mesh: Mesh, anchor_params=None, log=None):
        on_training = not len(ds.split("valid"))  # data too small for a validation split (a few molecules)
        if on_training and cfg.optim.eval_every and log is not None:
            log("the data has no validation split: the validation losses are those of its first 64 training molecules")
        ids = ds.split("train")[:64] if on_training else ds.split("valid")[:VAL_MOLECULES]
        n = mesh.devices.size
        b = max(n, min(VAL_BATCH, len(ids)) // n * n)
        self.batches = [put_batch(make_batch(ds, ids[k : k + b], n), mesh) for k in range(0, len(ids) - b + 1, b)]
        self.batches = self.batches or [put_batch(make_batch(ds, ids, n), mesh)]
        repl = NamedSharding(mesh, P())
        self.keys = [global_put(jax.random.fold_in(jax.random.PRNGKey(12345), k), repl)
                     for k in range(len(self.batches))]
        self.program, self.anchor = step_programs(program_config(cfg), mesh)[1], anchor_params
        self.shapes = [tuple(a.shape for a in jax.tree_util.tree_leaves(vb)) for vb in self.batches]
        self.compiled, self.compiling, self.used = {}, None, bool(cfg.optim.eval_every)

    def compile_aside(self, params):
        """Compile the loss's programs (one per batch shape) from the parameters' shapes and shardings in a thread of
        their own while the device trains (on a GPU the 256 x 9 network's took 23 s of training at the first one);
        nothing for a run without evaluations."""
        if not self.used:
            return
        like = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)

        def work():
            for vb, key, shape in zip(self.batches, self.keys, self.shapes):
                try:
                    if shape not in self.compiled:
                        self.compiled[shape] = self.program.lower(like, vb, key, self.anchor).compile()
                except Exception:  # noqa: BLE001
                    return
        self.compiling = threading.Thread(target=work, name="validation-compile", daemon=True)
        self.compiling.start()

    def __call__(self, params) -> float:
        if self.compiling is not None:
            self.compiling.join()
            self.compiling = None
        return float(np.mean([local_value(self._loss(params, vb, key, shape))
                              for vb, key, shape in zip(self.batches, self.keys, self.shapes)]))

    def _loss(self, params, vb, key, shape):
        try:  # a program compiled aside (strict about its arguments' shardings), or else the jitted one
            return self.compiled[shape](params, vb, key, self.anchor)
        except (KeyError, TypeError, ValueError):
            return self.program(params, vb, key, self.anchor)


class StopOnSignals:
    """Ctrl-C and SIGTERM (schedulers, `kill`) ask the loop to stop after the chunk in flight (an interrupt
    inside the jitted chunk would leave its donated input state deleted and unsaveable), and say so at once; a
    second one stops at once (``at_once``), keeping the last checkpoint, without waiting for the chunk. While a
    checkpoint is written (:meth:`holding`) they only ask: no checkpoint is cut short. Handlers are restored on
    exit."""

    def __init__(self, kept: Callable[[], int | None] = lambda: None, speaks: bool = True):
        self.requested, self.signum, self.at_once, self.held = False, None, False, False
        self.kept, self.speaks, self.previous = kept, speaks, {}

    def _request(self, signum, frame):
        self.signum = signum
        if self.requested and not self.held:
            self.at_once = True
            raise KeyboardInterrupt
        if not self.requested and self.speaks:  # written as it is (the handler may run inside a write to stderr)
            kept = self.kept()
            then = "with no checkpoint" if kept is None else f"keeping the checkpoint at step {kept}"
            line = (f"{stopped_by(signum)}: stopping after the chunk of steps in flight to save a checkpoint; again "
                    f"to stop at once, {then}\n")
            with contextlib.suppress(OSError):
                os.write(2, line.encode())
        self.requested = True

    @contextlib.contextmanager
    def holding(self):
        self.held = True
        try:
            yield
        finally:
            self.held = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _interrupted(stop: StopOnSignals, run_dir: Path, log: Callable[[str], None]) -> str:
    """The signal that stopped the loop (SIGINT, SIGTERM), said with what follows."""
    if not stop.at_once:
        log(f"{stopped_by(stop.signum)}: saving a checkpoint; continue with: molgen train --resume --out {run_dir}")
    return signal.Signals(stop.signum or signal.SIGINT).name


def train(cfg: RunConfig, run_dir: Path, ds, resume: bool = False, init_params=None, anchor_params=None,
          progress: str | None = None, log: Callable[[str], None] = print, max_seconds: float | None = None,
          stop_at: int | None = None, chunk: int = CHUNK) -> TrainResult:
    """Train until ``cfg.optim.steps`` (or ``stop_at``) steps, in jitted chunks of ``chunk`` steps, checkpointing at
    the first chunk boundary at or after every ``ckpt_every`` steps and at the end. ``progress``: "bar", "lines"
    or None."""
    log = RunText(run_dir, log if is_main() else (lambda s: None), is_main())  # one voice; also train.log
    mesh = make_mesh()
    check_devices(cfg, mesh.devices.size, max_atoms=int(np.max(ds.n_atoms, initial=0)))
    if chunk < 1:
        raise MolgenError("the chunk length must be at least 1 step")
    cfg, mgr, state = open_run(cfg, run_dir, resume, init_params, log)
    repl = NamedSharding(mesh, P())
    state = global_put(state, repl)
    start = int(local_value(state.step))
    end = min(cfg.optim.steps, stop_at) if stop_at is not None else cfg.optim.steps
    feed = Feed(ds, cfg, mesh, start, end, chunk, resumed_plan(run_dir, start, log) if resume else None)
    anchor_params = None if anchor_params is None else global_put(anchor_params, repl)
    validation = Validation(ds, cfg, mesh, anchor_params, log)  # (it says where it has no validation split)
    base_key = global_put(jax.random.PRNGKey(cfg.seed), repl)
    ckpt_every, eval_every = _aligned(cfg.optim.ckpt_every, chunk), _aligned(cfg.optim.eval_every, chunk)
    metrics = MetricsLog(Path(run_dir), start, end, progress, log, cfg.objective, is_main(), max_seconds)
    log.write(run_header(cfg, start, end, f"{mesh.devices.size} {jax.devices()[0].platform} device(s)"))
    step, interrupted, t0 = start, "", time.time()
    with StopOnSignals(mgr.latest_step, speaks=is_main()) as stop:
        try:
            pending = feed.prepare(step) if step < end else None
            while pending is not None:
                n, shape, rows = pending
                chunk_fn = make_train_chunk(cfg, mesh, shape, anchor_params)  # compiled once per shape
                state, out = chunk_fn(state, feed.dset, rows, global_put(np.int32(n), repl), base_key)
                if step == start:  # compiled, and dispatched: the device trains meanwhile
                    metrics.started(step + n)
                    validation.compile_aside(state.ema)
                first, step = step, step + n
                over = max_seconds is not None and time.time() - t0 > max_seconds
                over, stop.requested = agree(over), agree(stop.requested)  # every process stops at the same step
                pending = feed.prepare(step) if step < end and not over and not stop.requested else None
                wait_ready(out)  # the device runs the chunk; a second Ctrl-C stops here at once
                out = jax.tree_util.tree_map(lambda a: a[:n], local_value(out))
                evaluate = eval_every and (step % eval_every == 0 or step == end)
                metrics.write(first, out, *((validation(state.ema), validation(state.params)) if evaluate else ()))
                if ckpt_every and step % ckpt_every == 0:
                    with stop.holding():
                        _checkpoint(run_dir, mgr, state, step, feed.plan, log)
                if stop.requested:
                    raise KeyboardInterrupt
                if over and step < end:
                    log(f"time budget of {max_seconds:.0f} s reached at step {step}")
        except (Diverged, RuntimeError, MemoryError, OSError) as e:  # a loss no longer finite, out of memory or disk
            raise _stopped(e, cfg, mgr, run_dir, log) from None
        except KeyboardInterrupt:
            interrupted = _interrupted(stop, run_dir, log)
        finally:
            metrics.close()
        if stop.at_once or any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree_util.tree_leaves(state)):
            return _last_kept(cfg, mgr, init_params, log, interrupted, stop.at_once, run_dir)
        with stop.holding():
            _checkpoint(run_dir, mgr, state, step, feed.plan, log, said=True)
    return TrainResult(state, interrupted, (step - start) / max(time.time() - t0, 1e-9), step)


def _last_kept(cfg: RunConfig, mgr, init_params, log: RunText, interrupted: str, at_once: bool, run_dir: Path):
    """A run stopped inside a chunk (its donated state deleted, or a second signal that did not wait for it): the
    last checkpoint, else the starting state (none after a second signal: it would wait for the chunk)."""
    how = "stopped at once, without the chunk in flight" if at_once else "stopped inside a chunk"
    kept = mgr.latest_step()
    log(f"{how}: " + ("no checkpoint was saved" if kept is None else f"the last checkpoint (step {kept}) is kept; "
                      f"continue with: molgen train --resume --out {run_dir}"))
    if kept is not None:
        return TrainResult(restore_checkpoint(mgr, state_shapes(cfg)), interrupted, 0.0, kept)
    return TrainResult(None if at_once else init_state(cfg, init_params), interrupted, 0.0, 0)


def _checkpoint(run_dir: Path, mgr, state: TrainState, step: int, plan, log: RunText, said: bool = False) -> None:
    """Save the state and its batch plan (``said``: and say so in train.log); one that cannot be written (a full
    disk) stops the run with what is kept and how to go on (:func:`_no_room`)."""
    try:
        save_plan(run_dir, step, plan)
        save_checkpoint(mgr, state)
    except (MolgenError, OSError) as e:
        raise _no_room(e, mgr, run_dir, log) from None
    if said:
        log.write(f"checkpoint at step {step}")


def _no_room(e: Exception, mgr, run_dir: Path, log: RunText) -> MolgenError:
    """A file of the run that could not be written (a full disk) as one line with what is kept and how to go on,
    in train.log too if it can still be written."""
    why = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
    kept = mgr.latest_step()
    go_on = (f"the checkpoint at step {kept} is kept; make room, then continue with: molgen train --resume --out "
             f"{run_dir}" if kept is not None else "no checkpoint is kept; make room and start again")
    with contextlib.suppress(OSError):
        log.write(f"stopped: {why}; {go_on}")
    return MolgenError(f"{why}; {go_on}")


def _stopped(e: Exception, cfg: RunConfig, mgr, run_dir: Path, log: RunText) -> Exception:
    """The error that stops a run, told to train.log: a loss no longer finite (:func:`_diverged`), JAX out of
    memory (the command line says it in one line, :func:`molgen.failures.out_of_memory`), a full disk
    (:func:`_no_room`); others as they are."""
    if isinstance(e, Diverged):
        return _diverged(e, mgr, run_dir, log)
    if isinstance(e, OSError):
        return _no_room(e, mgr, run_dir, log)
    if is_out_of_memory(e):
        kept = mgr.latest_step()
        log.write(f"stopped, out of memory at batch size {cfg.optim.batch_size} ({first_line(e)}); " +
                  (f"the checkpoint at step {kept} is kept" if kept is not None else "no checkpoint was saved"))
    return e


def _diverged(e: Diverged, mgr, run_dir: Path, log: RunText) -> Diverged:
    """The error that stops a run whose loss is no longer finite, with what is kept and how to go on; in
    train.log too."""
    kept = mgr.latest_step()
    what = (f"the checkpoint at step {kept} is kept; continue with a lower learning rate: molgen train --resume "
            f"--out {run_dir} --lr LR" if kept is not None else "no checkpoint was saved; start again with a lower --lr")
    log.write(f"stopped: {e}; {what}")
    return Diverged(f"{e}; {what}")
