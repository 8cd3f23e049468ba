"""The teacher's probability-flow ODE solver and one-step distillation onto it."""

import numpy as np
import jax
import jax.numpy as jnp

from molgen.chem.elements import N_TYPES
from molgen.config import RunConfig
from molgen.consistency.distill import PairSet, distill_loss, generate_pairs, prepare_pairs, refine_pairs
from molgen.consistency.ict import make_consistency_fn
from molgen.data.batching import pack
from molgen.diffusion.noise import sample_noise
from molgen.diffusion.ode import heun_solve, karras_levels, n_calls
from molgen.nn.egnn import PRESETS
from molgen.train import features, init_params, make_apply, make_batch


def _graph(sizes):
    return pack(None, [np.zeros(n, np.int32) for n in sizes])


def test_karras_levels():
    lv = karras_levels(5, 0.002, 80.0)
    assert len(lv) == 6 and lv[-1] == 0.0
    np.testing.assert_allclose([lv[0], lv[-2]], [80.0, 0.002], rtol=1e-12)
    assert all(a > b for a, b in zip(lv, lv[1:]))


def test_heun_follows_the_exact_flow_of_gaussian_data():
    """Data ~ N(0, sd^2): D(y, s) = y sd^2 / (sd^2 + s^2) and the flow is y(s) = y0 sqrt(sd^2 + s^2) / sqrt(sd^2 + s0^2)."""
    sd = 1.3
    calls = []

    def denoise(params, x, h, s, graph):
        calls.append(1)
        c = (sd**2 / (sd**2 + s**2))[:, None]
        return x * c, h * c

    g = _graph([5, 3])
    zx, zh = sample_noise(jax.random.PRNGKey(0), g, 6)
    scale = sd / np.sqrt(sd**2 + 80.0**2) * 80.0
    errors = []
    for n in (40, 80):
        calls.clear()
        levels = karras_levels(n, 0.002, 80.0)
        x, h = heun_solve(denoise, None, zx, zh, g, levels)
        assert len(calls) == n_calls(levels) == 2 * n - 1
        ratio = np.asarray(x)[:8] / (scale * np.asarray(zx)[:8])
        np.testing.assert_allclose(np.asarray(h)[:8] / (scale * np.asarray(zh)[:8]), ratio.mean(), rtol=1e-4)
        errors.append(float(np.abs(ratio - 1).max()))
    assert errors[1] < 2.5e-3  # 80 steps: within 0.25 % of the exact flow
    assert 3.0 < errors[0] / errors[1] < 5.0  # and second order: half the step, a quarter of the error


def test_heun_ends_on_a_point_mass():
    """A denoiser that always answers c (data = one point) takes every start exactly to c."""
    g = _graph([4])
    target = jnp.asarray(np.random.default_rng(1).normal(size=g.positions.shape), jnp.float32)

    def denoise(params, x, h, s, graph):
        return target, jnp.zeros_like(h)

    zx, zh = sample_noise(jax.random.PRNGKey(3), g, 6)
    x, h = heun_solve(denoise, None, zx, zh, g, karras_levels(3, 0.01, 10.0))
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), 0.0, atol=1e-6)


def _teacher():
    cfg = RunConfig(mode="diffusion", model=PRESETS["tiny"], size_hist=(0, 0, 1, 1, 1))
    return cfg, init_params(cfg)


