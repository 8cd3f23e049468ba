"""Sampling throughput per preset: molecules per second for one network call over a batch of 1000 molecules
(steady state, after compilation), i.e. the speed of a 1-step consistency sample; a k-step sample costs k times
that.  Also prints the end-to-end wall time of the CLI's main command when --cli is given.

    python benchmarks/sampling.py [--presets small,base,edm] [--models NAME,...] [--n 1000] [--cli 5]

``--models`` also times one call of shipped models (or weights folders), e.g. a stacked model against the plain
one it was built from, in the same run. ``--ab-edge-attrs R`` times each of them R times in turn with the first pair
layers' edge-attribute term as molgen samples with it (element-wise) and as a matrix product (as before 2026-12-06;
the same function to float32 rounding), and prints the medians and their ratio. ``--parts`` times, for each of
``--models``, the parts of a first call as a fresh `molgen sample` process makes it: loading the model, tracing,
lowering, compiling (or, run again, loading the compiled program from the compilation cache), then two calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from molgen.config import DataConfig, RunConfig
from molgen.consistency.ict import ConsistencyConfig
from molgen.consistency.stack import describe_network
from molgen.models import Model, load_model
from molgen.networks import init_params
from molgen.nn.egnn import PRESETS
from molgen.data.batching import pack
from molgen.jax_setup import add_cpu_vector_flags
from molgen.sizes import draw_sizes
from molgen.samplers import get_sampler

QM9_HIST = (0, 0, 0, 1, 4, 5, 9, 16, 49, 124, 362, 807, 1689, 3060, 5136, 7796, 10644, 13025, 13364, 13832, 9482,
            9970, 3393, 4848, 539, 1506, 48, 266, 0, 25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="small,base,edm")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="", help="comma-separated shipped models / weights folders to time too")
    ap.add_argument("--ab-edge-attrs", type=int, default=0, help="--models: time each call this many times in turn "
                    "with the edge attributes' term element-wise and as a product")
    ap.add_argument("--parts", action="store_true", help="--models: time the parts of a first call (run twice: the "
                    "second run loads the compiled program from the compilation cache)")
    ap.add_argument("--cli", type=int, default=0, help="also time `molgen sample -n N --steps 1` this many times")
    args = ap.parse_args()
    add_cpu_vector_flags()  # as `molgen sample` does (a prefer_vector_width in XLA_FLAGS overrides it)
    print(f"device: {jax.devices()[0].device_kind}")

    def one_call(model):
        """Median time of one network call over a packed batch of n molecules (compiled once beforehand)."""
        s = get_sampler(model.cfg)
        fns, levels = s.prepare(model.cfg), s.levels(model.cfg, 1)
        g = pack(None, [np.zeros(int(k), np.int32) for k in draw_sizes(model.cfg, args.n, 0)])

        def run(r):
            x, _ = s.run(fns, model.params, g, model.cfg.n_features, jax.random.PRNGKey(r), levels, 1.0, None,
                         lambda out: None)
            jax.block_until_ready(x)

        run(0)
        ts = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            run(r)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for name in [p for p in args.presets.split(",") if p]:
        for label, cons in (("consistency", ConsistencyConfig()), ("diffusion", None)):
            cfg = RunConfig(model=PRESETS[name], consistency=cons, data=DataConfig(size_hist=QM9_HIST))
            med = one_call(Model(cfg, init_params(cfg)))
            print(f"{name:6s} {label:11s}: one network call over {args.n} molecules {med:.3f} s "
                  f"({args.n / med:.0f} molecules/s per call; 1000-step diffusion: {args.n / med / 1000:.2f} "
                  f"molecules/s)")
    for name in [m for m in args.models.split(",") if m]:
        if args.parts:
            parts(name, args.n)
            continue
        m = load_model(name)
        if m.cfg.consistency is None:
            print(f"{name}: a diffusion model; time it with --presets")
            continue
        med = one_call(m)
        print(f"{name} ({describe_network(m.cfg)}): one network call over {args.n} molecules {med:.3f} s "
              f"({args.n / med:.0f} molecules/s)")
        if args.ab_edge_attrs:
            ab_edge_attrs(m, name, one_call, args.ab_edge_attrs)
    if args.cli:
        out = os.path.join(tempfile.mkdtemp(), "out.sdf")
        walls = []
        for _ in range(args.cli):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "molgen", "sample", "-n", str(args.n), "--steps", "1", "-o", out],
                           check=True, capture_output=True, env=dict(os.environ))
            walls.append(time.perf_counter() - t0)
        print(f"molgen sample -n {args.n} --steps 1 (shipped default): wall times "
              f"{', '.join(f'{w:.2f}' for w in walls)} s; median {statistics.median(walls):.2f} s")


def parts(name: str, n: int) -> None:
    """Seconds of each part of a first call of the consistency model ``name`` over ``n`` molecules in this process."""
    import jax.numpy as jnp

    from molgen.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    t0 = time.perf_counter()
    m = load_model(name)
    t_load = time.perf_counter() - t0
    s = get_sampler(m.cfg)
    step, levels = s.prepare(m.cfg), s.levels(m.cfg, 1)
    g = pack(None, [np.zeros(int(k), np.int32) for k in draw_sizes(m.cfg, n, 0)])
    zx, zh = jnp.zeros(g.node_mask.shape + (3,)), jnp.zeros(g.node_mask.shape + (m.cfg.n_features,))
    call = (m.params, zx, zh, jnp.float32(levels[0]), jnp.bool_(True), g, jax.random.PRNGKey(0), jnp.float32(0.7))
    t = [time.perf_counter()]
    traced = step.trace(*call)
    t.append(time.perf_counter())
    lowered = traced.lower()
    t.append(time.perf_counter())
    compiled = lowered.compile()
    t.append(time.perf_counter())
    for _ in range(2):
        jax.block_until_ready(compiled(*call))
        t.append(time.perf_counter())
    d = np.diff(t)
    print(f"{name}: loading the model {t_load:.2f} s, tracing {d[0]:.2f} s, lowering {d[1]:.2f} s, compiling or "
          f"loading the compiled program {d[2]:.2f} s, calls over {n} molecules {d[3]:.2f} / {d[4]:.2f} s")


def ab_edge_attrs(model, name: str, one_call, rounds: int) -> None:
    """One call of ``model`` with the edge attributes' term element-wise (molgen's sampling network) and as a
    matrix product (``EGNN(fused_attrs=False)``), ``rounds`` times in turn: medians and their ratio."""
    import molgen.networks as networks
    from molgen.nn.egnn import EGNN

    own = networks.network

    def as_product(cfg, precision=None, pair_kernel=False):
        if precision is not None:
            return own(cfg, precision, pair_kernel)
        net = EGNN(cfg.model)
        return net, net.apply

    times = {"element-wise": [], "product": []}
    for _ in range(rounds):
        for label, fn in (("element-wise", own), ("product", as_product)):
            networks.network = fn
            try:
                times[label].append(one_call(model))
            finally:
                networks.network = own
    a, b = (statistics.median(times[k]) for k in ("element-wise", "product"))
    print(f"{name}: edge attributes element-wise {a:.3f} s, as a product {b:.3f} s (medians of {rounds} in turn; "
          f"ratio {a / b:.3f})")


if __name__ == "__main__":
    main()
