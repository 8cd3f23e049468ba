"""The teacher's probability-flow ODE solver, the distillation pairs and the distillation loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_net

from molgen import MolgenError
from molgen.chem.elements import N_TYPES, heteroatom_counts
from molgen.config import DataConfig, RunConfig
from molgen.consistency.distill import (BALANCE_TOP, BOND_CUTOFF, DistillConfig, PairSet, balance_pairs, check_pairs,
                                       distill_loss, keep_stable, make_pairs, ode_solver, polish_solver)
from molgen.consistency.ict import ConsistencyConfig, make_consistency_fn
from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.diffusion.levels import low_ladder, ode_levels
from molgen.diffusion.noise import sample_noise
from molgen.diffusion.ode import heun_solve, n_calls
from molgen.networks import init_params, model_fn, network
from molgen.objectives import features
from molgen.data.batching import make_batch

CC = ConsistencyConfig()
PLAIN = DistillConfig(anchor_fraction=0.0, bond_weight=0.0)


def _graph(sizes):
    return pack(None, [np.zeros(n, np.int32) for n in sizes])


def test_ode_levels():
    lv = ode_levels(5, 0.002, 80.0)
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
        levels = ode_levels(n, 0.002, 80.0)
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
    x, h = heun_solve(denoise, None, zx, zh, g, ode_levels(3, 0.01, 10.0))
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), 0.0, atol=1e-6)


def _teacher(stir: bool = False):
    cfg = RunConfig(model=tiny_net(), data=DataConfig(size_hist=(0, 0, 1, 1, 1)))
    params = init_params(cfg)
    if stir:  # an untrained teacher's epsilon is ~0: stir its weights
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
        params = tree.unflatten([w + 0.2 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
    return cfg, params


def _ode_pairs(tparams, tcfg, sizes, seed, steps=2, temperature=1.0, n_valid=0, batch_size=1000):
    solve = ode_solver(jax.jit(model_fn(tcfg)), tparams, steps, CC)
    return make_pairs(solve, sizes, seed, 6, n_valid, temperature=temperature, batch_size=batch_size)


def _student_cfg():
    return RunConfig(objective="distill", model=tiny_net(), diffusion=None, consistency=CC)


def test_pairs_are_deterministic_zero_com_and_round_trip(tmp_path):
    cfg, params = _teacher()
    sizes = np.array([3, 4, 2, 4, 3], np.int32)
    a = _ode_pairs(params, cfg, sizes, 5, n_valid=1, batch_size=2)
    b = _ode_pairs(params, cfg, sizes, 5, n_valid=1, batch_size=2)
    c = _ode_pairs(params, cfg, sizes, 6, n_valid=1, batch_size=2)
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
    least = PairSet.least_bytes(sizes, 6)  # the arrays alone; the file adds their headers and the zip's
    assert least <= (tmp_path / "p.npz").stat().st_size <= least + 8192
    r = PairSet.load(tmp_path / "p.npz")
    for f in ("n_atoms", "positions", "types", "noise_x", "noise_h"):
        np.testing.assert_array_equal(getattr(r, f), getattr(a, f))
    assert r.n_valid == 1
    saved = (tmp_path / "p.npz").read_bytes()
    for damaged in (saved[: len(saved) // 2], b"not a zip file"):  # cut short (a full disk), or something else
        (tmp_path / "p.npz").write_bytes(damaged)
        with pytest.raises(MolgenError, match="p.npz: damaged .*; delete it and the run makes its pairs again"):
            PairSet.load(tmp_path / "p.npz")


def test_batches_keep_noise_beside_its_molecule():
    cfg, params = _teacher()
    pairs = _ode_pairs(params, cfg, np.array([3, 4, 2, 4], np.int32), 0, steps=1)
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


def _one_call_student(sizes=(4, 3), seed=2):
    """A tiny student, a batch of molecules, their noise and the student's one-call answer to it."""
    cfg = _student_cfg()
    params = init_params(cfg)
    cfn = make_consistency_fn(network(cfg)[1], CC)
    g = _graph(list(sizes))
    zx, zh = sample_noise(jax.random.PRNGKey(seed), g, 6)
    s = CC.sigma_max
    ox, oh = cfn(params, s * zx, s * zh, jnp.full(g.node_mask.shape, s, jnp.float32), g)
    return cfg, params, cfn, g, zx, zh, s, ox, oh


