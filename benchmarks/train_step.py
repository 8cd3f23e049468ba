"""Training throughput of `molgen train`'s own loop: molecules/s of the jitted chunk of steps (batches assembled on
the device from the device-resident training set, forward, backward, Adam, EMA), per preset, batch size and
precision and batch layout (packed or grouped, molgen.data.device), with the FLOPs done and the fraction of the
device's measured bf16 matrix peak.

    python benchmarks/train_step.py [--presets small,edm] [--batch-sizes 64,512] [--precisions bf16,tf32]
                                    [--layouts packed,grouped] [--chunk 50] [--repeats 5] [--budget SECONDS]
                                    [--devices N] [--profile DIR]

One line per measurement, first its figure in a fixed form, then the details:

    RESULT molgen <preset> batch=<B> molecules_per_s=<X> precision=<p> layout=<l> steps_per_s=... tflops=... ...

FLOPs: the exact count of the matrix products over the batches' real atoms and pairs (useful work: the grouped
layout's padding pairs are not counted)
(:func:`molgen.nn.egnn.forward_flops`, x3 for forward + backward), and XLA's own count of one step as a check.
The peak is measured here (a bf16 8192^3 product, median of 10) unless --peak-tflops is given. Timings are the
median over --repeats chunks after one chunk that compiles. --budget skips the remaining measurements once
that many seconds have passed (each skipped one prints a SKIPPED line). --profile traces one more chunk after
the timed ones (not timed) and prints where its time went after the RESULT line. A measurement that fails (out
of device memory, a profiler that cannot start) prints one FAILED or PROFILE line; the next ones are still made.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def measure_peak(jax, jnp, n: int = 8192, repeats: int = 10) -> float:
    """bf16 matrix-product TFLOP/s on random data (median of ``repeats`` after a warm-up)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,edm")
    ap.add_argument("--batch-sizes", default="64,512")
    ap.add_argument("--precisions", default="auto", help="comma-separated: auto, float32, tf32, bf16")
    ap.add_argument("--layouts", default="auto", help="comma-separated: auto, packed, grouped")
    ap.add_argument("--runs", default=None,
                    help="measurements in this order instead of presets x batch sizes x precisions x layouts: "
                         "comma-separated PRESET:BATCH:PRECISION[:LAYOUT], e.g. edm:512:tf32:grouped,edm:64:bf16")
    ap.add_argument("--chunk", type=int, default=50, help="optimiser steps per jitted call")
    ap.add_argument("--repeats", type=int, default=5, help="timed chunks per measurement")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--devices", type=int, default=1, help="CPU devices (a GPU is used as it is)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; skip what is left after that")
    ap.add_argument("--profile", default=None,
                    help="folder: write a jax.profiler trace of each measurement's last timed chunk and print where "
                         "its time went (benchmarks/profile_summary.py)")
    ap.add_argument("--profile-top", type=int, default=25, help="operations listed per profile")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak to compare with (default: measure on a GPU)")
    args = ap.parse_args()
    if args.devices > 1:
        from molgen.jax_setup import configure_cpu_devices

        configure_cpu_devices(args.devices)
    import jax
    import jax.numpy as jnp

    from molgen.config import RunConfig
    from molgen.data.batching import BatchSampler
    from molgen.data.device import dense_set, make_plan, put
    from molgen.data.qm9 import load_qm9
    from molgen.nn.egnn import PRESETS, forward_flops
    from molgen.config import OptimConfig
    from molgen.networks import resolve_precision
    from molgen.state import init_state
    from molgen.train import make_mesh, make_step, make_train_chunk, resolve_layout
    from jax.sharding import NamedSharding, PartitionSpec as P

    t_start = time.time()
    ds = load_qm9(args.data_dir)
    ids = ds.split("train")
    mesh = make_mesh()
    n_shards = mesh.devices.size
    repl = NamedSharding(mesh, P())
    dset = put(dense_set(ds, ids), repl)
    row_of = np.full(len(ds.n_atoms), -1, np.int64)
    row_of[ids] = np.arange(len(ids))
    dev = jax.devices()[0]
    peak = args.peak_tflops
    if peak is None and dev.platform == "gpu":
        peak = measure_peak(jax, jnp)
    print(f"device: {dev.device_kind} x{n_shards} ({dev.platform}), jax {jax.__version__}, chunk {args.chunk}, "
          f"diffusion objective, bf16 peak {'%.0f TFLOP/s' % peak if peak else 'not measured'}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'none'}", flush=True)
    if args.runs:
        runs = [(f[0], int(f[1]), f[2], f[3] if len(f) > 3 else "auto")
                for f in (r.split(":") for r in args.runs.split(","))]
    else:
        runs = [(p, int(b), q, lay) for p in args.presets.split(",") for b in args.batch_sizes.split(",")
                for q in args.precisions.split(",") for lay in args.layouts.split(",")]
    for name, bs, prec, layout in runs:
        prec, layout = resolve_precision(prec), resolve_layout(layout)
        tag = f"{name} batch={bs} precision={prec} layout={layout}"
        if args.budget is not None and time.time() - t_start > args.budget:
            print(f"SKIPPED molgen {tag} (budget of {args.budget:.0f} s spent)", flush=True)
            continue
        trace = None
        try:
            cfg = RunConfig(model=PRESETS[name], optim=OptimConfig(batch_size=bs, precision=prec, layout=layout))
            sampler = BatchSampler(ids, bs, seed=0)
            k = args.chunk
            n_chunks = args.repeats + 1  # the first compiles
            extra = 1 if args.profile else 0  # a last chunk, traced and not timed (tracing slows it)
            plan = make_plan(layout, ds.n_atoms, sampler, n_shards)
            idx = np.stack([sampler.indices(s) for s in range(k * (n_chunks + extra))])
            by_shard = idx.reshape(len(idx), -1, n_shards).transpose(0, 2, 1)
            rows = plan.arrange(row_of[by_shard], by_shard).astype(np.int32)
            chunk = make_train_chunk(cfg, mesh, plan.shape)
            state = jax.device_put(init_state(cfg), repl)  # as train() does: no recompilation later
            key = jax.random.PRNGKey(0)
            times, trace_path = [], f"{args.profile}/{name}_{bs}_{prec}_{layout}" if extra else None
            for c in range(n_chunks + extra):
                r = jax.device_put(rows[c * k : (c + 1) * k], NamedSharding(mesh, P(None, "data")))
                if c == n_chunks:
                    trace = profiler(lambda: jax.profiler.start_trace(trace_path, create_perfetto_trace=True),
                                     trace_path)
                    if trace is None:
                        break
                t0 = time.perf_counter()
                state, m = chunk(state, dset, r, jnp.int32(k), key)
                jax.block_until_ready(m["loss"])
                if c < n_chunks:
                    times.append(time.perf_counter() - t0)
            traced, trace = profiler(jax.profiler.stop_trace, trace), None
            compile_s, med = times[0], statistics.median(times[1:])
            n = ds.n_atoms[idx[k : k * n_chunks]].astype(np.int64)  # the timed chunks' molecules
            nodes, edges = n.sum() / n.size, (n * (n - 1)).sum() / n.size  # per molecule, real only
            step_flops = 3 * forward_flops(cfg.model, nodes * bs, edges * bs)
            tflops = step_flops * k / med / 1e12
            # XLA's count of one step on one device's graphs (lowered, not compiled): a check of the count.
            step_fn, _ = make_step(cfg)
            one = jax.jit(lambda st, rr: step_fn(st, jax.vmap(lambda i: plan.assemble(dset, i, plan.shape))(rr), key))
            try:
                ca = one.lower(state, r[0]).cost_analysis()
                ca = ca[0] if isinstance(ca, list) else ca
                xla_gflop = ca.get("flops", float("nan")) / 1e9
            except Exception:  # not every backend reports costs
                xla_gflop = float("nan")
            mps = k * bs / med
            frac = f"{tflops / peak:.4f}" if peak else "nan"
            shape = "x".join(map(str, plan.shape)) if layout == "packed" else \
                "+".join(f"{m}x{a}" for m, a in plan.shape)
            print(f"RESULT molgen {name} batch={bs} molecules_per_s={mps:.0f} precision={prec} layout={layout} "
                  f"steps_per_s={k / med:.2f} tflops={tflops:.3f} peak_fraction={frac} "
                  f"gflop_per_step={step_flops / 1e9:.1f} xla_gflop_per_step_padded={xla_gflop:.1f} "
                  f"shape={shape} compile_s={compile_s:.1f} "
                  f"median_chunk_s={med:.4f} chunks={len(times) - 1}", flush=True)
            if traced is not None:
                print(summarize_safely(traced, args.profile_top), flush=True)
            del state, chunk
        except Exception as e:  # e.g. out of device memory: this measurement is lost, the next ones are still made
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"FAILED molgen {tag} ({type(e).__name__}: {msg})", flush=True)
            profiler(jax.profiler.stop_trace, trace)  # one left running (None: none is) would refuse the next


def profiler(action, path: str | None) -> str | None:
    """``action()`` (starting or stopping a jax.profiler trace into ``path``): ``path``, or None (and one line
    saying why) when this machine cannot trace; a profiler that fails costs the profile, never the measurement."""
    if path is None:
        return None
    try:
        action()
        return path
    except Exception as e:
        print(f"PROFILE {path}: not traced ({type(e).__name__}: {e})".replace("\n", " "), flush=True)
        return None


def summarize_safely(path: str, top: int) -> str:
    """The profile's summary, or one line saying why there is none (the RESULT line is printed before it)."""
    from profile_summary import summarize

    try:
        return summarize(path, top=top)
    except Exception as e:
        return f"PROFILE {path}: no summary ({type(e).__name__}: {e})".replace("\n", " ")


if __name__ == "__main__":
    main()