def test_pairs_are_deterministic_zero_com_and_round_trip(tmp_path):
    cfg, params = _teacher()
    sizes = np.array([3, 4, 2, 4, 3], np.int32)
    a = generate_pairs(cfg, params, sizes, seed=5, ode_steps=2, sigma_max=80.0, batch_size=2, n_valid=1)
    b = generate_pairs(cfg, params, sizes, seed=5, ode_steps=2, sigma_max=80.0, batch_size=2, n_valid=1)
    c = generate_pairs(cfg, params, sizes, seed=6, ode_steps=2, sigma_max=80.0, batch_size=2, n_valid=1)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(a.noise_x, c.noise_x)
    assert len(a) == 5 and a.positions.shape == (sizes.sum(), 3) and a.noise_h.shape == (sizes.sum(), 6)
    assert list(a.split("train")) == [0, 1, 2, 3] and list(a.split("valid")) == [4]
    for i in range(len(a)):
        zx, _ = a.noise(i)
        x, t = a.molecule(i)
        assert len(x) == len(t) == sizes[i]
        np.testing.assert_allclose(zx.mean(0), 0.0, atol=1e-5)  # noise on the zero-CoM subspace
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)  # and so is the ODE's end
        assert t.min() >= 0 and t.max() < N_TYPES
    a.save(tmp_path / "p.npz")
    r = PairSet.load(tmp_path / "p.npz")
    for f in ("n_atoms", "positions", "types", "noise_x", "noise_h"):
        np.testing.assert_array_equal(getattr(r, f), getattr(a, f))
    assert r.n_valid == 1


def test_batches_keep_noise_beside_its_molecule():
    cfg, params = _teacher()
    sizes = np.array([3, 4, 2, 4], np.int32)
    pairs = generate_pairs(cfg, params, sizes, seed=0, ode_steps=1, sigma_max=80.0)
    graphs, (nx, nh) = make_batch(pairs, [3, 0, 2, 1], n_shards=2)
    assert nx.shape[:2] == graphs.positions.shape[:2] and nh.shape[2] == 6
    for shard, ids in enumerate(([3, 2], [0, 1])):
        o = 0
        for i in ids:
            x, _ = pairs.molecule(i)
            zx, zh = pairs.noise(i)
            np.testing.assert_array_equal(graphs.positions[shard, o : o + len(x)], x)
            np.testing.assert_array_equal(nx[shard, o : o + len(x)], zx)
            np.testing.assert_array_equal(nh[shard, o : o + len(x)], zh)
            o += len(x)
        assert not nx[shard, o:].any() and not graphs.node_mask[shard, o:].any()  # padding rows stay empty


def _one_call_student():
    """A tiny student, a batch of two molecules, their noise and the student's one-call answer to it."""
    cfg = RunConfig(mode="distill", model=PRESETS["tiny"])
    params = init_params(cfg)
    _, apply = make_apply(cfg)
    cfn = make_consistency_fn(apply, cfg.consistency)
    g = _graph([4, 3])
    zx, zh = sample_noise(jax.random.PRNGKey(2), g, 6)
    s = cfg.consistency.sigma_max
    ox, oh = cfn(params, s * zx, s * zh, jnp.full(g.node_mask.shape, s, jnp.float32), g)
    return cfg, params, cfn, g, zx, zh, s, ox, oh


def test_distill_loss_is_zero_on_the_students_own_answer():
    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    loss, aux = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency)
    assert abs(float(loss)) < 1e-6 and float(aux["position_error"]) < 1e-4
    loss2, aux2 = distill_loss(cfn, params, ox + 0.3 * g.node_mask[:, None], oh, (zx, zh), g, cfg.consistency)
    assert float(loss2) > 0.1 and abs(float(aux2["position_error"]) - 0.3 * np.sqrt(3)) < 1e-3
    # features() of the target types is what training compares the feature channels with
    assert features(g).shape == oh.shape


