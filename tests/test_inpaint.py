"""A diffusion model trained to complete fragments (objective ``inpaint``): the fragments it trains on, what its
network is shown and scored on, the sampler that keeps the fragment, and how it is chosen."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation, tiny_config, tiny_models

from molgen import MolgenError
from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.diffusion.edm import DiffusionConfig
from molgen.diffusion.inpaint import (InpaintConfig, fragment_mask, inpaint_loss, make_inpaint_polish_step,
                                      make_inpaint_step)
from molgen.fragment import Fragment, contains_fragment
from molgen.models import Model
from molgen.networks import network
from molgen.objectives import get_objective
from molgen.recipes import check_settings
from molgen.sample import preflight, sample

D, C, _ = tiny_models()  # molecules of 6-9 atoms
APPLY = network(D.cfg)[1]
INPAINT = Model(D.cfg.replace(objective="inpaint", inpaint=InpaintConfig()), D.params)
FRAG = Fragment(np.array([1, 3, 0, 0], np.int32),
                np.array([[0.0, 0.0, 0.0], [1.43, 0.0, 0.0], [-0.36, 1.03, 0.0], [-0.36, -0.5, 0.9]]) + 2.0)


def _batch(rng, sizes=(5, 9, 12, 7, 3, 10)):
    pos, typ = random_molecules(rng, sizes)
    return pack(pos, typ, pad_graphs=8)


def _counts(mask, g):
    return np.asarray(jax.ops.segment_sum(mask, g.segment, g.n_atoms.shape[0]))


def _spied():
    """(seen, spy): the tiny model's network, which records the positions and times it is given in ``seen``."""
    seen = {}

    def spy(params, zx, zh, t, graph):
        seen.update(zx=zx, t=t)
        return APPLY(params, zx, zh, t, graph)

    return seen, spy


def test_fragments_are_real_atoms_and_never_a_whole_or_empty_molecule(rng):
    g = _batch(rng)
    n = np.asarray(g.n_atoms)
    for seed in range(20):
        m = np.asarray(fragment_mask(jax.random.PRNGKey(seed), g, InpaintConfig(share=1.0)))
        assert set(np.unique(m)) <= {0.0, 1.0} and not (m * (1 - np.asarray(g.node_mask))).any()
        c = _counts(m, g)
        assert ((c == 0) | (c < n)).all() and not c[n == 0].any()
    none = fragment_mask(jax.random.PRNGKey(0), g, InpaintConfig(share=0.0))
    assert not np.asarray(none).any()
    # a plane's side is contiguous: the fixed atoms are those below a threshold along one direction
    many = [np.asarray(fragment_mask(jax.random.PRNGKey(s), g, InpaintConfig(share=1.0, contiguous=1.0,
                                                                              kept_min=0.4, kept_max=0.6)))
            for s in range(10)]
    shares = np.mean([_counts(m, g)[:6].sum() / n[:6].sum() for m in many])
    assert 0.3 < shares < 0.7


