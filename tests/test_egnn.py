"""Equivariance, permutation, masking and fast-path tests for the EGNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation

from molgen.data.batching import _pairs, pack
from molgen.data.features import type_features
from molgen.nn.egnn import EGNN, PRESETS, EGNNConfig, remove_mean

CFG = EGNNConfig(nf=32, n_layers=3, inv_sublayers=2)


def _features(types, mask):
    return type_features(types, mask, np)


def dense_graph(positions, types, mask):
    """The plain formulation: B molecules padded to n_max rows each, all n_max**2 - n_max pairs, masked."""
    from molgen.data.batching import Graph

    b, n_max = mask.shape
    n_pad = b * n_max + 1
    i, j = _pairs(n_max)
    offs = (np.arange(b, dtype=np.int32) * n_max)[:, None]
    m = mask.astype(np.float32)
    pos = np.zeros((n_pad, 3), np.float32)
    pos[:-1] = positions.reshape(-1, 3)
    typ = np.zeros(n_pad, np.int32)
    typ[:-1] = types.reshape(-1)
    node_mask = np.zeros(n_pad, np.float32)
    node_mask[:-1] = m.reshape(-1)
    segment = np.full(n_pad, b, np.int32)
    segment[:-1] = np.repeat(np.arange(b, dtype=np.int32), n_max)
    n_atoms = np.concatenate([m.sum(1).astype(np.int32), [0]])
    return Graph(pos, typ, node_mask, segment, (j[None] + offs).reshape(-1).astype(np.int32),
                 (i[None] + offs).reshape(-1).astype(np.int32), (m[:, i] * m[:, j]).reshape(-1), n_atoms)


def _setup(rng, sizes=(5, 9, 3), cfg=CFG):
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    model = EGNN(cfg)
    h = _features(g.types, g.node_mask)
    cond = np.where(g.node_mask > 0, rng.uniform(size=g.node_mask.shape), 0).astype(np.float32)
    params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), g.positions, h, cond, g)
    # Make the coordinate updates non-trivial (the coordinate head starts near zero on purpose).
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    return model, params, g, h, cond


def _run(model, params, g, x, h, cond):
    return jax.jit(model.apply)(params, jnp.asarray(x), jnp.asarray(h), jnp.asarray(cond), g)


@pytest.mark.parametrize("fused", [False, True])  # fused: the edge attributes' term as sampling computes it
@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation(rng, reflect, fused):
    _, params, g, h, cond = _setup(rng)
    model = EGNN(CFG, fused_attrs=fused)
    vel, hout = _run(model, params, g, g.positions, h, cond)
    assert float(jnp.abs(vel).max()) > 1e-3  # the test is not vacuous
    q = random_rotation(rng, reflect)
    t = rng.normal(size=3) * 5
    # Rotate (and reflect); translate each molecule and re-centre as the model expects zero-CoM input.
    x2 = (g.positions @ q.T).astype(np.float32)
    shifted = (x2 + t * g.node_mask[:, None]).astype(np.float32)
    x2c = np.asarray(remove_mean(jnp.asarray(shifted), g.node_mask, g.segment, g.n_atoms.shape[0]))
    np.testing.assert_allclose(x2c, x2, atol=1e-4)
    vel2, hout2 = _run(model, params, g, x2c, h, cond)
    np.testing.assert_allclose(np.asarray(vel2), np.asarray(vel) @ q.T, atol=2e-4)
    np.testing.assert_allclose(np.asarray(hout2), np.asarray(hout), atol=2e-4)


def test_translation_invariance_of_raw_input(rng):
    """Relative geometry only: shifting a molecule's input leaves both outputs unchanged."""
    model, params, g, h, cond = _setup(rng)
    vel, hout = _run(model, params, g, g.positions, h, cond)
    shift = (rng.normal(size=3) * 3 * g.node_mask[:, None]).astype(np.float32)
    vel2, hout2 = _run(model, params, g, g.positions + shift, h, cond)
    # float32 rounding grows with the outputs (feature outputs of ~150 differed by 5e-4 once): scaled
    for a, b in ((vel2, vel), (hout2, hout)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4 + 1e-5 * _scale(b))


