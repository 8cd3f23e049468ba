"""The EGNN's two pair MLPs as fused GPU kernels (Pallas, Triton back end), for the packed layout.

Each block of the 256 x 9 network runs two MLPs over every ordered pair (receiver i, sender j) of a batch: the
edge MLP, whose gated messages are summed into the receivers, and the coordinate MLP, whose one output per pair
weighs the coordinate update. Written as array operations, XLA computes them as some 40 kernels a block, each
reading or writing a [pairs, features] array (at batch 1024, 330,000 pairs x 256 features: ~170 MB in bfloat16
each time), and on an H200 the training step is bound by those bytes (docs/performance.md). Here one kernel takes
a tile of pairs from the node rows to the summed messages (or the per-pair output) in registers and shared
memory, and one kernel does the whole backward pass of a tile; the only [pairs, features] arrays written are the
two operands of the second layer's weight gradient, which XLA's matrix product then reads once.

    pre1 = hr[i] + hs[j] + d2_ij w_d + d0_ij w_0 + b1      hr = h W_r, hs = h W_s (per-node products, XLA's)
    s1   = silu(pre1)                                      rounded to the compute type (bfloat16)
    m    = silu(s1 W2 + b2)                                products in the compute type, accumulated in float32
    gate: agg_i = sum_j m_ij sigmoid(m_ij . v + c) mask_ij  (the edge MLP with its attention gate)
    scalar: phi_ij = m_ij . v                               (the coordinate MLP's weight, before its tanh)

Everything after the first layer's sum is float32 except the second layer's product, whose operands are in the
compute type: the same arithmetic as :mod:`molgen.nn.egnn`'s bf16 path, to float32 rounding of the element-wise
parts (tests/test_pairkernel.py compares values and gradients with the plain formulation). Neighbour sums are
float32 atomic adds. On a machine without a GPU the kernels run in Pallas's interpreter (slow; for tests), where
each atomic add of a tile is an indexed add into the whole array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TILE = 64  # pairs a kernel instance takes (a multiple of 16, the tensor cores' tile; the pair count is padded)
COLS = 64  # the second layer's output columns a product takes at a time (registers: see the kernels)
WARPS = 8
INTERPRET: bool | None = None  # None: the interpreter where JAX's default backend is not a GPU


def supported(features: int) -> bool:
    """Whether the kernels take this feature width (Triton's blocks: a power of two, at least 16)."""
    return features >= 16 and features & (features - 1) == 0


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _dsilu(x):
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _add_rows(ref, rows, cols, val, interpret: bool):
    """ref[rows[k], cols] += val[k, :] for every k (rows may repeat)."""
    if interpret:  # the interpreter runs the instances one after another: a plain indexed add is exact
        ref[:, cols] = ref[:, cols].at[rows].add(val)
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.atomic_add(ref, (rows, cols), val)


def _first_layer(i, r_ref, s_ref, d2_ref, d0_ref, hr_ref, hs_ref, we_ref, b1_ref, cdt):
    """Tile ``i``'s pairs: (rows, receivers, senders, d2, d0, pre1 rounded to the compute type, s1)."""
    from jax.experimental import pallas as pl

    rows = pl.ds(i * TILE, TILE)
    r, s = r_ref[rows], s_ref[rows]
    d2, d0 = d2_ref[rows], d0_ref[rows]
    pre1 = (hr_ref[r, :] + hs_ref[s, :] + d2[:, None] * we_ref[0, :][None, :] + d0[:, None] * we_ref[1, :][None, :]
            + b1_ref[...][None, :])
    pre1 = pre1.astype(cdt).astype(jnp.float32)  # the sum in the compute type, as the XLA path rounds it
    return rows, r, s, d2, d0, pre1, _silu(pre1).astype(cdt)


def _cols(k, nf):
    """Output columns of block ``k`` of the second layer: COLS at a time (a [TILE, COLS] accumulator and an
    [F, COLS] block of W2 in registers, one block at a time: unrolled, the whole [F, F] weight spilled)."""
    from jax.experimental import pallas as pl

    step = min(COLS, nf)
    return pl.ds(pl.multiple_of(k * step, step), step)


def _n_blocks(nf):
    return nf // min(COLS, nf)


def _second_layer(s1, w2_ref, b2_ref, cols):
    pre2 = jnp.dot(s1, w2_ref[:, cols], preferred_element_type=jnp.float32) + b2_ref[cols][None, :]
    return pre2, _silu(pre2)


def _forward_kernel(r_ref, s_ref, d2_ref, d0_ref, mask_ref, hr_ref, hs_ref, we_ref, b1_ref, w2_ref, b2_ref, v_ref,
                    c_ref, zero_ref, out_ref, *, gate: bool, cdt, interpret: bool):
    """The tile's gated messages summed into their receivers (gate) or its per-pair outputs. With the gate, the
    logit (a sum over all columns) comes first and each block's product is computed again for the sums."""
    from jax.experimental import pallas as pl

    del zero_ref  # aliased to out_ref: the sums start from zero
    i = pl.program_id(0)
    rows, r, _, _, _, _, s1 = _first_layer(i, r_ref, s_ref, d2_ref, d0_ref, hr_ref, hs_ref, we_ref, b1_ref, cdt)
    nf = hr_ref.shape[1]

    def logit_block(k, logit):
        cols = _cols(k, nf)
        m = _second_layer(s1, w2_ref, b2_ref, cols)[1]
        return logit + jnp.sum(m * v_ref[cols][None, :], axis=1)

    logit = jax.lax.fori_loop(0, _n_blocks(nf), logit_block, jnp.zeros((TILE,), jnp.float32))
    if not gate:
        out_ref[rows] = logit
        return
    g = jax.nn.sigmoid(logit + c_ref[0]) * mask_ref[rows]

    def sum_block(k, carry):
        cols = _cols(k, nf)
        m = _second_layer(s1, w2_ref, b2_ref, cols)[1]
        _add_rows(out_ref, r, cols, m * g[:, None], interpret)
        return carry

    jax.lax.fori_loop(0, _n_blocks(nf), sum_block, 0)


def _backward_kernel(r_ref, s_ref, d2_ref, d0_ref, mask_ref, hr_ref, hs_ref, we_ref, b1_ref, w2_ref, b2_ref, v_ref,
                     c_ref, w2t_ref, gout_ref, zr_ref, zs_ref,
                     dhr_ref, dhs_ref, s1_ref, dpre2_ref, dd2_ref, dd0_ref, dlogit_ref,
                     sb1_ref, swd_ref, sw0_ref, sb2_ref, sv_ref,
                     *, gate: bool, cdt, interpret: bool):
    """Per tile: recompute, then the gradients. Pair outputs: s1 and the second layer's pre-activation gradient
    (for XLA's weight-gradient product), the two edge attributes' gradients, the logit's gradient; per-tile
    partial sums [tiles, F] of the gradients of b1, the two attribute weights, b2 and v; node gradients of hr
    and hs by atomic adds. With the gate, a first pass over the column blocks gives the logit and the gate's
    gradient (full-row sums), and the second computes each block's product again (registers, not memory)."""
    from jax.experimental import pallas as pl

    del zr_ref, zs_ref  # aliased to dhr_ref / dhs_ref
    i = pl.program_id(0)
    rows, r, s, d2, d0, _, s1 = _first_layer(i, r_ref, s_ref, d2_ref, d0_ref, hr_ref, hs_ref, we_ref, b1_ref,
                                                cdt)
    s1_ref[rows, :] = s1
    mask = mask_ref[rows]
    nf = hr_ref.shape[1]
    if gate:
        def gate_block(k, carry):
            cols = _cols(k, nf)
            m = _second_layer(s1, w2_ref, b2_ref, cols)[1]
            go = gout_ref[r, cols] * mask[:, None]                 # gradient of m * g * mask, per pair
            return carry[0] + jnp.sum(m * v_ref[cols][None, :], axis=1), carry[1] + jnp.sum(go * m, axis=1)

        zero = jnp.zeros((TILE,), jnp.float32)
        logit, gm = jax.lax.fori_loop(0, _n_blocks(nf), gate_block, (zero, zero))
        g = jax.nn.sigmoid(logit + c_ref[0])
        dlogit, gmask = gm * g * (1.0 - g), g * mask
    else:
        dlogit, gmask = gout_ref[rows], None                       # gradient of phi = m . v

    def grad_block(k, ds1):
        cols = _cols(k, nf)
        pre2, m = _second_layer(s1, w2_ref, b2_ref, cols)
        dm = dlogit[:, None] * v_ref[cols][None, :]
        if gate:
            dm = dm + gout_ref[r, cols] * gmask[:, None]
        dpre2 = dm * _dsilu(pre2)
        dpre2c = dpre2.astype(cdt)
        dpre2_ref[rows, cols] = dpre2c
        sb2_ref[i, cols] = jnp.sum(dpre2, axis=0)
        sv_ref[i, cols] = jnp.sum(dlogit[:, None] * m, axis=0)
        return ds1 + jnp.dot(dpre2c, w2t_ref[cols, :], preferred_element_type=jnp.float32)

    ds1 = jax.lax.fori_loop(0, _n_blocks(nf), grad_block, jnp.zeros((TILE, nf), jnp.float32))
    # the first layer again (its gathers mostly from cache) rather than kept in registers across the loop (ptxas:
    # 28 bytes spilled a thread instead of 768)
    pre1 = _first_layer(i, r_ref, s_ref, d2_ref, d0_ref, hr_ref, hs_ref, we_ref, b1_ref, cdt)[5]
    dpre1 = ds1 * _dsilu(pre1)
    _add_rows(dhr_ref, r, slice(None), dpre1, interpret)
    _add_rows(dhs_ref, s, slice(None), dpre1, interpret)
    dd2_ref[rows] = jnp.sum(dpre1 * we_ref[0, :][None, :], axis=1)
    dd0_ref[rows] = jnp.sum(dpre1 * we_ref[1, :][None, :], axis=1)
    dlogit_ref[rows] = dlogit
    sb1_ref[i, :] = jnp.sum(dpre1, axis=0)
    swd_ref[i, :] = jnp.sum(dpre1 * d2[:, None], axis=0)
    sw0_ref[i, :] = jnp.sum(dpre1 * d0[:, None], axis=0)


# [pairs, F] x [F, F] products per pair of each kernel (the gated sum's forward pass computes its second layer
# twice: once for the gate's logit, once for the sums; its backward pass likewise before the gradient's product)
PRODUCTS = {"pair_sum_forward": 2, "pair_sum_backward": 3, "pair_scalar_forward": 1, "pair_scalar_backward": 2}


def _call(kernel, name, n_tiles, out_shapes, aliases, args, interpret):
    from jax.experimental import pallas as pl

    kw = {"name": name}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=WARPS, num_stages=1)
    return pl.pallas_call(kernel, out_shape=out_shapes, grid=(n_tiles,), input_output_aliases=aliases,
                          interpret=interpret, **kw)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pair_mlp(gate, n_nodes, r, s, mask, hr, hs, d2, d0, we, b1, w2, b2, v, c):
    return _forward(gate, n_nodes, r, s, mask, hr, hs, d2, d0, we, b1, w2, b2, v, c)


