"""A floor under the `edm` preset's training step on this machine: the per-pair matrix products alone.

The `edm` step (256 features, 9 blocks, batch 64 with hydrogens, ~20,000 real directed atom pairs) contains,
per block, two [pairs x 256] x [256 x 256] products each followed by SiLU (the edge MLP's second layer and the
coordinate MLP's hidden layer; the first layers are split into per-node products). This script times exactly
that part in isolation: 18 such layers, forward and backward (dX and dW), with nothing else (no gathers,
segment sums, attention gates, node MLPs, optimizer). Any implementation of the architecture that keeps float32
and these products pays at least this much per step; compare it with `train_step.py --presets edm`.

    python benchmarks/edm_floor.py [--pairs 20480] [--nf 256] [--layers 18] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(f, *args, repeats=7):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20480)
    ap.add_argument("--nf", type=int, default=256)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (a.pairs, a.nf))
    w = jax.random.normal(k2, (a.nf, a.nf)) / np.sqrt(a.nf)
    flop = 2 * a.pairs * a.nf * a.nf

    one = timed(lambda x, w: x @ w, x, w, repeats=a.repeats)

    def mlp(x, w):
        for _ in range(a.layers):
            x = jax.nn.silu(x @ w)
        return jnp.sum(x)

    fwd = timed(mlp, x, w, repeats=a.repeats)
    both = timed(jax.grad(mlp, argnums=(0, 1)), x, w, repeats=a.repeats)
    print(f"device: {jax.devices()[0].device_kind}, float32, [{a.pairs} x {a.nf}] x [{a.nf} x {a.nf}]")
    print(f"one product: {one * 1e3:.1f} ms ({flop / one / 1e9:.0f} GFLOP/s)")
    print(f"{a.layers} product+SiLU layers, forward: {fwd:.3f} s ({a.layers * flop / fwd / 1e9:.0f} GFLOP/s)")
    print(f"{a.layers} product+SiLU layers, forward + backward: {both:.3f} s "
          f"({3 * a.layers * flop / both / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