def test_permutation_equivariance(rng):
    pos, typ = random_molecules(rng, (7, 4))
    perm = rng.permutation(7)
    g1 = pack(pos, typ)
    g2 = pack([pos[0][perm], pos[1]], [typ[0][perm], typ[1]])
    model = EGNN(CFG)
    h1, h2 = _features(g1.types, g1.node_mask), _features(g2.types, g2.node_mask)
    c = g1.node_mask * 0.3
    params = model.init(jax.random.PRNGKey(0), g1.positions, h1, c, g1)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    v1, o1 = _run(model, params, g1, g1.positions, h1, c)
    v2, o2 = _run(model, params, g2, g2.positions, h2, c)
    np.testing.assert_allclose(np.asarray(v2)[:7], np.asarray(v1)[:7][perm], atol=2e-4)
    np.testing.assert_allclose(np.asarray(o2)[:7], np.asarray(o1)[:7][perm], atol=2e-4)
    np.testing.assert_allclose(np.asarray(v2)[7:11], np.asarray(v1)[7:11], atol=2e-4)


def _repacked(g, h, cond, rng):
    """The same molecules with far more padding, and garbage in every padding row."""
    n_real = int(g.node_mask.sum())
    pos, typ, o = [], [], 0
    for n in g.n_atoms[:-1]:
        pos.append(g.positions[o : o + n]); typ.append(g.types[o : o + n]); o += n
    g2 = pack(pos, typ, pad_nodes=len(g.node_mask) + 37, pad_edges=len(g.edge_mask) + 512)  # (the kernels' 128s)
    x2 = g2.positions.copy(); x2[n_real:] = rng.normal(size=(len(x2) - n_real, 3)) * 100
    h2 = _features(g2.types, g2.node_mask); h2[n_real:] = rng.normal(size=(len(h2) - n_real, 6))
    c2 = np.zeros(len(x2), np.float32); c2[:n_real] = cond[:n_real]; c2[n_real:] = 7.0
    return g2, x2, h2, c2, n_real


@pytest.mark.parametrize("fused", [False, True])
def test_padding_never_changes_real_atoms(rng, fused):
    _, params, g, h, cond = _setup(rng)
    model = EGNN(CFG, fused_attrs=fused)
    vel, hout = _run(model, params, g, g.positions, h, cond)
    g2, x2, h2, c2, n_real = _repacked(g, h, cond, rng)
    vel2, hout2 = _run(model, params, g2, x2, h2, c2)
    np.testing.assert_allclose(np.asarray(vel2)[:n_real], np.asarray(vel)[:n_real], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(hout2)[:n_real], np.asarray(hout)[:n_real], rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(vel2)[n_real:] == 0)


def test_empty_molecules_after_the_real_ones_change_nothing(rng):
    """pack(pad_graphs=...) (sampling buckets the molecule count): the same outputs, bit for bit."""
    pos, typ = random_molecules(rng, (5, 9, 3))
    model, params, g, h, cond = _setup(rng)
    g = pack(pos, typ)
    g8 = pack(pos, typ, pad_graphs=8)
    assert list(g8.n_atoms) == [5, 9, 3, 0, 0, 0, 0, 0] and np.array_equal(g8.segment, g.segment)
    vel, hout = _run(model, params, g, g.positions, h, cond)
    vel8, hout8 = _run(model, params, g8, g8.positions, h, cond)
    assert np.array_equal(np.asarray(vel8), np.asarray(vel)) and np.array_equal(np.asarray(hout8), np.asarray(hout))
    with pytest.raises(ValueError, match="padding too small"):
        pack(pos, typ, pad_graphs=3)


def test_zero_com_output(rng):
    model, params, g, h, cond = _setup(rng)
    vel, _ = _run(model, params, g, g.positions, h, cond)
    vel = np.asarray(vel)
    o = 0
    for n in g.n_atoms[:-1]:
        np.testing.assert_allclose(vel[o : o + n].mean(0), 0, atol=1e-4)
        o += n


def test_split_edge_layer_equals_concat(rng):
    model, params, g, h, cond = _setup(rng)
    v1, o1 = _run(model, params, g, g.positions, h, cond)
    plain = EGNN(CFG.replace(split_edge_layer=False))
    v2, o2 = _run(plain, params, g, g.positions, h, cond)
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(o2), np.asarray(o1), rtol=1e-5, atol=1e-4)


