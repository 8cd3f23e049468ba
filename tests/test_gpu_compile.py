"""benchmarks/gpu_compile.py's reading of an optimised HLO program: which computation is the step, and the bytes
and FLOPs it counts per kernel, on a hand-written module (no GPU plugin needed)."""

import pytest
from conftest import load_script

HLO = """HloModule m

%fused_slice (p0: f32[1000,8], p1: s32[]) -> f32[10,8] {
  %p0 = f32[1000,8]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = f32[10,8]{1,0} dynamic-slice(%p0, %p1, %c0), dynamic_slice_sizes={10,8}
}

%gemm_computation (a: f32[10,8], b: f32[8,16]) -> f32[10,16] {
  %a = f32[10,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  ROOT %d = f32[10,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_scatter (q0: f32[50,16], q1: s32[10,1], q2: f32[10,16]) -> f32[50,16] {
  %q0 = f32[50,16]{1,0} parameter(0)
  %q1 = s32[10,1]{1,0} parameter(1)
  %q2 = f32[10,16]{1,0} parameter(2)
  ROOT %sc = f32[50,16]{1,0} scatter(%q0, %q1, %q2), update_window_dims={1}, to_apply=%add
}

%body (t: (s32[], f32[1000,8], f32[8,16], s32[10,1], f32[50,16])) -> (s32[], f32[1000,8], f32[8,16], s32[10,1], f32[50,16]) {
  %t = (s32[], f32[1000,8]{1,0}, f32[8,16]{1,0}, s32[10,1]{1,0}, f32[50,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %big = f32[1000,8]{1,0} get-tuple-element(%t), index=1
  %w = f32[8,16]{1,0} get-tuple-element(%t), index=2
  %idx = s32[10,1]{1,0} get-tuple-element(%t), index=3
  %acc = f32[50,16]{1,0} get-tuple-element(%t), index=4
  %sl = f32[10,8]{1,0} fusion(%big, %i), kind=kLoop, calls=%fused_slice
  %mm = f32[10,16]{1,0} fusion(%sl, %w), kind=kCustom, calls=%gemm_computation
  %scatter_fusion = f32[50,16]{1,0} fusion(%acc, %idx, %mm), kind=kInput, calls=%fused_scatter
  ROOT %out = (s32[], f32[1000,8]{1,0}, f32[8,16]{1,0}, s32[10,1]{1,0}, f32[50,16]{1,0}) tuple(%i, %big, %w, %idx, %scatter_fusion)
}

%cond (c: (s32[], f32[1000,8], f32[8,16], s32[10,1], f32[50,16])) -> pred[] {
  %c = (s32[], f32[1000,8]{1,0}, f32[8,16]{1,0}, s32[10,1]{1,0}, f32[50,16]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %lim = s32[] constant(4)
  ROOT %lt = pred[] compare(%n, %lim), direction=LT
}

ENTRY %main (e: (s32[], f32[1000,8], f32[8,16], s32[10,1], f32[50,16])) -> (s32[], f32[1000,8], f32[8,16], s32[10,1], f32[50,16]) {
  %e = (s32[], f32[1000,8]{1,0}, f32[8,16]{1,0}, s32[10,1]{1,0}, f32[50,16]{1,0}) parameter(0)
  ROOT %loop = (s32[], f32[1000,8]{1,0}, f32[8,16]{1,0}, s32[10,1]{1,0}, f32[50,16]{1,0}) while(%e), condition=%cond, body=%body
}
"""


@pytest.fixture(scope="module")
def gpu_compile():
    return load_script("benchmarks/gpu_compile.py")


def test_step_kernels_bytes_and_flops(gpu_compile):
    kernels = {k["name"]: k for k in gpu_compile.Program(HLO).step()}
    # the loop's body, not the fused computations (whose dynamic-slice would read the whole 32,000-byte array)
    assert set(kernels) == {"sl", "mm", "scatter_fusion"}
    # a slice of the big array (10 x 8 float32) and the index, then the slice written
    assert kernels["sl"]["bytes"] == 320 + 4 + 320
    # a matrix product: both operands and the result; 2 x 10 x 16 x 8 FLOPs
    assert kernels["mm"]["bytes"] == 320 + 512 + 640 and kernels["mm"]["flops"] == 2 * 10 * 16 * 8
    assert kernels["mm"]["kind"] == "matrix product"
    # a scatter updates its first operand in place: indices and updates read, the result written
    assert kernels["scatter_fusion"]["bytes"] == 40 + 640 + 3200
    assert kernels["scatter_fusion"]["kind"] == "kInput/scatter"
    assert kernels["sl"]["flops"] == kernels["scatter_fusion"]["flops"] == 0


