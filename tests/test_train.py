"""The training loop: exact resume, Ctrl-C, data parallelism on 2 virtual devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import tiny_config

from molgen.config import RunConfig
from molgen.data.batching import BatchSampler
from molgen.models import load_model
from molgen.train import train


def _cfg(mini_ds, objective="diffusion"):
    return tiny_config(mini_ds, objective, batch_size=8, steps=20, ckpt_every=10, eval_every=10, warmup=5)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_checkpoint_is_restored_into_the_shapes_of_a_fresh_state(mini_ds):
    """state_shapes: init_state's tree, shapes, dtypes and device, without computing it."""
    from molgen.state import init_state, state_shapes

    for cfg in (_cfg(mini_ds), _cfg(mini_ds, "ct")):
        fresh, shapes = init_state(cfg), state_shapes(cfg)
        assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(shapes)
        for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(shapes)):
            assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


@pytest.mark.parametrize("objective", ["diffusion", "ct"])
def test_resume_is_exact(tmp_path, mini_ds, objective):
    from molgen.steps import step_programs

    cfg = _cfg(mini_ds, objective)
    straight = train(cfg, tmp_path / "a", mini_ds, progress=None, log=lambda s: None)
    built = step_programs.cache_info().misses
    first = train(cfg, tmp_path / "b", mini_ds, progress=None, log=lambda s: None, stop_at=10)
    assert int(first.state.step) == 10
    resumed = train(cfg, tmp_path / "b", mini_ds, resume=True, progress=None, log=lambda s: None)
    assert int(resumed.state.step) == int(straight.state.step) == 20
    assert step_programs.cache_info().misses == built  # the later runs reused the first one's programs
    for a, b in zip(_leaves(straight.state.params), _leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(straight.state.ema), _leaves(resumed.state.ema)):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert lines and all('"loss"' in ln for ln in lines)
    assert (tmp_path / "b" / "config.json").exists()


def test_refuses_to_overwrite_a_run(tmp_path, mini_ds):
    from molgen import MolgenError

    cfg = _cfg(mini_ds).with_optim(steps=2, ckpt_every=2)
    train(cfg, tmp_path / "r", mini_ds, progress=None, log=lambda s: None)
    with pytest.raises(MolgenError, match="--resume"):
        train(cfg, tmp_path / "r", mini_ds, progress=None, log=lambda s: None)


def test_ctrl_c_saves_a_checkpoint(tmp_path, mini_ds, monkeypatch):
    """Ctrl-C while the host draws the chunk of steps 4-7 (chunks of 4): the run stops at step 4, saved."""
    cfg = _cfg(mini_ds)
    orig = BatchSampler.indices

    def interrupt_at_7(self, step):
        if step == 7:
            raise KeyboardInterrupt
        return orig(self, step)

    monkeypatch.setattr(BatchSampler, "indices", interrupt_at_7)
    res = train(cfg, tmp_path / "c", mini_ds, progress=None, log=lambda s: None, chunk=4)
    assert res.interrupted and int(res.state.step) == 4
    assert load_model(tmp_path / "c").meta["step"] == 4


def test_a_run_whose_loss_diverges_stops_with_its_last_checkpoint_kept(tmp_path, mini_ds):
    """Resumed at step 4 with a learning rate that blows the parameters up: a one-line error that says which
    checkpoint is kept and how to go on, in train.log too; no non-finite loss logged; the run goes on from step 4."""
    from molgen.runlog import Diverged

    cfg, run = _cfg(mini_ds).with_optim(steps=8, ckpt_every=4), tmp_path / "d"
    train(cfg, run, mini_ds, progress=None, log=lambda s: None, chunk=4, stop_at=4)
    with pytest.raises(Diverged, match=r"loss became nan at step [5-8]; the checkpoint at step 4 is kept; continue "
                                       r"with a lower learning rate: molgen train --resume --out .* --lr LR"):
        train(cfg.with_optim(lr=1e12, warmup=1), run, mini_ds, resume=True, progress=None, log=lambda s: None, chunk=4)
    assert "stopped: loss became nan" in (run / "train.log").read_text()
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (run / "metrics.jsonl").read_text().splitlines())
    res = train(cfg, run, mini_ds, resume=True, progress=None, log=lambda s: None, chunk=4)
    assert int(res.state.step) == 8 and np.isfinite(_leaves(res.state.params)[0]).all()
    with pytest.raises(Diverged, match="no checkpoint was saved; start again with a lower --lr"):
        train(cfg.with_optim(lr=1e12, warmup=1), tmp_path / "e", mini_ds, progress=None, log=lambda s: None, chunk=4)