def test_distill_loss_is_zero_on_the_students_own_answer():
    cfg, params, cfn, g, zx, zh, s, ox, oh = _one_call_student()
    loss, aux = distill_loss(cfn, params, ox, oh, (zx, zh), g, CC, PLAIN)
    assert abs(float(loss)) < 1e-6 and float(aux["position_error"]) < 1e-4
    loss2, aux2 = distill_loss(cfn, params, ox + 0.3 * g.node_mask[:, None], oh, (zx, zh), g, CC, PLAIN)
    assert float(loss2) > 0.1 and abs(float(aux2["position_error"]) - 0.3 * np.sqrt(3)) < 1e-3
    assert features(g).shape == oh.shape  # the target types' features are what the feature channels meet


def test_anchor_molecules_compare_with_the_anchor_model_at_low_noise():
    cfg = _student_cfg()
    params, other = init_params(cfg), init_params(cfg, seed=9)
    cfn = make_consistency_fn(network(cfg)[1], CC)
    g = _graph([4, 3, 5])
    zx, zh = sample_noise(jax.random.PRNGKey(2), g, 6)
    x, h, key = zx * 1.5, features(g), jax.random.PRNGKey(7)
    every = dataclasses.replace(PLAIN, anchor_fraction=1.0)
    # every molecule anchored, anchor = the student itself: nothing to learn, whatever the one-call targets
    loss, aux = distill_loss(cfn, params, x, h, (zx, zh), g, CC, every, key, params)
    assert abs(float(loss)) < 1e-6 and abs(float(aux["anchor_loss"])) < 1e-6
    # a different anchor model gives a positive loss; with fraction 0 the anchor is ignored
    loss2, _ = distill_loss(cfn, params, x, h, (zx, zh), g, CC, every, key, other)
    assert float(loss2) > 1e-3
    l0, _ = distill_loss(cfn, params, x, h, (zx, zh), g, CC, PLAIN, key, other)
    l_plain, _ = distill_loss(cfn, params, x, h, (zx, zh), g, CC, PLAIN)
    assert float(l0) == float(l_plain)


def test_a_batch_that_does_not_split_evenly_over_devices():
    """5 molecules on 2 shards (a small validation set): the short shard gets an empty graph more."""
    cfg, params = _teacher()
    sizes = np.array([3, 4, 2, 4, 5], np.int32)
    pairs = _ode_pairs(params, cfg, sizes, 0, steps=1)
    graphs, (nx, nh) = make_batch(pairs, [0, 1, 2, 3, 4], n_shards=2)
    assert graphs.n_atoms.shape == (2, 4)
    assert list(graphs.n_atoms[0]) == [3, 2, 5, 0] and list(graphs.n_atoms[1]) == [4, 4, 0, 0]
    assert graphs.node_mask.sum() == sizes.sum() and nx.shape[:2] == graphs.positions.shape[:2]
    scfg = _student_cfg()
    sp = init_params(scfg)
    cfn = make_consistency_fn(network(scfg)[1], CC)
    g1 = jax.tree_util.tree_map(lambda a: a[1], graphs)
    loss, _ = distill_loss(cfn, sp, g1.positions, features(g1), (nx[1], nh[1]), g1, CC, PLAIN)
    g_alone, (ax, ah) = make_batch(pairs, [1, 3], n_shards=1)
    g_alone = jax.tree_util.tree_map(lambda a: a[0], g_alone)
    alone, _ = distill_loss(cfn, sp, g_alone.positions, features(g_alone), (ax[0], ah[0]), g_alone, CC, PLAIN)
    np.testing.assert_allclose(float(loss), float(alone), rtol=1e-5)  # the empty graph changes nothing


