"""The training state (step, parameters, their EMA, Adam's state), the optimiser, and the run folder's
checkpoints (orbax) with the config.json beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from molgen import MolgenError
from molgen.config import OptimConfig, RunConfig
from molgen.networks import init_params
from molgen.rundir import CHECKPOINTS

CONFIG_NAME = "config.json"

_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # older optax: global_norm


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    ema: Any
    opt_state: Any


def make_optimizer(cfg: OptimConfig):
    """(optax transformation, learning-rate schedule): clipping by global norm, then Adam after a linear warm-up
    from lr / 100."""
    warm = max(cfg.warmup, 1)
    sched = optax.join_schedules([optax.linear_schedule(cfg.lr / 100, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                 [warm])
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(sched)), sched


def grad_norm(grads):
    return _tree_norm(grads)


def init_state(cfg: RunConfig, params=None) -> TrainState:
    params = init_params(cfg) if params is None else params
    tx, _ = make_optimizer(cfg.optim)
    return TrainState(jnp.zeros((), jnp.int32), params, jax.tree_util.tree_map(jnp.copy, params), tx.init(params))


def state_shapes(cfg: RunConfig) -> TrainState:
    """What :func:`init_state` returns for ``cfg`` as shapes, dtypes and placement (this process's first device),
    without computing it (seconds for a large network): the target a checkpoint is restored into."""
    device = jax.local_devices()[0]
    make = getattr(jax.sharding, "make_single_device_sharding", None)  # JAX 0.12 deprecates SingleDeviceSharding
    here = make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
                                  jax.eval_shape(lambda: init_state(cfg)))


def checkpoint_manager(run_dir: Path, keep: int = 3):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, options=opts)


def save_checkpoint(mgr, state: TrainState) -> None:
    """Save ``state`` at its step. A checkpoint that cannot be written (a full disk, a file size limit, no
    permission) is one line (MolgenError), and leaves no partial folder."""
    import logging
    import sys

    import orbax.checkpoint as ocp

    step = int(state.step.addressable_data(0)) if isinstance(state.step, jax.Array) else int(state.step)
    if mgr.latest_step() == step:
        return
    previous, absl = sys.unraisablehook, logging.getLogger("absl")
    sys.unraisablehook = _without_closed_loop_errors(previous)
    absl.addFilter(_thread_failures)  # orbax's threads log the error they raise here, with its traceback
    try:
        mgr.save(step, args=ocp.args.StandardSave(state), force=True)
        mgr.wait_until_finished()
    except Exception as e:
        why = _write_error(e)
        if why is None:
            sys.unraisablehook = previous
            absl.removeFilter(_thread_failures)
            raise
        _quiet_abandoned_io()
        _remove_partial(Path(mgr.directory), step)
        raise MolgenError(f"{mgr.directory}: the checkpoint at step {step} cannot be written ({why})") from None
    sys.unraisablehook = previous
    absl.removeFilter(_thread_failures)


def _remove_partial(directory: Path, step: int, settle_s: float = 0.5, limit_s: float = 10.0) -> None:
    """Remove the folder a failed save left (``<step>.orbax-checkpoint-tmp...``). The writes still in flight when the
    save failed go on in orbax's threads and may make it again after a first removal (seen under load): it is removed
    until nothing has come back for ``settle_s`` (at most ``limit_s`` in all)."""
    import shutil
    import time

    start = last = time.monotonic()
    while time.monotonic() - last < settle_s and time.monotonic() - start < limit_s:
        for partial in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
            last = time.monotonic()
        time.sleep(0.02)


def _thread_failures(record) -> bool:
    return "raised an exception" not in record.getMessage()


def restore_checkpoint(mgr, target: TrainState, step: int | None = None) -> TrainState:
    """The checkpoint at ``step`` (default: the latest) in the shapes of ``target``; a damaged checkpoint, or one of
    other shapes, is one line (MolgenError)."""
    import sys

    import orbax.checkpoint as ocp

    step = mgr.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    previous = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_errors(previous)
    try:
        state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
        cause = _read_error(e)
        if cause is None:
            raise
        _quiet_abandoned_io()
        first = str(cause).strip().splitlines()[0].split(". ")[0] if str(cause).strip() else type(cause).__name__
        earlier = [s for s in mgr.all_steps() if s < step]
        remedy = (f"; if only this checkpoint is damaged, delete its folder {step} there to go on from step "
                  f"{max(earlier)}" if earlier else "")
        raise MolgenError(f"{mgr.directory}: the checkpoint at step {step} cannot be read: damaged, or not made for "
                          f"the model {CONFIG_NAME} describes ({first[:200]}){remedy}") from None
    sys.unraisablehook = previous
    return state


def _read_error(e: BaseException) -> BaseException | None:
    """What made a restore fail when the checkpoint is the cause: arrays of other shapes or names, or damaged data
    (a ValueError, KeyError or TypeError, raised as it is or wrapped by orbax's reads in a bare Exception); None
    for anything else (memory, an interrupt), which is not the checkpoint's fault."""
    while e is not None:
        if isinstance(e, (ValueError, KeyError, TypeError)):
            return e
        e = e.__cause__ if type(e) is Exception else None
    return None


def _write_error(e: BaseException) -> str | None:
    """Why a checkpoint could not be written when the file system refused it (an OSError, or tensorstore's error
    with the OS's error code, which orbax raises as a ValueError); None for anything else."""
    import os
    import re

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e.strerror or str(e) or type(e).__name__
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1)))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _quiet_abandoned_io() -> None:
    """After a failed read or write, orbax's reads and writes still in flight end in a closed event loop, or fail
    unawaited: with :func:`_without_closed_loop_errors` as the hook (it stays) and these filters, they print no
    tracebacks (the command stops after one such failure)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(lambda r: "exception was never retrieved" not in r.getMessage())
    logging.getLogger("absl").addFilter(_thread_failures)


def _without_closed_loop_errors(previous):
    """An unraisable-exception hook that drops what orbax's abandoned reads and writes leave (callbacks into a closed
    event loop, its coroutines closed unfinished) and passes on anything else."""

    def hook(u):
        code = getattr(u.object, "cr_code", None)
        closed_loop = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        if not (closed_loop or (code is not None and "orbax" in code.co_filename)):
            previous(u)

    return hook


def load_ema_params(run_dir: Path, step: int | None = None) -> tuple[RunConfig, Any, int]:
    """(config, EMA parameters, step) of the checkpoint at ``step`` (default: the latest) in a run folder."""
    run_dir = Path(run_dir)
    cfg = RunConfig.load(run_dir / CONFIG_NAME)
    mgr = checkpoint_manager(run_dir, cfg.optim.keep)
    if mgr.latest_step() is None:
        raise MolgenError(f"{run_dir}: no checkpoint in this run folder")
    state = restore_checkpoint(mgr, state_shapes(cfg), step)
    return cfg, state.ema, int(state.step)
