"""The pair kernels' array formulations (:mod:`molgen.nn.pairgrad`: the same arithmetic and rounding as XLA
operations) and the check that the kernels agree with them where they run, which training in the packed-kernel
layout runs once a process before it starts (:func:`molgen.steps.check_pair_kernels`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from molgen.data.batching import pack
from molgen.nn import pairgrad
from molgen.nn.pairgrad import dsilu
from molgen.nn.pairs import molecule_index, segment_sum


def first_layer_grad_xla(g, hr, hs, attrs, w, b, receivers, senders):
    """:func:`~molgen.nn.pairgrad.first_layer_grad` as array operations (its reference), on any pair list."""
    f32 = jnp.float32
    pre = hr[receivers].astype(f32) + hs[senders].astype(f32) + attrs[:, :1] * w[0] + attrs[:, 1:] * w[1] + b
    pre = pre.astype(g.dtype).astype(f32)
    gf = (g.astype(f32) * dsilu(pre)).astype(g.dtype).astype(f32)
    da = jnp.stack([jnp.sum(gf * w[0], axis=1), jnp.sum(gf * w[1], axis=1)], axis=-1)
    n = hr.shape[0]
    return (segment_sum(gf, receivers, n), segment_sum(gf, senders, n), da,
            jnp.stack([jnp.sum(gf * attrs[:, :1], 0), jnp.sum(gf * attrs[:, 1:], 0)]), gf.sum(0))


def gated_sum_grad_xla(p, b, v, c, mask, receivers, g_agg):
    """:func:`~molgen.nn.pairgrad.gated_sum_grad` as array operations, with its rounding (its reference)."""
    cdt, f32 = p.dtype, jnp.float32
    pre = (p.astype(f32) + b).astype(cdt).astype(f32)
    m = (pre * jax.nn.sigmoid(pre)).astype(cdt).astype(f32)
    gm = g_agg.astype(f32)[receivers] * mask[:, None]
    gate = jax.nn.sigmoid((jnp.sum(m * v, axis=1) + c[0]).astype(cdt).astype(f32))
    dlogit = jnp.sum(gm * m, axis=1) * gate * (1.0 - gate)
    gp = ((gm * gate[:, None] + dlogit[:, None] * v) * dsilu(pre)).astype(cdt)
    return gp, gp.astype(f32).sum(0), jnp.sum(dlogit[:, None] * m, axis=0), jnp.sum(dlogit, keepdims=True)


def check_kernels(dtype=jnp.bfloat16, features: int = 256, seed: int = 0) -> dict[str, float]:
    """The kernels against their array formulations (the same rounding) on small random molecules of this feature
    width and compute type, where they will run (on a GPU: the compiled kernels; a few seconds): each output's
    error relative to the reference (Euclidean norms), by name. RuntimeError if one is beyond
    :data:`CHECK_TOLERANCE` (a wrong gather, a lost row or a miscompiled kernel is off by order one)."""
    rng = np.random.default_rng(seed)
    f32 = jnp.float32
    sizes = np.concatenate([[pairgrad.MAX_ATOMS, 1, 2], rng.integers(1, pairgrad.MAX_ATOMS + 1, 9), [0, 0]])
    graph = packed_graph(sizes, pairgrad.TILE)
    n, p, n_real = len(graph.node_mask), len(graph.receivers), int(graph.edge_mask.sum())
    receivers, senders = jnp.asarray(graph.receivers), jnp.asarray(graph.senders)
    hr, hs = (jnp.asarray(rng.normal(size=(n, features)), dtype) for _ in range(2))
    attrs = jnp.asarray(rng.uniform(0, 9, size=(p, 2)), f32)
    w, b = jnp.asarray(0.3 * rng.normal(size=(2, features)), f32), jnp.asarray(rng.normal(size=features), f32)
    g = jnp.asarray(rng.normal(size=(p, features)) * (np.arange(p) < n_real)[:, None], dtype)  # padding: 0
    tune = pairgrad.tuning()  # the launch settings now (a jit of the bare function would keep its first trace's)
    got = jax.jit(functools.partial(pairgrad.first_layer_grad, tune=tune))(g, hr, hs, attrs, w, b,
                                                                          molecule_index(graph.n_atoms))
    want = jax.jit(first_layer_grad_xla)(g, hr, hs, attrs, w, b, receivers, senders)
    names = ["first_layer.receivers", "first_layer.senders", "first_layer.attrs", "first_layer.weights",
             "first_layer.bias"]
    errors = dict(zip(names, map(relative_error, got, want)))
    mask = jnp.asarray((rng.uniform(size=p) < 0.9) & (np.arange(p) < n_real), f32)  # padding pairs masked
    g_agg = jnp.asarray(rng.normal(size=(n, features)), f32)
    args = (g, b, jnp.asarray(0.3 * rng.normal(size=features), f32), jnp.asarray([0.2], f32), mask)
    got = jax.jit(functools.partial(pairgrad.gated_sum_grad, tune=tune))(*args, receivers, g_agg)
    want = jax.jit(gated_sum_grad_xla)(*args, receivers, g_agg)
    names = ["gated_sum.pairs", "gated_sum.bias", "gated_sum.gate_weights", "gated_sum.gate_bias"]
    errors.update(zip(names, map(relative_error, got, want)))
    tol = CHECK_TOLERANCE["bf16" if dtype == jnp.bfloat16 else "float32"]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise RuntimeError("the pair kernels disagree with their array formulations: "
                           + ", ".join(f"{k} {v:.2e}" for k, v in bad.items()) + f" (tolerance {tol:.0e})")
    return errors


# Measured in Pallas's interpreter (2026-12-04, 32, 64 and 256 features): bf16 up to 2.5e-3 (the gate's weights:
# a logit summed in another order rounds to the next bfloat16 in a few rows), float32 below 1e-6.
CHECK_TOLERANCE = {"bf16": 3e-2, "float32": 1e-4}


def packed_graph(sizes, multiple: int = 1):
    """Molecules of these sizes (no positions) packed as training packs them (:func:`molgen.data.batching.pack`:
    the pairs (i, j), j != i, of each molecule by receiver, then sender, then padding pairs on the padding nodes),
    their pairs padded to a multiple of ``multiple``."""
    sizes = np.asarray(sizes, np.int64)
    real = int((sizes * (sizes - 1)).sum())
    return pack(None, [np.zeros(int(n), np.int32) for n in sizes], pad_edges=-(-real // multiple) * multiple)


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| (Euclidean norms, float32)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