def test_loss_falls_on_a_fixed_batch(mini_ds):
    """Sanity of the objective and optimiser: repeated steps on one batch reduce its loss."""

    from molgen.state import init_state
    from molgen.data.batching import shard_batch
    from molgen.parallel import make_mesh, put_batch
    from molgen.steps import make_train_step

    cfg = _cfg(mini_ds).with_optim(lr=3e-3, warmup=1)
    mesh = make_mesh(jax.devices()[:1])
    step, evaluate = make_train_step(cfg, mesh)
    g = put_batch(shard_batch([mini_ds.molecule(i) for i in range(20, 36)], 1), mesh)
    state = init_state(cfg)
    key = jax.random.PRNGKey(0)
    before = float(evaluate(state.params, g, key))
    for s in range(40):
        state, m = step(state, g, jax.random.fold_in(key, s))
    after = float(evaluate(state.params, g, key))
    assert np.isfinite(after) and after < 0.7 * before


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from molgen.config import OptimConfig, RunConfig
    from molgen.consistency.ict import ConsistencyConfig
    from molgen.data import qm9, sources
    from molgen.nn.egnn import PRESETS
    from molgen.state import init_state
    from molgen.data.batching import shard_batch
    from molgen.parallel import make_mesh, put_batch
    from molgen.steps import make_train_step
    assert jax.device_count() == 2, jax.devices()
    ds = qm9.build_dataset(sources.read_qm9pack_csv([{csv!r}]))
    mols = [ds.molecule(i) for i in range(10, 18)]
    for mode in ("diffusion", "ct"):
      cons = ConsistencyConfig(total_steps=100) if mode == "ct" else None
      cfg = RunConfig(objective=mode, model=PRESETS["tiny"].replace(n_layers=1), consistency=cons,
                      optim=OptimConfig(batch_size=8),
                      diffusion=None if cons else RunConfig().diffusion)
      out = []
      for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        step, _ = make_train_step(cfg, mesh)
        g = put_batch(shard_batch(mols, 2), mesh)   # the same two shards on one device or two
        state = init_state(cfg)
        state, m = step(state, g, jax.random.PRNGKey(4))
        out.append((float(m["loss"]), np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])))
      (s1, p1), (s2, p2) = out
      assert abs(s1 - s2) < 1e-5 * max(1, abs(s1)), (mode, s1, s2)  # the same loss ...
      np.testing.assert_allclose(p1, p2, rtol=1e-4, atol=1e-6)  # ... and the same gradient step
      print("OK", mode, s1, s2)
