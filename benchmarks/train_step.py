"""Median time of one jitted training step (forward, backward, Adam, EMA) on real QM9 batches, per preset,
and molecules/s of one forward pass at batch 1000.

    python benchmarks/train_step.py [--presets small,base,edm] [--batch-size 64] [--repeats 10] [--cpu-devices N]

--cpu-devices splits the CPU into N XLA devices (data parallel, as `molgen train` does by default without a
GPU; default here 1, the plain single-device step).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from molgen.config import RunConfig
from molgen.data.qm9 import load_qm9
from molgen.nn.egnn import PRESETS
from molgen.train import features, init_state, make_apply, make_mesh, make_train_step, put_batch, shard_batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="small,base,edm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--mode", default="diffusion")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--forward-batch", type=int, default=1000)
    ap.add_argument("--cpu-devices", type=int, default=1)
    args = ap.parse_args()
    if args.cpu_devices > 1:
        from molgen.jax_setup import configure_cpu_devices

        configure_cpu_devices(args.cpu_devices)
    ds = load_qm9(args.data_dir)
    ids = ds.split("train")
    rng = np.random.default_rng(0)
    mesh = make_mesh()
    n_shards = mesh.devices.size
    print(f"device: {jax.devices()[0].device_kind} x{n_shards}, batch {args.batch_size}, mode {args.mode}")
    for name in args.presets.split(","):
        cfg = RunConfig(mode=args.mode, model=PRESETS[name], batch_size=args.batch_size)
        step, _ = make_train_step(cfg, mesh)
        state = init_state(cfg)
        # Batches whose padded shapes are the same bucket: time steady-state steps, not compilation.
        batches = []
        while len(batches) < args.repeats + 1:
            mols = [ds.molecule(int(i)) for i in rng.choice(ids, args.batch_size, replace=False)]
            g = shard_batch(mols, n_shards)
            if not batches or (g.node_mask.shape == batches[0].node_mask.shape
                               and g.edge_mask.shape == batches[0].edge_mask.shape):
                batches.append(g)
        key = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        state, m = step(state, put_batch(batches[0], mesh), key)
        jax.block_until_ready(m["loss"])
        compile_s = time.perf_counter() - t0
        times = []
        for b in batches[1:]:
            gb = put_batch(b, mesh)
            t0 = time.perf_counter()
            state, m = step(state, gb, key)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        # Forward pass, batch of forward_batch molecules (one device).
        net, apply = make_apply(cfg)
        mols = [ds.molecule(int(i)) for i in rng.choice(ids, args.forward_batch, replace=False)]
        g = jax.tree_util.tree_map(lambda a: a[0], shard_batch(mols, 1))
        fwd = jax.jit(apply)
        h = features(g)
        cond = jnp.asarray(g.node_mask) * 0.5
        jax.block_until_ready(fwd(state.params, g.positions, h, cond, g))
        ft = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(state.params, g.positions, h, cond, g))
            ft.append(time.perf_counter() - t0)
        med = float(np.median(times))
        print(f"{name:6s} nf={cfg.model.nf:3d} layers={cfg.model.n_layers}: train step median {med:.3f} s "
              f"({1 / med:.2f} steps/s, min {min(times):.3f}, compile {compile_s:.1f} s); "
              f"forward {args.forward_batch / np.median(ft):.0f} molecules/s")


if __name__ == "__main__":
    main()
