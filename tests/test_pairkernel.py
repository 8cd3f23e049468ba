"""The fused pair kernels (molgen.nn.pairkernel), run in Pallas's interpreter on the CPU: values and gradients
against the plain formulation, padding, and the EGNN with them against the EGNN without (same parameters).
Their speed on a GPU is measured by benchmarks/train_step.py (layout fused), not here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, random_molecules, random_rotation, tiny_config

from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.nn import pairkernel as pk
from molgen.nn.egnn import EGNN, EGNNConfig, remove_mean


def _pairs_of(sizes, n_nodes, n_pad_pairs):
    r, s, o = [], [], 0
    for k in sizes:
        for i in range(k):
            for j in range(k):
                if i != j:
                    r.append(o + i)
                    s.append(o + j)
        o += k
    n_real = len(r)
    r += [n_nodes - 1] * n_pad_pairs
    s += [n_nodes - 1] * n_pad_pairs
    mask = np.r_[np.ones(n_real), np.zeros(n_pad_pairs)].astype(np.float32)
    return np.array(r, np.int32), np.array(s, np.int32), mask


def _inputs(rng, nf, n_nodes, n_pairs):
    f = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)  # noqa: E731
    return dict(hr=f(n_nodes, nf), hs=f(n_nodes, nf), d2=jnp.abs(f(n_pairs)), d0=jnp.abs(f(n_pairs)),
                w_attr=f(2, nf, scale=0.3), b1=f(nf, scale=0.1), w2=f(nf, nf, scale=nf**-0.5), b2=f(nf, scale=0.1),
                v=f(nf, scale=nf**-0.5), c=f(1))


# The plain formulation the kernels compute: gathered rows, both layers as array operations, the gate and the
# neighbour sum by segment_sum.
def _plain_m(hr, hs, d2, d0, w_attr, b1, w2, b2, receivers, senders):
    pre1 = hr[receivers] + hs[senders] + d2[:, None] * w_attr[0] + d0[:, None] * w_attr[1] + b1
    s1 = jax.nn.silu(pre1.astype(w2.dtype).astype(jnp.float32)).astype(w2.dtype)
    return jax.nn.silu(jnp.dot(s1, w2, preferred_element_type=jnp.float32) + b2)


def plain_sum(hr, hs, d2, d0, w_attr, b1, w2, b2, v, c, receivers, senders, edge_mask):
    m = _plain_m(hr, hs, d2, d0, w_attr, b1, w2, b2, receivers, senders)
    g = jax.nn.sigmoid(m @ v + c[0]) * edge_mask
    return jax.ops.segment_sum(m * g[:, None], receivers, num_segments=hr.shape[0])


def plain_scalar(hr, hs, d2, d0, w_attr, b1, w2, b2, v, receivers, senders):
    return _plain_m(hr, hs, d2, d0, w_attr, b1, w2, b2, receivers, senders) @ v


# (compute type, relative tolerance of values and gradients): float32 checks the algebra (products and sums in
# another order only); bfloat16 rounds where the plain formulation rounds, but its gradients are rounded to
# bfloat16 at other points (the second layer's pre-activation gradient), 4e-3 of the largest value measured
TOLS = [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]


@pytest.mark.parametrize("cdt,tol,cols", [TOLS[0] + (64,), TOLS[0] + (8,), TOLS[1] + (8,)])
def test_sum_kernel_matches_plain_formulation(cdt, tol, cols, monkeypatch):
    """cols: the second layer's output columns per product, one block (64) or four (8)."""
    monkeypatch.setattr(pk, "COLS", cols)
    rng = np.random.default_rng(0)
    n_nodes, nf = 32, 32
    r, s, mask = _pairs_of((10, 13, 6), n_nodes, 37)  # 37 padding pairs on the last padding row; not a tile multiple
    x = _inputs(rng, nf, n_nodes, len(r))
    x["w2"] = x["w2"].astype(cdt)
    got = pk.pair_mlp_sum(**x, receivers=r, senders=s, edge_mask=mask)
    want = plain_sum(**x, receivers=r, senders=s, edge_mask=mask)
    assert got.shape == (n_nodes, nf) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=tol * float(jnp.abs(want).max()))
    assert np.all(np.asarray(got)[29:] == 0)  # padding rows receive only masked (zero) messages

    weights = jnp.asarray(rng.normal(size=(n_nodes, nf)), jnp.float32)
    names = ("hr", "hs", "d2", "d0", "w_attr", "b1", "w2", "b2", "v", "c")

    def loss(fn, *args):
        kw = dict(zip(names, args))
        kw["w2"] = kw["w2"].astype(cdt)
        return jnp.sum(fn(**kw, receivers=r, senders=s, edge_mask=mask) * weights)

    args = [x[n].astype(jnp.float32) for n in names]
    g_got = jax.grad(loss, argnums=tuple(range(1, 11)))(pk.pair_mlp_sum, *args)
    g_want = jax.grad(loss, argnums=tuple(range(1, 11)))(plain_sum, *args)
    for name, a, b in zip(names, g_got, g_want):
        assert a.shape == b.shape, name
        assert float(jnp.abs(b).max()) > 0, name
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("cdt,tol", TOLS)
def test_scalar_kernel_matches_plain_formulation(cdt, tol, monkeypatch):
    monkeypatch.setattr(pk, "COLS", 16)
    rng = np.random.default_rng(1)
    n_nodes, nf = 24, 32
    r, s, _ = _pairs_of((9, 11), n_nodes, 5)
    x = _inputs(rng, nf, n_nodes, len(r))
    del x["c"]
    x["w2"] = x["w2"].astype(cdt)
    got = pk.pair_mlp_scalar(**x, receivers=r, senders=s)
    want = plain_scalar(**x, receivers=r, senders=s)
    assert got.shape == (len(r),)
    np.testing.assert_allclose(got, want, atol=tol * float(jnp.abs(want).max()))

    weights = jnp.asarray(rng.normal(size=len(r)), jnp.float32)
    names = ("hr", "hs", "d2", "d0", "w_attr", "b1", "w2", "b2", "v")

    def loss(fn, *args):
        kw = dict(zip(names, args))
        kw["w2"] = kw["w2"].astype(cdt)
        return jnp.sum(fn(**kw, receivers=r, senders=s) * weights)

    args = [x[n].astype(jnp.float32) for n in names]
    g_got = jax.grad(loss, argnums=tuple(range(1, 10)))(pk.pair_mlp_scalar, *args)
    g_want = jax.grad(loss, argnums=tuple(range(1, 10)))(plain_scalar, *args)
    for name, a, b in zip(names, g_got, g_want):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(b).max()), err_msg=name)