""")


def test_two_devices_same_loss_as_one():
    """Both objectives, one batch in two shards: on one device and on two virtual devices."""
    from conftest import DATA_CSV

    from conftest import FAST_COMPILE

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(csv=str(DATA_CSV))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("OK") == 2


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, mini_ds, monkeypatch, signame):
    """`kill` or Ctrl-C while a chunk runs: that chunk finishes, then a checkpoint is written (a Ctrl-C inside the
    jitted step once left the donated state deleted and the save failed). Chunks of 4 steps: the signal comes
    while the host draws steps 4-7, i.e. while the device runs steps 0-3."""
    import os
    import signal

    cfg = _cfg(mini_ds)
    orig = BatchSampler.indices

    def term_at_4(self, step):
        if step == 4:
            os.kill(os.getpid(), getattr(signal, signame))
        return orig(self, step)

    monkeypatch.setattr(BatchSampler, "indices", term_at_4)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN under `nohup ... &`
    res = train(cfg, tmp_path / "t", mini_ds, progress=None, log=lambda s: None, chunk=4)
    assert res.interrupted == signame and int(res.state.step) == 4  # the chunk in flight finishes, then it stops
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert load_model(tmp_path / "t").meta["step"] == 4


def test_a_second_signal_stops_at_once_and_none_cuts_a_checkpoint_short(tmp_path, mini_ds, monkeypatch, capfd):
    """Ctrl-C says at once that the run stops after the chunk in flight; Ctrl-C again while the loop waits for that
    chunk stops without it, keeping the last checkpoint; a signal while a checkpoint is written only asks to stop
    (it once cut the final checkpoint short, leaving none)."""
    import signal

    import molgen.train

    cfg = _cfg(mini_ds)
    orig_indices, orig_wait, orig_save = BatchSampler.indices, molgen.train.wait_ready, molgen.train.save_checkpoint
    sent = []

    def signal_at(step, again_while_waiting):
        def indices(self, s):
            if s == step:
                os.kill(os.getpid(), signal.SIGINT)
                sent.append(s)
            return orig_indices(self, s)

        def wait(out):
            if again_while_waiting and len(sent) == 1:
                os.kill(os.getpid(), signal.SIGINT)
                sent.append("again")
            return orig_wait(out)

        return indices, wait

    def save_with_a_signal(mgr, state):  # a signal in the middle of every save
        os.kill(os.getpid(), signal.SIGINT)
        return orig_save(mgr, state)

    # chunks of 4, a checkpoint every 4 steps; Ctrl-C while the host draws steps 8-11 (the device runs 4-7), then
    # again while the loop waits for steps 4-7: the run keeps step 4's checkpoint and does not write step 8's
    indices, wait = signal_at(8, True)
    monkeypatch.setattr(BatchSampler, "indices", indices)
    monkeypatch.setattr(molgen.train, "wait_ready", wait)
    cfg4 = tiny_config(mini_ds, "diffusion", batch_size=8, steps=20, ckpt_every=4, eval_every=10, warmup=5)
    logged = []
    res = train(cfg4, tmp_path / "a", mini_ds, progress=None, log=logged.append, chunk=4)
    assert res.interrupted == "SIGINT" and int(res.state.step) == 4
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["4"]
    assert logged[-1] == ("stopped at once, without the chunk in flight: the last checkpoint (step 4) is kept; "
                          f"continue with: molgen train --resume --out {tmp_path / 'a'}")
    # Ctrl-C while steps 0-3 run, and again in the middle of the checkpoint it asked for: step 4's is written whole
    indices, _ = signal_at(4, False)
    monkeypatch.setattr(BatchSampler, "indices", indices)
    monkeypatch.setattr(molgen.train, "wait_ready", orig_wait)
    monkeypatch.setattr(molgen.train, "save_checkpoint", save_with_a_signal)
    res = train(cfg, tmp_path / "b", mini_ds, progress=None, log=lambda s: None, chunk=4)
    assert res.interrupted == "SIGINT" and int(res.state.step) == 4
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["4"]
    assert load_model(tmp_path / "b").meta["step"] == 4
    assert ("interrupted: stopping after the chunk of steps in flight to save a checkpoint; again to stop at once, "
            "with no checkpoint") in capfd.readouterr().err


def test_chunk_length_does_not_change_the_run(tmp_path, mini_ds):
    """Chunks of 50 (one call for the whole run) vs chunks of 3 stopped at step 10 and resumed in chunks of 7."""
    cfg = _cfg(mini_ds)
    quiet = dict(progress=None, log=lambda s: None)
    one = train(cfg, tmp_path / "a", mini_ds, chunk=50, **quiet)
    first = train(cfg, tmp_path / "b", mini_ds, chunk=3, stop_at=10, **quiet)
    assert int(first.state.step) == 10  # stop_at is honoured inside a chunk
    rest = train(cfg, tmp_path / "b", mini_ds, resume=True, chunk=7, **quiet)
    assert int(rest.state.step) == 20
    for a, b in zip(_leaves(one.state.params), _leaves(rest.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    steps = [__import__("json").loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 10 in steps and 20 in steps


def test_device_batches_train_like_host_batches(mini_ds):
    """Six steps of the device loop (batches assembled on the device) equal six steps on batches packed on the
    host, same molecules and keys."""
    import jax.numpy as jnp

    from molgen.data.device import ShapePlan, dense_set, put
    from molgen.state import init_state
    from molgen.data.batching import shard_batch
    from molgen.parallel import make_mesh, put_batch
    from molgen.steps import make_train_chunk, make_train_step

    cfg = _cfg(mini_ds)
    mesh = make_mesh(jax.devices()[:1])
    ids = mini_ds.split("train")
    sampler = BatchSampler(ids, cfg.optim.batch_size, cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    step, _ = make_train_step(cfg, mesh)
    host = init_state(cfg)
    for s in range(6):
        g = put_batch(shard_batch([mini_ds.molecule(int(i)) for i in sampler.indices(s)], 1), mesh)
        host, _ = step(host, g, jax.random.fold_in(key, s))
    row_of = {int(m): r for r, m in enumerate(ids)}
    rows = np.array([[[row_of[int(i)] for i in sampler.indices(s)]] for s in range(6)], np.int32)
    shape = ShapePlan(mini_ds.n_atoms, sampler, 1).shape
    chunk = make_train_chunk(cfg, mesh, shape)
    dev, metrics = chunk(init_state(cfg), put(dense_set(mini_ds, ids)), rows, jnp.int32(6), key)
    assert int(dev.step) == 6 and metrics["loss"].shape == (6,)
    for a, b in zip(_leaves(host.params), _leaves(dev.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision,layout", [("bf16", "packed"), ("float32", "grouped"), ("tf32", "packed")])
def test_precision_and_layout_resume_exactly_and_are_recorded(tmp_path, mini_ds, precision, layout):
    """bf16 and tf32 training and the grouped batch layout: a run resumed from its checkpoint ends bit-equal to a straight
    run, with finite float32 parameters, and its config records the settings."""
    cfg = _cfg(mini_ds).with_optim(precision=precision, layout=layout, steps=8, ckpt_every=4, eval_every=4)
    quiet = dict(progress=None, log=lambda s: None)
    straight = train(cfg, tmp_path / "a", mini_ds, chunk=4, **quiet)
    train(cfg, tmp_path / "b", mini_ds, chunk=4, stop_at=4, **quiet)
    resumed = train(cfg, tmp_path / "b", mini_ds, resume=True, chunk=4, **quiet)
    for a, b in zip(_leaves(straight.state.params), _leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(x)) and x.dtype == np.float32 for x in _leaves(straight.state.params))
    optim = RunConfig.load(tmp_path / "a" / "config.json").optim
    assert (optim.precision, optim.layout) == (precision, layout)


def test_auto_settings_are_resolved_and_bad_ones_refused(tmp_path, mini_ds):
    from molgen import MolgenError

    quiet = dict(progress=None, log=lambda s: None)
    train(_cfg(mini_ds).with_optim(steps=2), tmp_path / "c", mini_ds, **quiet)
    optim = RunConfig.load(tmp_path / "c" / "config.json").optim
    assert (optim.precision, optim.layout) == ("float32", "packed")  # `auto` on a CPU, recorded
    for bad, what in (({"precision": "fp8"}, "precision"), ({"layout": "dense"}, "layout")):
        with pytest.raises(MolgenError, match=what):
            train(_cfg(mini_ds).with_optim(**bad), tmp_path / "d", mini_ds, **quiet)
        assert not (tmp_path / "d").exists()  # refused before anything is written
    from molgen.steps import check_devices

    with pytest.raises(MolgenError, match="batch size 8 is not divisible by the 3 devices"):
        check_devices(_cfg(mini_ds).with_optim(batch_size=8), 3)
    check_devices(_cfg(mini_ds).with_optim(batch_size=8), 2)


def test_grouped_and_packed_batches_give_the_same_network_output(mini_ds):
    """The same molecules in the two layouts, same parameters: the EGNN's outputs agree on every real atom and
    padding rows stay zero."""
    import jax.numpy as jnp

    from molgen.data.device import GroupPlan, assemble, assemble_grouped, dense_set, plan_groups
    from molgen.data.features import type_features
    from molgen.networks import init_params, network

    cfg = _cfg(mini_ds)
    ids = mini_ds.split("train")
    dset = dense_set(mini_ds, ids)
    rows = np.arange(16)
    sampler = BatchSampler(ids, 16, seed=0)
    plan = GroupPlan(mini_ds.n_atoms, sampler, 1, n_groups=3)
    order = plan.arrange(rows[None, None], ids[rows][None, None])[0, 0]
    n = np.asarray(dset.n_atoms)[order]
    assert np.all(np.diff(n) >= 0)  # sorted by size
    grouped = assemble_grouped(dset, jnp.asarray(order), plan_groups(n, 3))
    packed = assemble(dset, jnp.asarray(order), int(n.sum()) + 1, int((n * (n - 1)).sum()))
    _, apply = network(cfg, "float32")
    params = init_params(cfg)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    out = []
    for g in (packed, grouped):
        h = type_features(g.types, g.node_mask)
        vel, hh = apply(params, g.positions, h, 0.5 * g.node_mask, g)
        real = np.asarray(g.node_mask) > 0
        assert not np.asarray(vel)[~real].any() and not np.asarray(hh)[~real].any()  # padding rows stay zero
        out.append((np.asarray(vel)[real], np.asarray(hh)[real]))
    np.testing.assert_allclose(out[0][0], out[1][0], atol=2e-5)
    np.testing.assert_allclose(out[0][1], out[1][1], atol=2e-5)


def test_progress_line_counts_time_left_to_the_time_budget_when_that_comes_first(tmp_path, monkeypatch):
    """A run of 1000 steps at 0.5 steps/s has 33 minutes to go, but one stopped by a 60-s budget (--max-minutes)
    has 40 s left after 20."""
    import types

    from molgen import runlog

    now = [1000.0]
    monkeypatch.setattr(runlog, "time", types.SimpleNamespace(time=lambda: now[0]))
    for budget, expect in ((None, "0:33:00 left"), (60.0, "0:00:40 left (time budget)"), (3600.0, "0:33:00 left")):
        said = []
        log = runlog.MetricsLog(tmp_path, 0, 1000, "lines", said.append, "diffusion", max_seconds=budget)
        now[0] += 20
        log.write(0, {"loss": np.full(10, 0.5)})
        log.close()
        assert said == [f"step 10/1000  loss 0.5000  0.50 steps/s  {expect}"], said


def test_progress_line_rate_is_the_mean_since_the_line_before(tmp_path, monkeypatch):
    """Chunks of 10 steps at 100 steps/s and one that waited 2 s more for a checkpoint: the line after them says
    the mean rate since the line before (5 chunks, 50 steps in 2.5 s: 20 steps/s), not the slow chunk's 4.76;
    metrics.jsonl keeps each chunk's own rate."""
    import json
    import types

    from molgen import runlog

    now = [1000.0]
    monkeypatch.setattr(runlog, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(runlog, "LINE_EVERY_S", 2.0)
    said = []
    log = runlog.MetricsLog(tmp_path, 0, 1000, "lines", said.append, "diffusion")
    for k, seconds in enumerate((0.1, 0.1, 0.1, 0.1, 2.1)):
        now[0] += seconds
        log.write(10 * k, {"loss": np.full(10, 0.5)})
    log.close()
    assert said[0].startswith("step 50/1000  loss 0.5000  20.00 steps/s"), said
    recs = [json.loads(line) for line in (tmp_path / runlog.METRICS_NAME).read_text().splitlines()]
    rates = {r["step"]: r["steps_per_s"] for r in recs}
    assert rates == {10: 100.0, 20: 100.0, 25: 100.0, 30: 100.0, 40: 100.0, 50: round(10 / 2.1, 3)}, rates


def test_validation_logs_the_ema_and_the_trained_parameters(tmp_path, mini_ds):
    """Each evaluation logs the EMA parameters' validation loss and the trained parameters' beside it, each the
    loss that Validation gives those parameters (fixed molecules and noise), in metrics.jsonl and in train.log."""
    from molgen.parallel import make_mesh
    from molgen.train import Validation

    cfg = _cfg(mini_ds).with_optim(steps=8, eval_every=4, ckpt_every=4)
    res = train(cfg, tmp_path / "r", mini_ds, chunk=4, progress=None, log=lambda s: None)
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [4, 8] and all("val_loss_trained" in r for r in vals)
    validation = Validation(mini_ds, RunConfig.load(tmp_path / "r" / "config.json"), make_mesh())
    assert vals[-1]["val_loss"] == pytest.approx(validation(res.state.ema), rel=1e-5)
    assert vals[-1]["val_loss_trained"] == pytest.approx(validation(res.state.params), rel=1e-5)
    assert vals[-1]["val_loss"] != vals[-1]["val_loss_trained"]  # 8 steps: the EMA still lags
    text = (tmp_path / "r" / "train.log").read_text()
    assert f"validation loss (EMA) {vals[-1]['val_loss']:.4f}, trained parameters " \
           f"{vals[-1]['val_loss_trained']:.4f}" in text


def test_data_without_a_validation_split_says_what_its_validation_loss_is(tmp_path, mini_ds):
    """A data set too small for a validation split (a few molecules) is validated on its first training molecules,
    and the run says so (train.log and the messages); with a validation split nothing is said."""
    from molgen.data.qm9 import QM9

    no_valid = QM9(mini_ds.positions, mini_ds.types, mini_ds.n_atoms, mini_ds.index, mini_ds.smiles,
                   {**mini_ds.splits, "valid": np.zeros(0, np.int32)})
    cfg = _cfg(mini_ds).with_optim(steps=4, eval_every=4, ckpt_every=4)
    said = "the data has no validation split: the validation losses are those of its first 64 training molecules"
    for ds, run, want in ((no_valid, "n", True), (mini_ds, "v", False)):
        shown = []
        train(cfg, tmp_path / run, ds, chunk=4, progress=None, log=shown.append)
        recs = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if "val_loss" in r] == [4]
        assert (said in shown) == want and (said in (tmp_path / run / "train.log").read_text()) == want


def test_validation_compiled_aside_gives_the_same_loss(tmp_path, mini_ds):
    """The validation's programs compiled in a thread beside the training (from the parameters' shapes) are the
    ones the first evaluation would compile: one per batch shape, the same loss."""
    from molgen.parallel import make_mesh
    from molgen.state import init_state
    from molgen.train import Validation

    cfg = _cfg(mini_ds)
    params = init_state(cfg).ema
    mesh = make_mesh()
    aside = Validation(mini_ds, cfg, mesh)
    aside.compile_aside(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    loss = aside(params)
    assert aside.compiling is None and set(aside.compiled) == set(aside.shapes)
    assert loss == Validation(mini_ds, cfg, mesh)(params)
