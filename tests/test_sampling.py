"""Samplers (k network calls, zero CoM, determinism, temperature) and the consistency function's properties."""

import re

import hypothesis
import hypothesis.strategies
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation, tiny_net

from molgen import MolgenError
from molgen.config import DataConfig, RunConfig
from molgen.consistency.ict import (ConsistencyConfig, ict_scalings, make_consistency_fn, multistep_levels,
                                    n_discretisation, training_levels)
from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.diffusion.edm import DiffusionConfig, denoiser, respaced_times
from molgen.diffusion.levels import karras_grid, ode_levels
from molgen.models import Model
from molgen.networks import init_params, model_fn, network
from molgen.nn.egnn import remove_mean
from molgen.keep import sample_kept
from molgen.sample import parse_levels, plan, preflight, sample
from molgen.samplers import SAMPLERS, get_sampler

HIST = DataConfig(size_hist=(0, 0, 0, 2, 3, 5, 1))  # molecules of 3-6 atoms


def _cfg(kind, parametrization="ict"):
    if kind == "diffusion":
        return RunConfig(model=tiny_net(), data=HIST)
    cons = ConsistencyConfig(parametrization=parametrization, sigma_data_x=1.4, sigma_data_h=0.2)
    schedule = DiffusionConfig() if parametrization == "ict-vp" else None
    return RunConfig(objective="ct", model=tiny_net(), consistency=cons, diffusion=schedule, data=HIST)


def _model(kind, rng, parametrization="ict"):
    cfg = _cfg(kind, parametrization)
    p = init_params(cfg, 0)
    return Model(cfg, jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype), p))


def _recording(cfg, seen, what=lambda x, h: 1):
    _, apply = network(cfg)

    def rec(params, x, h, cond, graph):
        jax.debug.callback(lambda a, b: seen.append(what(np.asarray(a), np.asarray(b))), x, h)
        return apply(params, x, h, cond, graph)

    return rec


@pytest.mark.parametrize("kind,sampler,steps", [("diffusion", "ancestral", 1), ("diffusion", "ancestral", 5),
                                                ("consistency", "multistep", 1), ("consistency", "multistep", 2),
                                                ("consistency", "multistep", 4), ("consistency", "anneal", 3)])
def test_k_steps_make_k_network_calls(rng, kind, sampler, steps):
    m = _model(kind, rng)
    calls, ticks = [], []
    res = sample(m, n=12, steps=steps, seed=1, batch_size=12, sampler=sampler, apply=_recording(m.cfg, calls),
                 progress=ticks.append)
    assert len(calls) == steps == res.calls == sum(ticks)  # one batch: k evaluations for every molecule
    assert len(res.molecules) == 12
    for mol in res.molecules:
        assert np.isfinite(mol.positions).all() and 3 <= len(mol.types) <= 6
        # zero centre of mass to float32 rounding of the coordinates (an untrained network spreads some widely)
        np.testing.assert_allclose(mol.positions.mean(0), 0, atol=1e-5 * max(1.0, np.abs(mol.positions).max()))
        assert mol.props["molgen_sampler"] == sampler and mol.props["molgen_calls"] == steps


@pytest.mark.parametrize("steps", [1, 3])
def test_ode_sampler_calls_zero_com_and_determinism(rng, steps):
    m = _model("diffusion", rng)
    s = get_sampler(m.cfg, "ode")
    levels = s.levels(m.cfg, steps)
    assert levels == ode_levels(steps, 0.002, 80.0) and levels[0] == 80.0 and levels[-1] == 0.0
    assert s.calls(levels) == 2 * steps - 1  # Heun: 2 calls a step, 1 for the step to 0
    calls = []
    mols = sample(m, n=8, steps=steps, seed=2, batch_size=8, apply=_recording(m.cfg, calls), sampler="ode").molecules
    assert len(calls) == 2 * steps - 1
    again = sample(m, n=8, steps=steps, seed=2, sampler="ode").molecules
    for a, b in zip(mols, again):
        assert np.isfinite(a.positions).all() and 3 <= len(a.types) <= 6
        np.testing.assert_allclose(a.positions.mean(0), 0, atol=1e-5 * max(1.0, np.abs(a.positions).max()))
        np.testing.assert_array_equal(a.positions, b.positions)  # deterministic given the seed's noise