def test_packed_pairs_equal_dense_padded(rng):
    sizes = (6, 2, 9)
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    n_max = 11
    dpos = np.zeros((3, n_max, 3), np.float32); dtyp = np.zeros((3, n_max), np.int32)
    mask = np.zeros((3, n_max), np.float32)
    for k, n in enumerate(sizes):
        dpos[k, :n] = pos[k]; dtyp[k, :n] = typ[k]; mask[k, :n] = 1
    gd = dense_graph(dpos, dtyp, mask)
    model = EGNN(CFG.replace(split_edge_layer=False))
    hp, hd = _features(g.types, g.node_mask), _features(gd.types, gd.node_mask)
    params = model.init(jax.random.PRNGKey(1), g.positions, hp, g.node_mask * 0.5, g)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    vp, op = _run(model, params, g, g.positions, hp, g.node_mask * 0.5)
    vd, od = _run(model, params, gd, gd.positions, hd, gd.node_mask * 0.5)
    rows = np.nonzero(gd.node_mask)[0]
    np.testing.assert_allclose(np.asarray(vd)[rows], np.asarray(vp)[: sum(sizes)], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(od)[rows], np.asarray(op)[: sum(sizes)], rtol=1e-5, atol=1e-4)


def test_presets_are_frozen_and_roundtrip():
    cfg = PRESETS["edm"]
    assert (cfg.nf, cfg.n_layers, cfg.inv_sublayers, cfg.attention) == (256, 9, 1, True)
    assert EGNNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception):
        cfg.nf = 3  # frozen


# ----------------------------------------------------------------------------------------------------------
# bfloat16 compute (training's --precision bf16): the same parameters, equivariant to bf16's rounding
# ----------------------------------------------------------------------------------------------------------

# Stated tolerances, relative to the largest output entry. Equivariance: the bf16 products see rotation-invariant
# inputs (features, squared distances), so a rotated molecule is rounded (nearly) alike: seen below 1e-4, bound
# 1e-2. Against float32: bf16 keeps 8 significant bits; on these randomly perturbed 3-block networks (outputs up
# to ~60) the outputs moved by 0.1-4.5 % of their scale over six seeds: bound 10 %.
BF16_EQUIV_TOL = 1e-2
BF16_VS_F32_TOL = 1e-1


def _scale(a):
    return float(np.abs(np.asarray(a)).max())


@pytest.mark.parametrize("reflect,kernel", [(False, False), (True, False), (False, True)])
def test_bf16_rotation_reflection_translation_and_masks(reflect, kernel):
    """bf16, also as training builds it with the pair kernels (their forward pass is XLA's own arrangement)."""
    from molgen.nn.pairgrad import supported

    rng = np.random.default_rng(3 + reflect)  # fixed draws: the bound vs float32 is statistical
    model, params, g, h, cond = _setup(rng)
    assert not kernel or supported(len(g.senders), CFG.nf, 2)
    fast = EGNN(CFG, dtype=jnp.bfloat16, sorted_grads=kernel, pair_kernel=kernel)
    vel, hout = _run(fast, params, g, g.positions, h, cond)
    assert vel.dtype == jnp.float32 and hout.dtype == jnp.float32  # outputs stay float32
    ref_v, ref_h = _run(model, params, g, g.positions, h, cond)
    assert _scale(vel) > 1e-3
    np.testing.assert_allclose(np.asarray(vel), np.asarray(ref_v), atol=BF16_VS_F32_TOL * _scale(ref_v))
    np.testing.assert_allclose(np.asarray(hout), np.asarray(ref_h), atol=BF16_VS_F32_TOL * _scale(ref_h))
    q = random_rotation(rng, reflect)
    t = rng.normal(size=3) * 5
    shifted = ((g.positions @ q.T) + t * g.node_mask[:, None]).astype(np.float32)
    x2 = np.asarray(remove_mean(jnp.asarray(shifted), g.node_mask, g.segment, g.n_atoms.shape[0]))
    vel2, hout2 = _run(fast, params, g, x2, h, cond)
    np.testing.assert_allclose(np.asarray(vel2), np.asarray(vel) @ q.T, atol=BF16_EQUIV_TOL * _scale(vel))
    np.testing.assert_allclose(np.asarray(hout2), np.asarray(hout), atol=BF16_EQUIV_TOL * _scale(hout))
    # Masks: padding rows are exactly zero, every molecule's position output has zero mean.
    n_real = int(g.node_mask.sum())
    assert np.all(np.asarray(vel)[n_real:] == 0) and np.all(np.asarray(hout)[n_real:] == 0)
    o = 0
    for n in g.n_atoms[:-1]:
        np.testing.assert_allclose(np.asarray(vel)[o : o + n].mean(0), 0, atol=1e-5 * max(1.0, _scale(vel)))
        o += n


