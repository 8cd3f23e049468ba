"""Training throughput of `molgen train`'s own loop: molecules/s of the jitted chunk of steps (batches assembled on
the device from the device-resident training set, forward, backward, Adam, EMA), per preset, batch size and
precision and batch layout (packed, grouped or packed-kernel, molgen.data.device), with the FLOPs done and the
fraction of the device's measured bf16 matrix peak.

    python benchmarks/train_step.py [--presets small,edm] [--batch-sizes 64,512] [--precisions bf16,tf32]
                                    [--layouts packed,grouped] [--chunk 50] [--repeats 5] [--budget SECONDS]
                                    [--devices N] [--profile DIR] [--cache DIR]

One line per measurement, first its figure in a fixed form, then the details:

    RESULT molgen <preset> batch=<B> molecules_per_s=<X> precision=<p> layout=<l> steps_per_s=... tflops=... ...

FLOPs: the exact count of the matrix products over the batches' real atoms and pairs (useful work: the grouped
layout's padding pairs are not counted)
(:func:`molgen.nn.egnn.forward_flops`, x3 for forward + backward), and on a CPU XLA's own count of one step as a
check (JAX's GPU backend reported none, and lowering the 256 x 9 step again takes ~4 s).
The peak is measured here (a bf16 8192^3 product, median of 10) unless --peak-tflops is given. Timings are the
median over --repeats chunks after one chunk that compiles. --budget skips the remaining measurements once
that many seconds have passed (each skipped one prints a SKIPPED line). --profile traces one more chunk after
the timed ones (not timed) and prints where its time went after the RESULT line. A measurement that fails (out
of device memory, a profiler that cannot start) prints one FAILED or PROFILE line; the next ones are still made.
A packed-kernel measurement first checks the kernels against their array formulations (a CHECK line; if they
disagree, the measurement FAILED).
--cache keeps compiled programs in a JAX compilation cache folder (a measurement that finds its program there
loads it instead of compiling it; the RESULT line ends with cache=on).
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


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,edm")
    ap.add_argument("--batch-sizes", default="64,512")
    ap.add_argument("--precisions", default="auto", help="comma-separated: auto, float32, tf32, bf16")
    ap.add_argument("--layouts", default="auto", help="comma-separated: auto, packed, grouped, packed-kernel")
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
    ap.add_argument("--cache", default=None,
                    help="folder: JAX's persistent compilation cache (default: none, so compile_s is a compilation)")
    return ap.parse_args()


def planned_runs(args) -> list[tuple[str, int, str, str]]:
    """(preset, batch, precision, layout) in the order they are measured."""
    if args.runs:
        return [(f[0], int(f[1]), f[2], f[3] if len(f) > 3 else "auto")
                for f in (r.split(":") for r in args.runs.split(","))]
    return [(p, int(b), q, lay) for p in args.presets.split(",") for b in args.batch_sizes.split(",")
            for q in args.precisions.split(",") for lay in args.layouts.split(",")]


class Bench:
    """What every measurement shares: the mesh, the training split on the device and the peak."""

    def __init__(self, args):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from molgen.data.device import dense_set, put
        from molgen.data.qm9 import load_qm9
        from molgen.parallel import make_mesh

        self.args = args
        self.ds = load_qm9(args.data_dir)
        self.ids = self.ds.split("train")
        self.mesh = make_mesh()
        self.n_shards = self.mesh.devices.size
        self.repl = NamedSharding(self.mesh, P())
        self.rows_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.dset = put(dense_set(self.ds, self.ids), self.repl)
        self.row_of = np.full(len(self.ds.n_atoms), -1, np.int64)
        self.row_of[self.ids] = np.arange(len(self.ids))
        self.dev = jax.devices()[0]
        self.peak = args.peak_tflops
        if self.peak is None and self.dev.platform == "gpu":
            self.peak = measure_peak(jax, jax.numpy)

    def header(self) -> str:
        import jax

        peak = "%.0f TFLOP/s" % self.peak if self.peak else "not measured"
        return (f"device: {self.dev.device_kind} x{self.n_shards} ({self.dev.platform}), jax {jax.__version__}, "
                f"chunk {self.args.chunk}, diffusion objective, bf16 peak {peak}, "
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'none'}")

    def batches(self, name: str, bs: int, prec: str, layout: str, n_chunks: int):
        """(config, plan, molecule indices, device rows) of ``n_chunks`` chunks of one measurement: the same in
        every process (seed 0), so that a program in the compilation cache (--cache) is the one it runs."""
        from molgen.config import OptimConfig, RunConfig
        from molgen.data.batching import BatchSampler
        from molgen.data.device import make_plan
        from molgen.nn.egnn import PRESETS

        cfg = RunConfig(model=PRESETS[name], optim=OptimConfig(batch_size=bs, precision=prec, layout=layout))
        sampler = BatchSampler(self.ids, bs, seed=0)
        plan = make_plan(layout, self.ds.n_atoms, sampler, self.n_shards)
        idx = np.stack([sampler.indices(s) for s in range(self.args.chunk * n_chunks)])
        by_shard = idx.reshape(len(idx), -1, self.n_shards).transpose(0, 2, 1)
        return cfg, plan, idx, plan.arrange(self.row_of[by_shard], by_shard).astype(np.int32)

    def measure(self, name: str, bs: int, prec: str, layout: str) -> str:
        """Time ``repeats`` chunks after one that compiles (and trace one more with --profile): the RESULT line,
        followed by the profile's summary."""
        import jax
        import jax.numpy as jnp

        from molgen.state import init_state
        from molgen.steps import make_train_chunk

        args, k = self.args, self.args.chunk
        n_chunks = args.repeats + 1  # the first compiles
        extra = 1 if args.profile else 0  # a last chunk, traced and not timed (tracing slows it)
        cfg, plan, idx, rows = self.batches(name, bs, prec, layout, n_chunks + extra)
        if layout == "packed-kernel":  # the kernels against their array formulations first (a CHECK line)
            from molgen.nn.pairgrad import tuning
            from molgen.steps import check_pair_kernels

            t0 = time.perf_counter()
            err = check_pair_kernels(prec, cfg.model.nf)  # disagreement: MolgenError, a FAILED line
            print(f"CHECK pair kernels {name} precision={prec} largest_relative_error="
                  f"{'unused' if err is None else f'{err:.1e}'} "
                  f"check_s={time.perf_counter() - t0:.1f} tuning={tuning().text()}", flush=True)
        chunk = make_train_chunk(cfg, self.mesh, plan.shape)
        state = jax.device_put(init_state(cfg), self.repl)  # as train() does: no recompilation later
        key = jax.random.PRNGKey(0)
        times, trace = [], None
        trace_path = f"{args.profile}/{name}_{bs}_{prec}_{layout}" if extra else None
        try:
            for c in range(n_chunks + extra):
                r = jax.device_put(rows[c * k : (c + 1) * k], self.rows_sharding)
                if c == n_chunks:
                    trace = profiler(lambda: jax.profiler.start_trace(trace_path, create_perfetto_trace=True),
                                     trace_path)
                    if trace is None:
                        break
                t0 = time.perf_counter()
                state, m = chunk(state, self.dset, r, jnp.int32(k), key)
                jax.block_until_ready(m["loss"])
                if c < n_chunks:
                    times.append(time.perf_counter() - t0)
        finally:  # one left running would refuse the next measurement's trace
            traced = profiler(jax.profiler.stop_trace, trace)
        line = self.result_line(name, cfg, plan, idx[k : k * n_chunks], times, state, r[0], key)
        return line + ("\n" + summarize_safely(traced, args.profile_top) if traced is not None else "")

    def result_line(self, name, cfg, plan, idx, times, state, rows, key) -> str:
        """The RESULT line: molecules/s, FLOPs (exact count over ``idx``, the timed chunks' molecules, and XLA's
        count of one step as a check), the fraction of the peak and the padded shape."""
        import jax

        from molgen.nn.egnn import forward_flops
        from molgen.steps import make_step

        o, k = cfg.optim, self.args.chunk
        compile_s, med = times[0], statistics.median(times[1:])
        n = self.ds.n_atoms[idx].astype(np.int64)
        nodes, edges = n.sum() / n.size, (n * (n - 1)).sum() / n.size  # per molecule, real only
        step_flops = 3 * forward_flops(cfg.model, nodes * o.batch_size, edges * o.batch_size)
        tflops = step_flops * k / med / 1e12
        xla_gflop = float("nan")
        if self.dev.platform == "cpu":  # XLA's count of one step (lowered, not compiled); JAX's GPU backend gave none
            step_fn, _ = make_step(cfg)  # and tracing the step again costs seconds of the GPU's time
            one = jax.jit(lambda st, rr: step_fn(st, jax.vmap(lambda i: plan.assemble(self.dset, i, plan.shape))(rr),
                                                 key))
            try:
                ca = one.lower(state, rows).cost_analysis()
                xla_gflop = (ca[0] if isinstance(ca, list) else ca).get("flops", float("nan")) / 1e9
            except Exception:  # not every release reports costs
                pass
        frac = f"{tflops / self.peak:.4f}" if self.peak else "nan"
        shape = "x".join(map(str, plan.shape)) if o.layout != "grouped" else "+".join(f"{m}x{a}" for m, a in plan.shape)
        return (f"RESULT molgen {name} batch={o.batch_size} molecules_per_s={k * o.batch_size / med:.0f} "
                f"precision={o.precision} layout={o.layout} steps_per_s={k / med:.2f} tflops={tflops:.3f} "
                f"peak_fraction={frac} gflop_per_step={step_flops / 1e9:.1f} "
                f"xla_gflop_per_step_padded={xla_gflop:.1f} shape={shape} compile_s={compile_s:.1f} "
                f"median_chunk_s={med:.4f} chunks={len(times) - 1} cache={'on' if self.args.cache else 'off'}")