def test_sampler_option_errors(rng):
    d, c = _model("diffusion", rng), _model("consistency", rng)
    with pytest.raises(MolgenError, match="applies to diffusion models; this is a consistency model"):
        plan(c, 2, "ode")
    with pytest.raises(MolgenError, match="applies to consistency models"):
        plan(d, 2, "anneal")
    with pytest.raises(MolgenError, match="--sampler must be one of"):
        plan(d, 2, "heun")
    with pytest.raises(MolgenError, match="--sigmas applies to the consistency samplers"):
        plan(d, 2, "ode", sigmas=[1.0, 0.5])
    with pytest.raises(MolgenError, match="--sigmas gives 1 level for --steps 2"):
        plan(c, 2, sigmas=[1.0])
    with pytest.raises(MolgenError, match="must decrease"):
        plan(c, 2, sigmas=[0.5, 1.0])
    for bad in ([float("nan")], [1e9], [0.002], [-1.0]):  # outside (sigma_min, sigma_max]: refused, NaN too
        with pytest.raises(MolgenError, match="above sigma_min 0.002 and at most sigma_max 80"):
            plan(c, 1, sigmas=bad)
    assert plan(c, 2, sigmas=[80.0, 0.5])[2]["molgen_calls"] == 2
    _, levels, settings, _ = plan(c, None, sigmas=[80.0, 0.5, 0.1])  # no --steps: one per level given
    assert levels == [80.0, 0.5, 0.1] and settings["molgen_steps"] == settings["molgen_calls"] == 3
    for text in ("", " , ", "1,abc"):
        with pytest.raises(MolgenError, match="expected comma-separated numbers"):
            parse_levels(text)
    assert parse_levels(None) is None and parse_levels("2, 0.5") == [2.0, 0.5]
    with pytest.raises(MolgenError, match="--renoise applies to the multistep sampler"):
        plan(d, 2, renoise=0.5)
    with pytest.raises(MolgenError, match="exceeds the model's 1000 diffusion steps"):
        plan(d, 1001)
    with pytest.raises(MolgenError, match="--steps must be at least 1"):
        plan(c, 0)
    for kw, message in [({"n": 2.5}, "-n must be a whole number, got 2.5"), ({"steps": 1.0}, "--steps must be a whole "
                        "number, got 1.0"), ({"batch_size": 2.0}, "--batch-size must be a whole number, got 2.0"),
                        ({"n": True}, "-n must be a whole number, got True")]:
        with pytest.raises(MolgenError, match=re.escape(message)):
            sample(c, **{"n": 2, "steps": 1, **kw})
        if "steps" not in kw:
            with pytest.raises(MolgenError, match=re.escape(message)):
                sample_kept(c, kw.get("n", 2), "stable", batch_size=kw.get("batch_size"), steps=1)
    assert set(SAMPLERS) == {"ancestral", "inpaint", "ode", "multistep", "anneal"}


def test_batches_multiply_calls_and_sizes_follow_histogram(rng):
    m = _model("consistency", rng)
    calls = []
    res = sample(m, n=10, steps=2, seed=0, batch_size=4, apply=_recording(m.cfg, calls))
    assert len(calls) == 2 * 3  # three batches (4 + 4 + 2)
    assert all(3 <= len(x.types) <= 6 for x in res.molecules)
    fixed = sample(m, n=3, steps=1, seed=0, atoms=9).molecules
    assert all(len(x.types) == 9 for x in fixed)


def test_the_default_batch_holds_at_most_a_budget_of_atom_pairs(rng, monkeypatch):
    """Without --batch-size, 1000 molecules a batch up to 32 atoms (every QM9 size), fewer for larger ones, from
    the request alone: the same molecules as that batch size given."""
    import molgen.sizes
    from molgen.sizes import default_batch_size

    m = _model("consistency", rng)
    assert default_batch_size(m.cfg) == default_batch_size(m.cfg, 32) == default_batch_size(m.cfg, (3, 32)) == 1000
    assert [default_batch_size(m.cfg, a) for a in (33, 100, (10, 100), 256)] == [946, 101, 101, 15]
    monkeypatch.setattr(molgen.sizes, "PAIR_BUDGET", 400)  # 4 molecules of 6 atoms (30 pairs each), 3 of 9 (72)
    assert default_batch_size(m.cfg) == 13 and default_batch_size(m.cfg, 9) == 5
    calls = []
    res = sample(m, n=12, steps=1, seed=0, atoms=9, apply=_recording(m.cfg, calls))
    assert len(calls) == 3  # batches of 5 + 5 + 2
    given = sample(m, n=12, steps=1, seed=0, atoms=9, batch_size=5).molecules
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(res.molecules, given))
    assert {(x.props["molgen_seed"], x.props["molgen_batch_size"]) for x in res.molecules} == {(0, 5)}  # recorded
    assert preflight(m, 12, None, 9, None, 1)[0] == ("note: 5 molecules at a time, to bound the memory that large "
                                                     "molecules take (--batch-size sets it)")
    assert not [w for w in preflight(m, 12, 12, 9, None, 1) if w.startswith("note")]