def _interpret() -> bool:
    return jax.default_backend() != "gpu" if INTERPRET is None else INTERPRET


def _forward(gate, n_nodes, r, s, mask, hr, hs, d2, d0, we, b1, w2, b2, v, c):
    interpret, cdt = _interpret(), w2.dtype
    n_pairs = r.shape[0]
    if gate:
        out = jax.ShapeDtypeStruct((n_nodes, hr.shape[1]), jnp.float32)
        args = (r, s, d2, d0, mask, hr, hs, we, b1, w2, b2, v, c, jnp.zeros(out.shape, out.dtype))
    else:
        out = jax.ShapeDtypeStruct((n_pairs,), jnp.float32)
        args = (r, s, d2, d0, mask, hr, hs, we, b1, w2, b2, v, c, jnp.zeros((1,), jnp.float32))  # (unused)
    kernel = functools.partial(_forward_kernel, gate=gate, cdt=cdt, interpret=interpret)
    name = "pair_sum_forward" if gate else "pair_scalar_forward"
    return _call(kernel, name, n_pairs // TILE, out, {13: 0} if gate else {}, args, interpret)


def _pair_mlp_fwd(gate, n_nodes, *args):
    return _forward(gate, n_nodes, *args), args


def _pair_mlp_bwd(gate, n_nodes, saved, gout):
    r, s, mask, hr, hs, d2, d0, we, b1, w2, b2, v, c = saved
    interpret, cdt = _interpret(), w2.dtype
    n_pairs, nf = r.shape[0], hr.shape[1]
    n_tiles = n_pairs // TILE
    f32 = jnp.float32
    outs = (jax.ShapeDtypeStruct(hr.shape, f32), jax.ShapeDtypeStruct(hs.shape, f32),
            jax.ShapeDtypeStruct((n_pairs, nf), cdt), jax.ShapeDtypeStruct((n_pairs, nf), cdt),
            jax.ShapeDtypeStruct((n_pairs,), f32), jax.ShapeDtypeStruct((n_pairs,), f32),
            jax.ShapeDtypeStruct((n_pairs,), f32)) + (jax.ShapeDtypeStruct((n_tiles, nf), f32),) * 5
    args = (r, s, d2, d0, mask, hr, hs, we, b1, w2, b2, v, c, w2.T, gout, jnp.zeros(hr.shape, f32),
            jnp.zeros(hs.shape, f32))
    kernel = functools.partial(_backward_kernel, gate=gate, cdt=cdt, interpret=interpret)
    name = "pair_sum_backward" if gate else "pair_scalar_backward"
    dhr, dhs, s1, dpre2, dd2, dd0, dlogit, *part = _call(kernel, name, n_tiles, outs, {15: 0, 16: 1}, args,
                                                         interpret)
    db1, dwd, dw0, db2, dv = (jnp.sum(p, axis=0) for p in part)
    dw2 = jnp.dot(s1.T, dpre2, preferred_element_type=f32).astype(w2.dtype)
    zero = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else None  # noqa: E731
    int_zero = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    dc = jnp.sum(dlogit, keepdims=True).astype(c.dtype) if gate else zero(c)
    return (int_zero(r), int_zero(s), zero(mask), dhr, dhs, dd2, dd0, jnp.stack([dwd, dw0]).astype(we.dtype),
            db1.astype(b1.dtype), dw2, db2.astype(b2.dtype), dv.astype(v.dtype), dc)


_pair_mlp.defvjp(_pair_mlp_fwd, _pair_mlp_bwd)


def _padded(n_pairs: int) -> int:
    return -(-n_pairs // TILE) * TILE


def _pad_pairs(n, *arrays):
    extra = _padded(n) - n
    if not extra:
        return arrays
    return tuple(jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1)) for a in arrays)


