"""Refinement without re-noising: the refine sampler of consistency models and --refine N with a diffusion model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation

import molgen.train
from molgen import MolgenError
from molgen.config import RunConfig
from molgen.consistency.ict import ConsistencyConfig, make_consistency_fn
from molgen.data.batching import node_features, pack
from molgen.nn.egnn import PRESETS
from molgen.refine import clean_features, make_refine_step, refine_levels
from molgen.sample import load_refiner, noise_levels, sample
from molgen.train import init_params, make_apply

HIST = (0, 0, 0, 2, 3, 5, 1)  # molecules of 3-6 atoms


def _cfg(mode):
    cons = ConsistencyConfig(parametrization="eps" if mode == "diffusion" else "ict", sigma_data_x=1.4,
                             sigma_data_h=0.2)
    return RunConfig(mode=mode, model=PRESETS["tiny"], consistency=cons, size_hist=HIST)


def _noisy_params(cfg, rng):
    p = init_params(cfg, 0)
    return jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype), p)


def _counting(counter):
    real = make_apply

    def make(cfg):
        net, apply = real(cfg)

        def counted(params, x, h, cond, graph):
            jax.debug.callback(lambda: counter.append(cfg.mode))
            return apply(params, x, h, cond, graph)

        return net, counted

    return make


def test_refine_levels():
    assert refine_levels(0) == [] and refine_levels(1) == [0.1]
    for n in (2, 4, 8, 16, 32):
        lv = refine_levels(n)
        assert len(lv) == n and all(b < a for a, b in zip(lv, lv[1:]))
        assert lv[0] == pytest.approx(0.4) and lv[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        refine_levels(-1)
    assert noise_levels(_cfg("ct"), 3, sampler="refine") == [80.0] + refine_levels(2)


def test_refine_sampler_makes_k_calls_and_its_first_call_is_the_one_call_sample(rng, monkeypatch):
    cfg = _cfg("ct")
    params = _noisy_params(cfg, rng)
    calls = []
    monkeypatch.setattr(molgen.train, "make_apply", _counting(calls))
    one = sample(cfg, params, n=8, steps=1, seed=3, batch_size=8)
    one_r = sample(cfg, params, n=8, steps=1, seed=3, batch_size=8, sampler="refine")
    calls.clear()
    three = sample(cfg, params, n=8, steps=3, seed=3, batch_size=8, sampler="refine")
    assert len(calls) == 3
    again = sample(cfg, params, n=8, steps=3, seed=3, batch_size=8, sampler="refine")
    renoised = sample(cfg, params, n=8, steps=3, seed=3, batch_size=8)
    moved = 0.0
    for a, b, c, d, e in zip(one, one_r, three, again, renoised):
        np.testing.assert_array_equal(a.positions, b.positions)  # k = 1: the same single call
        np.testing.assert_array_equal(c.positions, d.positions)  # deterministic after the seed's first noise
        np.testing.assert_allclose(c.positions.mean(0), 0, atol=1e-4)
        assert np.isfinite(c.positions).all() and not np.allclose(c.positions, e.positions)
        moved = max(moved, float(np.abs(c.positions - a.positions).max()))
    assert moved > 1e-3


def test_refine_step_is_equivariant_reads_types_and_ignores_padding(rng):
    cfg = _cfg("ct")
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    step = jax.jit(make_refine_step(make_consistency_fn(apply, cfg.consistency)))
    pos, typ = random_molecules(rng, (5, 7))
    g = pack(pos, typ)
    h = node_features(g.types, g.node_mask)
    x1, h1 = step(params, g.positions, h, 0.3, g)
    # E(3): a rotation or reflection of the input rotates the output; the types' features are unchanged
    q = random_rotation(rng, reflect=True)
    xq, hq = step(params, (g.positions @ q.T).astype(np.float32), h, 0.3, g)
    np.testing.assert_allclose(np.asarray(xq), np.asarray(x1) @ q.T, atol=3e-4)
    np.testing.assert_allclose(np.asarray(hq), np.asarray(h1), atol=3e-4)
    # the types are re-read from h: any h with the same argmax per atom gives the same step
    wobble = (h + 0.02 * rng.random(h.shape) * np.asarray(g.node_mask)[:, None]).astype(np.float32)
    xw, _ = step(params, g.positions, wobble, 0.3, g)
    np.testing.assert_allclose(np.asarray(xw), np.asarray(x1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(clean_features(jnp.asarray(wobble), g.node_mask)), h, atol=1e-6)
    # permuting the atoms of a molecule permutes its output
    perm = np.concatenate([rng.permutation(5), 5 + rng.permutation(7)])
    gp = pack([pos[0][perm[:5]], pos[1][perm[5:] - 5]], [typ[0][perm[:5]], typ[1][perm[5:] - 5]])
    xp, _ = step(params, gp.positions, node_features(gp.types, gp.node_mask), 0.3, gp)
    np.testing.assert_allclose(np.asarray(xp)[:12], np.asarray(x1)[perm], atol=3e-4)
    # a molecule alone (other padding, no neighbour molecule) gets the same output
    ga = pack(pos[:1], typ[:1])
    xa, _ = step(params, ga.positions, node_features(ga.types, ga.node_mask), 0.3, ga)
    np.testing.assert_allclose(np.asarray(xa)[:5], np.asarray(x1)[:5], atol=3e-5)
    np.testing.assert_allclose(np.asarray(x1)[:5].mean(0), 0, atol=1e-4)


def test_refine_option_adds_n_calls_of_the_refiner(rng, monkeypatch):
    cfg, dcfg = _cfg("ct"), _cfg("diffusion")
    params, dparams = _noisy_params(cfg, rng), _noisy_params(dcfg, rng)
    calls = []
    monkeypatch.setattr(molgen.train, "make_apply", _counting(calls))
    base = sample(cfg, params, n=6, steps=2, seed=4, batch_size=6)
    calls.clear()
    polished = sample(cfg, params, n=6, steps=2, seed=4, batch_size=6, refine_steps=3, refiner=(dcfg, dparams))
    assert calls.count("ct") == 2 and calls.count("diffusion") == 3
    for a, b in zip(base, polished):
        assert len(a.types) == len(b.types) and not np.allclose(a.positions, b.positions)
        np.testing.assert_allclose(b.positions.mean(0), 0, atol=1e-4)
    with pytest.raises(MolgenError, match="--refiner"):
        sample(cfg, params, n=2, steps=1, refine_steps=1)
    calls.clear()  # a diffusion model refining its own samples: its k calls, then N more
    own = sample(dcfg, dparams, n=4, steps=3, seed=4, batch_size=4, refine_steps=2, refiner=(dcfg, dparams))
    assert calls == ["diffusion"] * 5
    for m in own:
        assert np.isfinite(m.positions).all()
        np.testing.assert_allclose(m.positions.mean(0), 0, atol=1e-4)


def test_which_model_refines(tmp_path):
    from molgen.sample import save_weights

    ct, diff = _cfg("ct"), _cfg("diffusion")
    with pytest.raises(MolgenError, match="name one with --refiner"):
        load_refiner(ct)
    assert load_refiner(diff)[1] is None  # a diffusion model refines its own samples
    # a distilled model's teacher recorded as a path that is gone: the shipped model of that name
    kd = ct.replace(mode="distill", teacher="gone/edm-small-diffusion")
    rcfg, rparams, name = load_refiner(kd)
    assert rcfg.mode == "diffusion" and name == "edm-small-diffusion" and rparams is not None
    with pytest.raises(MolgenError, match="runs/gone is not here; name one with --refiner"):
        load_refiner(ct.replace(mode="ect", init="runs/gone"))
    save_weights(tmp_path / "c", ct, init_params(ct, 0))
    with pytest.raises(MolgenError, match="must be a diffusion model"):
        load_refiner(kd, tmp_path / "c")
