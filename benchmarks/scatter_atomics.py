"""The neighbour sums of a packed training batch, alone: are scatter-adds on this GPU native atomics, and what
do padding edges on one row cost?

A packed batch (the 256 x 9 network at batch 1024: ~18,700 atom rows, ~334,000 pair rows) sums per-pair
messages into their atoms with scatter-adds, forward (sorted by receiver) and in the backward pass of every gather
(by receiver, sorted, and by sender, not sorted). On a GPU XLA lowers a float32 scatter-add to the hardware's
atomic add, unless its code generator emits a compare-and-swap loop instead, which is slow when many pairs add
into one row (as here: up to 28 per atom; and for padding edges all on one row, thousands). That happens for bfloat16 scatter-adds, and for float32 ones in the
releases whose LLVM keeps the native float32 atomic only for kernels compiled to flush denormals to zero, which
XLA's `--xla_gpu_ftz=true` does.

    python benchmarks/scatter_atomics.py            # in this process, with this process's XLA_FLAGS
    python benchmarks/scatter_atomics.py --ab       # the same twice, in child processes: as is and with FTZ
    python benchmarks/scatter_atomics.py --molecules 4096 --dtypes bfloat16 --accumulate float32 --spread-only

One line per measurement:

    RESULT scatter <op> dtype=<d> ftz=<0|1> ms=<median> GB_per_s=<pair rows read / time>

where <op> is sum_by_receiver (indices sorted, as XLA is told: it adds each run of rows in registers before one
atomic add), sum_by_sender (not sorted: an atomic add per element), or sum_by_sender_reversed (the same sums as
sum_by_sender, as the training step's backward pass makes them: the rows taken in the order of the reversed
pairs and summed by sorted receivers, molgen.nn.egnn.sender_rows), with the padding edges spread over the
padding rows as molgen packs them, or with the suffix _pad_one_row: all on the last row, as molgen packed them
before (not with --spread-only). --accumulate float32: the rows are converted to float32 before the sum, as the
training step's bf16 gradients are. With --ab a last line ``FTZ_SPEEDUP <x>``: the ratio of the float32 (spread)
sums' summed median times without and with FTZ (1.0 where FTZ changes nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np

FTZ_FLAG = "--xla_gpu_ftz=true"


def batch_pairs(n_mol: int, pad_rows: int, pad_edges: int, seed: int = 0):
    """Receivers (sorted) and senders of all ordered pairs of ``n_mol`` molecules of 9-27 atoms (QM9's range),
    then ``pad_edges`` padding edges on ``pad_rows`` padding rows, spread as molgen packs them and, for
    comparison, all on the last row (as molgen packed them before); and the number of node rows."""
    from molgen.data.batching import padding_edge_rows

    sizes = np.random.default_rng(seed).integers(9, 28, n_mol)
    recv, send, start = [], [], 0
    for n in sizes:
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        off = i != j
        recv.append(start + i[off])
        send.append(start + j[off])
        start += n
    n_nodes = start + pad_rows
    spread = padding_edge_rows(np.arange(pad_edges), start, n_nodes, pad_edges)
    one = np.full(pad_edges, n_nodes - 1)
    recv, send = np.concatenate(recv), np.concatenate(send)
    layouts = {"": (np.concatenate([recv, spread]), np.concatenate([send, spread])),
               "_pad_one_row": (np.concatenate([recv, one]), np.concatenate([send, one]))}
    return {k: (r.astype(np.int32), s.astype(np.int32)) for k, (r, s) in layouts.items()}, int(n_nodes)


def measure(args) -> None:
    import jax
    import jax.numpy as jnp

    ftz = int(FTZ_FLAG in os.environ.get("XLA_FLAGS", ""))
    layouts, n_nodes = batch_pairs(args.molecules, args.pad_rows, args.pad_edges)
    n_pairs = len(layouts[""][0])
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {n_nodes} atom rows ({args.pad_rows} padding), "
          f"{n_pairs} pair rows ({args.pad_edges} padding), {args.features} features, ftz={ftz}", flush=True)
    from molgen.nn.pairs import reverse_pairs

    ops = {}
    for tag, (recv, send) in layouts.items():
        if tag and args.spread_only:
            continue
        recv_d, send_d = jnp.asarray(recv), jnp.asarray(send)
        rev = reverse_pairs(send_d)
        ops[f"sum_by_receiver{tag}"] = partial(jax.ops.segment_sum, segment_ids=recv_d, num_segments=n_nodes,
                                               indices_are_sorted=True)
        ops[f"sum_by_sender{tag}"] = partial(jax.ops.segment_sum, segment_ids=send_d, num_segments=n_nodes)
        ops[f"sum_by_sender_reversed{tag}"] = partial(
            lambda m, r, s: jax.ops.segment_sum(m[r], s, num_segments=n_nodes, indices_are_sorted=True),
            r=rev, s=recv_d)
    acc = jnp.dtype(args.accumulate) if args.accumulate else None
    for dtype in args.dtypes.split(","):
        m = jax.random.normal(jax.random.PRNGKey(0), (n_pairs, args.features), jnp.dtype(dtype))
        for name, op in ops.items():
            f = jax.jit(op if acc is None else (lambda x, op=op: op(x.astype(acc))))
            f(m).block_until_ready()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                f(m).block_until_ready()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            dt = dtype if acc is None else f"{dtype}>{acc.name}"
            print(f"RESULT scatter {name} dtype={dt} ftz={ftz} ms={med * 1e3:.3f} "
                  f"GB_per_s={m.size * m.dtype.itemsize / med / 1e9:.1f}", flush=True)


def ab(args) -> float:
    """Run the measurements without and with FTZ in child processes (XLA reads its flags once per process);
    return the float32 speed-up."""
    totals = []
    for extra in ("", FTZ_FLAG):
        env = dict(os.environ)
        flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != FTZ_FLAG)
        env["XLA_FLAGS"] = f"{flags} {extra}".strip()
        cmd = [sys.executable, __file__, "--molecules", str(args.molecules), "--features", str(args.features),
               "--repeats", str(args.repeats), "--dtypes", args.dtypes, "--pad-rows", str(args.pad_rows),
               "--pad-edges", str(args.pad_edges)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith(("RESULT", "#"))]
        print("\n".join(lines), flush=True)
        if out.returncode:
            print(f"# child failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", flush=True)
            return 1.0
        totals.append(sum(float(re.search(r"ms=([\d.]+)", line).group(1)) for line in lines
                          if line.startswith("RESULT") and "dtype=float32" in line and "pad_one_row" not in line))
    return totals[0] / totals[1] if totals[1] > 0 else 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", type=int, default=1024, help="molecules in the batch")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--pad-rows", type=int, default=300, help="padding node rows (batch 1024's median: ~300)")
    ap.add_argument("--pad-edges", type=int, default=10541, help="padding edges (batch 1024's median: 10,541)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--accumulate", default=None, help="convert the rows to this type before summing (float32)")
    ap.add_argument("--spread-only", action="store_true", help="only the padding edges spread as molgen packs them")
    ap.add_argument("--ab", action="store_true", help="without and with FTZ, in two child processes")
    ap.add_argument("--timeout", type=float, default=120, help="--ab: seconds per child process")
    args = ap.parse_args()
    if args.ab:
        print(f"FTZ_SPEEDUP {ab(args):.2f}", flush=True)
    else:
        measure(args)


if __name__ == "__main__":
    main()
