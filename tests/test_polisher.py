"""Objective ``polish``: the examples (the teacher's and the model's own polishing chains from the start model's
molecules, of one or more calls), the loss, the saved examples' checks, and a run from the command line whose model
then polishes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli, one_line_error, tiny_models

from molgen import MolgenError
from molgen.chem.elements import N_TYPES
from molgen.consistency.distill import PairSet, _noise_batches
from molgen.consistency import polisher
from molgen.consistency.ict import make_multistep_step, multistep_levels
from molgen.consistency.polisher import PolishConfig, check_examples, example_steps, make_examples, polish_loss
from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.diffusion.levels import low_ladder
from molgen.models import Model, write_params
from molgen.networks import init_params, model_fn

CFG = PolishConfig(teacher="t", molecules=3, calls=2, temperature=0.7)


def _models():
    """(start: a consistency model, teacher: a diffusion model, own: another diffusion model)."""
    diff, cons, _ = tiny_models()
    own = Model(diff.cfg, init_params(diff.cfg, seed=5))
    return cons, diff, own


def _steps(start, teacher, own, renoise=0.3, seed=0):
    return example_steps(jax.jit(model_fn(start.cfg)), start.params, jax.jit(model_fn(teacher.cfg)), teacher.params,
                         jax.jit(model_fn(own.cfg)), own.params, start.cfg.consistency, renoise, seed)


def _alone(n):
    g = pack(None, [np.zeros(n, np.int32)])
    return g, (lambda v: jnp.full(g.node_mask.shape, v, jnp.float32))


def _call(fn, params, x, types, level, n):
    """``fn`` (a denoiser) on one molecule alone, its types given clean."""
    g, full = _alone(n)
    xp = np.zeros(g.positions.shape, np.float32)
    xp[:n] = x
    t = np.zeros(len(g.node_mask), np.int64)
    t[:n] = types
    ox, oh = fn(params, jnp.asarray(xp), jnp.asarray(type_features(t, np.asarray(g.node_mask), np)), full(level), g)
    return np.asarray(ox)[:n], np.asarray(oh)[:n]


def test_examples_follow_the_teachers_and_the_models_own_chains_molecule_by_molecule(tmp_path):
    start, teacher, own = _models()
    sizes = np.array([3, 5, 2], np.int32)
    ex = make_examples(*_steps(start, teacher, own), sizes, 4, CFG, 6, batch_size=2)
    # 2 calls: (one-call molecule, 0.4), (teacher's step from it, 0.1), (own step from it, 0.1) per molecule
    assert list(ex.n_atoms) == [3, 3, 3, 5, 5, 5, 2, 2, 2] and ex.n_valid == 1 and ex.drawn == 3
    assert ex.noise_h.shape == (len(ex.types), 7)
    levels = low_ladder(2)
    t_den, o_den = model_fn(teacher.cfg), model_fn(own.cfg)
    moved = 0.0
    for i, n in enumerate(sizes):
        first, after_teacher, after_own = (3 * i + k for k in range(3))
        x0, t0 = ex.molecule(first)
        np.testing.assert_allclose(x0.mean(0), 0.0, atol=1e-4)
        for k, (x_in, t_in, level) in ((first, (x0, t0, levels[0])), (after_teacher, (*ex.molecule(after_teacher),
                                                                                       levels[1]))):
            tx, th = _call(t_den, teacher.params, x_in, t_in, level, int(n))
            np.testing.assert_allclose(ex.noise(k)[0], tx, atol=2e-4)  # the target: the teacher's denoised molecule
            np.testing.assert_allclose(ex.noise(k)[1][:, :-1], th, atol=2e-4)
            np.testing.assert_allclose(ex.noise(k)[1][:, -1], level)
        # the teacher's chain goes on from the teacher's output, the model's own from its own
        np.testing.assert_allclose(ex.molecule(after_teacher)[0], ex.noise(first)[0], atol=1e-6)
        np.testing.assert_array_equal(ex.molecule(after_teacher)[1], np.argmax(ex.noise(first)[1][:, :N_TYPES], -1))
        ox, oh = _call(o_den, own.params, x0, t0, levels[0], int(n))
        np.testing.assert_allclose(ex.molecule(after_own)[0], ox, atol=2e-4)
        np.testing.assert_array_equal(ex.molecule(after_own)[1], np.argmax(oh[:, :N_TYPES], -1))
        tx, _ = _call(t_den, teacher.params, ox, np.argmax(oh[:, :N_TYPES], -1), levels[1], int(n))
        np.testing.assert_allclose(ex.noise(after_own)[0], tx, atol=2e-4)
        moved = max(moved, float(np.abs(ex.molecule(after_own)[0] - ex.molecule(after_teacher)[0]).max()))
    assert moved > 1e-3  # the two chains differ
    ex.save(tmp_path / "pairs.npz")
    back = check_examples(PairSet.load(tmp_path / "pairs.npz"), tmp_path / "pairs.npz", CFG, 6)
    np.testing.assert_array_equal(back.noise_h, ex.noise_h)
    with pytest.raises(MolgenError, match="the run wants 3, 4, 0.7"):
        check_examples(back, tmp_path / "pairs.npz", dataclasses.replace(CFG, calls=4), 6)
    with pytest.raises(MolgenError, match=r"start calls \[1\]; the run wants 3, 2, 0.7, \[1, 4\]"):
        check_examples(back, tmp_path / "pairs.npz", dataclasses.replace(CFG, start_calls=(1, 4)), 6)
    with pytest.raises(MolgenError, match="a distillation's pairs"):
        check_examples(PairSet(ex.n_atoms, ex.positions, ex.types, ex.noise_x, ex.noise_h[:, :6], 1, 2, 0.7, 3),
                       tmp_path / "pairs.npz", CFG, 6)


def test_start_molecules_of_several_calls_are_the_multistep_samplers_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(polisher, "BATCH", 1)  # a batch per molecule: the two batches take 3 calls, then 1
    start, teacher, own = _models()
    steps = _steps(start, teacher, own, renoise=0.3, seed=2)
    sizes = np.array([3, 4], np.int32)
    one = make_examples(*steps, sizes, 2, CFG, 6, batch_size=2)
    three = make_examples(*steps, sizes, 2, dataclasses.replace(CFG, start_calls=(3, 1)), 6, batch_size=2)
    assert three.start_calls == (3, 1) and one.start_calls == (1,)
    # batch 0: its one-call molecule, then the multistep sampler's two later calls at its levels (0.4, 0.1),
    # re-noised by 0.3 z from PRNGKey(seed + 11) folded with the batch and the call
    g, zx, zh = next(_noise_batches(sizes, 2, 6, 1, CFG.temperature))
    smax = start.cfg.consistency.sigma_max
    x, h = model_fn(start.cfg)(start.params, smax * zx, smax * zh, jnp.full(g.node_mask.shape, smax), g)
    np.testing.assert_allclose(one.molecule(0)[0], np.asarray(x)[:3], atol=2e-4)  # one call
    later = make_multistep_step(model_fn(start.cfg), start.cfg.consistency)
    key = jax.random.fold_in(jax.random.PRNGKey(2 + 11), 0)
    for i, s in enumerate(multistep_levels(3, start.cfg.consistency)[1:]):
        x, h = later(start.params, x, h, jnp.float32(s), jnp.bool_(False), g, jax.random.fold_in(key, i),
                     jnp.float32(0.3))
    np.testing.assert_allclose(three.molecule(0)[0], np.asarray(x)[:3], atol=2e-4)
    np.testing.assert_array_equal(three.molecule(0)[1], np.argmax(np.asarray(h)[:3, :N_TYPES], -1))
    assert np.abs(three.molecule(0)[0] - one.molecule(0)[0]).max() > 1e-3  # the later calls moved it
    for k in range(3, 6):  # batch 1: one call, as when every batch takes one
        np.testing.assert_array_equal(three.molecule(k)[0], one.molecule(k)[0])
        np.testing.assert_array_equal(three.noise(k)[0], one.noise(k)[0])
    path = tmp_path / "pairs.npz"
    three.save(path)
    assert PairSet.load(path).start_calls == (3, 1)


def test_the_loss_is_zero_for_the_teacher_itself_and_ignores_padding():
    start, teacher, own = _models()
    ex = make_examples(*_steps(start, teacher, own), np.array([4, 3], np.int32), 1, CFG, 6, batch_size=64)
    ids = range(len(ex))
    for pad in (None, 64):
        g = pack([ex.molecule(i)[0] for i in ids], [ex.molecule(i)[1].astype(np.int32) for i in ids], pad_nodes=pad,
                 pad_edges=None if pad is None else 64 * 63)
        rows = np.zeros((len(g.node_mask), 3), np.float32), np.ones((len(g.node_mask), 7), np.float32)
        rows[0][: len(ex.noise_x)], rows[1][: len(ex.noise_h)] = ex.noise_x, ex.noise_h
        den = model_fn(teacher.cfg)
        same, aux = polish_loss(den, teacher.params, g, rows, 1.0)
        assert float(same) < 1e-9 and float(aux["type_agreement"]) == 1.0
        other, aux = polish_loss(den, own.params, g, rows, 1.0)
        assert float(other) > 1e-3 and float(aux["loss_x"]) > 0 and float(aux["loss_h"]) > 0
        if pad is None:
            first = float(other)
        else:
            assert float(other) == pytest.approx(first, rel=1e-5)  # more padding rows change nothing


def _folder(path, model):
    path.mkdir()
    model.cfg.save(path / "config.json")
    write_params(path / "params.msgpack", model.params)
    return path


def test_a_polish_run_from_the_command_line_trains_a_model_that_polishes(tmp_path):
    start, teacher, own = _models()
    s, t, o = (_folder(tmp_path / k, m) for k, m in (("start", start), ("teacher", teacher), ("own", own)))
    out = tmp_path / "run"
    args = ("train", "--recipe", "polish", "--init", o, "--teacher", t, "--set", f'polish.start="{s}"', "--set",
            "polish.molecules=12", "--set", "polish.calls=2", "--batch-size", 4, "--steps", 2, "--set",
            "optim.ckpt_every=1", "--set", "optim.eval_every=1", "--devices", 1, "--out", out)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "polish" and cfg["consistency"] is None and cfg["distill"] is None
    assert cfg["polish"]["teacher"] == str(t) and cfg["polish"]["start"] == str(s) and cfg["polish"]["calls"] == 2
    assert cfg["model"] == json.loads((o / "config.json").read_text())["model"]  # --init's network
    with np.load(out / "pairs.npz") as z:
        assert z["n_atoms"].shape == (36,) and int(z["n_valid"]) == 1
        least = PairSet.least_bytes(z["n_atoms"], 7)  # checked before they are made: their arrays alone
    assert least <= (out / "pairs.npz").stat().st_size <= least + 8192
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_x", "loss_h", "type_agreement", "val_loss"} <= set(log[-1])
    stamp = (out / "pairs.npz").stat().st_mtime_ns
    res = cli("train", "--resume", "--steps", 3, "--out", out, "--devices", 1)
    assert res.exit_code == 0 and "step 3" in res.output, res.output
    assert (out / "pairs.npz").stat().st_mtime_ns == stamp  # examples are made once per run
    res = cli("export", out, tmp_path / "polisher")
    assert res.exit_code == 0, res.output
    res = cli("sample", "--checkpoint", s, "-n", 3, "--steps", 1, "--polish", 2, "--polisher", tmp_path / "polisher",
              "-o", tmp_path / "p.sdf", "--no-report")
    assert res.exit_code == 0 and "+ 2 polishing calls of" in res.output, res.output
    res = cli("sample", "--checkpoint", tmp_path / "polisher", "-n", 2, "--steps", 2, "-o", tmp_path / "q.sdf",
              "--no-report")
    assert res.exit_code == 0 and "taught to polish molecules, not to make them" in res.output, res.output
    recipe = (tmp_path / "polisher" / "recipe.toml").read_text()
    with pytest.MonkeyPatch.context() as mp:  # a disk without room for the examples: refused before they are made
        import os
        from types import SimpleNamespace

        mp.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=least - 1, f_frsize=1, f_blocks=10**9,
                                                             f_bfree=least - 1))
        mp.setattr("molgen.launch.make_examples", lambda *a, **k: pytest.fail("made examples"))
        res = cli(*args[:-1], tmp_path / "full")
    assert res.exit_code == 2 and "36 polishing examples take at least" in res.output, res.output
    assert not (tmp_path / "full").exists()
    assert 'objective = "polish"' in recipe and "[polish]" in recipe and "[model]" not in recipe


def test_a_polish_run_refuses_wrong_models_in_one_line(tmp_path):
    start, teacher, own = _models()
    s, t, o = (_folder(tmp_path / k, m) for k, m in (("start", start), ("teacher", teacher), ("own", own)))
    base = ("train", "--recipe", "polish", "--set", "polish.molecules=12", "--batch-size", 4, "--steps", 1,
            "--devices", 1)
    one_line_error(cli(*base, "--init", o, "--teacher", s, "--out", tmp_path / "a"), "must be a diffusion model")
    one_line_error(cli(*base, "--init", o, "--teacher", t, "--set", f'polish.start="{o}"', "--out", tmp_path / "b"),
                   "must be a consistency model")
    one_line_error(cli(*base, "--init", s, "--teacher", t, "--out", tmp_path / "c"), "starts from a diffusion model")
    one_line_error(cli(*base, "--init", o, "--set", f'polish.start="{s}"', "--out", tmp_path / "d"), "--teacher")
    one_line_error(cli(*base, "--init", o, "--teacher", t, "--set", "polish.molecules=1", "--out", tmp_path / "e"),
                   "polish.molecules must be at least 2")
    for bad in ("[]", "[1, 0]", "[1.5]"):
        one_line_error(cli(*base, "--init", o, "--teacher", t, "--set", f"polish.start_calls={bad}", "--out",
                           tmp_path / "g"), "polish.start_calls must be a list of call counts, each at least 1")
    one_line_error(cli(*base[:5], "--batch-size", 64, "--steps", 1, "--devices", 1, "--init", o, "--teacher", t,
                       "--set", f'polish.start="{s}"', "--out", tmp_path / "f"), "too few examples for batch size 64")
