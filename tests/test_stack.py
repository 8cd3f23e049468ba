"""Stacked consistency models: the base network's call followed by a diffusion model's denoising stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation, tiny_net

from molgen import MolgenError
from molgen.config import DataConfig, RunConfig
from molgen.consistency.ict import ConsistencyConfig
from molgen.consistency.stack import TYPE_TEMPERATURE, describe_network, restack, stack_model, unstack
from molgen.data.batching import pack
from molgen.data.features import clean_features, straight_through_features, type_features
from molgen.diffusion.levels import low_ladder
from molgen.diffusion.polish import make_polish_step, polish
from molgen.models import Model
from molgen.networks import init_params, model_fn, network
from molgen.nn.egnn import remove_mean
from molgen.sample import sample

HIST = DataConfig(size_hist=(0, 0, 0, 2, 3, 5, 1))  # molecules of 3-6 atoms


def _cfg(kind):
    if kind == "diffusion":
        return RunConfig(model=tiny_net(), data=HIST)
    cons = ConsistencyConfig(sigma_data_x=1.4, sigma_data_h=0.2)
    return RunConfig(objective="distill", model=tiny_net(), consistency=cons, diffusion=None, data=HIST)


def _noisy(params, rng, scale=0.05):
    return jax.tree_util.tree_map(lambda a: a + scale * jnp.asarray(rng.normal(size=a.shape), a.dtype), params)


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    cfg, tcfg = _cfg("consistency"), _cfg("diffusion")
    params, tparams = _noisy(init_params(cfg, 0), rng), _noisy(init_params(tcfg, 1), rng)
    scfg, sparams = stack_model(cfg, params, tcfg, tparams, 3, source="teacher")
    return cfg, params, tcfg, tparams, scfg, sparams


def _inputs(rng, sizes=(4, 6, 3), sigma=2.0):
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    yx = g.positions + sigma * np.asarray(jnp.where(g.node_mask[:, None] > 0, rng.normal(size=g.positions.shape), 0))
    yx = np.asarray(remove_mean(jnp.asarray(yx, jnp.float32), g.node_mask, g.segment, g.n_atoms.shape[0]))
    yh = type_features(g.types, g.node_mask, np) + 0.3 * rng.normal(size=(len(g.node_mask), 6))
    yh = (yh * np.asarray(g.node_mask)[:, None]).astype(np.float32)
    return g, jnp.asarray(yx, jnp.float32), jnp.asarray(yh), jnp.full(g.node_mask.shape, sigma, jnp.float32)


def test_stacked_call_is_the_model_then_its_stages(models, rng):
    cfg, params, tcfg, tparams, scfg, sparams = models
    assert scfg.stack.levels == tuple(low_ladder(3)) and scfg.stack.model == tcfg.model
    assert scfg.stack.source == "teacher" and describe_network(scfg) == "32x1 + 3 stages of 32x1"
    assert describe_network(cfg) == "32x1"
    g, yx, yh, sig = _inputs(rng)
    x_s, h_s = jax.jit(model_fn(scfg))(sparams, yx, yh, sig, g)
    x, h = model_fn(cfg)(params, yx, yh, sig, g)  # the plain model, then `--polish 3` with the teacher
    x, h = polish(jax.jit(make_polish_step(model_fn(tcfg))), tparams, x, h, g, low_ladder(3))
    np.testing.assert_allclose(np.asarray(x_s), np.asarray(x), atol=2e-5)
    np.testing.assert_allclose(np.asarray(h_s), np.asarray(h), atol=2e-5)
    x0, _ = model_fn(cfg)(params, yx, yh, sig, g)
    assert float(jnp.abs(x_s - x0).max()) > 1e-3  # the stages did move the atoms


def test_boundary_condition_holds_exactly(models, rng):
    cfg, params, _, _, scfg, sparams = models
    g, yx, yh, _ = _inputs(rng)
    smin = jnp.full(g.node_mask.shape, scfg.consistency.sigma_min, jnp.float32)
    xs, hs = model_fn(scfg)(sparams, yx, yh, smin, g)
    xb, hb = model_fn(cfg)(params, yx, yh, smin, g)
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(xb))  # the stages are gated off at sigma_min
    np.testing.assert_array_equal(np.asarray(hs), np.asarray(hb))
    np.testing.assert_allclose(np.asarray(xs), np.asarray(yx), atol=1e-5)


def test_stacked_model_is_equivariant_and_ignores_padding(models, rng):
    _, _, _, _, scfg, sparams = models
    f = jax.jit(model_fn(scfg))
    g, yx, yh, sig = _inputs(rng, sigma=80.0)
    x, h = f(sparams, yx, yh, sig, g)
    m = np.asarray(g.node_mask) > 0
    seg = np.asarray(g.segment)
    for i in range(g.n_graphs):  # every molecule's output is zero-CoM
        np.testing.assert_allclose(np.asarray(x)[seg == i].mean(0), 0, atol=1e-4)
    # rotation with reflection (a translation is removed with the centre of mass before any call)
    q = random_rotation(rng, reflect=True).astype(np.float32)
    xr, hr = f(sparams, yx @ q.T, yh, sig, g)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x) @ q.T, atol=1e-3)
    np.testing.assert_allclose(np.asarray(hr), np.asarray(h), atol=1e-3)
    # permuting the atoms of the first molecule permutes its output (every pair of it is an edge)
    n0 = int(g.n_atoms[0])
    perm = np.arange(len(m))
    perm[:n0] = rng.permutation(n0)
    xp, hp = f(sparams, yx[perm], yh[perm], sig, g)
    np.testing.assert_allclose(np.asarray(xp), np.asarray(x)[perm], atol=1e-3)
    np.testing.assert_allclose(np.asarray(hp), np.asarray(h)[perm], atol=1e-3)
    # the same molecules packed with far more padding, garbage in the padding rows: real atoms unchanged
    sizes = [int(k) for k in np.asarray(g.n_atoms)[:-1]]
    g2 = pack([np.zeros((k, 3), np.float32) for k in sizes], [np.zeros(k, np.int32) for k in sizes],
              pad_nodes=len(m) + 21, pad_edges=len(g.edge_mask) + 300)
    n_real = int(m.sum())
    yx2 = jnp.asarray(rng.normal(size=(len(g2.node_mask), 3)) * 9, jnp.float32).at[:n_real].set(yx[:n_real])
    yh2 = jnp.asarray(rng.normal(size=(len(g2.node_mask), 6)) * 9, jnp.float32).at[:n_real].set(yh[:n_real])
    x2, h2 = f(sparams, yx2, yh2, jnp.full(g2.node_mask.shape, 80.0, jnp.float32), g2)
    np.testing.assert_allclose(np.asarray(x2)[:n_real], np.asarray(x)[:n_real], atol=1e-4)
    np.testing.assert_allclose(np.asarray(h2)[:n_real], np.asarray(h)[:n_real], atol=1e-4)


def test_read_types_is_the_argmax_forward_and_passes_gradients(rng):
    h = jnp.asarray(rng.normal(size=(7, 6)) * 0.2, jnp.float32)
    mask = jnp.asarray([1, 1, 1, 1, 1, 0, 0], jnp.float32)

    def read(a):
        return straight_through_features(a, mask, TYPE_TEMPERATURE)

    np.testing.assert_array_equal(np.asarray(read(h)), np.asarray(clean_features(h, mask)))
    grad = jax.grad(lambda a: jnp.sum(read(a) * jnp.arange(6.0)))(h)
    assert float(jnp.abs(grad[:5, :5]).sum()) > 0 and float(jnp.abs(grad[5:]).sum()) == 0  # padding gets none


def test_sampling_counts_one_call_per_step_and_matches_polish(models):
    cfg, params, tcfg, tparams, scfg, sparams = models
    plain = sample(Model(cfg, params), n=6, steps=1, seed=2, batch_size=6, polish_calls=3,
                   polisher=Model(tcfg, tparams)).molecules
    calls = []
    _, apply = network(scfg)

    def counted(p, x, h, cond, graph):  # the base network: once per call of the stacked model
        jax.debug.callback(lambda: calls.append(1))
        return apply(p, x, h, cond, graph)

    res = sample(Model(scfg, sparams), n=6, steps=1, seed=2, batch_size=6, apply=counted)
    assert len(calls) == 1 and res.calls == 1  # one call of the stacked network (its stages run inside it)
    assert res.settings["molgen_network"] == "32x1 + 3 stages of 32x1"
    for a, b in zip(plain, res.molecules):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)
        np.testing.assert_array_equal(a.types, b.types)
    calls.clear()
    sample(Model(scfg, sparams), n=6, steps=3, seed=2, batch_size=6, apply=counted)
    assert len(calls) == 3


def test_a_stacked_model_stacked_again_runs_its_own_stages_then_the_new_ones(models, rng, tmp_path):
    cfg, params, tcfg, tparams, scfg, sparams = models
    pcfg = RunConfig(model=tiny_net().replace(nf=16), data=HIST)  # a second diffusion model, another size
    pparams = _noisy(init_params(pcfg, 5), rng)
    s2cfg, s2params = stack_model(scfg, sparams, pcfg, pparams, 2, source="polisher")
    assert s2cfg.stack.inner == scfg.stack and s2cfg.stack.levels == tuple(low_ladder(2))
    assert describe_network(s2cfg) == "32x1 + 3 stages of 32x1 + 2 stages of 16x1"
    g, yx, yh, sig = _inputs(rng)
    x2, h2 = jax.jit(model_fn(s2cfg))(s2params, yx, yh, sig, g)
    x, h = model_fn(scfg)(sparams, yx, yh, sig, g)  # the stacked model, then `--polish 2` with the second model
    x, h = polish(jax.jit(make_polish_step(model_fn(pcfg))), pparams, x, h, g, low_ladder(2))
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x), atol=2e-5)
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h), atol=2e-5)
    # the boundary condition still holds; fresh parameters and a saved config rebuild the same tree
    smin = jnp.full(g.node_mask.shape, s2cfg.consistency.sigma_min, jnp.float32)
    np.testing.assert_allclose(np.asarray(model_fn(s2cfg)(s2params, yx, yh, smin, g)[0]), np.asarray(yx), atol=1e-5)
    shapes = jax.tree_util.tree_map(np.shape, init_params(s2cfg, 0))
    assert shapes == jax.tree_util.tree_map(np.shape, s2params)
    s2cfg.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == s2cfg
    # re-spreading acts on the last stages only
    r = restack(s2cfg, s2params, 4)[0]
    assert r.stack.levels == tuple(low_ladder(4)) and r.stack.inner == scfg.stack
    # unstacking removes the last stages: the stack it was built on, then the consistency model alone
    u, up = unstack(s2cfg, s2params)
    assert u == scfg and up is sparams and describe_network(u) == "32x1 + 3 stages of 32x1"
    assert unstack(*unstack(s2cfg, s2params))[0] == cfg and unstack(scfg, sparams)[1] is sparams["base"]
    with pytest.raises(MolgenError, match="no denoising stages to remove"):
        unstack(cfg, params)


def test_stack_model_refusals(models):
    cfg, params, tcfg, tparams, scfg, sparams = models
    with pytest.raises(MolgenError, match="consistency model"):
        stack_model(tcfg, tparams, tcfg, tparams, 2)
    with pytest.raises(MolgenError, match="diffusion model"):
        stack_model(cfg, params, cfg, params, 2)
    with pytest.raises(MolgenError, match="at least 1"):
        stack_model(cfg, params, tcfg, tparams, 0)


def test_restack_respreads_the_trained_stages(models, rng):
    """restack keeps both networks and moves the stages to low_ladder(n): n = 1 is the base call followed by
    one denoising step at 0.1 Å (what `--polish 1` adds)."""
    cfg, params, tcfg, tparams, scfg, sparams = models
    one, p1 = restack(scfg, sparams, 1)
    assert one.stack.levels == (0.1,) and one.stack.model == scfg.stack.model and p1 is sparams
    assert restack(scfg, sparams, 3)[0] == scfg
    assert describe_network(one).endswith("+ 1 stage of " + describe_network(tcfg))
    g, yx, yh, sig = _inputs(rng)
    x0, h0 = model_fn(cfg)(params, yx, yh, sig, g)
    want = polish(make_polish_step(model_fn(tcfg)), tparams, x0, h0, g, [0.1])
    got = model_fn(one)(p1, yx, yh, sig, g)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=2e-5)
    with pytest.raises(MolgenError, match="no denoising stages"):
        restack(cfg, params, 2)
    with pytest.raises(MolgenError, match="at least 1"):
        restack(scfg, sparams, 0)


def test_config_round_trip_and_the_stages_train(models, tmp_path):
    from molgen.state import init_state, make_optimizer

    _, _, _, _, scfg, sparams = models
    scfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == scfg
    assert RunConfig.load(tmp_path / "c.json").stack.model == scfg.stack.model
    optim = scfg.optim.__class__(lr=1e-2, warmup=1)
    tx, _ = make_optimizer(optim)
    grads = jax.tree_util.tree_map(jnp.ones_like, sparams)
    upd, _ = tx.update(grads, init_state(scfg.replace(optim=optim), sparams).opt_state, sparams)
    for part in ("base", "stage"):  # the whole stack trains
        assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(upd[part]))
