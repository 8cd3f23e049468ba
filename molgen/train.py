"""One training loop for every objective: jitted, data-parallel chunks of steps, EMA, orbax checkpoints, JSONL logs.

The hot path never packs a batch on the host: the training set lives on the device(s) (:mod:`molgen.data.device`),
the host draws only the molecule indices of the next ``chunk`` steps, and one jitted call runs them all
(``lax.scan``: assemble each batch by gathers, loss, gradient, Adam, EMA), so the host meets the device once per
chunk. Checkpoints, logs, the time limit and Ctrl-C act at chunk boundaries (multiples of ``chunk`` steps).

Determinism: the batch at step s depends only on (seed, s) and the step's random key is
``fold_in(PRNGKey(seed), s)``, so a run resumed from a checkpoint continues exactly as if uninterrupted, whatever
the chunk length. Data parallelism: each batch is split into one packed graph per device (molecules
``ids[d::devices]``), stacked on a leading axis that is sharded over a 1-D device mesh; parameters are replicated.
With one device the same code runs unchanged.

Precision (``RunConfig.precision``): ``float32`` (every product in full float32), ``tf32`` (float32 numbers,
matrix products on TensorFloat-32 tensor cores: JAX's own default on recent NVIDIA GPUs, the same as float32 on a
CPU) or ``bf16`` (the EGNN's hidden matrix products and per-edge activations in bfloat16; parameters, optimiser,
loss, coordinates and neighbour sums float32: :mod:`molgen.nn.egnn`). ``auto`` picks :data:`AUTO_PRECISION`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molgen import MolgenError
from molgen.chem.elements import CHARGES, N_TYPES
from molgen.config import RunConfig
from molgen.consistency.ict import consistency_loss
from molgen.consistency.stack import make_model_fn
from molgen.data.batching import EDGE_GRANULE, NODE_GRANULE, BatchSampler, Graph, bucket, pack
from molgen.diffusion.edm import diffusion_loss
from molgen.nn.egnn import EGNN

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def type_features(types, node_mask):
    """EDM's normalised features inside jit: one-hot / 4 and Z / 10 (zero on padding)."""
    onehot = jax.nn.one_hot(types, N_TYPES) * 0.25
    charge = jnp.asarray(CHARGES, jnp.float32)[types][:, None] * 0.1
    return jnp.concatenate([onehot, charge], axis=-1) * node_mask[:, None]


def features(graph):
    """The features of a graph's atom types (:func:`type_features`)."""
    return type_features(graph.types, graph.node_mask)


PRECISIONS = ("float32", "tf32", "bf16")
# The training precision `auto` picks per platform, as measured (docs/performance.md): on a CPU bf16 is no faster;
# on an H200, 256 x 9 at batch 512, tf32 trained 2.7x as many molecules/s as this bf16 path.
AUTO_PRECISION = {"cpu": "float32", "gpu": "tf32"}


