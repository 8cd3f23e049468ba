"""Samplers (k network calls, zero CoM, determinism) and the consistency function's defining properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation

from molgen.config import RunConfig
from molgen.consistency.ict import (ConsistencyConfig, default_sigmas, karras_sigmas, make_consistency_fn,
                                    n_discretisation)
from molgen.data.batching import node_features, pack
from molgen.diffusion.schedule import gamma_table, ve_sigma_to_t, vp_to_ve_sigma
from molgen.nn.egnn import EGNN, PRESETS
from molgen.sample import sample
from molgen.train import init_params, make_apply


def _cfg(mode, parametrization="ict"):
    cons = ConsistencyConfig(parametrization=parametrization, sigma_data_x=1.4, sigma_data_h=0.2)
    hist = (0, 0, 0, 2, 3, 5, 1)  # molecules of 3-6 atoms
    return RunConfig(mode=mode, model=PRESETS["tiny"], consistency=cons, size_hist=hist)


def _noisy_params(cfg, rng):
    p = init_params(cfg, 0)
    return jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype), p)


def _counting_apply(cfg, counter):
    _, apply = make_apply(cfg)

    def counted(params, x, h, cond, graph):
        jax.debug.callback(lambda: counter.append(1))
        return apply(params, x, h, cond, graph)

    return counted


@pytest.mark.parametrize("mode,steps", [("diffusion", 1), ("diffusion", 5), ("ct", 1), ("ct", 2), ("ct", 4),
                                        ("ect", 3)])
def test_k_steps_make_k_network_calls(rng, mode, steps):
    cfg = _cfg(mode, "eps" if mode == "ect" else "ict")
    params = _noisy_params(cfg, rng)
    calls = []
    mols = sample(cfg, params, n=12, steps=steps, seed=1, batch_size=12, apply_fn=_counting_apply(cfg, calls))
    assert len(calls) == steps  # one batch: k evaluations of the network for every molecule
    assert len(mols) == 12
    for m in mols:
        assert np.isfinite(m.positions).all() and 3 <= len(m.types) <= 6
        np.testing.assert_allclose(m.positions.mean(0), 0, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 3])
def test_ode_sampler_calls_zero_com_and_determinism(rng, steps):
    from molgen.diffusion.ode import karras_levels
    from molgen.sample import network_calls, noise_levels

    cfg = _cfg("diffusion")
    params = _noisy_params(cfg, rng)
    levels = noise_levels(cfg, steps, sampler="ode")
    assert levels == karras_levels(steps, 0.002, 80.0) and levels[0] == 80.0 and levels[-1] == 0.0
    assert network_calls(cfg, levels, "ode") == 2 * steps - 1  # Heun: 2 calls a step, 1 for the step to 0
    calls = []
    mols = sample(cfg, params, n=8, steps=steps, seed=2, batch_size=8, apply_fn=_counting_apply(cfg, calls),
                  sampler="ode")
    assert len(calls) == 2 * steps - 1
    again = sample(cfg, params, n=8, steps=steps, seed=2, sampler="ode")
    for m, a in zip(mols, again):
        assert np.isfinite(m.positions).all() and 3 <= len(m.types) <= 6
        np.testing.assert_allclose(m.positions.mean(0), 0, atol=1e-4)
        np.testing.assert_array_equal(m.positions, a.positions)  # deterministic given the seed's noise


def test_sampler_option_errors():
    from molgen import MolgenError
    from molgen.sample import noise_levels

    with pytest.raises(MolgenError, match="applies to diffusion models"):
        noise_levels(_cfg("ct"), 2, sampler="ode")
    with pytest.raises(MolgenError, match="--sampler must be one of"):
        noise_levels(_cfg("diffusion"), 2, sampler="heun")
    with pytest.raises(MolgenError, match="consistency models only"):
        noise_levels(_cfg("diffusion"), 2, sigmas=[1.0, 0.5], sampler="ode")


def test_batches_multiply_calls_and_sizes_follow_histogram(rng):
    cfg = _cfg("ct")
    calls = []
    mols = sample(cfg, _noisy_params(cfg, rng), n=10, steps=2, seed=0, batch_size=4,
                  apply_fn=_counting_apply(cfg, calls))
    assert len(calls) == 2 * 3  # three batches (4 + 4 + 2)
    fixed = sample(cfg, _noisy_params(cfg, rng), n=3, steps=1, seed=0, atoms=9)
    assert all(len(m.types) == 9 for m in fixed)


@pytest.mark.parametrize("mode", ["diffusion", "ct"])
def test_same_seed_same_molecules(rng, mode):
    cfg = _cfg(mode)
    params = _noisy_params(cfg, rng)
    a = sample(cfg, params, n=6, steps=2, seed=5)
    b = sample(cfg, params, n=6, steps=2, seed=5)
    c = sample(cfg, params, n=6, steps=2, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.types, y.types)
    assert any(x.positions.shape != z.positions.shape or not np.array_equal(x.positions, z.positions)
               for x, z in zip(a, c))


@pytest.mark.parametrize("mode,sampler", [("ct", "ancestral"), ("ct", "refine"), ("diffusion", "ancestral"),
                                          ("diffusion", "ode")])
def test_temperature_scales_the_starting_noise(rng, mode, sampler):
    """The first network input of every sampler is linear in the starting Gaussian: temperature t scales it by t."""
    cfg = _cfg(mode)
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    seen = []

    def recording(params, x, h, cond, graph):
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, h)
        return apply(params, x, h, cond, graph)

    plain = sample(cfg, params, n=5, steps=2, seed=3, apply_fn=recording, sampler=sampler)
    calls = len(seen)
    cool = sample(cfg, params, n=5, steps=2, seed=3, apply_fn=recording, sampler=sampler, temperature=0.6)
    assert len(seen) == 2 * calls
    (x1, h1), (xt, ht) = seen[0], seen[calls]
    assert np.abs(x1).max() > 0.1
    np.testing.assert_allclose(xt, 0.6 * x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ht, 0.6 * h1, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(plain, cool))
    same = sample(cfg, params, n=5, steps=2, seed=3, sampler=sampler, temperature=1.0)
    for a, b in zip(plain, same):  # temperature 1 is the plain sampler
        np.testing.assert_array_equal(a.positions, b.positions)


def test_temperature_scales_the_ancestral_step_noise(rng):
    """EDM's ancestral step is mean + std * z: with temperature t it is mean + t * std * z exactly."""
    from molgen.diffusion.edm import make_sampler_step

    cfg = _cfg("diffusion")
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    step = jax.jit(make_sampler_step(apply, cfg.diffusion))
    g, h = _graph(rng)
    x = jnp.asarray(rng.normal(size=g.positions.shape), jnp.float32) * g.node_mask[:, None]
    key = jax.random.PRNGKey(4)
    out = {t: step(params, x, h, jnp.float32(0.5), jnp.float32(0.4), g, key, t) for t in (0.0, 0.3, 1.0)}
    for i in range(2):
        np.testing.assert_allclose(out[0.3][i] - out[0.0][i], 0.3 * (out[1.0][i] - out[0.0][i]), atol=1e-5)
    assert float(jnp.abs(out[1.0][0] - out[0.0][0]).max()) > 1e-3