def test_bond_term_measures_short_pair_distances():
    """Target = the student's own output stretched by a factor f: the bond error is the RMS of d (1 - 1/f) over
    the target's pairs closer than 2 Å, per molecule; an unstretched target gives zero."""
    cfg, params, cfn, g, zx, zh, s, own, oh = _one_call_student((6, 5), seed=4)
    o = np.asarray(own)[:6]
    f = 2.0 / np.median(np.linalg.norm(o[:, None] - o[None], axis=-1)[~np.eye(6, dtype=bool)])
    target = np.asarray(own) * f
    bonds = dataclasses.replace(PLAIN, bond_weight=1.0)
    _, aux = distill_loss(cfn, params, jnp.asarray(target), oh, (zx, zh), g, CC, bonds)
    expected = []
    for a, b in ((0, 6), (6, 11)):
        d = np.linalg.norm(target[a:b, None] - target[None, a:b], axis=-1)
        near = (d < BOND_CUTOFF) & ~np.eye(b - a, dtype=bool)
        expected.append(np.sqrt(np.mean((d[near] * (1 - 1 / f)) ** 2)))
    assert 0 < near.sum() < near.size - (b - a)  # the last molecule has pairs on both sides of the cutoff
    np.testing.assert_allclose(float(aux["bond_error"]), np.mean(expected), rtol=1e-4)
    _, aux0 = distill_loss(cfn, params, own, oh, (zx, zh), g, CC, bonds)
    assert float(aux0["bond_error"]) < 1e-5 and abs(float(aux0["bond_loss"])) < 1e-6


def test_polished_targets_are_the_students_answers_polished_by_the_teacher(tmp_path):
    """polish_solver: the noise is the ODE pairs' for the seed; no polishing gives the student's one-call
    molecule; each call is x <- D(x, s) on the low ladder with the types re-read, molecule by molecule (padding
    and batch-mates change nothing); targets stay zero-CoM; the call count survives a save and load."""
    tcfg, tparams = _teacher(stir=True)
    scfg = _student_cfg()
    sparams = init_params(scfg, seed=3)
    sizes = np.array([3, 5, 2, 4, 3], np.int32)
    t_den, s_fn = jax.jit(model_fn(tcfg)), jax.jit(model_fn(scfg))
    ode = _ode_pairs(tparams, tcfg, sizes, 4, steps=1, batch_size=2)
    zero = make_pairs(polish_solver(s_fn, sparams, t_den, tparams, 0, CC), sizes, 4, 6, batch_size=2)
    two = make_pairs(polish_solver(s_fn, sparams, t_den, tparams, 2, CC), sizes, 4, 6, 1, polish_calls=2,
                     batch_size=2)
    np.testing.assert_array_equal(zero.noise_x, ode.noise_x)
    np.testing.assert_array_equal(two.noise_h, ode.noise_h)
    moved = 0.0
    for i, n in enumerate(sizes):  # each molecule alone, in its own padded batch
        g = _graph([int(n)])
        zx = np.zeros(g.positions.shape, np.float32)
        zh = np.zeros((len(g.node_mask), 6), np.float32)
        zx[:n], zh[:n] = two.noise(i)
        full = lambda v: jnp.full(g.node_mask.shape, v, jnp.float32)  # noqa: E731
        x, h = s_fn(sparams, CC.sigma_max * zx, CC.sigma_max * zh, full(CC.sigma_max), g)
        np.testing.assert_allclose(zero.molecule(i)[0], np.asarray(x)[:n], atol=2e-4)
        np.testing.assert_array_equal(zero.molecule(i)[1], np.argmax(np.asarray(h)[:n, :N_TYPES], -1))
        x0 = x
        for level in low_ladder(2):
            t = np.argmax(np.asarray(h)[:, :N_TYPES], -1) * np.asarray(g.node_mask, np.int64)
            x, h = t_den(tparams, x, jnp.asarray(type_features(t, np.asarray(g.node_mask), np)), full(level), g)
        tx, tt = two.molecule(i)
        np.testing.assert_allclose(tx, np.asarray(x)[:n], atol=2e-4)
        np.testing.assert_array_equal(tt, np.argmax(np.asarray(h)[:n, :N_TYPES], -1))
        np.testing.assert_allclose(tx.mean(0), 0.0, atol=1e-4)
        moved = max(moved, float(np.abs(np.asarray(x - x0)[:n]).max()))
    assert moved > 1e-3  # the teacher's calls changed the targets
    two.save(tmp_path / "p.npz")
    back = PairSet.load(tmp_path / "p.npz")
    assert back.polish_calls == 2 and back.n_valid == 1
    np.testing.assert_array_equal(back.positions, two.positions)


