"""The pair MLPs' gradients as GPU kernels of molgen's own (Pallas, Triton back end), for training on packed
batches (``optim.layout = "packed-kernel"``). Both are memory-bound passes over [pairs, features] arrays, without
matrix products, where XLA makes several (docs/performance.md).

**The first layer** of each of a block's two pair MLPs (:class:`molgen.nn.egnn.EdgeInput`, split) is

    m = silu(pre),  pre = hr[i] + hs[j] + a0_ij w0 + a1_ij w1 + b      (rounded to the compute type before silu)

with hr = h W_r and hs = h W_s per node and two edge attributes a0, a1 (squared distances). Its backward pass
takes the gradient ``g`` of m to ``gp = g * silu'(pre)`` and from it to the node rows' gradients (sums of ``gp``
by receiver and by sender), the bias' and the attribute weights' gradients (sums over the pair rows of ``gp``,
``gp a0``, ``gp a1``) and the attributes' (sums over the features of ``gp w0``, ``gp w1``). XLA writes ``gp``,
then reads it four times: for the weights' sums, the attributes' gradients and the two scatter-adds into the
node rows (the senders' over the reversed pairs, :func:`molgen.nn.pairs.sender_rows`). :func:`first_layer_grad`
reads ``g`` once and writes no [pairs, features] array: a program takes one molecule (its pairs are rows
(i, j), j != i, by receiver, then sender, after the molecules before it) and 32 features (:class:`Tuning`), a tile of
consecutive pair rows at a time, computes ``pre`` again from the node rows and adds the tile into the receivers'
and the senders' sums with one-hot products (tensor cores), written when the molecule is done: no atomic adds
(every node row belongs to one molecule).

**The edge MLP's gated messages** summed into their receivers (:func:`gated_sum`, :class:`molgen.nn.egnn.GCL`
with attention): ``m = silu(p + b)`` from the second layer's product ``p``, the gate ``sigmoid(m . v + c)``.
The forward pass is XLA's, writing no messages (the logits, then the sums with a scatter-add, the messages
computed again from ``p``); the backward pass, :func:`gated_sum_grad`, computes the gate's logit and gradient
over each tile's features with the forward pass's rounding, then the gradient of ``p`` and the column sums of
``b`` and ``v``.

Off a GPU the kernels run in Pallas's interpreter (slow; for tests): tests/test_pairgrad.py compares them with
their array formulations (:mod:`molgen.nn.kernelcheck`), which :func:`molgen.nn.kernelcheck.check_kernels` also
does on a GPU before training.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from molgen import MolgenError
from molgen.nn.pairs import gather_rows, segment_sum

MAX_ATOMS = 32  # the first layer's kernel: atoms a molecule may have, and pair rows a tile takes
TILE = 128  # the gated gradient's kernel: pair rows a kernel instance takes (the pair count must be a multiple)
INTERPRET: bool | None = None  # None: Pallas's interpreter where JAX's default backend is not a GPU
TUNING_ENV = "MOLGEN_PAIR_KERNELS"
_ALLOWED = {"cols": (16, 32, 64, 128), "warps": (1, 2, 4, 8, 16), "stages": (1, 2, 3, 4), "tanh": (0, 1)}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the kernels are launched: the features a program's tile takes at a time (``*_cols``), its warps and
    Triton's software-pipelining stages, for the first layer's kernel and the gated gradient's (their speed, not
    their results); and ``*_tanh`` = 1: in bf16 training, silu's sigmoid as ``0.5 + 0.5 tanh(x / 2)`` with the
    GPU's ``tanh.approx.f32`` (one instruction instead of a precise exponential and a division; relative error
    ~5e-4, under bfloat16's rounding; ``jnp.tanh`` in Pallas's interpreter). The defaults, [32, 32] tiles (first
    layer) and [128, 32] tiles (gated gradient) with 4 warps, use 128 registers a thread without spilling
    (``ptxas -v`` for an H200). ``$MOLGEN_PAIR_KERNELS`` overrides them, e.g. ``first_warps=8,first_tanh=1``
    (:func:`tuning`; benchmarks/pair_kernels.py measures them)."""

    first_cols: int = 32
    first_warps: int = 4
    first_stages: int = 1
    first_tanh: int = 0
    gated_cols: int = 32
    gated_warps: int = 4
    gated_stages: int = 1
    gated_tanh: int = 0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            allowed = _ALLOWED[name.split("_")[1]]
            if value not in allowed:
                raise MolgenError(f"{TUNING_ENV}: {name} must be one of {', '.join(map(str, allowed))}, got {value}")

    def text(self) -> str:
        """The form ``$MOLGEN_PAIR_KERNELS`` takes (every field)."""
        return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def parse_tuning(text: str) -> Tuning:
    """A :class:`Tuning` from ``key=value`` pairs separated by commas (missing keys keep their defaults)."""
    names, kw = {f.name for f in dataclasses.fields(Tuning)}, {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in names or not value.isdigit():
            raise MolgenError(f"{TUNING_ENV}: expected key=number pairs with keys {', '.join(sorted(names))}; "
                              f"got {item!r}")
        kw[key] = int(value)
    return Tuning(**kw)


def tuning() -> Tuning:
    """The kernels' launch settings: ``$MOLGEN_PAIR_KERNELS`` over :class:`Tuning`'s defaults (read when a
    network is traced)."""
    return parse_tuning(os.environ.get(TUNING_ENV, ""))


def supported(n_pairs: int, features: int, n_attrs: int, tune: Tuning | None = None) -> bool:
    """Whether the kernels take these shapes (else the caller keeps XLA's gradient)."""
    tune = tune or tuning()
    return (n_pairs % TILE == 0 and features % tune.first_cols == 0 and features % tune.gated_cols == 0
            and n_attrs == 2)


def dsilu(x, sigmoid=jax.nn.sigmoid):
    """The derivative of silu at x."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _sigmoid(tanh: bool, interpret: bool):
    """The kernels' sigmoid: precise, or through tanh (:class:`Tuning`)."""
    if not tanh:
        return jax.nn.sigmoid
    if interpret:
        return lambda x: 0.5 + 0.5 * jnp.tanh(0.5 * x)
    from jax.experimental.pallas import triton as plgpu

    return lambda x: 0.5 + 0.5 * plgpu.approx_tanh(0.5 * x)


def _interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() != "gpu" if INTERPRET is None else INTERPRET
    return interpret


def _call(kernel, name: str, out_shape, grid: tuple[int, ...], interpret: bool | None, warps: int, stages: int):
    """The kernel over ``grid``: compiled by Triton with ``warps`` and ``stages``, or run in Pallas's interpreter
    (``interpret``; None: :data:`INTERPRET`)."""
    from jax.experimental import pallas as pl

    interpret, kw = _interpret(interpret), {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name, **kw)


def _zeros_after(start, n_rows, views):
    """Zeros in rows ``start`` to ``n_rows`` of outputs: ``views`` map a ``pl.ds`` of rows to a ref's view
    ([rows] or [rows, columns])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    k = jax.lax.broadcasted_iota(jnp.int32, (MAX_ATOMS,), 0)

    def rows(t, carry):
        first = start + t * MAX_ATOMS
        for view in views:
            ref = view(pl.ds(first, MAX_ATOMS))
            mask = jnp.broadcast_to((first + k < n_rows).reshape(MAX_ATOMS, *[1] * (ref.ndim - 1)), ref.shape)
            plgpu.store(ref, jnp.zeros(ref.shape, jnp.float32), mask=mask)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(n_rows - start, MAX_ATOMS), rows, 0)


def _layer_kernel(n_ref, ns_ref, ps_ref, g_ref, a0_ref, a1_ref, hr_ref, hs_ref, w_ref, b_ref,
                  dhr_ref, dhs_ref, da0_ref, da1_ref, sb_ref, sw0_ref, sw1_ref, *, cdt, width, sigmoid):
    """The first layer's backward pass over one molecule's pairs and ``width`` features, a tile of
    :data:`MAX_ATOMS` consecutive pair rows at a time (pair (i, j) by receiver i, then sender j != i): the tiles'
    sums by receiver and by sender as products with one-hot matrices [atoms, rows] (tensor cores; float32 rows
    split into three bfloat16 parts, which the products add exactly), kept in registers until the molecule is
    done; the program of the last (padding) graph writes zeros after the molecules."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, c = pl.program_id(0), pl.program_id(1)
    n, ns, ps = n_ref[m], ns_ref[m], ps_ref[m]
    (n_pairs, _), n_nodes, f32, bf16 = g_ref.shape, hs_ref.shape[0], jnp.float32, jnp.bfloat16
    cols = pl.ds(pl.multiple_of(c * width, width), width)
    k = jax.lax.broadcasted_iota(jnp.int32, (MAX_ATOMS,), 0)
    w0, w1, bias = w_ref[0, cols], w_ref[1, cols], b_ref[cols]
    others = jnp.maximum(n - 1, 1)

    def tile(t, acc):
        by_receiver, by_sender, sw0, sw1 = acc
        pair = t * MAX_ATOMS + k  # within the molecule
        valid = pair < n * (n - 1)
        rows, tile_valid = pl.ds(ps + t * MAX_ATOMS, MAX_ATOMS), jnp.broadcast_to(valid[:, None], (MAX_ATOMS, width))
        i = pair // others
        j = pair - i * others
        j = j + (j >= i).astype(jnp.int32)
        a0 = plgpu.load(a0_ref.at[rows], mask=valid, other=0.0)
        a1 = plgpu.load(a1_ref.at[rows], mask=valid, other=0.0)
        g = plgpu.load(g_ref.at[rows, cols], mask=tile_valid, other=0.0).astype(f32)
        pre = (hr_ref[jnp.minimum(ns + i, n_nodes - 1), cols].astype(f32)
               + hs_ref[jnp.minimum(ns + j, n_nodes - 1), cols].astype(f32)
               + a0[:, None] * w0[None, :] + a1[:, None] * w1[None, :] + bias[None, :])
        pre = pre.astype(cdt).astype(f32)  # the forward pass's rounding
        gp = jnp.where(tile_valid, (g * dsilu(pre, sigmoid)).astype(cdt).astype(f32), 0.0)
        plgpu.store(da0_ref.at[c, rows], jnp.sum(gp * w0[None, :], axis=1), mask=valid)
        plgpu.store(da1_ref.at[c, rows], jnp.sum(gp * w1[None, :], axis=1), mask=valid)
        at_i = ((i[None, :] == k[:, None]) & valid[None, :]).astype(bf16)  # [atom, row]
        at_j = ((j[None, :] == k[:, None]) & valid[None, :]).astype(bf16)
        rest = gp
        for _ in range(1 if cdt == jnp.bfloat16 else 3):  # bf16 parts of the rows: exact in sum
            part = rest.astype(bf16)
            rest = rest - part.astype(f32)
            by_receiver = by_receiver + jnp.dot(at_i, part, preferred_element_type=f32)
            by_sender = by_sender + jnp.dot(at_j, part, preferred_element_type=f32)
        return by_receiver, by_sender, sw0 + gp * a0[:, None], sw1 + gp * a1[:, None]

    zero = jnp.zeros((MAX_ATOMS, width), f32)
    by_receiver, by_sender, sw0, sw1 = jax.lax.fori_loop(0, pl.cdiv(n * (n - 1), MAX_ATOMS), tile,
                                                         (zero, zero, zero, zero))
    atoms = jnp.broadcast_to((k < n)[:, None], (MAX_ATOMS, width))
    plgpu.store(dhr_ref.at[pl.ds(ns, MAX_ATOMS), cols], by_receiver, mask=atoms)
    plgpu.store(dhs_ref.at[pl.ds(ns, MAX_ATOMS), cols], by_sender, mask=atoms)
    sb_ref[m, cols] = jnp.sum(by_receiver, axis=0)
    sw0_ref[m, cols], sw1_ref[m, cols] = jnp.sum(sw0, axis=0), jnp.sum(sw1, axis=0)

    @pl.when(m == pl.num_programs(0) - 1)
    def _():  # zeros after the last molecule's node rows and pair rows (padding)
        _zeros_after(ns + n, n_nodes, [lambda r: dhr_ref.at[r, cols], lambda r: dhs_ref.at[r, cols]])
        _zeros_after(ps + n * (n - 1), n_pairs, [lambda r: da0_ref.at[c, r], lambda r: da1_ref.at[c, r]])


def first_layer_grad(g, hr, hs, attrs, w, b, molecules, interpret: bool | None = None, tune: Tuning | None = None):
    """(receivers' gradient [N, F], senders' [N, F], both float32; the attributes' [P, 2], weights' [2, F],
    bias' [F]) of the first pair layer (module docstring), from ``g`` [P, F] (the gradient of its output, in the
    compute type; zero on padding pairs), the node products ``hr``, ``hs`` [N, F] (float32 or the compute type),
    ``attrs`` [P, 2], its attribute weights ``w`` [2, F], bias ``b`` [F] and ``molecules``
    (:func:`molgen.nn.pairs.molecule_index` of a packed graph whose last graph is empty, molecules of at most
    :data:`MAX_ATOMS` atoms). ``interpret``: Pallas's interpreter (None: :data:`INTERPRET`); ``tune``: launch
    settings (None: :func:`tuning`)."""
    (n_pairs, nf), n_nodes, n_graphs, f32 = g.shape, hr.shape[0], molecules[0].shape[0], jnp.float32
    tune = tune or tuning()
    width = tune.first_cols
    out_shape = (*[jax.ShapeDtypeStruct((n_nodes, nf), f32)] * 2,
                 *[jax.ShapeDtypeStruct((nf // width, n_pairs), f32)] * 2,
                 *[jax.ShapeDtypeStruct((n_graphs, nf), f32)] * 3)
    d_hr, d_hs, da0, da1, sb, sw0, sw1 = _call(
        functools.partial(_layer_kernel, cdt=g.dtype, width=width,
                          sigmoid=_sigmoid(tune.first_tanh and g.dtype == jnp.bfloat16, _interpret(interpret))),
        "first_pair_layer_grad", out_shape,
        (n_graphs, nf // width), interpret, tune.first_warps, tune.first_stages,
    )(*molecules, g, attrs[:, 0].astype(f32), attrs[:, 1].astype(f32), hr, hs, w.astype(f32), b.astype(f32))
    return d_hr, d_hs, jnp.stack([da0.sum(0), da1.sum(0)], -1), jnp.stack([sw0.sum(0), sw1.sum(0)]), sb.sum(0)


def _first_layer_sum(hr, hs, attrs, w, b, index):
    receivers, senders, _ = index  # as EdgeInput adds them up (the same rounding)
    hr, hs = hr.astype(jnp.float32), hs.astype(jnp.float32)
    return gather_rows(hr, receivers, sorted_ids=True) + hs[senders] + sum(
        attrs[:, k : k + 1] * w[k] for k in range(attrs.shape[-1])) + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def pair_layer(hr, hs, attrs, w, b, index, dtype):
    """``silu(pre)``, ``pre`` (module docstring) rounded to ``dtype``, whose gradient is :func:`first_layer_grad`'s
    kernel. ``index``: (receivers, senders, molecules) of a packed graph (:meth:`molgen.nn.pairs.Pairs.index`)."""
    return jax.nn.silu(_first_layer_sum(hr, hs, attrs, w, b, index).astype(dtype))


def _pair_layer_fwd(hr, hs, attrs, w, b, index, dtype):
    return pair_layer(hr, hs, attrs, w, b, index, dtype), (hr, hs, attrs, w, b, index[2])


def _pair_layer_bwd(dtype, res, g):
    hr, hs, attrs, w, b, molecules = res
    d_hr, d_hs, d_attrs, d_w, d_b = first_layer_grad(g.astype(dtype), hr, hs, attrs, w, b, molecules)
    return d_hr.astype(hr.dtype), d_hs.astype(hs.dtype), d_attrs.astype(attrs.dtype), d_w, d_b, None


pair_layer.defvjp(_pair_layer_fwd, _pair_layer_bwd)


def _gated_kernel(p_ref, r_ref, mask_ref, ga_ref, b_ref, v_ref, c_ref, gp_ref, sb_ref, sv_ref, sc_ref, *, cdt, width,
                  sigmoid):
    """The backward pass of a tile of :func:`gated_sum`: a first pass over the column blocks for the gate's
    logit and its gradient (sums over all features), a second for the rows' gradient and the column sums."""
    from jax.experimental import pallas as pl

    i = pl.program_id(0)
    rows = pl.ds(pl.multiple_of(i * TILE, TILE), TILE)
    r, mask = r_ref[rows], mask_ref[rows]
    f32, blocks = jnp.float32, p_ref.shape[1] // width

    def message(k):
        cols = pl.ds(pl.multiple_of(k * width, width), width)
        pre = (p_ref[rows, cols].astype(f32) + b_ref[cols][None, :]).astype(cdt).astype(f32)
        m = (pre * sigmoid(pre)).astype(cdt).astype(f32)  # the forward pass's rounding
        return cols, pre, m, ga_ref[r, cols] * mask[:, None]

    def gate_block(k, carry):
        cols, _, m, gm = message(k)
        return carry[0] + jnp.sum(m * v_ref[cols][None, :], axis=1), carry[1] + jnp.sum(gm * m, axis=1)

    zero = jnp.zeros((TILE,), f32)
    logit, dgate = jax.lax.fori_loop(0, blocks, gate_block, (zero, zero))
    gate = jax.nn.sigmoid((logit + c_ref[0]).astype(cdt).astype(f32))
    dlogit = dgate * gate * (1.0 - gate)

    def grad_block(k, carry):
        cols, pre, m, gm = message(k)
        gp = ((gm * gate[:, None] + dlogit[:, None] * v_ref[cols][None, :]) * dsilu(pre, sigmoid)).astype(cdt)
        gp_ref[rows, cols] = gp
        sb_ref[i, cols] = jnp.sum(gp.astype(f32), axis=0)
        sv_ref[i, cols] = jnp.sum(dlogit[:, None] * m, axis=0)
        return carry

    jax.lax.fori_loop(0, blocks, grad_block, 0)
    sc_ref[i] = jnp.sum(dlogit)


def gated_sum_grad(p, b, v, c, mask, receivers, g_agg, interpret: bool | None = None, tune: Tuning | None = None):
    """(gradient of ``p`` [P, F] in p's dtype, of ``b`` [F], ``v`` [F], ``c`` [1]) of :func:`gated_sum`, given
    the gradient ``g_agg`` [N, F] of its sums; ``tune`` as :func:`first_layer_grad`'s."""
    n_pairs, nf = p.shape
    tiles, f32, tune = n_pairs // TILE, jnp.float32, tune or tuning()
    out_shape = (jax.ShapeDtypeStruct((n_pairs, nf), p.dtype), *[jax.ShapeDtypeStruct((tiles, nf), f32)] * 2,
                 jax.ShapeDtypeStruct((tiles,), f32))
    gp, sb, sv, sc = _call(
        functools.partial(_gated_kernel, cdt=p.dtype, width=tune.gated_cols,
                          sigmoid=_sigmoid(tune.gated_tanh and p.dtype == jnp.bfloat16, _interpret(interpret))),
        "gated_sum_grad", out_shape, (tiles,),
        interpret, tune.gated_warps, tune.gated_stages,
    )(p, receivers, mask.astype(f32), g_agg.astype(f32), b.astype(f32), v.astype(f32), c.astype(f32))
    return gp, sb.sum(0), sv.sum(0), sc.sum(0, keepdims=True)


def gated_messages(p, b, v, c, mask, dtype):
    """The gated messages ``m sigmoid(m . v + c) mask``, ``m = silu(p + b)`` in ``dtype`` from the second layer's
    product ``p`` [P, F] (XLA fuses them with their sums and never writes them)."""
    m = jax.nn.silu(p + b.astype(dtype))
    logit = (jnp.sum(m.astype(jnp.float32) * v, axis=-1, keepdims=True) + c).astype(dtype)
    return (m * jax.nn.sigmoid(logit)).astype(jnp.float32) * mask[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def gated_sum(p, b, v, c, mask, receivers, n_nodes, dtype):
    """The edge MLP's gated messages (:func:`gated_messages`) summed into their (sorted) receivers, as
    :class:`molgen.nn.egnn.GCL` computes them; [N, F] float32. Its gradient is one kernel
    (:func:`gated_sum_grad`), which computes the messages and the gate again from ``p`` instead of reading them:
    the forward pass writes no [pairs, features] array."""
    return segment_sum(gated_messages(p, b, v, c, mask, dtype), receivers, n_nodes, sorted_ids=True)


def _gated_sum_fwd(p, b, v, c, mask, receivers, n_nodes, dtype):
    return gated_sum(p, b, v, c, mask, receivers, n_nodes, dtype), (p, b, v, c, mask, receivers)


def _gated_sum_bwd(n_nodes, dtype, res, g):
    p, b, v, c, mask, receivers = res
    gp, gb, gv, gc = gated_sum_grad(p, b, v, c, mask, receivers, g)
    return gp, gb.astype(b.dtype), gv.astype(v.dtype), gc.astype(c.dtype), jnp.zeros_like(mask), None


gated_sum.defvjp(_gated_sum_fwd, _gated_sum_bwd)