def resolve_precision(precision: str, platform: str | None = None) -> str:
    """``auto`` -> the platform's entry of :data:`AUTO_PRECISION`; anything else must be one of PRECISIONS."""
    if precision == "auto":
        platform = platform or jax.default_backend()
        return AUTO_PRECISION.get(platform, "float32")
    if precision not in PRECISIONS:
        raise MolgenError(f"--precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def make_apply(cfg: RunConfig, precision: str | None = None):
    """(network, apply): ``precision`` None leaves matrix products at JAX's default (sampling); else a training
    precision of :data:`PRECISIONS`."""
    if precision is None:
        net = EGNN(cfg.model)
        return net, net.apply
    precision = resolve_precision(precision)
    net = EGNN(cfg.model, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
    matmul = {"float32": "float32", "tf32": "tensorfloat32", "bf16": None}[precision]
    if matmul is None:
        return net, net.apply

    def apply(*args, **kw):
        with jax.default_matmul_precision(matmul):  # read when the products are traced
            return net.apply(*args, **kw)

    return net, apply


def make_loss(cfg: RunConfig, precision: str | None = None) -> Callable:
    """loss(params, graph, key, step) -> (loss, aux) for the run's mode (network at ``precision``; default the
    run's)."""
    _, apply = make_apply(cfg, cfg.precision if precision is None else precision)
    if cfg.mode == "diffusion":
        return lambda p, g, k, s: diffusion_loss(apply, p, g.positions, features(g), g, k, cfg.diffusion)
    if cfg.mode in ("ct", "ect"):
        cfn = make_model_fn(cfg, apply)
        return lambda p, g, k, s: consistency_loss(cfn, p, g.positions, features(g), g, k, s, cfg.consistency)
    if cfg.mode == "distill":  # batches are (graph of targets, noise): see molgen.consistency.distill
        from molgen.consistency.distill import distill_loss
        from molgen.sample import load_model

        cfn = make_model_fn(cfg, apply)
        anchor = None
        if cfg.anchor_fraction > 0:
            from molgen.nn.egnn import can_grow, grow_params

            acfg, anchor, _ = load_model(cfg.anchor or cfg.init)
            if acfg.model != cfg.model and can_grow(acfg.model, cfg.model):  # a grown student (--layers, --nf)
                _, anchor = grow_params(anchor, acfg.model, cfg.model.n_layers, nf=cfg.model.nf)
                acfg = acfg.replace(model=cfg.model)
            if acfg.model != cfg.model or acfg.consistency != cfg.consistency or acfg.stack != cfg.stack:
                raise MolgenError(f"{cfg.anchor or cfg.init}: the anchor model's network or noise levels differ from the student's")
            anchor = jax.tree_util.tree_map(jnp.asarray, anchor)
        relax = None
        if cfg.relax_weight > 0 or cfg.dmd_weight > 0:  # terms that call the teacher during training
            from molgen.diffusion.ode import edm_denoiser

            tcfg, tparams, _ = load_model(cfg.teacher)
            _, tapply = make_apply(tcfg)
            tdenoise, tparams = edm_denoiser(tapply, tcfg.diffusion), jax.tree_util.tree_map(jnp.asarray, tparams)
        if cfg.relax_weight > 0:
            relax = (tdenoise, tparams, cfg.relax_weight, cfg.relax_rounds)
        if cfg.dmd_weight > 0:
            from molgen.consistency.dmd import DMD

            dmd = DMD(tdenoise, tapply, tparams, tcfg.diffusion, cfg.dmd_weight)
            return lambda p, b, k, s: distill_loss(cfn, p["student"], b[0].positions, features(b[0]), b[1], b[0],
                                                   cfg.consistency, k, anchor, cfg.anchor_fraction, cfg.bond_weight,
                                                   relax, dmd, p["fake"])
        return lambda p, b, k, s: distill_loss(cfn, p, b[0].positions, features(b[0]), b[1], b[0], cfg.consistency,
                                               k, anchor, cfg.anchor_fraction, cfg.bond_weight, relax)
    raise MolgenError(f"unknown mode {cfg.mode!r}")


_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # older optax: global_norm


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    ema: Any
    opt_state: Any


def has_fake(cfg: RunConfig) -> bool:
    """Whether the run trains a fake diffusion model beside its network (distribution matching)."""
    return cfg.mode == "distill" and cfg.dmd_weight > 0


def model_params(cfg: RunConfig, params):
    """The parameters of the run's model (the student's, without a distribution-matching fake model)."""
    return params["student"] if has_fake(cfg) else params


def make_optimizer(cfg: RunConfig):
    sched = optax.join_schedules(
        [optax.linear_schedule(cfg.lr / 100, cfg.lr, max(cfg.warmup, 1)), optax.constant_schedule(cfg.lr)],
        [max(cfg.warmup, 1)],
    )
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(sched))
    if has_fake(cfg):  # student and fake model are clipped apart: neither's gradient scale throttles the other
        tx = optax.multi_transform({"student": tx, "fake": tx},
                                   lambda p: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in p.items()})
    if cfg.stack is not None and cfg.freeze_stages:  # the stages' parameters get no updates
        def labels(p):
            def label(path, _):
                keys = [getattr(k, "key", None) for k in path]
                return "frozen" if "stage" in keys and "fake" not in keys else "train"

            return jax.tree_util.tree_map_with_path(label, p)

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, sched


