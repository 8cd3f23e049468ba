"""The jitted programs of training: one optimiser step (loss, gradient, Adam, EMA) on batches packed on the host,
its loss alone, and a chunk of steps whose batches are assembled on the device (``lax.scan``), each compiled once
per (program config, device mesh, batch shape) and shared by the runs of a process. The loop that drives them:
:mod:`molgen.train`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molgen import MolgenError
from molgen.config import RunConfig, resolve_auto
from molgen.networks import network, resolve_precision
from molgen.objectives import get_objective
from molgen.state import TrainState, grad_norm, make_optimizer


# The layout `auto` picks per platform (docs/performance.md).
AUTO_LAYOUT = {"cpu": "packed", "gpu": "packed"}


def resolve_layout(layout: str, platform: str | None = None) -> str:
    """``auto`` -> the platform's entry of :data:`AUTO_LAYOUT`; anything else must be one of LAYOUTS."""
    from molgen.data.device import LAYOUTS

    return resolve_auto(layout, LAYOUTS, AUTO_LAYOUT, "layout", platform)


def check_devices(cfg: RunConfig, n_devices: int, platform: str | None = None, max_atoms: int | None = None) -> None:
    """The batch splits evenly over the devices; the packed-kernel layout's kernels run on a GPU, take the bf16 or
    tf32 arithmetic, molecules of the data's size (``max_atoms``, where known) and, where this process runs them
    (``platform`` None), agree with their array formulations (:func:`molgen.nn.kernelcheck.check_kernels`, once a
    process; else one line: MolgenError)."""
    if cfg.optim.batch_size % n_devices:
        raise MolgenError(f"batch size {cfg.optim.batch_size} is not divisible by the {n_devices} devices")
    if resolve_layout(cfg.optim.layout, platform) != "packed-kernel":
        return
    platform = platform or jax.default_backend()
    if platform != "gpu":
        raise MolgenError(f"the packed-kernel layout runs its kernels on a GPU, not on a {platform}: use --set "
                          "optim.layout=packed")
    precision = resolve_precision(cfg.optim.precision, platform)
    if precision not in ("bf16", "tf32"):
        raise MolgenError(f"the packed-kernel layout trains in bf16 or tf32, not {cfg.optim.precision}: add "
                          "--precision bf16")
    from molgen.nn.pairgrad import MAX_ATOMS

    if max_atoms is not None and max_atoms > MAX_ATOMS:
        raise MolgenError(f"the packed-kernel layout takes molecules of up to {MAX_ATOMS} atoms, the data has "
                          f"{max_atoms}: use --set optim.layout=packed")
    if platform == jax.default_backend():
        check_pair_kernels(precision, cfg.model.nf)


@functools.lru_cache(maxsize=4)
def check_pair_kernels(precision: str, features: int) -> float | None:
    """The pair kernels checked at this feature width and precision where they run: the largest relative error
    (None where the layers do not use them); MolgenError if they disagree."""
    from molgen.nn.kernelcheck import check_kernels
    from molgen.nn.pairgrad import TILE, supported

    if not supported(4 * TILE, features, 2):
        return None
    try:
        return max(check_kernels(jnp.bfloat16 if precision == "bf16" else jnp.float32, features).values())
    except RuntimeError as e:
        raise MolgenError(f"{e}: train with --set optim.layout=packed") from None