def test_pairs_at_a_temperature_start_the_teachers_ode_from_scaled_noise(tmp_path):
    tcfg, tparams = _teacher()
    sizes = np.array([3, 4, 2], np.int32)
    one = _ode_pairs(tparams, tcfg, sizes, 2, batch_size=2)
    cold = _ode_pairs(tparams, tcfg, sizes, 2, temperature=0.5, batch_size=2)
    assert one.temperature == 1.0 and cold.temperature == 0.5
    np.testing.assert_allclose(cold.noise_x, 0.5 * one.noise_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cold.noise_h, 0.5 * one.noise_h, rtol=1e-6, atol=1e-7)
    assert not np.allclose(cold.positions, one.positions, atol=1e-3)  # a different start, a different end
    denoise = model_fn(tcfg)
    levels = ode_levels(2, 0.002, 80.0)
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
    back = PairSet.load(tmp_path / "pairs.npz")
    assert back.temperature == 0.5
    want = DistillConfig(pairs=3)
    with pytest.raises(MolgenError, match="temperature 0.5, the run wants 1"):
        check_pairs(back, tmp_path / "pairs.npz", want)
    assert check_pairs(back, tmp_path / "pairs.npz", dataclasses.replace(want, pair_temperature=0.5)) is back


def test_a_run_refuses_pairs_made_for_other_targets(tmp_path):
    tcfg, tparams = _teacher()
    pairs = _ode_pairs(tparams, tcfg, np.array([3, 4], np.int32), 0, steps=1)
    want = DistillConfig(pairs=2, targets="polished", polish_calls=8)
    with pytest.raises(MolgenError, match="0 polishing calls, the run wants 8"):
        check_pairs(pairs, tmp_path / "pairs.npz", want)
    with pytest.raises(MolgenError, match="holds 2 pairs, the run wants 5"):
        check_pairs(pairs, tmp_path / "pairs.npz", DistillConfig(pairs=5))
    assert len(check_pairs(pairs, tmp_path / "pairs.npz", DistillConfig(pairs=2))) == 2


def test_keep_stable_keeps_the_pairs_whose_target_is_a_stable_molecule(tmp_path):
    # targets: H2 (each H one bond: stable), CH (carbon with one bond: not), H2 again, HF (stable)
    mols = [([[0, 0, 0], [0.74, 0, 0]], [0, 0]), ([[0, 0, 0], [1.09, 0, 0]], [1, 0]),
            ([[0, 0, 0], [0, 0.74, 0]], [0, 0]), ([[0, 0, 0], [0.92, 0, 0]], [0, 4])]
    n = np.array([2, 2, 2, 2], np.int32)
    noise = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    pairs = PairSet(n, np.concatenate([np.float32(p) for p, _ in mols]), np.int8([t for _, ts in mols for t in ts]),
                    noise, -noise[:, :2], n_valid=1, polish_calls=4, temperature=0.7)
    kept = keep_stable(pairs)
    assert (len(kept), kept.drawn, kept.kept, kept.n_valid) == (3, 4, "stable", 1)
    for k, i in enumerate([0, 2, 3]):  # in their order, each noise beside its own target
        np.testing.assert_array_equal(kept.molecule(k)[0], pairs.molecule(i)[0])
        np.testing.assert_array_equal(kept.noise(k)[0], pairs.noise(i)[0])
    assert list(kept.split("train")) == [0, 1] and list(kept.split("valid")) == [2]
    kept.save(tmp_path / "pairs.npz")
    back = PairSet.load(tmp_path / "pairs.npz")
    assert (len(back), back.drawn, back.kept, back.polish_calls) == (3, 4, "stable", 4)
    want = DistillConfig(pairs=4, targets="polished", pair_temperature=0.7, keep="stable")
    assert check_pairs(back, tmp_path / "pairs.npz", want) is back
    with pytest.raises(MolgenError, match="keeps stable targets, the run wants all"):
        check_pairs(back, tmp_path / "pairs.npz", dataclasses.replace(want, keep="all"))
    with pytest.raises(MolgenError, match="holds 4 pairs, the run wants 3"):
        check_pairs(back, tmp_path / "pairs.npz", dataclasses.replace(want, pairs=3))


