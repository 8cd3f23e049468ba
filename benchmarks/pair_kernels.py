"""The pair MLPs' gradient kernels (molgen.nn.pairgrad) alone, at the shapes of one training batch, for each launch
setting asked (features a tile takes, warps, Triton's pipelining stages), and their array formulations as XLA
compiles them (molgen.nn.kernelcheck: the same results): the time of one call, the bytes it must read and write
and the speed that makes, and its largest error relative to the array formulation; then the fastest setting of
each kernel that agrees, in the form $MOLGEN_PAIR_KERNELS takes (molgen.nn.pairgrad.Tuning), for the training
that follows.

    python benchmarks/pair_kernels.py [--batch 4096] [--features 256] [--precision bf16] [--repeats 20]
        [--first 32:4:1,32:8:1,...] [--gated 32:4:1,...] [--budget SECONDS] [--data-dir DIR]

--first and --gated list settings as cols:warps:stages[:tanh] (molgen.nn.pairgrad.Tuning; tanh 1: the sigmoid
through the GPU's tanh.approx in bf16). The batch's molecules are drawn (seed 0) from QM9's
training split (the cache in --data-dir, else $MOLGEN_HOME's), or from its size range 3-29 where there is no
cache; they are packed as training packs them. Lines:

    RESULT pair-kernel <kernel> batch=<B> ms=<t> gb=<X> tb_per_s=<Y> cols=<c> warps=<w> stages=<s> tanh=<t>
           error=<e>
    RESULT pair-xla <kernel> batch=<B> ms=<t> gb=<X> tb_per_s=<Y>
    FAILED pair-kernel <kernel> cols=<c> warps=<w> stages=<s> tanh=<0|1> (<why>)
    BEST MOLGEN_PAIR_KERNELS=first_cols=..,first_warps=..,first_stages=..,first_tanh=..,gated_cols=..,...

ms: the median of --repeats calls after one that compiles. gb: what the kernel must read and write at least (its
inputs once, its outputs), not what it moves. A setting whose error is beyond the kernels' check tolerance
(molgen.nn.kernelcheck.CHECK_TOLERANCE) or that fails to compile or run is never BEST; the first setting listed
(the defaults) stays unless another is more than 2 % faster. Off a GPU the kernels run in Pallas's interpreter,
where launch settings change nothing: a rehearsal (e.g. --batch 8 --features 64 --repeats 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the defaults first (measured whatever the budget), then the sigmoid through tanh.approx (22 % and 35 % fewer
# instructions, compiled for an H200), with what may hide the gathers' latency better: more warps, wider tiles, a
# pipelined loop
FIRST = "32:4:1,32:4:1:1,64:8:1:1,32:8:1:1,32:4:2:1,64:8:1"
GATED = "32:4:1,32:4:1:1,32:8:1:1,32:4:2:1"


def parse_settings(text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
            raise SystemExit(f"a setting is cols:warps:stages[:tanh], got {item!r}")
        out.append(tuple(int(p) for p in parts + ["0"] * (4 - len(parts))))
    return out


def batch_sizes(batch: int, data_dir: str | None) -> tuple[np.ndarray, str]:
    """Atom counts of ``batch`` molecules: QM9's training split where its cache is, else uniform over 3-29."""
    rng = np.random.default_rng(0)
    try:
        from molgen.data.qm9 import load_qm9

        ds = load_qm9(data_dir, verify=False)
        return ds.n_atoms[rng.choice(ds.split("train"), batch, replace=False)].astype(np.int64), "qm9-train"
    except Exception:  # no cache: sizes in QM9's range
        return rng.integers(3, 30, batch), "uniform-3-29"