def test_anchor_molecules_compare_with_the_anchor_model_at_low_noise():
    cfg = RunConfig(mode="distill", model=PRESETS["tiny"])
    params = init_params(cfg)
    other = init_params(cfg, seed=9)
    _, apply = make_apply(cfg)
    cfn = make_consistency_fn(apply, cfg.consistency)
    g = _graph([4, 3, 5])
    zx, zh = sample_noise(jax.random.PRNGKey(2), g, 6)
    x = zx * 1.5
    h = features(g)
    key = jax.random.PRNGKey(7)
    # every molecule anchored, anchor = the student itself: nothing to learn, whatever the one-step targets
    loss, aux = distill_loss(cfn, params, x, h, (zx, zh), g, cfg.consistency, key, params, 1.0)
    assert abs(float(loss)) < 1e-6 and abs(float(aux["anchor_loss"])) < 1e-6
    # a different anchor model gives a positive loss; with fraction 0 the anchor is ignored
    loss2, _ = distill_loss(cfn, params, x, h, (zx, zh), g, cfg.consistency, key, other, 1.0)
    assert float(loss2) > 1e-3
    l0, _ = distill_loss(cfn, params, x, h, (zx, zh), g, cfg.consistency, key, other, 0.0)
    l_plain, _ = distill_loss(cfn, params, x, h, (zx, zh), g, cfg.consistency)
    assert float(l0) == float(l_plain)


def test_a_batch_that_does_not_split_evenly_over_devices():
    """5 molecules on 2 shards (a small validation set): the short shard gets an empty graph more."""
    cfg, params = _teacher()
    sizes = np.array([3, 4, 2, 4, 5], np.int32)
    pairs = generate_pairs(cfg, params, sizes, seed=0, ode_steps=1, sigma_max=80.0)
    graphs, (nx, nh) = make_batch(pairs, [0, 1, 2, 3, 4], n_shards=2)
    assert graphs.n_atoms.shape == (2, 4)
    assert list(graphs.n_atoms[0]) == [3, 2, 5, 0] and list(graphs.n_atoms[1]) == [4, 4, 0, 0]
    assert graphs.node_mask.sum() == sizes.sum() and nx.shape[:2] == graphs.positions.shape[:2]
    scfg = RunConfig(mode="distill", model=PRESETS["tiny"])
    sp = init_params(scfg)
    cfn = make_consistency_fn(make_apply(scfg)[1], scfg.consistency)
    g1 = jax.tree_util.tree_map(lambda a: a[1], graphs)
    loss, _ = distill_loss(cfn, sp, g1.positions, features(g1), (nx[1], nh[1]), g1, scfg.consistency)
    g_alone, (ax, ah) = make_batch(pairs, [1, 3], n_shards=1)
    g_alone = jax.tree_util.tree_map(lambda a: a[0], g_alone)
    alone, _ = distill_loss(cfn, sp, g_alone.positions, features(g_alone), (ax[0], ah[0]), g_alone, scfg.consistency)
    np.testing.assert_allclose(float(loss), float(alone), rtol=1e-5)  # the empty graph changes nothing


def test_bond_term_measures_short_pair_distances():
    """Target = the student's own output stretched by a factor f: the bond error is the RMS of d (1 - 1/f) over
    the target's pairs closer than 2 Å, per molecule; an unstretched target gives zero."""
    from molgen.consistency.distill import BOND_CUTOFF

    cfg = RunConfig(mode="distill", model=PRESETS["tiny"])
    params = init_params(cfg)
    cfn = make_consistency_fn(make_apply(cfg)[1], cfg.consistency)
    g = _graph([6, 5])
    zx, zh = sample_noise(jax.random.PRNGKey(4), g, 6)
    s = cfg.consistency.sigma_max
    own, oh = cfn(params, s * zx, s * zh, jnp.full(g.node_mask.shape, s, jnp.float32), g)
    o = np.asarray(own)[:6]
    f = 2.0 / np.median(np.linalg.norm(o[:, None] - o[None], axis=-1)[~np.eye(6, dtype=bool)])
    target = np.asarray(own) * f
    _, aux = distill_loss(cfn, params, jnp.asarray(target), oh, (zx, zh), g, cfg.consistency, bond_weight=1.0)
    expected = []
    for a, b in ((0, 6), (6, 11)):
        d = np.linalg.norm(target[a:b, None] - target[None, a:b], axis=-1)
        near = (d < BOND_CUTOFF) & ~np.eye(b - a, dtype=bool)
        expected.append(np.sqrt(np.mean((d[near] * (1 - 1 / f)) ** 2)))
    assert 0 < near.sum() < near.size - (b - a)  # the last molecule has pairs on both sides of the cutoff
    np.testing.assert_allclose(float(aux["bond_error"]), np.mean(expected), rtol=1e-4)
    _, aux0 = distill_loss(cfn, params, own, oh, (zx, zh), g, cfg.consistency, bond_weight=1.0)
    assert float(aux0["bond_error"]) < 1e-5 and abs(float(aux0["bond_loss"])) < 1e-6