def test_an_atom_range_draws_the_training_histogram_within_it():
    """--atoms A-B: sizes drawn from the training histogram restricted to A..B (renormalised), the same draws
    as the whole histogram gives where it puts all its weight in the range; bad ranges are one line each."""
    from types import SimpleNamespace

    from molgen.sizes import draw_sizes, parse_atoms

    assert parse_atoms("19") == 19 and parse_atoms("15-20") == (15, 20) and parse_atoms(" 7 - 7") == 7
    assert parse_atoms(None) is None
    for bad, msg in (("x", "give a count"), ("3-", "give a count"), ("1-2-3", "give a count"),
                     ("-4", "give a count"), ("9-4", "a range goes from the smaller count to the larger (4-9)")):
        with pytest.raises(MolgenError, match=re.escape(msg)):
            parse_atoms(bad)
    cfg = SimpleNamespace(data=SimpleNamespace(size_hist=[0, 0, 0, 1, 3, 0, 6, 2]))  # sizes 3, 4, 6, 7
    sizes = draw_sizes(cfg, 20000, seed=1, atoms=(4, 6))
    assert set(np.unique(sizes)) == {4, 6}
    assert np.mean(sizes == 4) == pytest.approx(3 / 9, abs=0.02)  # 3 : 6 within the range
    np.testing.assert_array_equal(draw_sizes(cfg, 50, seed=1, atoms=(3, 7)), draw_sizes(cfg, 50, seed=1))
    assert set(draw_sizes(cfg, 200, seed=0, atoms=(4, 200), above=4)) == {6, 7}  # a fragment of 4 atoms
    for atoms, above, msg in (((1, 2), 0, "--atoms 1-2: the model was trained on no molecule of 1 to 2 atoms "
                                          "(its sizes: 3-7); give a count or another range"),
                              ((5, 5), 0, "no molecule of 5 to 5"),
                              ((0, 4), 0, "--atoms must be in 1 .. 256 (the largest molecule molgen reads back), got 0-4"),
                              ((3, 4), 5, "the fragment has 5 atoms, more than --atoms 3-4"),
                              ((3, 4), 4, "no molecule of 3 to 4 atoms larger than the fragment's 4")):
        with pytest.raises(MolgenError, match=re.escape(msg)):
            draw_sizes(cfg, 5, seed=0, atoms=atoms, above=above)


@pytest.mark.parametrize("kind", ["diffusion", "consistency"])
def test_same_seed_same_molecules(rng, kind):
    m = _model(kind, rng)
    a, b, c = (sample(m, n=6, steps=2, seed=s).molecules for s in (5, 5, 6))
    pairs = list(zip(a, b))
    # fewer molecules are the first of more (sizes and noise are drawn as prefixes), also with a formula
    pairs += zip(a, sample(m, n=4, steps=2, seed=5).molecules)
    if kind == "consistency":
        from molgen.formula import parse_formula

        more, fewer = (sample(m, n=k, steps=2, seed=5, formula=parse_formula("CH4")).molecules for k in (5, 3))
        pairs += zip(more, fewer)
    assert len(pairs) == (13 if kind == "consistency" else 10)
    for x, y in pairs:
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.types, y.types)
    assert any(x.positions.shape != z.positions.shape or not np.array_equal(x.positions, z.positions)
               for x, z in zip(a, c))


def test_calls_of_a_few_molecules_share_one_compiled_step(rng):
    """2, 3 and 7 molecules of 5 atoms fit one bucket of atoms and of molecules: one compiled program; the first
    molecules of a call are the same whatever the count (the molecule count only pads)."""
    from molgen.sample import _prepared

    m = _model("consistency", rng)
    step = _prepared(get_sampler(m.cfg), m.cfg)
    before = step._cache_size()
    runs = {n: sample(m, n=n, steps=1, seed=2, atoms=5).molecules for n in (2, 3, 7)}
    assert step._cache_size() - before <= 1
    first = [x.positions for x in runs[2]]
    assert all(np.array_equal(a, b.positions) for a, b in zip(first, runs[3][:2]))  # the same noise rows