def problem(batch: int, features: int, dtype, data_dir: str | None):
    """Random inputs of both kernels on a packed batch of QM9-sized molecules, as training packs them."""
    import jax.numpy as jnp

    from molgen.data.batching import pack
    from molgen.nn import pairgrad

    sizes, source = batch_sizes(batch, data_dir)
    atoms, real = int(sizes.sum()), int((sizes * (sizes - 1)).sum())
    tile = pairgrad.TILE  # ~1.5 % padding pairs and ~1 % padding nodes, as a training batch's shape has
    graph = pack(None, [np.zeros(int(k), np.int32) for k in sizes], pad_nodes=atoms + 1 + atoms // 100,
                 pad_edges=-(-(real + real // 64) // tile) * tile)
    import jax

    f32, keys = jnp.float32, iter(jax.random.split(jax.random.PRNGKey(1), 10))
    n, p = len(graph.node_mask), len(graph.receivers)
    real_rows = jnp.asarray(np.arange(p) < real)[:, None]

    def normal(shape, dt=f32, scale=1.0):  # drawn on the device: the batch's arrays are large
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)

    arrays = {
        "g": jnp.where(real_rows, normal((p, features), dtype), 0).astype(dtype),
        "hr": normal((n, features), dtype), "hs": normal((n, features), dtype),
        "attrs": jax.random.uniform(next(keys), (p, 2), f32, 0.0, 9.0),
        "w": normal((2, features), scale=0.3), "b": normal((features,)), "v": normal((features,), scale=0.3),
        "c": jnp.asarray([0.2], f32), "mask": real_rows[:, 0].astype(f32), "g_agg": normal((n, features)),
    }
    print(f"# batch {batch} ({source}): {n} node rows, {p} pair rows ({real} real), {features} features, "
          f"{np.dtype(dtype).name}", flush=True)
    return graph, arrays


def least_bytes(kernel: str, graph, a, features: int) -> float:
    """What ``kernel`` must read and write at least: its inputs once, its outputs."""
    n, p, b = len(graph.node_mask), len(graph.receivers), a["g"].dtype.itemsize
    if kernel == "first_layer_grad":  # g, hr, hs, attrs in; two [N, F] float32 sums and the attributes' out
        return p * features * b + 2 * n * features * b + p * 8 + 2 * n * features * 4 + p * 8
    return 2 * p * features * b + p * 8 + n * features * 4  # p in, its gradient out, receivers, mask, g_agg


def time_calls(fn, args, repeats: int) -> float:
    """Median seconds of one call (after one that compiles)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kernel: str, args, graph, a, repeats: int, deadline: float) -> dict:
    """Each setting of ``kernel`` against its array formulation: {setting: ms} of those that agree."""
    import functools

    import jax
    import jax.numpy as jnp

    from molgen.nn import kernelcheck, pairgrad
    from molgen.nn.pairs import molecule_index

    features, dt = a["g"].shape[1], a["g"].dtype
    tol = kernelcheck.CHECK_TOLERANCE["bf16" if dt == jnp.bfloat16 else "float32"]
    recv, send = jnp.asarray(graph.receivers), jnp.asarray(graph.senders)
    if kernel == "first_layer_grad":
        ins = (a["g"], a["hr"], a["hs"], a["attrs"], a["w"], a["b"])
        ref_fn, ref_in = jax.jit(kernelcheck.first_layer_grad_xla), (*ins, recv, send)
        ker_in = (*ins, molecule_index(graph.n_atoms))
        ker = pairgrad.first_layer_grad
    else:
        ins = (a["g"], a["b"], a["v"], a["c"], a["mask"], recv, a["g_agg"])
        ref_fn, ref_in, ker_in, ker = jax.jit(kernelcheck.gated_sum_grad_xla), ins, ins, pairgrad.gated_sum_grad
    gb = least_bytes(kernel, graph, a, features) / 1e9
    batch = int((graph.n_atoms > 0).sum())
    want = ref_fn(*ref_in)
    s = time_calls(ref_fn, ref_in, repeats)
    print(f"RESULT pair-xla {kernel} batch={batch} ms={s * 1e3:.3f} gb={gb:.3f} tb_per_s={gb / s / 1e3:.2f}",
          flush=True)
    ok = {}
    prefix = "first" if kernel == "first_layer_grad" else "gated"
    for cols, warps, stages, tanh in args:
        what = f"cols={cols} warps={warps} stages={stages} tanh={tanh}"
        if time.perf_counter() > deadline:
            print(f"SKIPPED pair-kernel {kernel} {what} (time spent)", flush=True)
            continue
        try:
            tune = pairgrad.Tuning(**{f"{prefix}_cols": cols, f"{prefix}_warps": warps, f"{prefix}_stages": stages,
                                      f"{prefix}_tanh": tanh})
            if features % cols:
                raise ValueError(f"{features} features are not a multiple of {cols}")
            fn = jax.jit(functools.partial(ker, tune=tune))
            err = max(map(kernelcheck.relative_error, fn(*ker_in), want))
            s = time_calls(fn, ker_in, repeats)
        except Exception as e:  # a setting Triton cannot compile (registers, shared memory) or run
            print(f"FAILED pair-kernel {kernel} {what} ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                  flush=True)
            continue
        agrees = err <= tol
        print(f"RESULT pair-kernel {kernel} batch={batch} ms={s * 1e3:.3f} gb={gb:.3f} tb_per_s={gb / s / 1e3:.2f} "
              f"{what} error={err:.1e}{'' if agrees else f' (beyond {tol:.0e}: never chosen)'}", flush=True)
        if agrees:
            ok[(cols, warps, stages, tanh)] = s
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096, help="molecules in the batch")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "tf32"], help="the kernels' compute type")
    ap.add_argument("--first", default=FIRST,
                    help="first_layer_grad's settings, cols:warps:stages[:tanh], comma-separated")
    ap.add_argument("--gated", default=GATED, help="gated_sum_grad's settings")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget", type=float, default=None, help="seconds; settings left after that are skipped")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    first, gated = parse_settings(args.first), parse_settings(args.gated)

    import jax
    import jax.numpy as jnp

    from molgen.nn import pairgrad

    deadline = time.perf_counter() + (args.budget or float("inf"))
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
    graph, a = problem(args.batch, args.features, dtype, args.data_dir)
    best = {}
    for kernel, settings, prefix in (("first_layer_grad", first, "first"), ("gated_sum_grad", gated, "gated")):
        ok = measure(kernel, settings, graph, a, args.repeats, deadline)
        if ok:
            choice = min(ok, key=ok.get)
            if ok.get(settings[0], float("inf")) <= ok[choice] / 0.98:  # within 2 %: the first
                choice = settings[0]
            best.update(zip((f"{prefix}_cols", f"{prefix}_warps", f"{prefix}_stages", f"{prefix}_tanh"), choice))
    print(f"BEST {pairgrad.TUNING_ENV}={pairgrad.Tuning(**best).text()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
