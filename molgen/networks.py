"""The functions a run configuration's model computes, built once from its config: the EGNN, a diffusion model's
denoiser, a consistency model's consistency function (plain or stacked), and fresh parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from molgen.config import RunConfig, resolve_auto
from molgen.consistency.ict import make_consistency_fn
from molgen.consistency.stack import make_stacked_fn
from molgen.diffusion.edm import denoiser
from molgen.nn.egnn import EGNN
from molgen.nn.egnn import init_params as egnn_init

PRECISIONS = ("float32", "tf32", "bf16")
# The training precision `auto` picks per platform, as measured (docs/performance.md): on a CPU bf16 is no
# faster; on an H200, 256 x 9 at batch 512, tf32 trained 2.7x as many molecules/s as the bf16 path.
AUTO_PRECISION = {"cpu": "float32", "gpu": "tf32"}


def resolve_precision(precision: str, platform: str | None = None) -> str:
    """``auto`` -> the platform's entry of :data:`AUTO_PRECISION`; anything else must be one of PRECISIONS."""
    return resolve_auto(precision, PRECISIONS, AUTO_PRECISION, "precision", platform)


def network(cfg: RunConfig, precision: str | None = None, pair_kernel: bool = False):
    """(EGNN module, apply function). ``precision`` None leaves matrix products at JAX's default (sampling,
    the edge attributes' term of each pair MLP's first layer element-wise: :mod:`molgen.nn.egnn`);
    else a training precision: ``float32`` (full float32 products), ``tf32`` (TensorFloat-32 products) or
    ``bf16`` (bfloat16 hidden products and edge activations; :mod:`molgen.nn.egnn`), with the gradient's
    neighbour sums by sorted indices (``EGNN.sorted_grads``). ``pair_kernel``: the pair MLPs' gradients in GPU
    kernels (the ``packed-kernel`` layout; :mod:`molgen.nn.pairgrad`)."""
    if precision is None:  # the edge attributes' term element-wise: a CPU's sampling call ~10 % faster
        net = EGNN(cfg.model, fused_attrs=True)
        return net, net.apply
    precision = resolve_precision(precision)
    net = EGNN(cfg.model, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32,
               fused_attrs=precision == "tf32", sorted_grads=True, pair_kernel=pair_kernel)
    matmul = {"float32": "float32", "tf32": "tensorfloat32", "bf16": None}[precision]
    if matmul is None:
        return net, net.apply

    def apply(*args, **kw):
        with jax.default_matmul_precision(matmul):  # read when the products are traced
            return net.apply(*args, **kw)

    return net, apply


def model_fn(cfg: RunConfig, apply=None, precision: str | None = None, between=None):
    """What the model computes from a noisy state: a consistency model's f(params, y_x, y_h, sigma, graph) (with
    its stages when stacked), or a diffusion model's denoiser D with the same signature. ``between(x, h, graph)``:
    applied to the molecule before each stage of a stacked model reads it (a formula's types, :mod:`molgen.formula`)."""
    if apply is None:
        _, apply = network(cfg, precision)
    if cfg.consistency is None:
        return denoiser(apply, cfg.diffusion)
    fn = make_consistency_fn(apply, cfg.consistency, cfg.diffusion)
    return _stacked(fn, cfg, cfg.stack, precision, between)


def _stacked(fn, cfg: RunConfig, stack, precision: str | None, between=None):
    """``fn`` followed by the stages of ``stack`` (its inner stack's first)."""
    if stack is None:
        return fn
    fn = _stacked(fn, cfg, stack.inner, precision, between)
    _, stage_apply = network(cfg.replace(model=stack.model), precision)
    return make_stacked_fn(fn, stage_apply, stack, cfg.consistency.sigma_min, between)


def init_params(cfg: RunConfig, seed: int | None = None):
    """Fresh parameters of the config's network ({"base", "stage"} for a stacked model, nested when stacked again)."""
    seed = cfg.seed if seed is None else seed
    params, stack, stacks = egnn_init(cfg.model, seed), cfg.stack, []
    while stack is not None:
        stacks.append(stack)
        stack = stack.inner
    for depth, st in enumerate(reversed(stacks)):  # the innermost stages first, next to the base network
        params = {"base": params, "stage": egnn_init(st.model, seed + 2 + depth)}
    return params