def main():
    args = parse_args()
    from molgen.jax_setup import add_cpu_training_flags, add_cpu_vector_flags

    add_cpu_training_flags()  # as `molgen train` does (a ynn_fusion_type in XLA_FLAGS overrides it)
    add_cpu_vector_flags()  # as `molgen train` does (a prefer_vector_width in XLA_FLAGS overrides it)
    if args.cache:
        from molgen.jax_setup import enable_compilation_cache

        enable_compilation_cache(args.cache)
    if args.devices > 1:
        from molgen.jax_setup import configure_cpu_devices

        configure_cpu_devices(args.devices)
    from molgen.networks import resolve_precision
    from molgen.steps import resolve_layout

    t_start = time.time()
    bench = Bench(args)
    print(bench.header(), flush=True)
    for name, bs, prec, layout in planned_runs(args):
        prec, layout = resolve_precision(prec), resolve_layout(layout)
        tag = f"{name} batch={bs} precision={prec} layout={layout}"
        if args.budget is not None and time.time() - t_start > args.budget:
            print(f"SKIPPED molgen {tag} (budget of {args.budget:.0f} s spent)", flush=True)
            continue
        try:
            print(bench.measure(name, bs, prec, layout), flush=True)
        except Exception as e:  # e.g. out of device memory: this measurement is lost, the next ones are still made
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"FAILED molgen {tag} ({type(e).__name__}: {msg})", flush=True)


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