@pytest.mark.parametrize("kind,sampler", [("consistency", "multistep"), ("consistency", "anneal"),
                                          ("diffusion", "ancestral"), ("diffusion", "ode")])
def test_temperature_scales_the_starting_noise(rng, kind, sampler):
    """The first network input of every sampler is linear in the starting Gaussian: temperature t scales it by t."""
    m = _model(kind, rng)
    seen = []
    rec = _recording(m.cfg, seen, lambda x, h: (x, h))
    plain = sample(m, n=5, steps=2, seed=3, apply=rec, sampler=sampler).molecules
    calls = len(seen)
    cool = sample(m, n=5, steps=2, seed=3, apply=rec, sampler=sampler, temperature=0.6).molecules
    assert len(seen) == 2 * calls
    (x1, h1), (xt, ht) = seen[0], seen[calls]
    assert np.abs(x1).max() > 0.1
    np.testing.assert_allclose(xt, 0.6 * x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ht, 0.6 * h1, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(plain, cool))
    same = sample(m, n=5, steps=2, seed=3, sampler=sampler, temperature=1.0).molecules
    for a, b in zip(plain, same):  # temperature 1 is the plain sampler
        np.testing.assert_array_equal(a.positions, b.positions)


def test_card_settings_are_the_defaults_of_a_python_caller(rng):
    """A model's card (meta.json) sets the temperature and re-noising the library uses when none is given."""
    m = _model("consistency", rng)
    carded = Model(m.cfg, m.params, {"temperature": 0.7, "renoise": 0.2})
    res = sample(carded, n=4, steps=2, seed=1)
    assert res.settings["molgen_temperature"] == 0.7 and res.settings["molgen_renoise"] == 0.2
    explicit = sample(m, n=4, steps=2, seed=1, temperature=0.7, renoise=0.2)
    for a, b in zip(res.molecules, explicit.molecules):
        np.testing.assert_array_equal(a.positions, b.positions)
    assert sample(Model(m.cfg, m.params, {"temperature": 0.7}), n=2, steps=2).settings["molgen_renoise"] == 0.7


def test_temperature_scales_the_ancestral_step_noise(rng):
    """EDM's ancestral step is mean + std * z: with temperature t it is mean + t * std * z exactly."""
    from molgen.diffusion.edm import make_sampler_step

    m = _model("diffusion", rng)
    step = jax.jit(make_sampler_step(network(m.cfg)[1], m.cfg.diffusion))
    g, h = _graph(rng)
    x = jnp.asarray(rng.normal(size=g.positions.shape), jnp.float32) * g.node_mask[:, None]
    key = jax.random.PRNGKey(4)
    out = {t: step(m.params, x, h, jnp.float32(0.5), jnp.float32(0.4), g, key, t) for t in (0.0, 0.3, 1.0)}
    for i in range(2):
        np.testing.assert_allclose(out[0.3][i] - out[0.0][i], 0.3 * (out[1.0][i] - out[0.0][i]), atol=1e-5)
    assert float(jnp.abs(out[1.0][0] - out[0.0][0]).max()) > 1e-3


def test_renoise_scales_only_the_noise_added_between_consistency_calls(rng):
    """multistep: the first call sees temperature * sigma_max * z whatever renoise is; the second sees
    c_in(s) (x + renoise * sqrt(s^2 - sigma_min^2) z'), affine in renoise with the same x and z'."""
    m = _model("consistency", rng)
    seen = []
    rec = _recording(m.cfg, seen, lambda x, h: x)
    out = {r: sample(m, n=5, steps=2, seed=2, apply=rec, temperature=0.8, renoise=r).molecules for r in (0.0, 0.5, 1.0)}
    assert len(seen) == 6
    first, second = seen[0::2], seen[1::2]
    for a in first[1:]:
        np.testing.assert_allclose(a, first[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(second[1] - second[0], 0.5 * (second[2] - second[0]), rtol=1e-4, atol=1e-6)
    assert np.abs(second[2] - second[0]).max() > 1e-3  # renoise 1 adds noise that renoise 0 does not
    plain = sample(m, n=5, steps=2, seed=2, temperature=0.8).molecules  # renoise defaults to the temperature
    again = sample(m, n=5, steps=2, seed=2, temperature=0.8, renoise=0.8).molecules
    for a, b in zip(plain, again):
        np.testing.assert_array_equal(a.positions, b.positions)
    assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(out[0.0], plain))
    with pytest.raises(MolgenError, match="--renoise must be a number >= 0"):
        sample(m, n=2, steps=2, renoise=-0.1)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_temperature_must_be_positive(rng, bad):
    with pytest.raises(MolgenError, match="--temperature must be a positive number"):
        sample(_model("consistency", rng), n=2, steps=1, temperature=bad)


def _graph(rng, sizes=(5, 8)):
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ)
    return g, type_features(g.types, g.node_mask, np)