def test_the_network_sees_the_fragment_clean_at_time_0_and_is_scored_on_the_free_atoms(rng):
    g = _batch(rng)
    h = type_features(g.types, g.node_mask)
    seen, spy = _spied()

    cfg, icfg = DiffusionConfig(), InpaintConfig(share=1.0)
    key = jax.random.PRNGKey(3)
    loss, aux = inpaint_loss(spy, D.params, jnp.asarray(g.positions), h, g, key, cfg, icfg)
    fixed = np.asarray(fragment_mask(jax.random.split(key, 3)[0], g, icfg)) > 0
    assert fixed.any() and 0 < float(aux["fixed"]) < 1
    t, zx = np.asarray(seen["t"]), np.asarray(seen["zx"])
    assert not t[fixed].any() and (t[~fixed & (np.asarray(g.node_mask) > 0)] >= 0).all()
    # the fixed atoms are the molecule's own, moved so that each fragment's mean is 0
    seg = np.asarray(g.segment)
    for b in np.unique(seg[fixed]):
        rows = fixed & (seg == b)
        np.testing.assert_allclose(zx[rows].mean(0), 0, atol=1e-5)
        x = np.asarray(g.positions)[rows]
        np.testing.assert_allclose(zx[rows], x - x.mean(0), atol=1e-5)

    def moved_on_fixed(params, zx, zh, t, graph):  # outputs on the fixed atoms changed: the loss is not
        ex, eh = APPLY(params, zx, zh, t, graph)
        return ex + 5.0 * jnp.asarray(fixed)[:, None], eh - 3.0 * jnp.asarray(fixed)[:, None]

    loss2, _ = inpaint_loss(moved_on_fixed, D.params, jnp.asarray(g.positions), h, g, key, cfg, icfg)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_the_last_step_keeps_the_fragment_and_turns_with_it(rng):
    g = _batch(rng, sizes=(8, 6, 9))
    nf = D.cfg.n_features
    fixed = np.zeros(len(g.node_mask), np.float32)
    fixed[[0, 1, 2, 8, 9]] = 1.0
    zx = jnp.asarray(rng.normal(size=g.positions.shape).astype(np.float32)) * g.node_mask[:, None]
    zh = jnp.asarray(rng.normal(size=(len(g.node_mask), nf)).astype(np.float32)) * g.node_mask[:, None]
    step = jax.jit(make_inpaint_step(network(D.cfg)[1], D.cfg.diffusion))
    q = jnp.asarray(random_rotation(rng), jnp.float32)
    key = jax.random.PRNGKey(0)
    ax, ah = step(D.params, zx, zh, 0.01, 0.0, g, key, 1.0, jnp.asarray(fixed))  # the last step: no noise
    bx, bh = step(D.params, zx @ q.T, zh, 0.01, 0.0, g, key, 1.0, jnp.asarray(fixed))
    f = fixed > 0
    np.testing.assert_array_equal(np.asarray(ax)[f], np.asarray(zx)[f])
    np.testing.assert_array_equal(np.asarray(ah)[f], np.asarray(zh)[f])
    np.testing.assert_allclose(np.asarray(bx), np.asarray(ax) @ np.asarray(q).T, atol=2e-4)
    np.testing.assert_allclose(np.asarray(bh), np.asarray(ah), atol=2e-4)
    assert not np.asarray(ax)[np.asarray(g.node_mask) == 0].any()
    cx, _ = step(D.params, zx, zh, 0.5, 0.4, g, key, 1.0, jnp.asarray(fixed))  # a noisy step moves the free atoms
    free = ~f & (np.asarray(g.node_mask) > 0)
    assert np.abs(np.asarray(cx)[free] - np.asarray(zx)[free]).max() > 1e-3


def test_polishing_keeps_the_fragment_clean_at_time_0_and_turns_with_it(rng):
    g = _batch(rng, sizes=(8, 6, 9))
    fixed = np.zeros(len(g.node_mask), np.float32)
    fixed[[0, 1, 2, 8, 9]] = 1.0
    f, free = fixed > 0, (fixed == 0) & (np.asarray(g.node_mask) > 0)
    x = jnp.asarray(g.positions)
    h = type_features(g.types, g.node_mask)
    seen, spy = _spied()

    step = make_inpaint_polish_step(spy, D.cfg.diffusion)
    px, ph = step(D.params, x, h, 0.4, g, jnp.asarray(fixed))
    t, zx = np.asarray(seen["t"]), np.asarray(seen["zx"])
    assert not t[f].any() and (t[free] > 0).all()  # the fragment at time 0, the free atoms at the level's time
    seg, xs = np.asarray(g.segment), np.asarray(x)
    centre = np.stack([xs[f & (seg == seg[i])].mean(0) if (f & (seg == seg[i])).any() else xs[seg == seg[i]].mean(0)
                       for i in range(len(seg))])  # each molecule's fragment (or, without one, all its atoms)
    np.testing.assert_allclose(zx[f], (xs - centre)[f], atol=1e-5)  # given clean, unscaled, centred on it
    np.testing.assert_allclose(zx[free], (xs - centre)[free] / np.sqrt(1 + 0.4**2), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(px)[f], np.asarray(x)[f])
    np.testing.assert_array_equal(np.asarray(ph)[f], np.asarray(h)[f])
    assert np.abs(np.asarray(px)[free] - np.asarray(x)[free]).max() > 1e-3
    assert not np.asarray(px)[np.asarray(g.node_mask) == 0].any()
    q = jnp.asarray(random_rotation(rng), jnp.float32)
    jstep = jax.jit(make_inpaint_polish_step(APPLY, D.cfg.diffusion))
    ax, ah = jstep(D.params, x, h, 0.2, g, jnp.asarray(fixed))
    bx, bh = jstep(D.params, x @ q.T + 1.5, h, 0.2, g, jnp.asarray(fixed))
    np.testing.assert_allclose(np.asarray(bx), (np.asarray(ax) @ np.asarray(q).T + 1.5) * np.asarray(g.node_mask)[:, None],
                               atol=2e-4)
    np.testing.assert_allclose(np.asarray(bh), np.asarray(ah), atol=2e-4)


