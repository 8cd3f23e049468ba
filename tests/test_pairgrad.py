"""The pair MLPs' gradient kernels (molgen.nn.pairgrad), run in Pallas's interpreter on a CPU: the same values as
their array formulations, and in the EGNN the same gradient as XLA's, where its shapes allow them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_molecules

from molgen import MolgenError
from molgen.data.batching import pack
from molgen.data.features import type_features
from molgen.nn.egnn import EGNN, EGNNConfig
from molgen.nn.kernelcheck import first_layer_grad_xla, packed_graph
from molgen.nn.pairgrad import MAX_ATOMS, TILE, first_layer_grad, gated_messages, gated_sum, supported
from molgen.nn.pairs import molecule_index


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_equals_its_array_formulation(dtype):
    """Molecules of 32 atoms (the most the kernel takes), 1, 2 and others, an empty graph between them and padding
    after them (nodes and pairs): the node rows' sums by receiver and by sender, the attribute, weight and bias
    gradients of the array formulation (to float32 summation order), and zeros on every padding row (Pallas's
    interpreter fills an output with NaN where a kernel writes nothing)."""
    rng = np.random.default_rng(5)
    sizes = [7, MAX_ATOMS, 1, 0, 2, 13, 0, 0]
    graph = packed_graph(sizes, TILE)
    receivers, senders, n_atoms, n_real = graph.receivers, graph.senders, graph.n_atoms, int(graph.edge_mask.sum())
    n, p, f = len(graph.node_mask), len(receivers), 64
    assert n > sum(sizes) + 1 and len(set(receivers[n_real:])) > 1  # padding nodes, padding pairs spread over them
    g = jnp.asarray(rng.normal(size=(p, f)) * (np.arange(p) < n_real)[:, None], dtype)
    hr, hs = (jnp.asarray(rng.normal(size=(n, f)), dtype) for _ in range(2))
    attrs = jnp.asarray(rng.uniform(0, 9, size=(p, 2)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=(2, f)), jnp.float32), jnp.asarray(rng.normal(size=f), jnp.float32)
    got = jax.jit(first_layer_grad)(g, hr, hs, attrs, w, b, molecule_index(n_atoms))
    want = jax.jit(first_layer_grad_xla)(g, hr, hs, attrs, w, b, jnp.asarray(receivers), jnp.asarray(senders))
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == jnp.float32 and float(jnp.abs(e).max()) > 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(got[0][sum(sizes):])) and not np.any(np.asarray(got[1][sum(sizes):]))
    assert not np.any(np.asarray(got[2][n_real:]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gated_sum_gradient_equals_autodiff_of_its_forward_pass(dtype):
    """The gated messages' sums: their kernel gradient (one pass, the gate and messages computed again) against
    JAX's autodiff of the same function, with masked pairs, a molecule of one atom, an empty graph and padding
    nodes and pairs."""
    from molgen.nn.pairs import segment_sum

    rng = np.random.default_rng(8)
    sizes = [9, 1, 0, MAX_ATOMS, 4, 0]
    graph = packed_graph(sizes, TILE)
    receivers, n_real = graph.receivers, int(graph.edge_mask.sum())
    n, p, f = len(graph.node_mask), len(receivers), 64
    args = (jnp.asarray(rng.normal(size=(p, f)), dtype), jnp.asarray(rng.normal(size=f), jnp.float32),
            jnp.asarray(0.3 * rng.normal(size=f), jnp.float32), jnp.asarray([0.2], jnp.float32))
    mask = jnp.asarray((rng.uniform(size=p) < 0.8) & (np.arange(p) < n_real), jnp.float32)
    receivers = jnp.asarray(receivers)
    g = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)

    def plain(*a):
        return segment_sum(gated_messages(*a, mask, dtype), receivers, n, sorted_ids=True)

    out, vjp = jax.vjp(lambda *a: gated_sum(*a, mask, receivers, n, dtype), *args)
    want_out, want_vjp = jax.vjp(plain, *args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    for a, e in zip(jax.jit(vjp)(g), jax.jit(want_vjp)(g)):
        assert a.dtype == e.dtype and a.shape == e.shape and float(jnp.abs(e.astype(jnp.float32)).max()) > 0.1
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: silu' in float32 here, in bfloat16 there
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=tol,
                                   atol=tol * float(jnp.abs(e.astype(jnp.float32)).max()))


def _setup(nf, sizes=(5, 1, 9, 3)):
    rng = np.random.default_rng(2)
    cfg = EGNNConfig(nf=nf, n_layers=2)
    pos, typ = random_molecules(rng, sizes)
    g = pack(pos, typ, pad_graphs=6)
    h = jnp.asarray(type_features(g.types, g.node_mask, np))
    cond = jnp.asarray(np.where(g.node_mask > 0, rng.uniform(size=g.node_mask.shape), 0), jnp.float32)
    params = EGNN(cfg).init(jax.random.PRNGKey(3), g.positions, h, cond, g)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    def value_and_grad(rotate=None, **kw):
        def loss(p, x):
            vel, hout = EGNN(cfg, sorted_grads=True, **kw).apply(p, x, h, cond, g)
            return (vel**2).sum() + (hout**2).sum()

        x = g.positions if rotate is None else (g.positions @ rotate.T).astype(np.float32)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))

    return cfg, g, value_and_grad


def _errors(got, want):
    return [float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]


def test_network_gradient_with_the_kernel_equals_xla_s():
    """Both kernels (the first pair layers and the edge MLP's gated sums). TF32 training's arithmetic (float32
    here, edge attributes element-wise): the same loss and, to float32 rounding, the same gradients of every
    parameter and of the coordinates. bf16: a loss and gradients as close to float32's as XLA's bf16 ones (the
    kernels take the forward pass's rounding, their gradient computes silu' in float32, XLA's in bfloat16)."""
    cfg, g, value_and_grad = _setup(64)
    assert supported(g.senders.shape[0], cfg.nf, 2)
    fast, plain = value_and_grad(fused_attrs=True, pair_kernel=True), value_and_grad(fused_attrs=True)
    assert float(fast[0]) == pytest.approx(float(plain[0]), rel=1e-6)  # (XLA may fuse the sum differently)
    assert max(_errors(fast[1], plain[1])) < 2e-5
    ref_loss, reference = float(plain[0]), plain[1]
    fast, plain = value_and_grad(dtype=jnp.bfloat16, pair_kernel=True), value_and_grad(dtype=jnp.bfloat16)
    assert abs(float(fast[0]) - ref_loss) <= 2 * abs(float(plain[0]) - ref_loss) + 1e-3 * ref_loss
    kernel_err, xla_err = _errors(fast[1], reference), _errors(plain[1], reference)
    assert np.median(kernel_err) < 0.02 and np.median(kernel_err) <= 1.5 * np.median(xla_err)


def test_gradient_through_the_kernels_is_equivariant():
    """An invariant loss's gradient with respect to the coordinates rotates (and reflects) with them, through
    both kernels, in bf16."""
    from conftest import random_rotation

    cfg, g, value_and_grad = _setup(64)
    rng = np.random.default_rng(4)
    q = random_rotation(rng, True)
    (_, (_, gx)), (_, (_, gx2)) = (value_and_grad(dtype=jnp.bfloat16, pair_kernel=True, rotate=r) for r in (None, q))
    scale = float(jnp.abs(gx).max())
    assert scale > 1e-2
    np.testing.assert_allclose(np.asarray(gx2), np.asarray(gx) @ q.T, atol=2e-2 * scale)


def test_shapes_the_kernels_do_not_take_keep_xla_s_gradient():
    """A feature width that is not a multiple of the kernels' column block: the layers keep XLA's gradient, the
    very same numbers."""
    cfg, g, value_and_grad = _setup(16, sizes=(4, 6))
    assert not supported(g.senders.shape[0], cfg.nf, 2)
    fast, plain = value_and_grad(dtype=jnp.bfloat16, pair_kernel=True), value_and_grad(dtype=jnp.bfloat16)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_the_layout_is_refused_where_the_kernel_cannot_run(mini_ds):
    from conftest import tiny_config

    from molgen.steps import check_devices

    cfg = tiny_config(mini_ds, "diffusion", batch_size=8, steps=2).with_optim(layout="packed-kernel")
    with pytest.raises(MolgenError, match="runs its kernels on a GPU, not on a cpu"):
        check_devices(cfg, 1)
    with pytest.raises(MolgenError, match="trains in bf16 or tf32, not float32"):
        check_devices(cfg.with_optim(precision="float32"), 1, platform="gpu")
    check_devices(cfg.with_optim(precision="bf16"), 1, platform="gpu")
    check_devices(cfg.with_optim(precision="auto"), 1, platform="gpu")  # auto: tf32 on a GPU
    check_devices(cfg.with_optim(precision="bf16"), 1, platform="gpu", max_atoms=MAX_ATOMS)
    with pytest.raises(MolgenError, match=f"takes molecules of up to {MAX_ATOMS} atoms, the data has 33"):
        check_devices(cfg.with_optim(precision="bf16"), 1, platform="gpu", max_atoms=MAX_ATOMS + 1)


def test_the_kernel_check_passes_and_names_a_kernel_that_disagrees(monkeypatch):
    """What `molgen train` runs once before training in the packed-kernel layout: both kernels agree with their
    array formulations; a kernel whose rows' gradient is 10 % off is named, and the run refused in one line."""
    from molgen.nn import kernelcheck, pairgrad
    from molgen.steps import check_pair_kernels

    errors = kernelcheck.check_kernels(jnp.bfloat16, 64)
    assert len(errors) == 9 and max(errors.values()) < kernelcheck.CHECK_TOLERANCE["bf16"]
    assert max(kernelcheck.check_kernels(jnp.float32, 64).values()) < 1e-5
    check_pair_kernels.cache_clear()
    assert check_pair_kernels("tf32", 16) is None  # a width the layers do not use them at
    real = pairgrad.first_layer_grad
    monkeypatch.setattr(pairgrad, "first_layer_grad", lambda *a, **kw: (real(*a, **kw)[0] * 1.1, *real(*a, **kw)[1:]))
    with pytest.raises(RuntimeError, match=r"array formulations: first_layer.receivers 1\.0\de-01"):
        kernelcheck.check_kernels(jnp.bfloat16, 64)
    with pytest.raises(MolgenError, match="first_layer.receivers .* train with --set optim.layout=packed"):
        check_pair_kernels("bf16", 64)
    check_pair_kernels.cache_clear()


def test_launch_settings_change_the_tiles_not_the_results(monkeypatch):
    """$MOLGEN_PAIR_KERNELS: another tile width (16 and 64 features at a time) gives both kernels' results as
    their array formulations, to float32 summation order; a width the features are not a multiple of keeps
    XLA's gradient (not supported)."""
    from molgen.nn import kernelcheck, pairgrad

    monkeypatch.setenv(pairgrad.TUNING_ENV, "first_cols=64,gated_cols=64,first_warps=8,gated_stages=2")
    assert pairgrad.tuning() == pairgrad.Tuning(first_cols=64, first_warps=8, gated_cols=64, gated_stages=2)
    assert max(kernelcheck.check_kernels(jnp.float32, 64).values()) < 1e-5
    assert not supported(4 * TILE, 32, 2) and supported(4 * TILE, 128, 2)
    monkeypatch.setenv(pairgrad.TUNING_ENV, "first_cols=16,gated_cols=16")
    assert max(kernelcheck.check_kernels(jnp.float32, 32).values()) < 1e-5


@pytest.mark.parametrize("text, message", [
    ("first_cols=48", "first_cols must be one of 16, 32, 64, 128, got 48"),
    ("gated_warps=3", "gated_warps must be one of 1, 2, 4, 8, 16, got 3"),
    ("first_stages=0", "first_stages must be one of 1, 2, 3, 4, got 0"),
    ("cols=32", "expected key=number pairs with keys first_cols, .*; got 'cols=32'"),
    ("first_warps=eight", "expected .*; got 'first_warps=eight'"),
    ("first_warps", "expected .*; got 'first_warps'"),
])
def test_bad_launch_settings_are_one_line_errors(monkeypatch, text, message):
    from molgen.nn import pairgrad

    monkeypatch.setenv(pairgrad.TUNING_ENV, text)
    with pytest.raises(MolgenError, match=f"^MOLGEN_PAIR_KERNELS: {message}"):
        pairgrad.tuning()


def test_launch_settings_round_trip_through_their_text():
    from molgen.nn.pairgrad import Tuning, parse_tuning

    t = Tuning(first_cols=64, first_warps=8, first_stages=2, gated_cols=16, gated_warps=2, gated_stages=3)
    assert parse_tuning(t.text()) == t and parse_tuning("") == Tuning() and parse_tuning(" first_warps = 8 ,") \
        == Tuning(first_warps=8)


def test_the_pair_kernel_benchmark_names_the_fastest_setting_that_agrees(capsys, monkeypatch, tmp_path):
    """benchmarks/pair_kernels.py (in the interpreter here): a RESULT line for each setting and for each array
    formulation, a FAILED line for a width the features are not a multiple of, and a BEST line that scripts
    export; where no setting agrees with the array formulation, BEST keeps the defaults."""
    import re

    from conftest import load_script

    from molgen.nn import kernelcheck, pairgrad

    bench = load_script("benchmarks/pair_kernels.py")
    args = ["--batch", "3", "--features", "32", "--repeats", "1", "--data-dir", str(tmp_path),
            "--first", "32:4:1,64:8:1,16:8:2", "--gated", "32:4:1,16:2:1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "(uniform-3-29)" in out  # no QM9 cache there
    assert len(re.findall(r"^RESULT pair-kernel first_layer_grad batch=3 ms=[\d.]+ .* error=", out, re.M)) == 2
    assert len(re.findall(r"^RESULT pair-kernel gated_sum_grad ", out, re.M)) == 2
    assert len(re.findall(r"^RESULT pair-xla ", out, re.M)) == 2
    assert re.search(r"^FAILED pair-kernel first_layer_grad cols=64 .*32 features are not a multiple of 64", out, re.M)
    best = re.search(r"^BEST MOLGEN_PAIR_KERNELS=(\S+)$", out, re.M).group(1)
    tune = pairgrad.parse_tuning(best)
    assert (tune.first_cols, tune.first_warps) in ((32, 4), (16, 8)) and tune.gated_cols in (32, 16)
    monkeypatch.setitem(kernelcheck.CHECK_TOLERANCE, "bf16", -1.0)  # nothing agrees
    bench.main(args)
    out = capsys.readouterr().out
    assert "never chosen" in out and f"BEST MOLGEN_PAIR_KERNELS={pairgrad.Tuning().text()}\n" in out


def test_the_sigmoid_through_tanh_is_taken_in_bf16_only(monkeypatch):
    """``*_tanh = 1``: in bf16 both kernels' sigmoid goes through tanh (``jnp.tanh`` in the interpreter, the GPU's
    tanh.approx when compiled) and still agrees with the array formulations within the check's tolerance; in
    float32 (TF32 training) the setting is not taken."""
    from molgen.nn import kernelcheck, pairgrad

    fast = pairgrad.Tuning(first_tanh=1, gated_tanh=1)
    x = jnp.linspace(-30.0, 30.0, 101)
    np.testing.assert_allclose(pairgrad._sigmoid(True, True)(x), jax.nn.sigmoid(x), atol=1e-6)
    asked = []

    def spy(tanh, interpret):
        asked.append(bool(tanh))
        return real(tanh, interpret)

    real = pairgrad._sigmoid
    monkeypatch.setattr(pairgrad, "_sigmoid", spy)
    monkeypatch.setenv(pairgrad.TUNING_ENV, fast.text())
    errors = kernelcheck.check_kernels(jnp.bfloat16, 32)
    assert asked == [True, True] and max(errors.values()) < kernelcheck.CHECK_TOLERANCE["bf16"]
    asked.clear()
    assert max(kernelcheck.check_kernels(jnp.float32, 32).values()) < 1e-5 and asked == [False, False]