@pytest.mark.parametrize("parametrization", ["ict", "ict-vp"])
def test_boundary_condition_is_exact(rng, parametrization):
    m = _model("consistency", rng, parametrization)
    f = model_fn(m.cfg)
    g, h = _graph(rng)
    s = jnp.full(g.node_mask.shape, m.cfg.consistency.sigma_min, jnp.float32)
    fx, fh = f(m.params, g.positions, h, s, g)
    np.testing.assert_array_equal(np.asarray(fh), h)
    np.testing.assert_allclose(np.asarray(fx), g.positions, atol=1e-5)  # exact up to re-centring round-off
    fx2, _ = f(m.params, g.positions, h, jnp.full(g.node_mask.shape, 3.0, jnp.float32), g)
    assert float(jnp.abs(fx2 - g.positions).max()) > 1e-3  # away from sigma_min the network acts


@pytest.mark.parametrize("parametrization", ["ict", "ict-vp"])
def test_consistency_function_is_equivariant(rng, parametrization):
    m = _model("consistency", rng, parametrization)
    f = jax.jit(model_fn(m.cfg))
    g, h = _graph(rng)
    s = jnp.asarray(g.node_mask * 2.5 + (1 - g.node_mask), jnp.float32)
    x = g.positions
    fx, fh = f(m.params, x, h, s, g)
    q = random_rotation(rng, reflect=bool(rng.integers(2)))
    fxr, fhr = f(m.params, (x @ q.T).astype(np.float32), h, s, g)
    np.testing.assert_allclose(np.asarray(fxr), np.asarray(fx) @ q.T, atol=3e-4)
    np.testing.assert_allclose(np.asarray(fhr), np.asarray(fh), atol=3e-4)
    # translated input (before re-centring) gives the same, zero-CoM output
    t = (rng.normal(size=3) * g.node_mask[:, None]).astype(np.float32)
    fxt, _ = f(m.params, x + t, h, s, g)
    o = 0
    for n in g.n_atoms[:-1]:
        np.testing.assert_allclose(np.asarray(fxt)[o : o + n].mean(0), 0, atol=1e-4)
        o += n


def test_denoiser_is_edms_clean_estimate(rng):
    """At EDM's grid time t with VE level s = sigma_t / alpha_t: D(y, s) = y - s eps_hat(alpha_t y, t), and
    EDM's own x0 estimate of the VP state alpha_t y; ict-vp is the same network call, rescaled:
    f(y, s) = c_skip(s) y - c_out(s) eps_hat, which at small s is that denoiser up to sigma_min."""
    m = _model("diffusion", rng)
    apply = network(m.cfg)[1]
    D = denoiser(apply, m.cfg.diffusion)
    g, h = _graph(rng)
    gam = m.cfg.diffusion.gammas()[400]
    s, t = float(np.exp(0.5 * gam)), 0.4
    alpha = 1 / np.sqrt(1 + s**2)
    ex, eh = apply(m.params, alpha * g.positions, alpha * h, jnp.asarray(g.node_mask * t), g)
    dx, dh = D(m.params, g.positions, h, jnp.full(g.node_mask.shape, s, jnp.float32), g)
    np.testing.assert_allclose(np.asarray(dh), (h - s * np.asarray(eh)) * g.node_mask[:, None], atol=2e-4)
    np.testing.assert_allclose(np.asarray(dx), g.positions - s * np.asarray(ex), atol=2e-4)
    cons = ConsistencyConfig(parametrization="ict-vp", sigma_data_x=1.4, sigma_data_h=0.2)
    f = make_consistency_fn(apply, cons, m.cfg.diffusion)
    s_small = 0.05
    small = jnp.full(g.node_mask.shape, s_small, jnp.float32)
    fx, _ = f(m.params, g.positions, h, small, g)
    dx2, _ = D(m.params, g.positions, h, small, g)
    eps = (g.positions - np.asarray(dx2)) / s_small  # D - y = -s eps_hat
    c_skip, c_out, _ = ict_scalings(s_small, cons.sigma_data_x, cons.sigma_min)
    assert abs(c_skip - 1) < 2e-3 and abs(c_out - (s_small - cons.sigma_min)) < 1e-4  # small s: the denoiser
    want = remove_mean(jnp.asarray(c_skip * g.positions - c_out * eps, jnp.float32), jnp.asarray(g.node_mask),
                       jnp.asarray(g.segment), g.n_atoms.shape[0])
    assert np.abs(eps).max() > 1e-2  # the network moves the molecules
    np.testing.assert_allclose(np.asarray(fx), np.asarray(want), atol=2e-5)