def test_supported_widths():
    assert [n for n in (8, 16, 24, 32, 64, 96, 128, 256) if pk.supported(n)] == [16, 32, 64, 128, 256]


CFG = EGNNConfig(nf=32, n_layers=1)  # one block: its edge MLP and its coordinate MLP


def _setup(rng, cfg=CFG, sizes=(5, 9, 3)):
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    h = type_features(g.types, g.node_mask, np)
    cond = np.where(g.node_mask > 0, rng.uniform(size=g.node_mask.shape), 0).astype(np.float32)
    params = EGNN(cfg).init(jax.random.PRNGKey(0), g.positions, h, cond, g)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    return params, g, h, cond


def _apply(net, params, g, x, h, cond):
    return jax.jit(net.apply)(params, jnp.asarray(x), jnp.asarray(h), jnp.asarray(cond), g)


def _max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_egnn_with_pair_kernels_has_the_same_parameters_and_outputs():
    """The same parameter tree and fresh values; outputs and gradients as the bf16 EGNN without the kernels, and as
    close to float32's within a factor 2 (both round to bfloat16, at places that differ in the gradient; measured,
    as a fraction of the largest value: kernels against plain bf16 1.6 % and 0.35 % (outputs), 0.85 % (worst
    gradient); against float32 0.46 %, 0.27 %, 1.3 %, where plain bf16 is 2.0 %, 0.29 %, 1.6 % off); masks and
    equivariance hold."""
    rng = np.random.default_rng(5)
    params, g, h, cond = _setup(rng)
    exact = EGNN(CFG)
    plain, fused = EGNN(CFG, dtype=jnp.bfloat16), EGNN(CFG, dtype=jnp.bfloat16, pair_kernel=True)
    fresh = [net.init(jax.random.PRNGKey(3), g.positions, h, cond, g) for net in (exact, fused)]
    assert jax.tree_util.tree_structure(fresh[0]) == jax.tree_util.tree_structure(fresh[1])
    for a, b in zip(jax.tree_util.tree_leaves(fresh[0]), jax.tree_util.tree_leaves(fresh[1])):
        np.testing.assert_array_equal(a, b)

    got, ref, f32 = (_apply(net, params, g, g.positions, h, cond) for net in (fused, plain, exact))
    for a, b, c in zip(got, ref, f32):
        scale = float(np.abs(c).max())
        assert scale > 1e-3
        np.testing.assert_allclose(a, b, atol=3e-2 * scale)
        assert _max_err(a, c) <= 2 * _max_err(b, c) + 1e-6 * scale
    vel, hout = got
    scale_v, scale_h = float(np.abs(vel).max()), float(np.abs(hout).max())
    n_real = int(g.node_mask.sum())
    assert np.all(np.asarray(vel)[n_real:] == 0) and np.all(np.asarray(hout)[n_real:] == 0)

    q = random_rotation(rng, True)
    shifted = ((g.positions @ q.T) + rng.normal(size=3) * 5 * g.node_mask[:, None]).astype(np.float32)
    x2 = np.asarray(remove_mean(jnp.asarray(shifted), g.node_mask, g.segment, g.n_atoms.shape[0]))
    vel2, hout2 = _apply(fused, params, g, x2, h, cond)
    np.testing.assert_allclose(vel2, np.asarray(vel) @ q.T, atol=1e-2 * scale_v)
    np.testing.assert_allclose(hout2, hout, atol=1e-2 * scale_h)

    def loss(net, p):
        v, o = net.apply(p, jnp.asarray(g.positions), jnp.asarray(h), jnp.asarray(cond), g)
        return (v**2).sum() + (o**2).sum()

    grads = [jax.tree_util.tree_leaves(jax.jit(jax.grad(lambda p, n=n: loss(n, p)))(params))
             for n in (fused, plain, exact)]
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    worst = {"fused": 0.0, "plain": 0.0}  # the largest error of any parameter's gradient against float32's
    for path, a, b, c in zip(paths, *grads):
        scale = float(np.abs(c).max())
        np.testing.assert_allclose(a, b, atol=3e-2 * scale + 1e-8, err_msg=path)
        worst["fused"] = max(worst["fused"], _max_err(a, c) / scale)
        worst["plain"] = max(worst["plain"], _max_err(b, c) / scale)
    assert worst["fused"] <= 2 * worst["plain"], worst


