"""Where a traced chunk's time went: the durations in a jax.profiler trace (the ``perfetto_trace.json.gz`` that
``jax.profiler.start_trace(..., create_perfetto_trace=True)`` writes), summed by operation name on the device's
own timelines (a GPU's streams; on a CPU, the XLA threads), largest first, with the share of the total and a
coarse kind (matrix product, gather, scatter / segment sum, reduction, copy, molgen's pair kernels, other fusion).

    python benchmarks/profile_summary.py TRACE_DIR [--top 25]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path


def kind(name: str) -> str:
    n = name.lower()
    for key, label in (("first_pair_layer_grad", "pair kernel"), ("gated_sum_grad", "pair kernel"),
                       ("gemm", "matmul"), ("cublas", "matmul"), ("cutlass", "matmul"), ("dot", "matmul"),
                       ("matmul", "matmul"), ("triton", "fusion"), ("scatter", "scatter"), ("gather", "gather"),
                       ("reduce", "reduction"), ("copy", "copy"), ("memcpy", "copy"), ("memset", "copy"),
                       ("fusion", "fusion"), ("loop_", "fusion"), ("input_", "fusion")):
        if key in n:
            return label
    return "other"


def load_events(trace_dir: str | Path):
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(trace_dir: str | Path, top: int = 25) -> str:
    events = load_events(trace_dir)
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name and "cpu" not in name.lower()}

    def on_device(e) -> bool:
        if device:  # a GPU's streams
            return e.get("pid") in device
        # a CPU run: the operations on XLA's worker threads (not the host's Python or the executor's waits)
        return threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLAEigen") and \
            not e["name"].startswith("ThunkExecutor")

    by_name, total = defaultdict(float), 0.0
    for e in events:
        if e.get("ph") == "X" and "dur" in e and on_device(e):
            by_name[e["name"]] += float(e["dur"])
            total += float(e["dur"])
    if total <= 0:
        names = sorted({n for n in procs.values() if n})
        return f"PROFILE {trace_dir}: no device operations in the trace (its processes: {', '.join(names) or 'none'})"
    by_kind = defaultdict(float)
    for name, d in by_name.items():
        by_kind[kind(name)] += d
    lines = [f"PROFILE {trace_dir}: {total / 1e3:.1f} ms of device time in {len(by_name)} operations; by kind: "
             + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))]
    for name, d in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {d / total:6.1%}  {d / 1e3:9.2f} ms  {kind(name):9s} {name[:110]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    try:
        print(summarize(args.trace_dir, args.top))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