def test_curriculum_and_grid():
    cfg = ConsistencyConfig(s0=10, s1=80, total_steps=400)
    ns = [int(n_discretisation(k, cfg)) for k in (0, 99, 100, 200, 399)]
    assert ns == [11, 11, 21, 41, 81]
    sig = karras_grid(np.arange(11, dtype=np.float64), 11, 0.002, 80.0)
    assert sig[0] == pytest.approx(0.002) and sig[-1] == pytest.approx(80.0, rel=1e-9)
    assert np.all(np.diff(sig) > 0)
    dyn = np.asarray(training_levels(jnp.int32(11), cfg, 20))  # traced length, padded by repeating the last
    np.testing.assert_allclose(dyn[:11], sig, rtol=1e-5)
    assert np.all(dyn[11:] == dyn[10])
    assert multistep_levels(1, cfg) == [80.0] and multistep_levels(2, cfg) == [80.0, 0.2]
    assert len(multistep_levels(4, cfg)) == 4 and np.all(np.diff(multistep_levels(4, cfg)) < 0)


def test_respaced_times_are_distinct_integer_steps_denser_at_low_noise():
    np.testing.assert_array_equal(respaced_times(4), [1.0, 0.65, 0.354, 0.125, 0.0])  # (i / 4)^1.5 of 1000, rounded
    np.testing.assert_array_equal(respaced_times(3, spacing=1.0), [1.0, 0.667, 0.333, 0.0])  # EDM's uniform spacing
    np.testing.assert_array_equal(respaced_times(1000), np.arange(1000, -1, -1) / 1000)  # EDM's own sampler
    for timesteps, spacing in ((1000, None), (37, 1.0), (37, 1.5), (37, 3.0)):
        for k in range(1, timesteps + 1):
            t = respaced_times(k, timesteps, spacing)
            ints = np.round(t * timesteps)
            assert len(t) == k + 1 and t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(ints) < 0), (k, spacing)
            np.testing.assert_allclose(t * timesteps, ints, atol=1e-9)  # on the integer grid
    t = respaced_times(50)
    assert np.sum(t < 0.3) > 1.3 * np.sum(np.linspace(1, 0, 51) < 0.3)  # more of the steps at low noise
    cfg = _cfg("diffusion")
    assert SAMPLERS["ancestral"].levels(cfg, 4) == SAMPLERS["inpaint"].levels(cfg, 4) == [1.0, 0.65, 0.354, 0.125, 0.0]
    with pytest.raises(ValueError):
        respaced_times(0)


