"""`molgen train`'s chunk compiled for an NVIDIA H200 on a machine without one (XLA's deviceless ahead-of-time
compilation), and what the optimised program says about one training step: its kernels, their memory traffic and
the FLOPs of its matrix products. An estimate from the program, not a measurement: it shows what a change does to
the GPU program (kernels fused, arrays made smaller, layout copies gone) before a GPU is at hand.

Needs JAX with its CUDA plugin (JAX 0.11 needs Python >= 3.12), no GPU and no CUDA runtime:

    python3.12 -m venv .aotenv && .aotenv/bin/pip install "jax==0.11.2" "jax-cuda12-plugin==0.11.2" \\
        "jax-cuda12-pjrt==0.11.2" nvidia-cuda-nvcc-cu12 flax optax orbax-checkpoint typer rich numpy \\
        && .aotenv/bin/pip install --no-deps -e .
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .aotenv/bin/python benchmarks/gpu_compile.py \\
        --runs edm:1024:tf32:packed,edm:1024:bf16:packed [--top 20] [--atomics] [--scatters]

One line per compiled program:

    ESTIMATE molgen <preset> batch=<B> precision=<p> layout=<l> kernels=<n> traffic_gb=<X> gflop=<Y> bound_ms=<Z>
             memory_gb=<M>

traffic_gb: the bytes every kernel of one step reads and writes, summed (operands and results; an operand a kernel
only slices (also after element-wise operations on it) or updates in place counts as the slice or not at all);
caches are ignored, so it is an upper bound
of the step's HBM traffic. gflop: the matrix products'. bound_ms: each kernel at the slower of 80 % of 4.8 TB/s
and 400 TFLOP/s, summed, plus 3 us a kernel: a floor in the roofline sense, not a prediction. memory_gb: the
device memory XLA plans for the chunk (its arguments and temporaries; the H200 has 139 GiB). --top lists the
kinds of kernel and the largest kernels; --atomics compiles neighbour sums (float32 and bfloat16, sorted;
bfloat16 rows summed into float32, sorted, also through a gather as by the reversed pairs; float32 not sorted)
and prints the atomic instructions of their PTX (native atomics or a compare-and-swap loop; a sorted sum writes
its runs' sums at several places, an unsorted one adds every element at one) and its local memory accesses
(registers spilled: XLA's sorted scatter has been slow where its accumulators spill).
--scatters counts the step's scatter-adds, those XLA is told have sorted indices (it then adds each run of equal
indices in registers before one atomic add) and those that read their rows through a gather, and its sorts.
The kernels' tile sizes are XLA's defaults: without a GPU there is no autotuning. In the packed-kernel layout
molgen's Pallas kernels (molgen.nn.pairgrad) are lowered for the H200 too (Triton), and count as custom calls:
their operands and results, whole (a kernel reading part of an array twice counts it once), and no FLOPs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
import tempfile
import time

import numpy as np

# The H200 as XLA's GPU compiler describes a device (a GpuTargetConfigProto in text form).
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""
BANDWIDTH, FLOPS, LAUNCH_S = 0.8 * 4.8e12, 400e12, 3e-6

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "s64": 8,
               "u64": 8, "f64": 8, "s16": 2, "u16": 2}
SHAPE = re.compile(r"\b(%s)\[([0-9,]*)\]" % "|".join(DTYPE_BYTES))
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s*\(.*\)\s*->\s*.*\{\s*$")
# Operations through which a slice of their result reads only the same part of a fused parameter.
ELEMENTWISE = {"convert", "bitcast", "copy", "reshape", "bitcast-convert", "negate", "abs", "exponential", "log",
               "tanh", "logistic", "sqrt", "rsqrt", "add", "subtract", "multiply", "divide", "maximum", "minimum",
               "power", "select", "compare", "and", "or", "not"}
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "copy-start", "copy-done", "async-start",
               "async-done", "add-dependency"}


def elements(dims: str) -> int:
    return int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))


def dims_of(type_text: str) -> list[int]:
    return [int(d) for d in SHAPE.search(type_text).group(2).split(",") if d]


def count(type_text: str) -> int:
    """Elements of an HLO type (a shape or a tuple of shapes)."""
    return sum(elements(dims) for _, dims in SHAPE.findall(type_text))


def leading_rows_only(ins, source_type: str) -> bool:
    """Whether a slice or dynamic slice of an array of ``source_type`` keeps every dimension but the first whole."""
    full = dims_of(source_type)[1:]
    if ins["op"] == "slice":
        spans = re.findall(r"\[(\d+):(\d+)(?::\d+)?\]", ins["attrs"])
        return [int(b) - int(a) for a, b in spans[1:]] == full
    m = re.search(r"dynamic_slice_sizes=\{([0-9,]*)\}", ins["attrs"]) if ins["op"] == "dynamic-slice" else None
    return bool(m) and [int(d) for d in m.group(1).split(",")][1:] == full


def nbytes(type_text: str) -> int:
    """Bytes of an HLO type (a shape or a tuple of shapes)."""
    return sum(elements(dims) * DTYPE_BYTES[dt] for dt, dims in SHAPE.findall(type_text))


def parse_hlo(text: str) -> dict[str, list[dict]]:
    """Computations of an HLO module's text: name -> instructions (name, type, op, operand names, the rest)."""
    comps, cur = {}, None
    for line in text.splitlines():
        head = COMPUTATION.match(line)
        if head:
            cur = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and (m := INSTRUCTION.match(line)):
            name, type_text, op, rest = m.groups()
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            cur.append({"name": name, "type": type_text, "op": op, "operands": re.findall(r"%([^\s,)]+)", rest[:i]),
                        "attrs": rest[i:], "line": line})
    return comps