def _net_init(cfg: RunConfig, seed: int):
    net, _ = make_apply(cfg)
    g = pack([np.zeros((3, 3), np.float32)], [np.zeros(3, np.int32)])
    h = np.zeros((len(g.node_mask), cfg.n_features), np.float32)
    params = net.init(jax.random.PRNGKey(seed), g.positions, h, g.node_mask, g)
    if cfg.stack is None:
        return params
    stage = EGNN(cfg.stack.model).init(jax.random.PRNGKey(seed + 2), g.positions, h, g.node_mask, g)
    return {"base": params, "stage": stage}


def init_params(cfg: RunConfig, seed: int | None = None):
    seed = cfg.seed if seed is None else seed
    if has_fake(cfg):  # the fake model has the teacher's network
        from molgen.sample import load_model

        tcfg, _, _ = load_model(cfg.teacher)
        return {"student": _net_init(cfg, seed), "fake": _net_init(tcfg, seed + 1)}
    return _net_init(cfg, seed)


def init_state(cfg: RunConfig, params=None) -> TrainState:
    params = init_params(cfg) if params is None else params
    tx, _ = make_optimizer(cfg)
    return TrainState(jnp.zeros((), jnp.int32), params, jax.tree_util.tree_map(jnp.copy, params), tx.init(params))


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ("data",))


def make_step(cfg: RunConfig):
    """(step_fn, sharded_loss), pure: ``step_fn(state, graphs, key) -> (state, metrics)`` on a batch of per-device
    graphs stacked on axis 0; ``sharded_loss(params, graphs, key, step) -> (loss, aux)``."""
    loss_fn = make_loss(cfg)
    tx, sched = make_optimizer(cfg)

    def sharded_loss(params, graphs, key, step):
        keys = jax.random.split(key, jax.tree_util.tree_leaves(graphs)[0].shape[0])
        losses, aux = jax.vmap(lambda g, k: loss_fn(params, g, k, step))(graphs, keys)
        return losses.mean(), jax.tree_util.tree_map(jnp.mean, aux)

    def step_fn(state: TrainState, graphs, key):
        (loss, aux), grads = jax.value_and_grad(sharded_loss, has_aux=True)(state.params, graphs, key, state.step)
        gnorm = _tree_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with a warm-up (decay grows with the step) so short runs are not dominated by the initial weights.
        d = jnp.minimum(cfg.ema, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": sched(state.step), **aux}
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    return step_fn, sharded_loss


def make_train_step(cfg: RunConfig, mesh: Mesh):
    """(step, evaluate), jitted, on batches packed on the host (:func:`shard_batch`, :func:`put_batch`)."""
    step_fn, sharded_loss = make_step(cfg)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    step = jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))

    def eval_fn(params, graphs, key):
        return sharded_loss(params, graphs, key, jnp.asarray(0))[0]

    evaluate = jax.jit(eval_fn, in_shardings=(repl, data, repl), out_shardings=repl)
    return step, evaluate