def test_a_batch_takes_a_shared_shape_that_holds_it_and_samples_the_same_molecules(rng):
    """sampling_graph with shapes compiled before: the smallest that holds the batch with at most twice its own
    padded nodes, or SHARED_EXTRA_NODES more, is taken (else the batch's own is added); sampled in either padding,
    the molecules are the same."""
    from molgen.data.batching import SHARED_EXTRA_NODES, sampling_graph

    def shape(g):
        return len(g.n_atoms), len(g.node_mask), len(g.senders)

    sizes = [3, 4, 5, 6, 6]
    own = shape(sampling_graph(sizes))
    shapes = []
    assert shape(sampling_graph(sizes, shapes)) == own and shapes == [own]
    wide, wider = (own[0] + 8, 2 * own[1], own[2] + 1024), (own[0] + 16, 2 * own[1], own[2] + 2048)
    assert own[1] + SHARED_EXTRA_NODES > 2 * own[1]  # a small batch: the extra rows allowed are the larger bound
    shapes = [wider, wide, (own[0], own[1], own[2] - 1)]  # the last is too small: it lacks an edge row
    g = sampling_graph(sizes, shapes)
    assert shape(g) == wide and len(shapes) == 3 and int(g.node_mask.sum()) == sum(sizes)
    assert g.n_atoms.tolist()[: len(sizes)] == sizes and not g.n_atoms[len(sizes):].any()
    roomy = [(own[0], own[1] + SHARED_EXTRA_NODES, own[2])]  # more than twice the nodes, within the extra rows
    assert shape(sampling_graph(sizes, roomy)) == roomy[0] and len(roomy) == 1
    too_wide = [(own[0], own[1] + SHARED_EXTRA_NODES + 64, own[2])]  # beyond both: compiled anew
    assert shape(sampling_graph(sizes, too_wide)) == own and too_wide[-1] == own
    big = sampling_graph([18] * 300)  # 5,400 atoms: twice its nodes is the larger bound
    big_own = shape(big)
    assert shape(sampling_graph([18] * 300, [(big_own[0], 2 * big_own[1], big_own[2])]))[1] == 2 * big_own[1]
    over = [(big_own[0], 2 * big_own[1] + 64, big_own[2])]
    assert shape(sampling_graph([18] * 300, over)) == big_own
    m = _model("consistency", rng)
    for steps in (1, 2):
        a = sample(m, 9, steps, seed=5).molecules
        shared = [(24, 128, 2048)]  # 9 molecules of 3-6 atoms: their own shape is (16, 64, 1024)
        b = sample(m, 9, steps, seed=5, shapes=shared).molecules
        assert shared == [(24, 128, 2048)]  # taken, not added to
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.types, y.types)
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-5)


def test_keep_writes_only_molecules_that_pass_and_draws_more_until_n():
    """--keep: every kept molecule passes by molgen.evaluate's own per-molecule results; the first round is plain
    sampling with the same seed (its kept molecules are a subsequence of it, in order); same settings, same
    molecules; fewer than n only when the draw limit is reached."""
    from molgen.evaluate import judge
    from molgen.models import load_model
    from molgen.keep import sample_kept

    m = load_model("edm-small-stack2")
    plain = sample(m, 40, 1, seed=3).molecules
    res = sample_kept(m, 40, "valid", seed=3)
    assert len(res.molecules) == 40 and res.drawn > 40 and res.settings["molgen_keep"] == "valid"
    assert all(p.valid and p.n_fragments == 1 for p in judge(res.molecules))
    assert [x.name for x in res.molecules] == [f"molgen_{i}" for i in range(40)]
    assert {x.props["molgen_seed"] for x in res.molecules} == {3} == {res.settings["molgen_seed"]}  # not a round's
    ok = [x for x, p in zip(plain, judge(plain)) if p.valid and p.n_fragments == 1]
    assert 0 < len(ok) < 40  # the first round alone is not enough here
    for a, b in zip(ok, res.molecules):
        np.testing.assert_array_equal(a.positions, b.positions)
    again = sample_kept(m, 40, "valid", seed=3)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(res.molecules, again.molecules))
    stable = sample_kept(m, 15, "stable", seed=1)
    assert all(p.stable and p.valid and p.n_fragments == 1 for p in judge(stable.molecules))
    assert len({p.smiles for p in judge(stable.molecules)}) < 15  # this seed repeats a molecule
    short = sample_kept(m, 12, "stable", seed=1, max_draws=12)
    assert short.drawn == 12 and len(short.molecules) < 12
    assert sum(p.stable and p.n_fragments == 1 for p in judge(sample(m, 12, 1, seed=1).molecules)) == \
        len(short.molecules)
    with pytest.raises(MolgenError, match="--keep must be one of all, valid, stable"):
        sample_kept(m, 5, "pretty")
    distinct = sample_kept(m, 15, "stable", seed=1, unique=True)
    smiles = [p.smiles for p in judge(distinct.molecules)]
    assert len(set(smiles)) == len(smiles) == 15 and distinct.settings["molgen_keep"] == "stable, unique"
    with pytest.raises(MolgenError, match="--unique compares SMILES"):
        sample_kept(m, 5, "all", unique=True)
    # --novel: SMILES of a known set (here the first 5 distinct ones, as if QM9's training split held them) are
    # never kept, so the same seed keeps others in their place
    known = set(smiles[:5])
    rounds = []
    novel = sample_kept(m, 15, "stable", seed=1, unique=True, known=known, on_round=rounds.append)
    got = [p.smiles for p in judge(novel.molecules)]
    assert len(set(got)) == 15 and not known & set(got) and set(got) & set(smiles[5:])
    assert novel.settings["molgen_keep"] == "stable, unique, novel" and novel.drawn >= distinct.drawn
    # the first round's kept molecules are all known now: the next round is not sized by a share of ~0 but is
    # held to 8x the molecules drawn before it
    assert rounds[:2] == [18, 8 * 18] and novel.drawn == sum(rounds) < 100 * 15
    assert all(r <= 8 * sum(rounds[:i]) for i, r in enumerate(rounds) if i)
    with pytest.raises(MolgenError, match="--novel compares SMILES"):
        sample_kept(m, 5, "all", known=known)