def _relax_term(cfg, cfn, g, zx, zh, s, key, teacher, rounds):
    """params -> the relaxation term (weight 1) of the student's own one-call answer, with this teacher."""

    def term(p):
        px, ph = cfn(p, s * zx, s * zh, jnp.full(g.node_mask.shape, s, jnp.float32), g)
        return distill_loss(cfn, p, px, ph, (zx, zh), g, cfg.consistency, key,
                            relax=(teacher, None, 1.0, rounds))[1]["relax_loss"]

    return term


def _unit_step(params, grads, size=1e-4):
    """params moved by ``size`` against the gradient direction (asserting the gradient is not zero)."""
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(grads)))
    assert float(norm) > 0
    return jax.tree_util.tree_map(lambda a, b: a - size * b / norm, params, grads)


def test_relaxation_term_pulls_the_output_towards_the_teachers_denoising_of_it():
    """relax: zero when the teacher's denoiser gives the output back; else the pseudo-Huber distance to it,
    whose gradient moves the output towards the teacher's answer; the denoiser sees the output + low noise."""
    from molgen.consistency.distill import RELAX_SIGMAS
    from molgen.consistency.ict import pseudo_huber
    from molgen.diffusion.noise import per_molecule_sum

    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    seen = {}

    def echo(tp, px, ph, sig, graph):  # a "teacher" whose denoising returns the clean output exactly
        seen["sig"], seen["dx"] = sig, px - ox
        return ox, oh

    key = jax.random.PRNGKey(5)
    base, _ = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key)
    loss, aux = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key, relax=(echo, None, 2.0, 0))
    assert abs(float(aux["relax_loss"])) < 1e-6 and abs(float(loss - base)) < 1e-6
    real = np.asarray(g.node_mask) > 0
    sig = np.asarray(seen["sig"])[real]
    assert (sig >= RELAX_SIGMAS[0] - 1e-6).all() and (sig <= RELAX_SIGMAS[1] + 1e-6).all()
    assert float(jnp.abs(seen["dx"]).max()) > 1e-3  # the teacher was given a noised copy, not the output itself
    shift = 0.1 * ox  # a stretched copy: zero-CoM, as every denoised molecule is

    def shifted(tp, px, ph, sig, graph):
        return ox + shift, oh

    loss2, aux2 = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key, relax=(shifted, None, 2.0, 0))
    dim = g.n_atoms.astype(jnp.float32) * 9
    want = pseudo_huber(per_molecule_sum(jnp.sum(shift**2, -1), g), dim, cfg.consistency.huber_scale)
    want = float(jnp.sum(want * (g.n_atoms > 0)) / jnp.sum(g.n_atoms > 0))
    assert abs(float(aux2["relax_loss"]) - want) < 1e-5 and abs(float(loss2 - base) - 2.0 * want) < 1e-5

    relax_only = _relax_term(cfg, cfn, g, zx, zh, s, key, shifted, 0)
    step = _unit_step(params, jax.grad(relax_only)(params))
    assert float(relax_only(step)) < float(relax_only(params))  # a gradient step moves towards the target