def make_train_chunk(cfg: RunConfig, mesh: Mesh, n_nodes: int, n_edges: int):
    """``chunk(state, dset, ids, n_active, base_key) -> (state, metrics)``, jitted: the steps of ``ids``
    [K, devices, batch / devices] (row indices of the device-resident ``dset``), each batch assembled on the
    device into graphs of ``n_nodes`` / ``n_edges`` rows per device; only the first ``n_active`` steps run (the
    rest leave the state as it is and report zeros). Step s uses the key ``fold_in(base_key, s)``. ``metrics``
    holds one row per step."""
    from molgen.data.device import assemble

    step_fn, _ = make_step(cfg)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, "data"))

    def chunk(state, dset, ids, n_active, base_key):
        def one(state, ids_k):
            graphs = jax.vmap(lambda i: assemble(dset, i, n_nodes, n_edges))(ids_k)
            return step_fn(state, graphs, jax.random.fold_in(base_key, state.step))

        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                       jax.eval_shape(one, state, ids[0])[1])

        def body(state, xs):
            ids_k, k = xs
            return jax.lax.cond(k < n_active, one, lambda s, _: (s, zeros), state, ids_k)

        return jax.lax.scan(body, state, (ids, jnp.arange(ids.shape[0])))

    return jax.jit(chunk, in_shardings=(repl, repl, data, repl, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


def shard_batch(mols: list[tuple[np.ndarray, np.ndarray]], n_shards: int,
                noise: list[tuple[np.ndarray, np.ndarray]] | None = None):
    """Split molecules into n_shards packed graphs with common padded sizes, stacked on axis 0.

    With per-molecule ``noise`` (distillation pairs) returns (graphs, (noise_x, noise_h)) in the same rows.
    """
    parts = [mols[i::n_shards] for i in range(n_shards)]
    n_nodes = max(sum(len(t) for _, t in p) for p in parts)
    n_edges = max(sum(len(t) * (len(t) - 1) for _, t in p) for p in parts)
    pn, pe = bucket(n_nodes + 1, granule=NODE_GRANULE), bucket(n_edges, granule=EDGE_GRANULE)
    graphs = [pack([x for x, _ in p], [t.astype(np.int32) for _, t in p], pn, pe) for p in parts]
    # A batch that does not split evenly leaves some shards one molecule short: give them an empty graph more.
    n_seg = max(len(g.n_atoms) for g in graphs)
    graphs = [g._replace(n_atoms=np.pad(g.n_atoms, (0, n_seg - len(g.n_atoms)))) for g in graphs]
    stacked = Graph(*[np.stack(f) for f in zip(*graphs)])
    if noise is None:
        return stacked

    def rows(arrs, width):
        out = np.zeros((pn, width), np.float32)
        if arrs:
            cat = np.concatenate(arrs)
            out[: len(cat)] = cat
        return out

    nparts = [noise[i::n_shards] for i in range(n_shards)]
    nx = np.stack([rows([a for a, _ in p], 3) for p in nparts])
    nh = np.stack([rows([b for _, b in p], noise[0][1].shape[1]) for p in nparts])
    return stacked, (nx, nh)


def make_batch(ds, ids, n_shards: int):
    """The sharded batch of these molecules (with their noise when ``ds`` holds distillation pairs)."""
    mols = [ds.molecule(int(i)) for i in ids]
    noise = [ds.noise(int(i)) for i in ids] if hasattr(ds, "noise") else None
    return shard_batch(mols, n_shards, noise)


def put_batch(graphs: Graph, mesh: Mesh) -> Graph:
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(graphs, sharding)
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sharding, a), graphs)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def checkpoint_manager(run_dir: Path, cfg: RunConfig):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=opts)