class Program:
    """The kernels of an optimised HLO module, with each one's bytes moved and matrix-product FLOPs."""

    def __init__(self, text: str):
        self.comps = parse_hlo(text)
        self.types = {ins["name"]: ins["type"] for c in self.comps.values() for ins in c}

    def called(self, ins) -> list[dict]:
        m = re.search(r"calls=%([^\s,]+)", ins["attrs"])
        return self.comps.get(m.group(1), []) if m else []

    @staticmethod
    def _read_fraction(body, name, rows_only=False) -> float | None:
        """The fraction of value ``name`` that a fused computation reads when every path from it ends in a slice,
        dynamic slice or gather, through element-wise operations, reshapes and broadcasts into new trailing
        dimensions (XLA converts or scales a pair array, then slices one group's rows out of it); None if any
        path reads it whole. After such a broadcast only slices of leading rows count (``rows_only``)."""
        types = {x["name"]: x["type"] for x in body}
        own = count(types[name])
        users = [x for x in body if name in x["operands"]]
        if not users or not own:
            return None
        total = 0.0
        for u in users:
            if u["op"] in ("dynamic-slice", "gather", "slice") and u["operands"][0] == name:
                if rows_only and not leading_rows_only(u, types[name]):
                    return None
                total += count(u["type"]) / own
                continue
            m = re.search(r"dimensions=\{([0-9,]*)\}", u["attrs"]) if u["op"] == "broadcast" else None
            if u["op"] in ELEMENTWISE and count(u["type"]) == own:
                inner = Program._read_fraction(body, u["name"], rows_only)
            elif m and [int(d) for d in m.group(1).split(",") if d] == list(range(len(dims_of(types[name])))):
                inner = Program._read_fraction(body, u["name"], True)
            else:
                return None
            if inner is None:
                return None
            total += inner
        return total

    def operand_bytes(self, ins) -> int:
        """A fusion's parameter that is only sliced or gathered from (directly or after element-wise operations,
        :meth:`_read_fraction`) counts as what is read of it; one that is only updated in place (scatter,
        dynamic-update-slice) not at all."""
        body = self.called(ins) if ins["op"] == "fusion" else []
        params = {int(re.search(r"parameter\((\d+)", x["line"]).group(1)): x["name"] for x in body
                  if x["op"] == "parameter"}
        total = 0
        for k, name in enumerate(ins["operands"]):
            type_text = self.types.get(name, "")
            size, p = nbytes(type_text), params.get(k)
            users = [x for x in body if p in x["operands"]] if p else []
            read = self._read_fraction(body, p) if users and len(SHAPE.findall(type_text)) == 1 else None
            if read is not None:
                size = min(size, round(read * size))
            elif users and all(u["op"] in ("scatter", "dynamic-update-slice") and u["operands"][0] == p
                               for u in users):
                size = 0
            total += size
        return total

    def product_flops(self, ins) -> int:
        flops = 0
        for x in self.called(ins) if ins["op"] == "fusion" else [ins]:
            if x["op"] != "dot":
                continue
            lhs = SHAPE.search(self.types.get(x["operands"][0], "")).group(2).split(",")
            contracted = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", x["attrs"]).group(1)
            k = int(np.prod([int(lhs[int(d)]) for d in contracted.split(",") if d]))
            flops += 2 * elements(SHAPE.search(x["type"]).group(2)) * k
        return flops

    def kernels(self, computation: str) -> list[dict]:
        out = []
        for ins in self.comps[computation]:
            if ins["op"] in NOT_KERNELS:
                continue
            kind = ins["op"]
            if kind == "fusion":
                kind = re.search(r"kind=(\w+)", ins["attrs"]).group(1)
                kind = {"kCustom": "matrix product"}.get(kind, kind)
                for tag in ("scatter", "reduce", "transpose", "concatenate"):
                    if tag in ins["name"] and kind != "matrix product":
                        kind += "/" + tag
                        break
            m = re.search(r'op_name="([^"]*)"', ins["line"])
            out.append({"name": ins["name"], "kind": kind, "type": ins["type"], "op_name": m.group(1) if m else "",
                        "bytes": self.operand_bytes(ins) + nbytes(ins["type"]), "flops": self.product_flops(ins)})
        return out

    def step(self) -> list[dict]:
        """The kernels of the computation that moves the most bytes: the training step, the body of the chunk's
        loop (the loop runs it once per step). Computations inside kernels (fused ones, reducers) are not
        candidates."""
        inside = {name for c in self.comps.values() for ins in c
                  for name in re.findall(r"(?:calls|to_apply)=%([^\s,}]+)", ins["attrs"])}
        return max((self.kernels(c) for c in self.comps if c not in inside), key=lambda ks: sum(k["bytes"] for k in ks))