_FUZZ_MODELS = {}


def _fuzz_model(kind):
    if kind not in _FUZZ_MODELS:
        _FUZZ_MODELS[kind] = _model(kind, np.random.default_rng(0))
    return _FUZZ_MODELS[kind]


_NUMBERS = hypothesis.strategies.one_of(
    hypothesis.strategies.none(), hypothesis.strategies.floats(allow_nan=True, allow_infinity=True),
    hypothesis.strategies.sampled_from([0.0, -1.0, 0.002, 0.5, 1.0, 80.0, 80.5]))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(kind=hypothesis.strategies.sampled_from(["diffusion", "consistency"]),
                  sampler=hypothesis.strategies.sampled_from([None, "x", *SAMPLERS]),
                  steps=hypothesis.strategies.one_of(hypothesis.strategies.none(), hypothesis.strategies.integers(-1, 5),
                                                     hypothesis.strategies.integers(995, 1005)),
                  sigmas=hypothesis.strategies.one_of(hypothesis.strategies.none(),
                                                      hypothesis.strategies.lists(_NUMBERS.filter(bool), max_size=4)),
                  temperature=_NUMBERS, renoise=_NUMBERS,
                  polish=hypothesis.strategies.integers(-1, 3), resample=hypothesis.strategies.integers(-1, 2),
                  fixing=hypothesis.strategies.booleans())
def test_any_sampling_request_is_refused_in_one_error_or_planned_sound(kind, sampler, steps, sigmas, temperature,
                                                                       renoise, polish, resample, fixing):
    """Whatever the options, `plan` (which `molgen sample` calls before any work) either refuses them with a
    MolgenError or returns a plan a sampler can run: finite levels (a consistency sampler's decreasing, inside
    the model's (sigma_min, sigma_max]), a positive finite temperature, a finite re-noising, at least one call."""
    model = _fuzz_model(kind)
    try:
        s, levels, settings, r = plan(model, steps, sampler, sigmas, temperature, renoise, polish, 0, resample, fixing)
    except MolgenError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert np.isfinite(levels).all() and len(levels) >= 1 and settings["molgen_calls"] >= 1
    assert np.isfinite(settings["molgen_temperature"]) and settings["molgen_temperature"] > 0
    assert r is None or (np.isfinite(r) and r >= 0)
    if s.kind == "consistency":
        c = model.cfg.consistency
        assert all(c.sigma_min < x <= c.sigma_max for x in levels)
        assert all(b < a for a, b in zip(levels, levels[1:]))


@pytest.mark.parametrize("suffix", ["sdf", "xyz"])
def test_sampled_molecules_are_exactly_what_their_file_holds(tmp_path, suffix):
    """With decimals=DECIMALS (`molgen sample`) coordinates come rounded to what an SDF file holds, so the report
    describes the file written: reading it back gives the same numbers and the same per-molecule results."""
    from molgen.chem.io import DECIMALS, read_molecules
    from molgen.chem.write import write_molecules
    from molgen.evaluate import judge

    rng = np.random.default_rng(0)
    for kind, sampler, steps in (("consistency", "multistep", 2), ("diffusion", "ancestral", 3)):
        res = sample(_model(kind, rng), 30, steps, seed=4, sampler=sampler, decimals=DECIMALS)
        write_molecules(tmp_path / f"m.{suffix}", res.molecules)
        back = read_molecules(tmp_path / f"m.{suffix}")
        for a, b in zip(res.molecules, back, strict=True):
            np.testing.assert_array_equal(a.types, b.types)
            np.testing.assert_array_equal(a.positions, b.positions)
        assert judge(res.molecules) == judge(back)
