"""Polishing without re-noising: the anneal sampler of consistency models and --polish N with a diffusion model."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules, random_rotation, tiny_net

from molgen import MolgenError
from molgen.config import DataConfig, RunConfig
from molgen.consistency.distill import DistillConfig
from molgen.consistency.ict import ConsistencyConfig, make_consistency_fn
from molgen.data.batching import pack
from molgen.data.features import clean_features, type_features
from molgen.diffusion.levels import low_ladder
from molgen.diffusion.polish import make_polish_step
from molgen.models import Model, export_model, load_model, polisher_for, save_model
from molgen.networks import init_params, network
from molgen.sample import _polish_step, plan, sample

HIST = DataConfig(size_hist=(0, 0, 0, 2, 3, 5, 1))  # molecules of 3-6 atoms
CONS = ConsistencyConfig(sigma_data_x=1.4, sigma_data_h=0.2)


def _cfg(kind):
    if kind == "diffusion":
        return RunConfig(model=tiny_net(), data=HIST)
    return RunConfig(objective="ct", model=tiny_net(), consistency=CONS, diffusion=None, data=HIST)


def _model(kind, rng, meta=None):
    cfg = _cfg(kind)
    p = init_params(cfg, 0)
    return Model(cfg, jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype), p),
                 meta or {})


def _counting(cfg, calls, tag):
    _, apply = network(cfg)

    def counted(params, x, h, cond, graph):
        jax.debug.callback(lambda: calls.append(tag))
        return apply(params, x, h, cond, graph)

    return counted


def test_low_ladder():
    assert low_ladder(0) == [] and low_ladder(1) == [0.1]
    for n in (2, 4, 8, 16, 32):
        lv = low_ladder(n)
        assert len(lv) == n and all(b < a for a, b in zip(lv, lv[1:]))
        assert lv[0] == pytest.approx(0.4) and lv[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        low_ladder(-1)
    m = Model(_cfg("consistency"), None)
    assert plan(m, 3, "anneal")[1] == [80.0] + low_ladder(2)


def test_anneal_sampler_makes_k_calls_and_its_first_call_is_the_one_call_sample(rng):
    m = _model("consistency", rng)
    calls = []
    counted = _counting(m.cfg, calls, "ct")
    one = sample(m, n=8, steps=1, seed=3, batch_size=8).molecules
    one_a = sample(m, n=8, steps=1, seed=3, batch_size=8, sampler="anneal").molecules
    three = sample(m, n=8, steps=3, seed=3, batch_size=8, sampler="anneal", apply=counted).molecules
    assert len(calls) == 3
    again = sample(m, n=8, steps=3, seed=3, batch_size=8, sampler="anneal").molecules
    renoised = sample(m, n=8, steps=3, seed=3, batch_size=8).molecules
    moved = 0.0
    for a, b, c, d, e in zip(one, one_a, three, again, renoised):
        np.testing.assert_array_equal(a.positions, b.positions)  # k = 1: the same single call
        np.testing.assert_array_equal(c.positions, d.positions)  # deterministic after the seed's first noise
        np.testing.assert_allclose(c.positions.mean(0), 0, atol=1e-5 * max(1.0, np.abs(c.positions).max()))
        assert np.isfinite(c.positions).all() and not np.allclose(c.positions, e.positions)
        moved = max(moved, float(np.abs(c.positions - a.positions).max()))
    assert moved > 1e-3


def test_polish_step_is_equivariant_reads_types_and_ignores_padding(rng):
    m = _model("consistency", rng)
    step = jax.jit(make_polish_step(make_consistency_fn(network(m.cfg)[1], CONS)))
    pos, typ = random_molecules(rng, (5, 7))
    g = pack(pos, typ)
    h = type_features(g.types, g.node_mask, np)
    x1, h1 = step(m.params, g.positions, h, 0.3, g)
    # E(3): a rotation or reflection of the input rotates the output; the types' features are unchanged
    q = random_rotation(rng, reflect=True)
    xq, hq = step(m.params, (g.positions @ q.T).astype(np.float32), h, 0.3, g)
    np.testing.assert_allclose(np.asarray(xq), np.asarray(x1) @ q.T, atol=3e-4)
    np.testing.assert_allclose(np.asarray(hq), np.asarray(h1), atol=3e-4)
    # the types are re-read from h: any h with the same argmax per atom gives the same step
    wobble = (h + 0.02 * rng.random(h.shape) * np.asarray(g.node_mask)[:, None]).astype(np.float32)
    xw, _ = step(m.params, g.positions, wobble, 0.3, g)
    np.testing.assert_allclose(np.asarray(xw), np.asarray(x1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(clean_features(jnp.asarray(wobble), g.node_mask)), h, atol=1e-6)
    # permuting the atoms of a molecule permutes its output
    perm = np.concatenate([rng.permutation(5), 5 + rng.permutation(7)])
    gp = pack([pos[0][perm[:5]], pos[1][perm[5:] - 5]], [typ[0][perm[:5]], typ[1][perm[5:] - 5]])
    xp, _ = step(m.params, gp.positions, type_features(gp.types, gp.node_mask, np), 0.3, gp)
    np.testing.assert_allclose(np.asarray(xp)[:12], np.asarray(x1)[perm], atol=3e-4)
    # a molecule alone (other padding, no neighbour molecule) gets the same output
    ga = pack(pos[:1], typ[:1])
    xa, _ = step(m.params, ga.positions, type_features(ga.types, ga.node_mask, np), 0.3, ga)
    np.testing.assert_allclose(np.asarray(xa)[:5], np.asarray(x1)[:5], atol=3e-5)
    np.testing.assert_allclose(np.asarray(x1)[:5].mean(0), 0, atol=1e-4)


def test_polish_adds_n_calls_of_the_polisher(rng, monkeypatch):
    cm, dm = _model("consistency", rng), _model("diffusion", rng, {"source": "weights/d"})
    calls = []
    base = sample(cm, n=6, steps=2, seed=4, batch_size=6).molecules
    polisher = Model(dm.cfg, dm.params, dm.meta)
    counted_d = _counting(dm.cfg, calls, "diffusion")
    monkeypatch.setattr("molgen.sample.network", lambda cfg, precision=None: (None, counted_d))  # the polisher's
    _polish_step.cache_clear()  # built again, with the counting network (an earlier test may have kept one)
    res = sample(cm, n=6, steps=2, seed=4, batch_size=6, polish_calls=3, polisher=polisher,
                 apply=_counting(cm.cfg, calls, "ct"))
    monkeypatch.undo()
    _polish_step.cache_clear()
    assert calls.count("ct") == 2 and calls.count("diffusion") == 3 and res.calls == 5
    assert res.settings["molgen_polish"] == 3 and res.settings["molgen_polisher"] == "d"
    for a, b in zip(base, res.molecules):
        assert len(a.types) == len(b.types) and not np.allclose(a.positions, b.positions)
        np.testing.assert_allclose(b.positions.mean(0), 0, atol=1e-4)
    with pytest.raises(MolgenError, match="--polisher"):
        sample(cm, n=2, steps=1, polish_calls=1)
    own = sample(dm, n=4, steps=3, seed=4, batch_size=4, polish_calls=2, polisher=dm)  # its own samples
    assert own.calls == 5
    for mol in own.molecules:
        assert np.isfinite(mol.positions).all()
        np.testing.assert_allclose(mol.positions.mean(0), 0, atol=1e-4)


def test_which_model_polishes(tmp_path, rng):
    ct, diff = _model("consistency", rng), _model("diffusion", rng)
    with pytest.raises(MolgenError, match="name one with --polisher"):
        polisher_for(ct)
    assert polisher_for(diff) is diff  # a diffusion model polishes its own samples
    # a distilled model's teacher recorded as a path that is gone: the shipped model of that name
    kd = Model(ct.cfg.replace(objective="distill", distill=DistillConfig(teacher="gone/edm-small-diffusion")), None)
    p = polisher_for(kd)
    assert p.cfg.kind == "diffusion" and p.name == "edm-small-diffusion" and p.params is not None
    ect = Model(ct.cfg.replace(objective="ect", init="runs/gone", diffusion=diff.cfg.diffusion), None)
    with pytest.raises(MolgenError, match="runs/gone is not here; name one with --polisher"):
        polisher_for(ect)
    save_model(tmp_path / "c", ct.cfg, ct.params)
    with pytest.raises(MolgenError, match="must be a diffusion model"):
        polisher_for(kd, tmp_path / "c")


def test_a_card_names_the_polisher_that_polish_calls_by_default(tmp_path, rng, monkeypatch):
    ct, diff = _model("consistency", rng), _model("diffusion", rng)
    save_model(tmp_path / "d", diff.cfg, diff.params)
    save_model(tmp_path / "d2", diff.cfg, diff.params)
    kd_cfg = ct.cfg.replace(objective="distill", distill=DistillConfig(teacher="edm-small-diffusion"))
    kd = Model(kd_cfg, ct.params, {"polisher": str(tmp_path / "d")})
    assert polisher_for(kd).name == "d"  # the card's, not the teacher
    assert polisher_for(kd, tmp_path / "d2").name == "d2"  # --polisher wins
    assert polisher_for(kd, calls=0) is None
    # a card's polisher that is gone: the shipped model of its name, else a one-line refusal
    assert polisher_for(Model(kd_cfg, None, {"polisher": "gone/edm-small-polisher"})).name == "edm-small-polisher"
    with pytest.raises(MolgenError, match="polisher gone/p is not here; name one with --polisher"):
        polisher_for(Model(kd_cfg, None, {"polisher": "gone/p"}))
    for bad in ("", 3, ["d"]):
        with pytest.raises(MolgenError, match="meta.json's polisher must name a model"):
            polisher_for(Model(kd_cfg, None, {"polisher": bad}))
    # a shipped model's bare name is the shipped model, whatever folder of that name the working folder has
    save_model(tmp_path / "edm-small-polisher", ct.cfg, ct.params)
    kd_bare = Model(kd_cfg, None, {"polisher": "edm-small-polisher"})
    monkeypatch.chdir(tmp_path)
    p = polisher_for(kd_bare)
    assert p.cfg.consistency is None and Path(p.meta["source"]) != tmp_path / "edm-small-polisher"
    # export keeps the card's polisher
    save_model(tmp_path / "kd", kd_cfg, ct.params, {"polisher": str(tmp_path / "d")})
    assert export_model(tmp_path / "kd", tmp_path / "kd2").polisher == str(tmp_path / "d")
    assert load_model(tmp_path / "kd2").polisher == str(tmp_path / "d")


def test_the_default_is_a_stage_of_edm_small_stack_then_its_polishers_stages_and_polishes_with_it():
    """The default: edm-small-stack's network trained five rounds more (its config's init is the eighth, alone,
    whose recipe, recipe-8.toml, starts from the seventh, alone, recipe-7.toml from the sixth, recipe-6.toml from
    the fifth, and recipe-5.toml from edm-small-stack), then 4 stages of edm-small-polisher appended as they are,
    which it also names as its polisher."""
    from molgen.models import default_model

    m = load_model(default_model())
    assert m.polisher == "edm-small-polisher" and polisher_for(m).name == "edm-small-polisher"
    stack, polisher = load_model("edm-small-stack"), load_model("edm-small-polisher")
    assert m.cfg.stack.inner == stack.cfg.stack and m.cfg.stack.model == polisher.cfg.model
    assert m.cfg.stack.levels == tuple(low_ladder(4))
    assert m.cfg.init == "runs/default-stack" and m.cfg.distill.teacher == "edm-diffusion"
    chain = {"recipe-8.toml": "runs/default-stack", "recipe-7.toml": "runs/stage6", "recipe-6.toml": "runs/stage5",
             "recipe-5.toml": "edm-small-stack"}  # each earlier round's recipe and the weights it started from
    for recipe, init in chain.items():
        assert f"--init {init} " in (Path(m.meta["source"]) / recipe).read_text(), recipe
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), m.params["stage"], polisher.params)
    assert all(jax.tree_util.tree_leaves(same))
    # the base has edm-small-stack's shapes and was trained on from its weights
    shapes = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, m.params["base"], stack.params)
    assert all(jax.tree_util.tree_leaves(shapes))
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                                             m.params["base"], stack.params))
    assert 0 < max(moved) < 0.1