def save_checkpoint(mgr, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    if mgr.latest_step() == step:
        return
    mgr.save(step, args=ocp.args.StandardSave(state), force=True)
    mgr.wait_until_finished()


def restore_checkpoint(mgr, target: TrainState, step: int | None = None) -> TrainState:
    import orbax.checkpoint as ocp

    step = mgr.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def load_ema_params(run_dir: Path) -> tuple[RunConfig, Any, int]:
    """(config, EMA parameters, step) of the latest checkpoint in a run directory."""
    run_dir = Path(run_dir)
    cfg = RunConfig.load(run_dir / CONFIG_NAME)
    mgr = checkpoint_manager(run_dir, cfg)
    if mgr.latest_step() is None:
        raise MolgenError(f"{run_dir}: no checkpoint in this run directory")
    state = restore_checkpoint(mgr, init_state(cfg))
    return cfg, model_params(cfg, state.ema), int(state.step)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    state: TrainState
    interrupted: bool
    steps_per_s: float


def prepare_config(cfg: RunConfig, ds) -> RunConfig:
    """Fill in what is measured on the data: atom-count histogram, type mix and (for ct) sigma_data."""
    from molgen.consistency.ict import measure_sigma_data
    from molgen.data.batching import node_features

    hist = tuple(int(c) for c in ds.size_histogram("train"))
    fracs = tuple(float(f) for f in ds.type_fractions("train"))
    cfg = cfg.replace(size_hist=hist, type_fractions=fracs)
    if cfg.mode in ("ct", "ect") and cfg.consistency.parametrization in ("ict", "ict-vp"):
        sx, sh = measure_sigma_data(ds, ds.split("train"), node_features, seed=cfg.seed)
        cfg = cfg.replace(consistency=dataclasses.replace(cfg.consistency, sigma_data_x=sx, sigma_data_h=sh))
    return cfg


LOG_EVERY = 25  # steps per line of metrics.jsonl
CHUNK = 50  # optimiser steps per host round-trip


def _aligned(every: int, chunk: int) -> int:
    """``every`` rounded up to a multiple of the chunk (checkpoints and evaluations fall on chunk boundaries)."""
    return max(chunk, -(-every // chunk) * chunk) if every else 0


def train(
    cfg: RunConfig,
    run_dir: Path,
    ds,
    resume: bool = False,
    init_params_from=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    max_seconds: float | None = None,
    stop_at: int | None = None,
    chunk: int = CHUNK,
) -> TrainResult:
    """Train until ``cfg.steps`` (or ``stop_at``) steps, in jitted chunks of ``chunk`` steps, checkpointing at the
    first chunk boundary at or after every ``cfg.ckpt_every`` steps and at the end."""
    from molgen.data.device import ShapePlan, dense_set, put

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    n_shards = len(mesh.devices.reshape(-1))
    if cfg.batch_size % n_shards:
        raise MolgenError(f"batch size {cfg.batch_size} is not divisible by the {n_shards} devices")
    if chunk < 1:
        raise MolgenError("the chunk length must be at least 1 step")
    cfg = cfg.replace(precision=resolve_precision(cfg.precision))
    mgr = checkpoint_manager(run_dir, cfg)
    if not resume and mgr.latest_step() is not None:
        raise MolgenError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    cfg.save(run_dir / CONFIG_NAME)
    state = init_state(cfg, init_params_from)
    if resume and mgr.latest_step() is not None:
        state = restore_checkpoint(mgr, state)
        log(f"resumed from step {int(state.step)} in {run_dir}")
    repl = NamedSharding(mesh, P())
    state = jax.device_put(state, repl)

    train_ids = ds.split("train")
    sampler = BatchSampler(ds, train_ids, cfg.batch_size, cfg.seed)
    # The training molecules on the device; the sampler's indices are data-set indices, hence the row map.
    dset = put(dense_set(ds, train_ids), repl)
    row_of = np.full(len(ds.n_atoms), -1, np.int64)
    row_of[train_ids] = np.arange(len(train_ids))
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    start = int(state.step)
    plan = ShapePlan(ds.n_atoms, sampler, n_shards, start, end)
    chunk_fns: dict[tuple[int, int], Callable] = {}
    ids_sharding = NamedSharding(mesh, P(None, "data"))

    _, eval_fn = make_train_step(cfg, mesh)
    val_ids = ds.split("valid")[: max(cfg.batch_size * 4, 1)] if len(ds.split("valid")) else train_ids[:64]
    val_batches = [
        put_batch(make_batch(ds, val_ids[k : k + cfg.batch_size], n_shards), mesh)
        for k in range(0, len(val_ids) - cfg.batch_size + 1, cfg.batch_size)
    ] or [put_batch(make_batch(ds, val_ids, n_shards), mesh)]
    base_key = jax.random.PRNGKey(cfg.seed)
    ckpt_every, eval_every = _aligned(cfg.ckpt_every, chunk), _aligned(cfg.eval_every, chunk)
    metrics_file = open(run_dir / METRICS_NAME, "a")
    t0 = time.time()
    t_last, s_last = t0, start
    interrupted = False

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} step/s"), TimeRemainingColumn()]
    bar = Progress(*columns, disable=not progress, transient=False)
    stop_requested = []
    previous_handlers = {}

    def request_stop(*_):
        if stop_requested:  # a second Ctrl-C: stop at once (the last checkpoint stays)
            raise KeyboardInterrupt
        stop_requested.append(True)

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM (schedulers, `kill`) let the chunk in flight finish, then checkpoint and exit cleanly:
        # an interrupt inside the jitted chunk would leave its donated input state deleted and unsaveable.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, request_stop)

    def write_logs(first: int, n: int, metrics, now: float, state) -> tuple[float, float]:
        """metrics.jsonl lines for steps first+1 .. first+n: every LOG_EVERY steps and at the chunk's end (with
        the validation loss when an evaluation falls there). Returns (steps/s since the last call, last loss)."""
        nonlocal t_last, s_last
        m = {k: np.asarray(v) for k, v in metrics.items()}
        done = first + n
        rate = (done - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, done
        loss = float(m["loss"][n - 1])
        bad = np.flatnonzero(~np.isfinite(m["loss"][:n]))
        if len(bad):
            raise MolgenError(f"loss became {m['loss'][bad[0]]} at step {first + bad[0] + 1}; lower --lr or check the data")
        for k in range(n):
            step = first + k + 1
            if step % LOG_EVERY and k != n - 1:
                continue
            rec = {"step": step, "time": round(now - t0, 2), "steps_per_s": round(rate, 3),
                   **{name: float(v[k]) for name, v in m.items()}}
            if k == n - 1 and eval_every and (done % eval_every == 0 or done == end):
                vk = jax.random.PRNGKey(12345)
                rec["val_loss"] = float(np.mean([eval_fn(state.ema, vb, vk) for vb in val_batches]))
            metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        return rate, loss

    def prepare(first: int):
        """What the chunk starting at step ``first`` needs: (steps, shape, rows on the device)."""
        n = min(chunk - first % chunk, end - first)  # chunks end on multiples of `chunk`
        idx = np.stack([sampler.indices(first + min(k, n - 1)) for k in range(chunk)])
        rows = row_of[idx].reshape(chunk, -1, n_shards).transpose(0, 2, 1)  # shard d: ids[d::n_shards]
        shape = plan.shape_for(idx[:n])
        return n, shape, jax.device_put(rows.astype(np.int32), ids_sharding)

    step = start
    try:
        with bar:
            task = bar.add_task(f"train {cfg.mode}", total=end, completed=start, loss=float("nan"), rate=0.0)
            pending = prepare(step) if step < end else None
            while pending is not None:
                n, shape, rows = pending
                if shape not in chunk_fns:
                    chunk_fns[shape] = make_train_chunk(cfg, mesh, *shape)
                state, metrics = chunk_fns[shape](state, dset, rows, jnp.int32(n), base_key)
                first, step = step, step + n
                pending = None
                stop = (max_seconds is not None and time.time() - t0 > max_seconds) or bool(stop_requested)
                if step < end and not stop:
                    pending = prepare(step)  # the host draws the next chunk while the device runs this one
                metrics = jax.tree_util.tree_map(lambda a: a[:n], jax.device_get(metrics))
                rate, loss = write_logs(first, n, metrics, time.time(), state)
                bar.update(task, completed=step, loss=loss, rate=rate)
                if ckpt_every and step % ckpt_every == 0:
                    save_checkpoint(mgr, state)
                if stop_requested:
                    raise KeyboardInterrupt
                if pending is None and step < end:
                    log(f"time budget of {max_seconds:.0f} s reached at step {step}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: saving a checkpoint ...")
    finally:
        metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree_util.tree_leaves(state)):
        log(f"stopped inside a chunk: the last checkpoint (step {mgr.latest_step() or 0}) is kept")
        last = init_state(cfg, init_params_from)
        return TrainResult(restore_checkpoint(mgr, last) if mgr.latest_step() is not None else last, True, 0.0)
    save_checkpoint(mgr, state)
    elapsed = time.time() - t0
    n_done = int(state.step) - start
    return TrainResult(state, interrupted, n_done / elapsed if elapsed > 0 else 0.0)