def test_heteroatom_counts_count_n_o_and_f_atoms_of_each_molecule():
    # CH4O (methanol), H2 (none), NOF plus H (three), C2 (none)
    types = np.int8([1, 0, 0, 0, 0, 3, 0, 0, 2, 3, 4, 0, 1, 1])
    assert heteroatom_counts(types, np.array([6, 2, 4, 2])).tolist() == [1, 0, 3, 0]


def _pairs_of_counts(counts, n_valid):
    """A pair set whose molecule i has counts[i] O atoms and 2 H atoms; its noise rows name the molecule."""
    n_atoms = np.int32([c + 2 for c in counts])
    types = np.concatenate([np.int8([3] * c + [0, 0]) for c in counts])
    mol = np.repeat(np.arange(len(counts)), n_atoms).astype(np.float32)
    pos = np.stack([mol, -mol, mol], 1)
    return PairSet(n_atoms, pos, types, pos + 0.5, np.repeat(mol[:, None], 6, 1), n_valid=n_valid, polish_calls=4,
                   temperature=0.8, drawn=50, kept="stable")


def test_balance_pairs_resamples_the_training_pairs_toward_the_references_heteroatom_counts():
    # 30 training molecules without N, O or F and 10 with three O atoms (a share of 0.25), then 4 held out
    counts = [0] * 30 + [3] * 10 + [0, 3, 3, 0]
    pairs = _pairs_of_counts(counts, n_valid=4)
    only_o3 = np.zeros(BALANCE_TOP + 1)
    only_o3[3] = 1.0
    assert balance_pairs(pairs, only_o3, 0.0) is pairs  # balance 0: as drawn

    full = balance_pairs(pairs, only_o3, 1.0)  # weights 0 / 0.75 and 1 / 0.25: each O3 molecule taken 4 times
    assert len(full) == 44 and list(full.split("valid")) == [40, 41, 42, 43]
    assert [int(full.noise_h[full.offsets[i], 0]) for i in range(40)] == list(np.repeat(np.arange(30, 40), 4))
    for i in range(len(full)):  # each pair whole: its target, noise and noise features of one drawn molecule
        m = int(full.noise_h[full.offsets[i], 0])
        np.testing.assert_array_equal(full.molecule(i)[0], pairs.molecule(m)[0])
        np.testing.assert_array_equal(full.molecule(i)[1], pairs.molecule(m)[1])
        np.testing.assert_array_equal(full.noise(i)[0], pairs.noise(m)[0])
    assert [int(full.noise_h[full.offsets[i], 0]) for i in range(40, 44)] == [40, 41, 42, 43]  # held out as they were
    assert (full.drawn, full.kept, full.polish_calls, full.temperature) == (50, "stable", 4, 0.8)

    halves = np.zeros(BALANCE_TOP + 1)
    halves[[0, 3]] = 0.5
    half = balance_pairs(pairs, halves, 0.5)  # halfway in the weights' logarithm: 1.46 copies against 0.85
    got = heteroatom_counts(half.types, half.n_atoms)[: len(half) - 4]
    assert 0.25 < np.mean(got == 3) < 0.5 and abs(len(half) - 44) <= 6
    again = balance_pairs(pairs, halves, 0.5)  # the same pairs give the same set
    np.testing.assert_array_equal(again.positions, half.positions)