def test_deterministic_relaxation_targets_the_teachers_refinement_of_the_output_itself():
    """relax with R rounds: the teacher sees the output itself (no noise) at refine_levels(R), with clean
    features of its argmax types, R times in a row; the term is the pseudo-Huber distance to the result, the
    same for any key; its gradient moves the output towards that result and not through the teacher."""
    from molgen.consistency.ict import pseudo_huber
    from molgen.diffusion.noise import per_molecule_sum
    from molgen.refine import clean_features, refine_levels

    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    calls = []

    def stretch(tp, px, ph, sig, graph):  # a "teacher" that stretches what it is given by 5 %
        calls.append((px, ph, sig))
        return 1.05 * px, ph

    key = jax.random.PRNGKey(5)
    base, _ = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key)
    loss, aux = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key, relax=(stretch, None, 2.0, 3))
    assert len(calls) == 3
    real = np.asarray(g.node_mask) > 0
    for (px, ph, sig), level, r in zip(calls, refine_levels(3), range(3)):
        np.testing.assert_allclose(np.asarray(px), np.asarray(ox) * 1.05**r, atol=1e-5)  # no noise added
        np.testing.assert_allclose(np.asarray(ph), np.asarray(clean_features(oh, g.node_mask)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sig)[real], level, rtol=1e-6)
    shift = (1.05**3 - 1) * ox
    dim = g.n_atoms.astype(jnp.float32) * 9
    dh = clean_features(oh, g.node_mask) - oh
    want = pseudo_huber(per_molecule_sum(jnp.sum(shift**2, -1) + jnp.sum(dh**2, -1), g), dim,
                        cfg.consistency.huber_scale)
    want = float(jnp.sum(want * (g.n_atoms > 0)) / jnp.sum(g.n_atoms > 0))
    assert abs(float(aux["relax_loss"]) - want) < 1e-5 and abs(float(loss - base) - 2.0 * want) < 1e-5
    _, aux_k = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, jax.random.PRNGKey(9),
                            relax=(stretch, None, 2.0, 3))
    assert abs(float(aux_k["relax_loss"]) - float(aux["relax_loss"])) < 1e-6  # deterministic

    fixed_x, fixed_h = 1.05**3 * ox, clean_features(oh, g.node_mask)

    def fixed(tp, px, ph, sig, graph):  # the same target, as a constant of the parameters
        return fixed_x, fixed_h

    relax_only = _relax_term(cfg, cfn, g, zx, zh, s, key, stretch, 3)
    fixed_only = _relax_term(cfg, cfn, g, zx, zh, s, key, fixed, 3)
    grads = jax.grad(relax_only)(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(jax.grad(fixed_only)(params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # none through the teacher
    step = _unit_step(params, grads)
    assert float(fixed_only(step)) < float(fixed_only(params))  # a step moves the output towards the target


def test_refined_targets_are_the_students_answers_relaxed_by_the_teacher(tmp_path):
    """refine_pairs: the noise is generate_pairs' for the seed; round 0 is the student's one-call molecule;
    each round is x <- D(x, sigma) with the types re-read, molecule by molecule (padding and batch-mates
    change nothing); targets stay zero-CoM; the round count survives a save and load."""
    from molgen.data.batching import node_features
    from molgen.diffusion.ode import edm_denoiser

    tcfg, tparams = _teacher()
    leaves, tree = jax.tree_util.tree_flatten(tparams)  # an untrained teacher's epsilon is ~0: stir its weights
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    tparams = tree.unflatten([w + 0.2 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
    scfg = RunConfig(mode="distill", model=PRESETS["tiny"])
    sparams = init_params(scfg, seed=3)
    sizes = np.array([3, 5, 2, 4, 3], np.int32)
    ode = generate_pairs(tcfg, tparams, sizes, seed=4, ode_steps=1, sigma_max=80.0, batch_size=2)
    zero = refine_pairs(scfg, sparams, tcfg, tparams, sizes, seed=4, rounds=0, batch_size=2)
    two = refine_pairs(scfg, sparams, tcfg, tparams, sizes, seed=4, rounds=2, sigma=0.3, batch_size=2, n_valid=1)
    np.testing.assert_array_equal(zero.noise_x, ode.noise_x)
    np.testing.assert_array_equal(two.noise_h, ode.noise_h)
    _, s_apply = make_apply(scfg)
    cfn = make_consistency_fn(s_apply, scfg.consistency)
    _, t_apply = make_apply(tcfg)
    denoise = edm_denoiser(t_apply, tcfg.diffusion)
    s_max = scfg.consistency.sigma_max
    moved = 0.0
    for i, n in enumerate(sizes):  # each molecule alone, in its own padded batch
        g = _graph([int(n)])
        zx = np.zeros(g.positions.shape, np.float32)
        zh = np.zeros((len(g.node_mask), 6), np.float32)
        zx[:n], zh[:n] = two.noise(i)
        full = lambda v: jnp.full(g.node_mask.shape, v, jnp.float32)  # noqa: E731
        x, h = cfn(sparams, s_max * zx, s_max * zh, full(s_max), g)
        np.testing.assert_allclose(zero.molecule(i)[0], np.asarray(x)[:n], atol=2e-4)
        np.testing.assert_array_equal(zero.molecule(i)[1], np.argmax(np.asarray(h)[:n, :N_TYPES], -1))
        x0 = x
        for _ in range(2):
            t = np.argmax(np.asarray(h)[:, :N_TYPES], -1) * np.asarray(g.node_mask, np.int64)
            x, h = denoise(tparams, x, jnp.asarray(node_features(t, np.asarray(g.node_mask))), full(0.3), g)
        tx, tt = two.molecule(i)
        np.testing.assert_allclose(tx, np.asarray(x)[:n], atol=2e-4)
        np.testing.assert_array_equal(tt, np.argmax(np.asarray(h)[:n, :N_TYPES], -1))
        np.testing.assert_allclose(tx.mean(0), 0.0, atol=1e-4)
        moved = max(moved, float(np.abs(np.asarray(x - x0)[:n]).max()))
    assert moved > 1e-3  # the teacher's rounds changed the targets
    two.save(tmp_path / "p.npz")
    back = PairSet.load(tmp_path / "p.npz")
    assert back.refine_rounds == 2 and back.n_valid == 1
    np.testing.assert_array_equal(back.positions, two.positions)


def test_pairs_at_a_temperature_start_the_teachers_ode_from_scaled_noise(tmp_path):
    import pytest

    from molgen import MolgenError
    from molgen.diffusion.ode import edm_denoiser

    tcfg, tparams = _teacher()
    sizes = np.array([3, 4, 2], np.int32)
    one = generate_pairs(tcfg, tparams, sizes, seed=2, ode_steps=2, sigma_max=80.0, batch_size=2)
    cold = generate_pairs(tcfg, tparams, sizes, seed=2, ode_steps=2, sigma_max=80.0, batch_size=2, temperature=0.5)
    assert one.temperature == 1.0 and cold.temperature == 0.5
    np.testing.assert_allclose(cold.noise_x, 0.5 * one.noise_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cold.noise_h, 0.5 * one.noise_h, rtol=1e-6, atol=1e-7)
    assert not np.allclose(cold.positions, one.positions, atol=1e-3)  # a different start, a different end
    _, t_apply = make_apply(tcfg)
    denoise = edm_denoiser(t_apply, tcfg.diffusion)
    levels = karras_levels(2, 0.002, 80.0)
    for i, n in enumerate(sizes):  # the target is the ODE's end from s_max * (the stored noise), nothing else
        g = _graph([int(n)])
        zx = np.zeros(g.positions.shape, np.float32)
        zh = np.zeros((len(g.node_mask), 6), np.float32)
        zx[:n], zh[:n] = cold.noise(i)
        x, h = heun_solve(denoise, tparams, jnp.asarray(zx), jnp.asarray(zh), g, levels)
        # (an untrained teacher's ODE ends hundreds of Å out: batched and single float sums differ by ~1e-4)
        np.testing.assert_allclose(cold.molecule(i)[0], np.asarray(x)[:n], rtol=1e-3, atol=2e-4)
        np.testing.assert_array_equal(cold.molecule(i)[1], np.argmax(np.asarray(h)[:n, :N_TYPES], -1))
    cold.save(tmp_path / "pairs.npz")
    assert PairSet.load(tmp_path / "pairs.npz").temperature == 0.5
    cfg = RunConfig(mode="distill", model=PRESETS["tiny"], n_pairs=3)
    with pytest.raises(MolgenError, match="temperature 0.5, the run wants 1"):
        prepare_pairs(cfg, tmp_path)
    assert prepare_pairs(cfg.replace(pair_temperature=0.5), tmp_path).temperature == 0.5


def test_a_run_refuses_pairs_made_for_other_targets(tmp_path):
    import pytest

    from molgen import MolgenError

    tcfg, tparams = _teacher()
    sizes = np.array([3, 4], np.int32)
    generate_pairs(tcfg, tparams, sizes, seed=0, ode_steps=1, sigma_max=80.0).save(tmp_path / "pairs.npz")
    cfg = RunConfig(mode="distill", model=PRESETS["tiny"], n_pairs=2, refine_rounds=8)
    with pytest.raises(MolgenError, match="0 refinement rounds, the run wants 8"):
        prepare_pairs(cfg, tmp_path)
    assert len(prepare_pairs(cfg.replace(refine_rounds=0), tmp_path)) == 2


def _dmd_setup():
    """A tiny student's one-call answers, a tiny teacher and DMD over its denoiser."""
    from molgen.consistency.dmd import DMD
    from molgen.diffusion.ode import edm_denoiser

    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    tcfg, tparams = _teacher()
    _, tapply = make_apply(tcfg)
    dmd = DMD(edm_denoiser(tapply, tcfg.diffusion), tapply, tparams, tcfg.diffusion, 1.0)
    return dmd, tcfg, tparams, g, ox, oh


def test_distribution_matching_vanishes_when_the_fake_model_is_the_teacher():
    """Fake = teacher: the generator term and its gradient are 0; the fake loss is EDM's loss on the output."""
    from molgen.consistency.dmd import dmd_terms
    from molgen.diffusion.edm import diffusion_loss

    dmd, tcfg, tparams, g, ox, oh = _dmd_setup()
    keep = jnp.ones(g.n_atoms.shape, jnp.float32)
    key = jax.random.PRNGKey(4)
    gen, fake, aux = dmd_terms(dmd, tparams, ox, oh, g, key, keep)
    assert abs(float(gen)) < 1e-9 and abs(float(aux["dmd_gap"])) < 1e-6
    grad_x = jax.grad(lambda x: dmd_terms(dmd, tparams, x, oh, g, key, keep)[0])(ox)
    assert float(jnp.abs(grad_x).max()) == 0.0
    want, _ = diffusion_loss(dmd.apply, tparams, ox, oh, g, jax.random.split(key, 3)[2], dmd.diffusion)
    assert abs(float(fake) - float(want)) < 1e-6 and float(fake) > 0
    other = init_params(tcfg, seed=11)  # a different fake model: the term is no longer 0
    gen2, _, aux2 = dmd_terms(dmd, other, ox, oh, g, key, keep)
    assert float(gen2) > 0 and float(aux2["dmd_gap"]) > 0


def test_distribution_matching_gradient_is_the_normalised_denoiser_difference():
    """d gen / d x = (D_fake - D_real) / (w sqrt(dim)) per molecule (w: mean |x - D_real|); molecules with keep 0
    get none; the fake loss sends nothing to x and the generator term nothing to the fake model."""
    from molgen.consistency.dmd import DMD, dmd_terms

    _, tcfg, tparams, g, ox, oh = _dmd_setup()
    rng = np.random.default_rng(0)
    m = np.asarray(g.node_mask)[:, None]
    real_x, fake_x = (jnp.asarray(rng.normal(size=ox.shape) * m, jnp.float32) for _ in range(2))
    real_h, fake_h = (jnp.asarray(rng.normal(size=oh.shape) * m, jnp.float32) for _ in range(2))

    def denoise(p, yx, yh, s, graph):  # answers its parameters, whatever the input
        return p["x"], p["h"]

    _, tapply = make_apply(tcfg)
    dmd = DMD(denoise, lambda p, zx, zh, t, graph: (zx * p["a"], zh * p["a"]), {"x": real_x, "h": real_h},
              tcfg.diffusion, 1.0)
    fake = {"x": fake_x, "h": fake_h, "a": jnp.float32(0.5)}
    keep = jnp.asarray([1.0, 0.0, 0.0], jnp.float32)  # the first molecule only (the third is the padding graph)
    key = jax.random.PRNGKey(1)
    gx, gh = jax.grad(lambda x, h: dmd_terms(dmd, fake, x, h, g, key, keep)[0], argnums=(0, 1))(ox, oh)
    first = np.asarray(g.segment) == 0
    n = int(g.n_atoms[0])
    w = (np.abs(np.asarray(ox - real_x))[first].sum() + np.abs(np.asarray(oh - real_h))[first].sum()) / (n * 9)
    scale = 1.0 / (w * np.sqrt(n * 9) * 1.0)  # one kept molecule: the mean over molecules divides by 1
    np.testing.assert_allclose(np.asarray(gx)[first], np.asarray(fake_x - real_x)[first] * scale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gh)[first], np.asarray(fake_h - real_h)[first] * scale, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(gx[~first]).max()) == 0.0 and float(jnp.abs(gh[~first]).max()) == 0.0
    fx = jax.grad(lambda x: dmd_terms(dmd, fake, x, oh, g, key, keep)[1])(ox)
    assert float(jnp.abs(fx).max()) == 0.0
    gp = jax.grad(lambda p: dmd_terms(dmd, p, ox, oh, g, key, keep)[0])(fake)
    fp = jax.grad(lambda p: dmd_terms(dmd, p, ox, oh, g, key, keep)[1])(fake)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree_util.tree_leaves(gp))
    assert float(jnp.abs(fp["a"])) > 0  # the fake model learns from the student's molecules


def test_distill_loss_adds_distribution_matching_on_one_call_molecules_only():
    """dmd in distill_loss: + weight * generator term + fake loss, reported in aux; anchored molecules excluded."""
    from molgen.consistency.dmd import DMD, dmd_terms

    from molgen.diffusion.ode import edm_denoiser

    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    tcfg, _ = _teacher()
    _, tapply = make_apply(tcfg)
    other = init_params(tcfg, seed=11)
    key = jax.random.PRNGKey(6)
    base, _ = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key)
    dmd3 = DMD(edm_denoiser(tapply, tcfg.diffusion), tapply, init_params(tcfg), tcfg.diffusion, 3.0)
    loss, aux = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key, dmd=dmd3, fake_params=other)
    gen, fake, _ = dmd_terms(dmd3, other, ox, oh, g, jax.random.fold_in(key, 2), jnp.ones(g.n_atoms.shape))
    assert abs(float(aux["dmd_loss"]) - float(gen)) < 1e-5 and abs(float(aux["fake_loss"]) - float(fake)) < 1e-5
    assert abs(float(loss - base) - (3.0 * float(gen) + float(fake))) < 1e-4
    # every molecule anchored: nothing is one-call, so nothing enters either term
    _, aux_a = distill_loss(cfn, params, ox, oh, (zx, zh), g, cfg.consistency, key, anchor_params=params,
                            anchor_fraction=1.0, dmd=dmd3, fake_params=other)
    assert float(aux_a["dmd_loss"]) == 0.0 and float(aux_a["fake_loss"]) == 0.0