def bound_s(kernels) -> float:
    return sum(max(k["bytes"] / BANDWIDTH, k["flops"] / FLOPS) + LAUNCH_S for k in kernels)


def compile_chunk(name: str, bs: int, precision: str, layout: str, data_dir=None) -> tuple[str, float]:
    """The optimised HLO text of `molgen train`'s chunk (4 steps) for one H200, and the bytes of device memory
    it plans for (arguments and temporaries)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from molgen.config import OptimConfig, RunConfig
    from molgen.data.batching import BatchSampler
    from molgen.data.device import dense_set, make_plan
    from molgen.data.qm9 import load_qm9
    from molgen.nn.egnn import PRESETS
    from molgen.state import init_state
    from molgen.steps import _chunk_program, program_config

    topology = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1")
    mesh = Mesh(np.array(topology.devices), ("data",))
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    ds = load_qm9(data_dir)
    ids = ds.split("train")
    cfg = RunConfig(model=PRESETS[name], optim=OptimConfig(batch_size=bs, precision=precision, layout=layout))
    plan = make_plan(layout, ds.n_atoms, BatchSampler(ids, bs, seed=0), 1)

    def spec(x, sharding=repl):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    dset = jax.tree_util.tree_map(spec, dense_set(ds, ids))
    state = jax.tree_util.tree_map(spec, jax.eval_shape(lambda: init_state(cfg)))
    k = 4
    ids_spec = jax.ShapeDtypeStruct((k, 1, bs), np.int32, sharding=rows)  # the steps' rows [steps, shards, batch]
    fn = _chunk_program(program_config(cfg), mesh, plan.shape)
    with _pallas_for_h200(layout):
        lowered = fn.lower(state, dset, ids_spec, spec(jnp.int32(0)), spec(jax.random.PRNGKey(0)), None)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    return compiled.as_text(), float(memory.argument_size_in_bytes + memory.temp_size_in_bytes)


@contextlib.contextmanager
def _pallas_for_h200(layout: str):
    """The packed-kernel layout's Pallas kernel lowered for the H200 (Triton), not for the interpreter that a
    machine without a GPU would run it in: Pallas reads the target from an abstract mesh that names the device."""
    if layout != "packed-kernel":
        yield
        return
    import jax
    from jax._src.mesh import AbstractDevice  # JAX 0.11: how a mesh names a device it does not have
    from jax.sharding import AbstractMesh, AxisType

    from molgen.nn import pairgrad

    mesh = AbstractMesh((1,), ("d",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))
    before, pairgrad.INTERPRET = pairgrad.INTERPRET, False
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            yield
    finally:
        pairgrad.INTERPRET = before


def atomics() -> str:
    """The atomic instructions XLA writes for a float32 and a bfloat16 neighbour sum (scatter-add)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    topology = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1")
    repl = NamedSharding(Mesh(np.array(topology.devices), ("d",)), P())
    def sums(v, i, sorted_ids=True):
        return jax.ops.segment_sum(v, i, num_segments=1000, indices_are_sorted=sorted_ids)

    f32 = jnp.float32
    # (name, dtype, function of (rows, indices)): the neighbour sums as the training step has them
    cases = [("float32 scatter-add", f32, sums),
             ("bfloat16 scatter-add", jnp.bfloat16, sums),
             ("bfloat16>float32 sorted", jnp.bfloat16, lambda v, i: sums(v.astype(f32), i)),
             ("bfloat16>float32 by reversed pairs", jnp.bfloat16,
              lambda v, i: sums(v[(i * 7919) % 20000].astype(f32), i)),
             ("float32 not sorted", f32, lambda v, i: sums(v, i, False))]
    lines = []
    for name, dtype, f in cases:
        with tempfile.TemporaryDirectory() as dump:  # (XLA writes the PTX only with all of these)
            options = {"xla_dump_to": dump, "xla_gpu_dump_llvmir": True, "xla_dump_emitter_re": ".*",
                       "xla_gpu_experimental_dump_gpu_executable": True}
            x = jax.ShapeDtypeStruct((20000, 256), dtype, sharding=repl)
            idx = jax.ShapeDtypeStruct((20000,), jnp.int32, sharding=repl)
            jax.jit(f).lower(x, idx).compile(compiler_options=options)
            ptx = "".join(open(os.path.join(dump, f)).read() for f in os.listdir(dump) if f.endswith(".ptx"))
        found = collections.Counter(re.findall(r"\batom\.[a-z0-9.]+", ptx))
        spills = len(re.findall(r"\b(?:ld|st)\.local", ptx))  # a sorted sum's registers spilled to memory
        lines.append(f"ATOMICS {name}: " + (", ".join(f"{n} x {a}" for a, n in sorted(found.items()))
                                            or "no PTX written") + f"; local memory accesses {spills}")
    return "\n".join(lines)