@pytest.mark.parametrize("kernel", [False, True])
def test_bf16_padding_never_changes_real_atoms(kernel):
    rng = np.random.default_rng(7)
    _, params, g, h, cond = _setup(rng)
    fast = EGNN(CFG, dtype=jnp.bfloat16, sorted_grads=kernel, pair_kernel=kernel)
    vel, hout = _run(fast, params, g, g.positions, h, cond)
    g2, x2, h2, c2, n_real = _repacked(g, h, cond, rng)
    if kernel:  # both through the kernels (shapes they take)
        from molgen.nn.pairgrad import supported

        assert supported(len(g.senders), CFG.nf, 2) and supported(len(g2.senders), CFG.nf, 2)
    vel2, hout2 = _run(fast, params, g2, x2, h2, c2)
    np.testing.assert_allclose(np.asarray(vel2)[:n_real], np.asarray(vel)[:n_real], atol=1e-3 * _scale(vel))
    np.testing.assert_allclose(np.asarray(hout2)[:n_real], np.asarray(hout)[:n_real], atol=1e-3 * _scale(hout))
    assert np.all(np.asarray(vel2)[n_real:] == 0)


@pytest.mark.parametrize("split", [True, False])
def test_fused_edge_attributes_give_the_same_outputs(rng, split):
    """``fused_attrs`` (training in TF32, sampling) adds the edge attributes' term element-wise: the same function
    as the product, to float32 rounding, with the same parameters."""
    cfg = CFG.replace(split_edge_layer=split)
    model, params, g, h, cond = _setup(rng, cfg=cfg)
    want = _run(model, params, g, g.positions, h, cond)
    got = _run(EGNN(cfg, fused_attrs=True), params, g, g.positions, h, cond)
    for a, b in zip(got, want):
        assert _scale(b) > 1e-3
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * _scale(b))


@pytest.mark.parametrize("split", [True, False])
def test_bf16_gradient_scatters_in_float32(split):
    """Every scatter-add of a bf16 training gradient (the neighbour sums, and the backward pass of the gathers of
    node rows into pair rows) sums into float32 rows; the backward ones add a bfloat16 gradient, converted (half
    the memory a float32 [pairs, features] gradient would cost the four passes that read it)."""
    import re

    rng = np.random.default_rng(11)
    cfg = EGNNConfig(nf=32, n_layers=2, split_edge_layer=split)
    _, params, g, h, cond = _setup(rng, cfg=cfg)
    fast = EGNN(cfg, dtype=jnp.bfloat16, sorted_grads=True)  # as training builds it

    def loss(p):
        vel, hout = fast.apply(p, jnp.asarray(g.positions), jnp.asarray(h), jnp.asarray(cond), g)
        return (vel**2).sum() + (hout**2).sum()

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
    scatters = re.findall(r"= (\w+)\[[\d,]*\]\S* scatter\(", hlo)
    n = int(g.node_mask.shape[0])
    wide = re.findall(rf"= (\w+)\[{n},32\]\S* scatter\(", hlo)
    # per block: the forward neighbour sum and, backward, the receiver and sender sums of 2 edge inputs
    assert len(wide) == cfg.n_layers * (1 + 4)
    assert scatters and set(scatters) == {"f32"}
    defs = {m[0]: m[1:] for m in re.findall(r"^\s*(?:ROOT )?(\S+) = (\w+)\[\S* (\w[\w-]*)\((\S+?)[,)]", hlo, re.M)}

    def source(name):  # (type, operation) of a scatter's updates, through a slice (the unsplit layer's halves)
        _, op, arg = defs[name]  # and a gather (the sender sums' rows in the order of the reversed pairs)
        return source(arg) if op in ("slice", "gather") else (defs[arg][0], op)

    updates = re.findall(rf"= f32\[{n},32\]\S* scatter\([^,]+, [^,]+, (\S+?)\)", hlo)
    backward = [source(u) for u in updates if defs[u][1] != "multiply"]  # the forward sums add masked messages
    assert backward == [("bf16", "convert")] * cfg.n_layers * 4