def pair_mlp_sum(hr, hs, d2, d0, w_attr, b1, w2, b2, v, c, receivers, senders, edge_mask):
    """sum_j silu(s1_ij W2 + b2) * sigmoid(. v + c) * mask_ij for every receiver i: [N, F] float32 (module
    docstring). hr, hs [N, F] float32; d2, d0, edge_mask [E]; w_attr [2, F]; b1, b2, v [F]; c [1]; w2 [F, F] in
    the compute type; receivers, senders [E] int32."""
    n = receivers.shape[0]
    r, s, mask, d2, d0 = _pad_pairs(n, receivers, senders, edge_mask, d2, d0)
    return _pair_mlp(True, hr.shape[0], r, s, mask, hr, hs, d2, d0, w_attr, b1, w2, b2, v, c)


def pair_mlp_scalar(hr, hs, d2, d0, w_attr, b1, w2, b2, v, receivers, senders):
    """silu(s1_ij W2 + b2) . v for every pair: [E] float32 (module docstring)."""
    n = receivers.shape[0]
    r, s, d2, d0 = _pad_pairs(n, receivers, senders, d2, d0)
    mask = jnp.ones(r.shape, jnp.float32)
    c = jnp.zeros((1,), jnp.float32)
    return _pair_mlp(False, hr.shape[0], r, s, mask, hr, hs, d2, d0, w_attr, b1, w2, b2, v, c)[:n]