def test_renoise_scales_only_the_noise_added_between_consistency_calls(rng):
    """k-step consistency sampling: the first call sees temperature * sigma_max * z whatever renoise is; the
    second sees c_in(s) (x + renoise * sqrt(s^2 - sigma_min^2) z'), affine in renoise with the same x and z'."""
    cfg = _cfg("ct")
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    seen = []

    def recording(params, x, h, cond, graph):
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), x)
        return apply(params, x, h, cond, graph)

    out = {r: sample(cfg, params, n=5, steps=2, seed=2, apply_fn=recording, temperature=0.8, renoise=r)
           for r in (0.0, 0.5, 1.0)}
    assert len(seen) == 6
    first, second = seen[0::2], seen[1::2]
    for a in first[1:]:
        np.testing.assert_allclose(a, first[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(second[1] - second[0], 0.5 * (second[2] - second[0]), rtol=1e-4, atol=1e-6)
    assert np.abs(second[2] - second[0]).max() > 1e-3  # renoise 1 adds noise that renoise 0 does not
    plain = sample(cfg, params, n=5, steps=2, seed=2, temperature=0.8)  # renoise defaults to the temperature
    again = sample(cfg, params, n=5, steps=2, seed=2, temperature=0.8, renoise=0.8)
    for a, b in zip(plain, again):
        np.testing.assert_array_equal(a.positions, b.positions)
    assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(out[0.0], plain))
    from molgen import MolgenError

    with pytest.raises(MolgenError, match="--renoise must be a number >= 0"):
        sample(cfg, params, n=2, steps=2, renoise=-0.1)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_temperature_must_be_positive(bad):
    from molgen import MolgenError

    with pytest.raises(MolgenError, match="--temperature must be a positive number"):
        sample(_cfg("ct"), None, n=2, steps=1, temperature=bad)


def _graph(rng, sizes=(5, 8)):
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    return g, node_features(g.types, g.node_mask)


@pytest.mark.parametrize("parametrization", ["ict", "eps", "ict-vp"])
def test_boundary_condition_is_exact(rng, parametrization):
    cfg = _cfg("ct", parametrization)
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    f = make_consistency_fn(apply, cfg.consistency)
    g, h = _graph(rng)
    s = jnp.full(g.node_mask.shape, cfg.consistency.sigma_min, jnp.float32)
    fx, fh = f(params, g.positions, h, s, g)
    np.testing.assert_array_equal(np.asarray(fh), h)
    np.testing.assert_allclose(np.asarray(fx), g.positions, atol=1e-5)  # exact up to re-centring round-off
    s2 = jnp.full(g.node_mask.shape, 3.0, jnp.float32)
    fx2, _ = f(params, g.positions, h, s2, g)
    assert float(jnp.abs(fx2 - g.positions).max()) > 1e-3  # away from sigma_min the network acts


@pytest.mark.parametrize("parametrization", ["ict", "eps", "ict-vp"])
def test_consistency_function_is_equivariant(rng, parametrization):
    cfg = _cfg("ct", parametrization)
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    f = jax.jit(make_consistency_fn(apply, cfg.consistency))
    g, h = _graph(rng)
    s = jnp.asarray(g.node_mask * 2.5 + (1 - g.node_mask), jnp.float32)
    x = g.positions
    fx, fh = f(params, x, h, s, g)
    q = random_rotation(rng, reflect=bool(rng.integers(2)))
    xr = (x @ q.T).astype(np.float32)
    fxr, fhr = f(params, xr, h, s, g)
    np.testing.assert_allclose(np.asarray(fxr), np.asarray(fx) @ q.T, atol=3e-4)
    np.testing.assert_allclose(np.asarray(fhr), np.asarray(fh), atol=3e-4)
    # translated input (before re-centring) gives the same, zero-CoM output
    t = (rng.normal(size=3) * g.node_mask[:, None]).astype(np.float32)
    fxt, _ = f(params, x + t, h, s, g)
    o = 0
    for n in g.n_atoms[:-1]:
        np.testing.assert_allclose(np.asarray(fxt)[o : o + n].mean(0), 0, atol=1e-4)
        o += n


def test_vp_ve_conversion_known_values():
    gammas = gamma_table(1000)
    assert vp_to_ve_sigma(0.0) == pytest.approx(1.0)
    assert vp_to_ve_sigma(np.log(4.0)) == pytest.approx(2.0)
    # z = alpha x + sigma eps  ==  alpha (x + (sigma/alpha) eps)
    g = gammas[300]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
    assert vp_to_ve_sigma(g) == pytest.approx(sigma / alpha, rel=1e-5)
    for t in [0.0, 0.1, 0.5, 0.9, 1.0]:
        s = vp_to_ve_sigma(gammas[int(round(t * 1000))])
        assert ve_sigma_to_t(s, gammas) == pytest.approx(t, abs=1e-6)
    # EDM's schedule spans sigma_VE from ~0.003 to ~316
    assert vp_to_ve_sigma(gammas[0]) == pytest.approx(np.sqrt(1e-5 / (1 - 1e-5)), rel=1e-3)


def test_eps_parametrisation_is_edm_denoiser(rng):
    """At a grid time t, f(y, s) = y - (s - sigma_min) eps_hat(alpha y, t): EDM's x0 estimate, exact boundary."""
    cfg = _cfg("ect", "eps")
    params = _noisy_params(cfg, rng)
    _, apply = make_apply(cfg)
    f = make_consistency_fn(apply, cfg.consistency)
    g, h = _graph(rng)
    gammas = gamma_table(1000)
    t = 0.4
    s = float(vp_to_ve_sigma(gammas[400]))
    alpha = 1 / np.sqrt(1 + s**2)
    ex, eh = apply(params, alpha * g.positions, alpha * h, jnp.asarray(g.node_mask * t), g)
    fx, fh = f(params, g.positions, h, jnp.full(g.node_mask.shape, s, jnp.float32), g)
    c = s - cfg.consistency.sigma_min
    np.testing.assert_allclose(np.asarray(fh), (h - c * np.asarray(eh)) * g.node_mask[:, None], atol=2e-4)
    np.testing.assert_allclose(np.asarray(fx), g.positions - c * np.asarray(ex), atol=2e-4)


def test_curriculum_and_grid():
    cfg = ConsistencyConfig(s0=10, s1=80, total_steps=400)
    ns = [int(n_discretisation(k, cfg)) for k in (0, 99, 100, 200, 399)]
    assert ns == [11, 11, 21, 41, 81]
    sig = np.asarray(karras_sigmas(11, 0.002, 80.0, 7.0))
    assert sig[0] == pytest.approx(0.002) and sig[-1] == pytest.approx(80.0, rel=1e-5)
    assert np.all(np.diff(sig) > 0)
    assert default_sigmas(1, cfg) == [80.0]
    assert len(default_sigmas(4, cfg)) == 4 and np.all(np.diff(default_sigmas(4, cfg)) < 0)