@pytest.mark.parametrize("split", [True, False])
def test_sorted_gradients_equal_those_of_plain_gathers(rng, split):
    """With ``sorted_grads`` (training) the sender gathers' gradient, summed by sorted receivers in the order of
    the reversed pairs, is the gradient of a plain gather (summed by senders): the same outputs and parameter
    gradients, float32, up to summation order; padding rows, empty molecules after the real ones and one-atom
    molecules included. Without it the network also takes forward-mode derivatives."""
    cfg = EGNNConfig(nf=16, n_layers=2, split_edge_layer=split)
    pos, typ = random_molecules(rng, (5, 1, 9, 3))
    g = pack(pos, typ, pad_graphs=6)
    h = _features(g.types, g.node_mask)
    cond = np.where(g.node_mask > 0, rng.uniform(size=g.node_mask.shape), 0).astype(np.float32)
    params = EGNN(cfg).init(jax.random.PRNGKey(3), g.positions, h, cond, g)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    def loss(model, p, x):
        vel, hout = model.apply(p, x, jnp.asarray(h), jnp.asarray(cond), g)
        return (vel**2).sum() + (hout**2).sum()

    x = jnp.asarray(g.positions)
    fast = jax.jit(jax.value_and_grad(lambda p: loss(EGNN(cfg, sorted_grads=True), p, x)))(params)
    plain = jax.jit(jax.value_and_grad(lambda p: loss(EGNN(cfg), p, x)))(params)
    assert float(fast[0]) == float(plain[0])
    for a, b in zip(jax.tree_util.tree_leaves(fast[1]), jax.tree_util.tree_leaves(plain[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(fast[1])) > 1e-3
    _, tangent = jax.jvp(lambda x: loss(EGNN(cfg), params, x), (x,), (jnp.ones_like(x) * g.node_mask[:, None],))
    assert np.isfinite(float(tangent))


def test_every_neighbour_sum_of_the_gradient_has_sorted_indices(rng):
    """With ``sorted_grads`` XLA is told that every scatter-add of a training step's gradient has sorted indices (on a GPU it then adds
    each run of rows in registers before one atomic add, instead of an atomic add per element)."""
    import re

    _, params, g, h, cond = _setup(rng)
    model = EGNN(CFG, dtype=jnp.bfloat16, sorted_grads=True)

    def loss(p):
        vel, hout = model.apply(p, jnp.asarray(g.positions), jnp.asarray(h), jnp.asarray(cond), g)
        return (vel**2).sum() + (hout**2).sum()

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
    scatters = [line for line in hlo.splitlines() if re.search(r"\bscatter\(", line)]
    assert len(scatters) >= CFG.n_layers * 5
    assert all("indices_are_sorted=true" in line for line in scatters)


def test_bf16_one_output_layers_are_elementwise_sums(rng):
    """With bf16 the attention gate's logit and the coordinate weight (one output per pair) are float32 sums of
    element-wise products: no matrix product with one column, forward or in the gradient, while the parameters
    are nn.Dense's and float32 computes them as nn.Dense does."""
    import re

    import flax.linen as nn

    from molgen.nn.egnn import PairScalar

    x = jnp.asarray(rng.normal(size=(7, 32)), jnp.float32)
    dense, pair, fast = nn.Dense(1), PairScalar(1), PairScalar(1, elementwise=True)
    params = dense.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(pair.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(pair.apply(params, x), dense.apply(params, x))
    np.testing.assert_allclose(fast.apply(params, x), dense.apply(params, x), rtol=1e-5, atol=1e-6)

    cfg = EGNNConfig(nf=32, n_layers=2)
    _, params, g, h, cond = _setup(rng, cfg=cfg)

    def loss(p):
        vel, hout = EGNN(cfg, dtype=jnp.bfloat16).apply(p, jnp.asarray(g.positions), jnp.asarray(h),
                                                        jnp.asarray(cond), g)
        return (vel**2).sum() + (hout**2).sum()

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
    products = re.findall(r"= \w+\[([\d,]*)\]\S* dot\(", hlo)
    assert products and not [s for s in products if s.endswith(",1") or s.startswith("1,")], products


@pytest.mark.parametrize("split", [True, False])
def test_forward_flops_is_xla_s_count_of_the_products(rng, split):
    """The exact count of the matrix products equals XLA's own count of the forward pass, up to the element-wise
    work that XLA counts too (a few percent at this width)."""
    from molgen.nn.egnn import forward_flops

    cfg = EGNNConfig(nf=64, n_layers=2, split_edge_layer=split)
    pos, typ = random_molecules(rng, (9, 12, 5))
    g = pack(pos, typ)
    h = _features(g.types, g.node_mask)
    model = EGNN(cfg)
    params = model.init(jax.random.PRNGKey(0), g.positions, h, g.node_mask, g)
    xla = jax.jit(model.apply).lower(params, g.positions, h, g.node_mask, g).cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    ours = forward_flops(cfg, len(g.node_mask), len(g.edge_mask))
    assert ours <= xla["flops"] <= 1.15 * ours, (ours, xla["flops"])
    # QM9-like sizes (18 atoms, 306 pairs a molecule): the split first edge layer saves 60 % of the products.
    assert 0.35 < forward_flops(cfg, 18, 306, split=True) / forward_flops(cfg, 18, 306, split=False) < 0.45