def test_the_gpu_benchmarks_check_of_the_fused_layout_passes_and_catches_a_lost_sum(mini_ds, monkeypatch):
    """benchmarks/train_step.py --check-fused: the fused layout's loss and gradients on one batch against the packed
    layout's; the GPU run trains in the fused layout only after it passed. A kernel that loses half its atomic adds
    fails it."""
    from molgen.data.batching import BatchSampler
    from molgen.data.device import dense_set, make_plan, put
    from molgen.state import init_state

    bench = load_script("benchmarks/train_step.py")
    cfg = tiny_config(mini_ds, batch_size=4, precision="bf16", layout="fused")
    ids = mini_ds.split("train")
    sampler = BatchSampler(ids, 4, seed=0)
    plan = make_plan("fused", mini_ds.n_atoms, sampler, 1)
    idx = sampler.indices(0)[None, :]  # [devices, batch]
    row_of = np.zeros(len(mini_ds.n_atoms), np.int32)
    row_of[ids] = np.arange(len(ids))  # dense_set's row of each molecule
    rows = jnp.asarray(plan.arrange(row_of[idx], idx))
    args = (cfg, plan, put(dense_set(mini_ds, ids)), rows, init_state(cfg).params, jax.random.PRNGKey(0), "tiny")
    line = bench.check_fused(*args)
    assert line.startswith("CHECK fused tiny batch=4 loss_rel=") and line.endswith(" ok"), line
    agree = dict(kv.split("=") for kv in line.split()[4:7])
    assert float(agree["loss_rel"]) < bench.FUSED_TOLERANCE["loss"] / 10
    assert float(agree["grad_rel_all"]) < bench.FUSED_TOLERANCE["grad_all"] / 5
    assert float(agree["grad_rel_max"]) < bench.FUSED_TOLERANCE["grad_max"] / 2

    add_rows = pk._add_rows
    monkeypatch.setattr(pk, "_add_rows", lambda ref, r, c, val, interpret: add_rows(ref, r, c, val.at[::2].set(0), interpret))
    with pytest.raises(RuntimeError, match="CHECK fused kernels disagree with the packed layout: tiny batch=4"):
        bench.check_fused(*args)