def report(name, bs, precision, layout, text: str, top: int, memory: float | None = None) -> str:
    ks = Program(text).step()
    gb, gflop = sum(k["bytes"] for k in ks) / 1e9, sum(k["flops"] for k in ks) / 1e9
    out = [f"ESTIMATE molgen {name} batch={bs} precision={precision} layout={layout} kernels={len(ks)} "
           f"traffic_gb={gb:.2f} gflop={gflop:.0f} bound_ms={bound_s(ks) * 1e3:.1f}"
           + (f" memory_gb={memory / 1e9:.1f}" if memory is not None else "")]
    if top:
        by_kind = collections.defaultdict(lambda: [0, 0])
        for k in ks:
            by_kind[k["kind"]][0] += 1
            by_kind[k["kind"]][1] += k["bytes"]
        out += [f"  {kind:28s} {n:5d} kernels {b / 1e9:8.2f} GB" for kind, (n, b) in
                sorted(by_kind.items(), key=lambda kv: -kv[1][1])]
        for k in sorted(ks, key=lambda k: -k["bytes"])[:top]:
            where = k["op_name"].split("/branch_1_fun/")[-1][-70:]
            out.append(f"  {k['bytes'] / 1e6:8.0f} MB {k['kind']:24s} {k['type'][:44]:44s} {where}")
    return "\n".join(out)


def scatters(text: str) -> str:
    """The program's scatter-adds: how many tell XLA their indices are sorted (XLA's GPU scatter then adds each run
    of equal indices in registers before one atomic add, instead of one atomic add per element), how many sum
    [rows, 256] arrays, and how many of those read their rows through a gather (the reversed pairs); and its sorts."""
    sc = [line for line in text.splitlines() if re.search(r"\bscatter\(", line)]
    wide = [line for line in sc if re.search(r"= f32\[\d+,256\]", line)]
    bodies = re.findall(r"^%fused_scatter\S* .*?^\}", text, re.M | re.S)
    gathered = sum(1 for b in bodies if "256]" in b.splitlines()[0] and "gather(" in b)
    n_sorts = sum(1 for line in text.splitlines() if re.search(r"\bsort\(", line))
    is_sorted = "indices_are_sorted=true"
    return (f"  scatter-adds {len(sc)} ({sum(is_sorted in line for line in sc)} sorted); 256 wide {len(wide)} "
            f"({sum(is_sorted in line for line in wide)} sorted, {gathered} reading their rows through a gather); "
            f"sorts {n_sorts}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="edm:1024:tf32:packed,edm:1024:bf16:packed",
                    help="comma-separated PRESET:BATCH:PRECISION:LAYOUT (precision tf32, bf16 or float32)")
    ap.add_argument("--top", type=int, default=0, help="also list the kinds of kernel and the N largest kernels")
    ap.add_argument("--atomics", action="store_true", help="the atomic instructions of a neighbour sum's PTX")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--save-hlo", default=None, help="folder: write each optimised program's text there")
    ap.add_argument("--scatters", action="store_true", help="count the scatter-adds (sorted or not) and sorts")
    args = ap.parse_args()
    import jax

    print(f"# deviceless compilation for an H200, jax {jax.__version__}", flush=True)
    if args.atomics:
        print(atomics(), flush=True)
    for run in args.runs.split(","):
        name, bs, precision, layout = run.split(":")
        t0 = time.time()
        text, memory = compile_chunk(name, int(bs), precision, layout, args.data_dir)
        if args.save_hlo:
            os.makedirs(args.save_hlo, exist_ok=True)
            with open(os.path.join(args.save_hlo, f"{name}_{bs}_{precision}_{layout}.hlo"), "w") as f:
                f.write(text)
        print(report(name, bs, precision, layout, text, args.top, memory)
              + (f"\n{scatters(text)}" if args.scatters else "") + f"\n  (compiled in {time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