def make_step(cfg: RunConfig):
    """(step_fn, sharded_loss), pure: ``step_fn(state, graphs, key, anchor=None) -> (state, metrics)`` on a batch of
    per-device graphs stacked on axis 0; ``sharded_loss(params, graphs, key, step, anchor=None) -> (loss, aux)``.
    ``anchor``: the parameters the objective's loss needs besides the trained ones (:mod:`molgen.objectives`)."""
    _, apply = network(cfg, cfg.optim.precision, pair_kernel=resolve_layout(cfg.optim.layout) == "packed-kernel")
    loss_fn = get_objective(cfg.objective).make_loss(cfg, apply)
    tx, sched = make_optimizer(cfg.optim)

    def sharded_loss(params, graphs, key, step, anchor=None):
        keys = jax.random.split(key, jax.tree_util.tree_leaves(graphs)[0].shape[0])
        if keys.shape[0] == 1:  # one device: no batch axis of size 1 in every product (XLA transposed the
            # [pairs, features] arrays around it on a GPU, docs/performance.md); the same values
            losses, aux = loss_fn(params, jax.tree_util.tree_map(lambda a: a[0], graphs), keys[0], step, anchor)
        else:
            losses, aux = jax.vmap(lambda g, k: loss_fn(params, g, k, step, anchor))(graphs, keys)
        return losses.mean(), jax.tree_util.tree_map(jnp.mean, aux)

    def step_fn(state: TrainState, graphs, key, anchor=None):
        (loss, aux), grads = jax.value_and_grad(sharded_loss, has_aux=True)(state.params, graphs, key, state.step,
                                                                             anchor)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with a warm-up (decay grows with the step) so short runs are not dominated by the initial weights.
        d = jnp.minimum(cfg.optim.ema, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": grad_norm(grads), "lr": sched(state.step), **aux}
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    return step_fn, sharded_loss


def program_config(cfg: RunConfig) -> RunConfig:
    """What a training step's program depends on: ``cfg`` without the settings that only steer the loop (steps,
    checkpoint and evaluation intervals, checkpoints kept), the seed (keys are arguments) and the model the run
    started from. Runs that agree on the rest share their compiled programs within a process."""
    return cfg.replace(seed=0, init=None).with_optim(steps=0, ckpt_every=0, eval_every=0, keep=0)


# The jitted programs of a (program config, mesh[, batch shape]): a later run in the same process (a resumed run,
# a Python caller's sweep) reuses their traced and compiled programs instead of building them again.
@functools.lru_cache(maxsize=8)
def step_programs(cfg: RunConfig, mesh: Mesh):
    step_fn, sharded_loss = make_step(cfg)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    step = jax.jit(step_fn, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl), donate_argnums=(0,))

    def eval_fn(params, graphs, key, anchor):
        return sharded_loss(params, graphs, key, jnp.asarray(0), anchor)[0]

    evaluate = jax.jit(eval_fn, in_shardings=(repl, data, repl, repl), out_shardings=repl)
    return step, evaluate


def make_train_step(cfg: RunConfig, mesh: Mesh, anchor_params=None):
    """(step, evaluate), jitted, on batches packed on the host (:func:`shard_batch`, :func:`put_batch`):
    ``step(state, graphs, key)``, ``evaluate(params, graphs, key)``, with ``anchor_params`` for the loss."""
    step, evaluate = step_programs(program_config(cfg), mesh)
    return (lambda state, graphs, key: step(state, graphs, key, anchor_params),
            lambda params, graphs, key: evaluate(params, graphs, key, anchor_params))


@functools.lru_cache(maxsize=32)
def _chunk_program(cfg: RunConfig, mesh: Mesh, shape):
    from molgen.data.device import GroupPlan, ShapePlan

    assemble = (GroupPlan if resolve_layout(cfg.optim.layout) == "grouped" else ShapePlan).assemble
    step_fn, _ = make_step(cfg)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, "data"))

    @jax.jit  # traced once: the shapes of its metrics (for the steps that do not run), then its program
    def one(state, ids_k, dset, base_key, anchor):
        graphs = jax.vmap(lambda i: assemble(dset, i, shape))(ids_k)
        return step_fn(state, graphs, jax.random.fold_in(base_key, state.step), anchor)

    def chunk(state, dset, ids, n_active, base_key, anchor):
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                       jax.eval_shape(one, state, ids[0], dset, base_key, anchor)[1])

        def body(state, xs):
            ids_k, k = xs
            return jax.lax.cond(k < n_active, lambda s, i: one(s, i, dset, base_key, anchor),
                                lambda s, _: (s, zeros), state, ids_k)

        return jax.lax.scan(body, state, (ids, jnp.arange(ids.shape[0])))

    return jax.jit(chunk, in_shardings=(repl, repl, data, repl, repl, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


def make_train_chunk(cfg: RunConfig, mesh: Mesh, shape, anchor_params=None):
    """``chunk(state, dset, ids, n_active, base_key) -> (state, metrics)``, jitted: the steps of ``ids``
    [K, devices, batch / devices] (row indices of the device-resident ``dset``), each batch assembled on the
    device in the run's layout (``cfg.optim.layout``, resolved) with the static ``shape`` of its plan (packed:
    (nodes, edges) per device; grouped: the groups); only the first ``n_active`` steps run (the rest leave the
    state as it is and report zeros). Step s uses the key ``fold_in(base_key, s)``; the loss gets
    ``anchor_params``. ``metrics`` holds one row per step. ``chunk.lower`` (same arguments) lowers the same
    program, for compiling it ahead of time (``.compile()``; with a compilation cache, another process then
    loads it instead of compiling)."""
    fn = _chunk_program(program_config(cfg), mesh, shape)

    def chunk(state, dset, ids, n_active, base_key):
        return fn(state, dset, ids, n_active, base_key, anchor_params)

    chunk.lower = lambda *args: fn.lower(*args, anchor_params)
    return chunk
