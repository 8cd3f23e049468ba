"""One training loop for every objective: a jitted, data-parallel step, EMA, orbax checkpoints, JSONL logs.

Determinism: the batch at step s depends only on (seed, s) and the step's random key is
``fold_in(PRNGKey(seed), s)``, so a run resumed from a checkpoint continues exactly as if uninterrupted.
Data parallelism: each batch is split into one packed graph per device, stacked on a leading axis that is
sharded over a 1-D device mesh; parameters are replicated.  With one device the same code runs unchanged.
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


def make_apply(cfg: RunConfig):
    net = EGNN(cfg.model)
    return net, net.apply


def make_loss(cfg: RunConfig) -> Callable:
    """loss(params, graph, key, step) -> (loss, aux) for the run's mode."""
    _, apply = make_apply(cfg)
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


def make_train_step(cfg: RunConfig, mesh: Mesh):
    loss_fn = make_loss(cfg)
    tx, sched = make_optimizer(cfg)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def sharded_loss(params, graphs, key, step):
        keys = jax.random.split(key, jax.tree_util.tree_leaves(graphs)[0].shape[0])
        losses, aux = jax.vmap(lambda g, k: loss_fn(params, g, k, step))(graphs, keys)
        return losses.mean(), jax.tree_util.tree_map(jnp.mean, aux)

    def step_fn(state: TrainState, graphs: Graph, key):
        (loss, aux), grads = jax.value_and_grad(sharded_loss, has_aux=True)(state.params, graphs, key, state.step)
        gnorm = _tree_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with a warm-up (decay grows with the step) so short runs are not dominated by the initial weights.
        d = jnp.minimum(cfg.ema, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": sched(state.step), **aux}
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    step = jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))

    def eval_fn(params, graphs, key):
        return sharded_loss(params, graphs, key, jnp.asarray(0))[0]

    evaluate = jax.jit(eval_fn, in_shardings=(repl, data, repl), out_shardings=repl)
    return step, evaluate


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
) -> TrainResult:
    """Train until ``cfg.steps`` (or ``stop_at``) steps, checkpointing every ``cfg.ckpt_every`` and at the end."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    n_shards = len(mesh.devices.reshape(-1))
    if cfg.batch_size % n_shards:
        raise MolgenError(f"batch size {cfg.batch_size} is not divisible by the {n_shards} devices")
    cfg.save(run_dir / CONFIG_NAME)
    mgr = checkpoint_manager(run_dir, cfg)
    state = init_state(cfg, init_params_from)
    if resume and mgr.latest_step() is not None:
        state = restore_checkpoint(mgr, state)
        log(f"resumed from step {int(state.step)} in {run_dir}")
    elif not resume and mgr.latest_step() is not None:
        raise MolgenError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    repl = NamedSharding(mesh, P())
    state = jax.device_put(state, repl)

    step_fn, eval_fn = make_train_step(cfg, mesh)
    train_ids = ds.split("train")
    sampler = BatchSampler(ds, train_ids, cfg.batch_size, cfg.seed)
    val_ids = ds.split("valid")[: max(cfg.batch_size * 4, 1)] if len(ds.split("valid")) else train_ids[:64]
    val_batches = [
        put_batch(make_batch(ds, val_ids[k : k + cfg.batch_size], n_shards), mesh)
        for k in range(0, len(val_ids) - cfg.batch_size + 1, cfg.batch_size)
    ] or [put_batch(make_batch(ds, val_ids, n_shards), mesh)]
    base_key = jax.random.PRNGKey(cfg.seed)
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    start = int(state.step)
    metrics_file = open(run_dir / METRICS_NAME, "a")
    t0 = time.time()
    t_last, s_last = t0, start
    interrupted = False

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} step/s"), TimeRemainingColumn()]
    bar = Progress(*columns, disable=not progress, transient=False)
    step = start
    stop_requested = []
    previous_handlers = {}

    def request_stop(*_):
        if stop_requested:  # a second Ctrl-C: stop at once (the last checkpoint stays)
            raise KeyboardInterrupt
        stop_requested.append(True)

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM (schedulers, `kill`) let the step in flight finish, then checkpoint and exit cleanly:
        # an interrupt inside the jitted step would leave its donated input state deleted and unsaveable.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, request_stop)
    try:
        with bar:
            task = bar.add_task(f"train {cfg.mode}", total=end, completed=start, loss=float("nan"), rate=0.0)
            for step in range(start, end):
                ids = sampler.indices(step)
                if jax.process_count() > 1:
                    ids = ids[jax.process_index() :: jax.process_count()]
                graphs = put_batch(make_batch(ds, ids, n_shards // jax.process_count()), mesh)
                state, m = step_fn(state, graphs, jax.random.fold_in(base_key, step))
                done = step + 1
                if done % 25 == 0 or done == end:
                    m = {k: float(v) for k, v in m.items()}
                    now = time.time()
                    rate = (done - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, done
                    rec = {"step": done, "time": round(now - t0, 2), "steps_per_s": round(rate, 3), **m}
                    if cfg.eval_every and (done % cfg.eval_every == 0 or done == end):
                        vk = jax.random.PRNGKey(12345)
                        rec["val_loss"] = float(np.mean([eval_fn(state.ema, vb, vk) for vb in val_batches]))
                    if not math.isfinite(m["loss"]):
                        raise MolgenError(f"loss became {m['loss']} at step {done}; lower --lr or check the data")
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    bar.update(task, completed=done, loss=m["loss"], rate=rate)
                if done % cfg.ckpt_every == 0:
                    save_checkpoint(mgr, state)
                if max_seconds is not None and time.time() - t0 > max_seconds:
                    log(f"time budget of {max_seconds:.0f} s reached at step {done}")
                    break
                if stop_requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: saving a checkpoint ...")
    finally:
        metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree_util.tree_leaves(state)):
        log(f"stopped inside a step: the last checkpoint (step {mgr.latest_step() or 0}) is kept")
        last = init_state(cfg, init_params_from)
        return TrainResult(restore_checkpoint(mgr, last) if mgr.latest_step() is not None else last, True, 0.0)
    save_checkpoint(mgr, state)
    elapsed = time.time() - t0
    n = int(state.step) - start
    return TrainResult(state, interrupted, n / elapsed if elapsed > 0 else 0.0)
