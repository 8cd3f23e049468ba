"""Stacked consistency models: a consistency function followed by denoising stages, in one network call.

A stacked model's network is the consistency model's EGNN followed by S stages of a diffusion model's denoiser
D(x, s) at fixed low noise levels s_1 > ... > s_S (the low ladder, :func:`molgen.diffusion.levels.low_ladder`),
with the atom types re-read between stages::

    f_stack(y, sigma) = x_S,   x_0 = f(y, sigma),   x_i = D(x_{i-1}, s_i)

so one call is one forward pass of a deeper network (for the `small` networks 4 + 4 S blocks) that maps noise
straight to a molecule. The stages share one set of parameters (a diffusion model's). A stacked model can be
stacked again (``StackConfig.inner``: its own stages first, then the new ones; params {"base": the stacked model's
{"base", "stage"}, "stage": the new stages'}), e.g. a stack followed by a polisher's stages. Assembled from a trained
model and a diffusion model (`molgen export --stack S`), one call computes exactly what `molgen sample
--polish S` adds after the model's call; trained as a whole (`--objective distill --init STACKED`) every part
moves: the atom types between stages are read with a straight-through argmax.

Boundary condition: the stages fade out below ``sigma_min + gate`` (linearly, to nothing at sigma_min), so
f_stack(y, sigma_min) = y holds exactly; the samplers' levels are far above the gate. Every stage is
E(3)-equivariant and keeps positions zero-CoM, so the stack is too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from molgen import MolgenError
from molgen.data.features import straight_through_features
from molgen.diffusion.edm import DiffusionConfig, denoiser
from molgen.diffusion.levels import low_ladder
from molgen.nn.egnn import EGNNConfig

TYPE_TEMPERATURE = 0.02  # softmax temperature of the straight-through type read-out (type logits are ~0.25 apart)


@dataclass(frozen=True)
class StackConfig:
    levels: tuple[float, ...] = ()  # the stages' noise levels (Å), decreasing
    model: EGNNConfig = field(default_factory=EGNNConfig)  # the stages' network (a diffusion model's)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # its noise schedule
    gate: float = 0.01  # the stages fade out linearly between sigma_min + gate and sigma_min
    source: str = ""  # the diffusion model the stages were taken from
    inner: StackConfig | None = None  # a stacked model's own stages, which run before these (a stack stacked again)


def make_stacked_fn(base_fn, stage_apply, stack: StackConfig, sigma_min: float, between=None):
    """f(params, yx, yh, sigma_node, graph) with params {"base": ..., "stage": ...}: ``base_fn`` (a consistency
    function), then the stages: the denoiser of ``stage_apply`` at each of ``stack.levels``. ``between(x, h,
    graph)``, when given, is applied to the molecule before each stage reads it (e.g. a formula's types imposed)."""
    denoise = denoiser(stage_apply, stack.diffusion)

    def f(params, yx, yh, sigma, graph):
        m = graph.node_mask
        x, h = base_fn(params["base"], yx, yh, sigma, graph)
        g = jnp.clip((sigma - sigma_min) / stack.gate, 0.0, 1.0)[:, None]  # 1 at every sampling level

        def stage(carry, s):
            x, h = carry if between is None else between(*carry, graph)
            types = straight_through_features(h, m, TYPE_TEMPERATURE)
            dx, dh = denoise(params["stage"], x, types, jnp.full(m.shape, s, jnp.float32), graph)
            return ((1.0 - g) * x + g * dx, (1.0 - g) * h + g * dh), None

        # one traced stage, scanned over the levels: tracing and compiling cost one network, not S
        (x, h), _ = jax.lax.scan(stage, (x, h), jnp.asarray(stack.levels, jnp.float32))
        return x, h

    return f


def stack_model(cfg, params, stage_cfg, stage_params, n_stages: int, source: str = ""):
    """(config, params) of the consistency model ``cfg`` with ``n_stages`` stages of the diffusion model
    ``stage_cfg`` on the low ladder; a stacked ``cfg`` keeps its stages, and the new ones run after them."""
    if cfg.consistency is None:
        raise MolgenError("--stack: the model must be a consistency model, not a diffusion model")
    if stage_cfg.consistency is not None:
        raise MolgenError("--stack: the stages must come from a diffusion model, not a consistency model")
    if stage_cfg.model.in_node_nf != cfg.model.in_node_nf or stage_cfg.data.remove_h != cfg.data.remove_h:
        raise MolgenError("--stack: the diffusion model's atom features or hydrogen setting differ from the model's")
    if n_stages < 1:
        raise MolgenError("--stack must be at least 1")
    st = StackConfig(levels=tuple(low_ladder(n_stages)), model=stage_cfg.model, diffusion=stage_cfg.diffusion,
                     source=source, inner=cfg.stack)
    return cfg.replace(stack=st), {"base": params, "stage": stage_params}


def restack(cfg, params, n_stages: int):
    """(config, params) of the stacked model ``cfg`` with its trained stages (its last ones, when stacked again)
    re-spread over ``n_stages`` levels of the low ladder: fewer stages make a cheaper call, more a deeper one."""
    if cfg.stack is None:
        raise MolgenError("this model has no denoising stages to re-spread; stack it first (--stack N --stages-from)")
    if n_stages < 1:
        raise MolgenError("--stack must be at least 1")
    return cfg.replace(stack=dataclasses.replace(cfg.stack, levels=tuple(low_ladder(n_stages)))), params


def unstack(cfg, params):
    """(config, params) of the stacked model ``cfg`` without the stages that run last: a stack stacked again gives
    the stack it was built on (e.g. the default's trained stack without its appended polishing stages, to train it
    further), a stack its consistency model alone."""
    if cfg.stack is None:
        raise MolgenError("--unstack: this model has no denoising stages to remove")
    return cfg.replace(stack=cfg.stack.inner), params["base"]


def describe_network(cfg) -> str:
    """The network in words, e.g. '64x4', '64x4 + 4 stages of 64x4' or '64x4 + 4 stages of 64x4 + 4 stages of
    64x4'."""
    net, groups, st = f"{cfg.model.nf}x{cfg.model.n_layers}", [], cfg.stack
    while st is not None:
        n = len(st.levels)
        groups.append(f" + {n} stage{'s' if n != 1 else ''} of {st.model.nf}x{st.model.n_layers}")
        st = st.inner
    return net + "".join(reversed(groups))