def test_polishing_a_completion_keeps_the_fragment_with_a_model_trained_to():
    plain = sample(INPAINT, 4, 5, seed=2, fragment=FRAG)
    res = sample(INPAINT, 4, 5, seed=2, fragment=FRAG, polish_calls=3, polisher=INPAINT)
    assert res.settings["molgen_calls"] == 8 and res.settings["molgen_polish"] == 3
    moved = 0.0
    for a, b in zip(plain.molecules, res.molecules, strict=True):
        np.testing.assert_array_equal(b.positions[:4], FRAG.positions)
        np.testing.assert_array_equal(b.types[:4], FRAG.types)
        assert np.isfinite(b.positions).all()
        moved = max(moved, float(np.abs(b.positions[4:] - a.positions[4:]).max()))
    assert moved > 1e-3  # the free atoms were polished


def test_few_sampler_steps_for_a_fragment_are_warned_of_fewer_with_polishing():
    def warned(calls, polish=0):
        return any("completes fragments poorly" in w for w in preflight(INPAINT, 2, 2, None, FRAG, calls, None, polish))

    assert warned(49) and not warned(50) and not warned(1000)
    assert warned(29 + 8, 8) and not warned(30 + 8, 8) and warned(20 + 16, 16)
    assert not any("poorly" in w for w in preflight(INPAINT, 2, 2, None, None, 10))  # no fragment: no warning


def test_a_polisher_not_trained_with_fragments_gets_the_fragment_put_back_after_each_call(monkeypatch):
    import molgen.sample as sampling

    states = []
    real = sampling._molecules

    def spy(x, h, sizes, *a, **k):  # the batch's positions before they are moved onto the fragment's input frame
        states.append((np.asarray(x), np.asarray(sizes)))
        return real(x, h, sizes, *a, **k)

    monkeypatch.setattr(sampling, "_molecules", spy)

    def pair_distances(p):
        return np.linalg.norm(p[:, None] - p[None], axis=-1)

    want = pair_distances(FRAG.positions)
    for model, sampler in ((INPAINT, None), (D, "ancestral")):
        states.clear()
        sample(model, 3, 5, seed=2, fragment=FRAG, sampler=sampler, polish_calls=3, polisher=D)
        x, sizes = states[0]
        for start in np.concatenate([[0], np.cumsum(sizes)[:-1]]):
            np.testing.assert_allclose(pair_distances(x[start : start + 4]), want, atol=1e-4)


def test_a_model_trained_to_complete_fragments_samples_them_with_the_fragment_given():
    res = sample(INPAINT, 6, 8, seed=1, fragment=FRAG)
    assert res.settings["molgen_sampler"] == "inpaint" and res.settings["molgen_calls"] == 8
    for m in res.molecules:
        np.testing.assert_array_equal(m.types[:4], FRAG.types)
        np.testing.assert_array_equal(m.positions[:4], FRAG.positions)
        assert np.isfinite(m.positions).all()
    assert contains_fragment(FRAG, res.molecules).all()
    assert sample(INPAINT, 3, 4, seed=1).settings["molgen_sampler"] == "ancestral"  # no fragment: EDM's
    replaced = sample(INPAINT, 3, 4, seed=1, fragment=FRAG, sampler="ancestral")  # the replacement method
    assert replaced.settings["molgen_sampler"] == "ancestral"
    with pytest.raises(MolgenError, match="completes a fragment"):
        sample(INPAINT, 3, 4, sampler="inpaint")
    with pytest.raises(MolgenError, match="is not"):
        sample(D, 3, 4, sampler="inpaint", fragment=FRAG)
    with pytest.raises(MolgenError, match="applies to diffusion models"):
        sample(C, 3, 2, sampler="inpaint", fragment=FRAG)


def test_the_objective_trains_a_diffusion_model_with_its_settings(mini_ds):
    cfg = tiny_config(mini_ds, "inpaint")
    assert cfg.inpaint == InpaintConfig() and cfg.kind == "diffusion"
    check_settings(cfg)
    with pytest.raises(MolgenError, match="kept_min must be at most kept_max"):
        check_settings(cfg.replace(inpaint=dataclasses.replace(cfg.inpaint, kept_min=0.8, kept_max=0.5)))
    with pytest.raises(MolgenError, match=r"inpaint.share must be in \[0, 1\]"):
        check_settings(cfg.replace(inpaint=dataclasses.replace(cfg.inpaint, share=1.5)))
    plain = get_objective("diffusion").configure(cfg, mini_ds, None)
    assert plain.inpaint is None  # another objective drops it


def test_a_moved_fragment_moves_the_completions_the_same_way():
    rng = np.random.default_rng(4)
    q, shift = random_rotation(rng), rng.normal(size=3) * 3
    moved = Fragment(FRAG.types, FRAG.positions @ q.T + shift)
    a = sample(INPAINT, 4, 5, seed=3, fragment=FRAG).molecules
    b = sample(INPAINT, 4, 5, seed=3, fragment=moved).molecules
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.types, y.types)
        np.testing.assert_allclose(y.positions, x.positions @ q.T + shift, atol=1e-3)