def test_report_line(gpu_compile):
    line = gpu_compile.report("edm", 64, "bf16", "packed", HLO, top=0)
    total = (320 + 4 + 320) + (320 + 512 + 640) + (40 + 640 + 3200)
    assert line.startswith("ESTIMATE molgen edm batch=64 precision=bf16 layout=packed kernels=3 "
                           f"traffic_gb={total / 1e9:.2f} gflop=0 ")
    assert line.endswith("bound_ms=0.0")  # three launches of 3 us


CONVERTED = """HloModule c

%fused_part (p0: bf16[1000,8]) -> f32[10,8] {
  %p0 = bf16[1000,8]{1,0} parameter(0)
  %f = f32[1000,8]{1,0} convert(%p0)
  %r = f32[10,100,8]{2,1,0} bitcast(%f)
  ROOT %s = f32[1,100,8]{2,1,0} slice(%r), slice={[2:3], [0:100], [0:8]}
}

%fused_whole (p0: bf16[1000,8]) -> (f32[1,100,8], f32[1000,8]) {
  %p0 = bf16[1000,8]{1,0} parameter(0)
  %f = f32[1000,8]{1,0} convert(%p0)
  %r = f32[10,100,8]{2,1,0} bitcast(%f)
  %s = f32[1,100,8]{2,1,0} slice(%r), slice={[2:3], [0:100], [0:8]}
  ROOT %t = (f32[1,100,8]{2,1,0}, f32[1000,8]{1,0}) tuple(%s, %f)
}

ENTRY %main (x: bf16[1000,8]) -> (f32[1,100,8], (f32[1,100,8], f32[1000,8])) {
  %x = bf16[1000,8]{1,0} parameter(0)
  %part = f32[1,100,8]{2,1,0} fusion(%x), kind=kLoop, calls=%fused_part
  %whole = (f32[1,100,8]{2,1,0}, f32[1000,8]{1,0}) fusion(%x), kind=kLoop, calls=%fused_whole
  ROOT %o = (f32[1,100,8]{2,1,0}, (f32[1,100,8]{2,1,0}, f32[1000,8]{1,0})) tuple(%part, %whole)
}
"""


def test_slice_after_conversion_reads_the_slice(gpu_compile):
    """XLA converts a bfloat16 pair array to float32 and then slices one group's rows out of it: the kernel
    reads those rows only (100 x 8 bfloat16), unless the converted array is also used whole."""
    kernels = {k["name"]: k for k in gpu_compile.Program(CONVERTED).step()}
    assert kernels["part"]["bytes"] == 100 * 8 * 2 + 100 * 8 * 4
    assert kernels["whole"]["bytes"] == 1000 * 8 * 2 + 100 * 8 * 4 + 1000 * 8 * 4


SCALED = """HloModule s

%fused_rows (p0: bf16[1000,8], p1: f32[1000]) -> f32[100,8] {
  %p0 = bf16[1000,8]{1,0} parameter(0)
  %p1 = f32[1000]{0} parameter(1)
  %f = f32[1000,8]{1,0} convert(%p0)
  %b = f32[1000,8]{1,0} broadcast(%p1), dimensions={0}
  %m = f32[1000,8]{1,0} multiply(%f, %b)
  ROOT %s = f32[100,8]{1,0} slice(%m), slice={[100:200], [0:8]}
}

%fused_columns (p0: bf16[1000,8], p1: f32[1000]) -> f32[1000,2] {
  %p0 = bf16[1000,8]{1,0} parameter(0)
  %p1 = f32[1000]{0} parameter(1)
  %f = f32[1000,8]{1,0} convert(%p0)
  %b = f32[1000,8]{1,0} broadcast(%p1), dimensions={0}
  %m = f32[1000,8]{1,0} multiply(%f, %b)
  ROOT %s = f32[1000,2]{1,0} slice(%m), slice={[0:1000], [0:2]}
}

ENTRY %main (x: bf16[1000,8], y: f32[1000]) -> (f32[100,8], f32[1000,2]) {
  %x = bf16[1000,8]{1,0} parameter(0)
  %y = f32[1000]{0} parameter(1)
  %rows = f32[100,8]{1,0} fusion(%x, %y), kind=kLoop, calls=%fused_rows
  %columns = f32[1000,2]{1,0} fusion(%x, %y), kind=kLoop, calls=%fused_columns
  ROOT %o = (f32[100,8]{1,0}, f32[1000,2]{1,0}) tuple(%rows, %columns)
}
"""


def test_slice_of_a_scaled_array_reads_the_rows_of_each_operand(gpu_compile):
    """A pair array scaled by a per-pair factor (broadcast along the features), then one group's rows sliced:
    both operands are read in those rows only. A slice of columns reads every row of the per-pair factor."""
    kernels = {k["name"]: k for k in gpu_compile.Program(SCALED).step()}
    assert kernels["rows"]["bytes"] == 100 * 8 * 2 + 100 * 4 + 100 * 8 * 4
    assert kernels["columns"]["bytes"] == 1000 * 2 * 2 + 1000 * 4 + 1000 * 2 * 4
