"""Stacked consistency models: a consistency function followed by denoising stages, in one network.

A stacked model's network is the consistency model's EGNN followed by S stages of a diffusion model's denoiser
D(x, s) at fixed low noise levels s_1 > ... > s_S (the levels of :func:`molgen.refine.refine_levels`), with the
atom types re-read between stages::

    f_stack(y, sigma) = x_S,   x_0 = f(y, sigma),   x_i = D(x_{i-1}, s_i)

so one call of it is one forward pass of a deeper network (for the `small` networks 4 + 4 S blocks) that maps
noise straight to a molecule.  The stages share one set of parameters (a diffusion model's), so the weights grow
by one network, not S.  Assembled from a trained model and its teacher (`molgen export --stack S`) it computes
exactly what `molgen sample --refine S` computes after the model's call; trained further as a whole
(`molgen train --mode distill --init STACKED`) every part moves: the atom types between stages are read with a
straight-through argmax (forward: the argmax, as in sampling; backward: the softmax's gradient).

Boundary condition: the stages are faded out below ``sigma_min + gate`` (linearly, to nothing at sigma_min),
so f_stack(y, sigma_min) = y holds exactly as for the plain consistency function; the samplers' levels are
far above the gate.  Every stage is E(3)-equivariant and keeps positions zero-CoM, so the stack is too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from molgen.chem.elements import CHARGES, N_TYPES
from molgen.diffusion.edm import DiffusionConfig
from molgen.nn.egnn import EGNNConfig

TYPE_TEMPERATURE = 0.02  # softmax temperature of the straight-through type read-out (type logits are ~0.25 apart)


@dataclass(frozen=True)
class StackConfig:
    levels: tuple[float, ...] = ()  # the stages' noise levels (Å), decreasing
    model: EGNNConfig = field(default_factory=EGNNConfig)  # the stages' network (a diffusion model's)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # its noise schedule
    gate: float = 0.01  # the stages fade out linearly between sigma_min + gate and sigma_min
    source: str = ""  # the diffusion model the stages were taken from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StackConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "model" in d:
            d["model"] = EGNNConfig.from_dict(d["model"])
        if "diffusion" in d:
            names = {f.name for f in dataclasses.fields(DiffusionConfig)}
            d["diffusion"] = DiffusionConfig(**{k: v for k, v in d["diffusion"].items() if k in names})
        if "levels" in d:
            d["levels"] = tuple(float(s) for s in d["levels"])
        return cls(**d)


def read_types(h, node_mask):
    """EDM's clean features of the atom types in h: the argmax's one-hot / 4 and Z / 10 in the forward pass,
    the gradient of the same features of softmax(h_types / TYPE_TEMPERATURE) in the backward pass."""
    from molgen.refine import clean_features

    p = jax.nn.softmax(h[:, :N_TYPES] / TYPE_TEMPERATURE, axis=-1)  # type_features of the expected type
    soft = jnp.concatenate([0.25 * p, 0.1 * (p @ jnp.asarray(CHARGES, jnp.float32))[:, None]], -1) * node_mask[:, None]
    return clean_features(h, node_mask) + (soft - jax.lax.stop_gradient(soft))


def make_stacked_fn(base_fn, stage_apply, stack: StackConfig, sigma_min: float):
    """f(params, yx, yh, sigma_node, graph) with params {"base": ..., "stage": ...}: ``base_fn`` (a consistency
    function), then the stages: the denoiser of ``stage_apply`` at each of ``stack.levels``."""
    from molgen.diffusion.ode import edm_denoiser

    denoise = edm_denoiser(stage_apply, stack.diffusion)

    def f(params, yx, yh, sigma, graph):
        m = graph.node_mask
        x, h = base_fn(params["base"], yx, yh, sigma, graph)
        g = jnp.clip((sigma - sigma_min) / stack.gate, 0.0, 1.0)[:, None]  # 1 at every sampling level

        def stage(carry, s):
            x, h = carry
            dx, dh = denoise(params["stage"], x, read_types(h, m), jnp.full(m.shape, s, jnp.float32), graph)
            return ((1.0 - g) * x + g * dx, (1.0 - g) * h + g * dh), None

        # one traced stage, scanned over the levels: tracing and compiling cost one network, not S
        (x, h), _ = jax.lax.scan(stage, (x, h), jnp.asarray(stack.levels, jnp.float32))
        return x, h

    return f


def make_model_fn(cfg, apply_fn=None):
    """The consistency function of a run config: plain, or stacked when ``cfg.stack`` is set."""
    from molgen.consistency.ict import make_consistency_fn
    from molgen.nn.egnn import EGNN

    if apply_fn is None:
        apply_fn = EGNN(cfg.model).apply
    fn = make_consistency_fn(apply_fn, cfg.consistency)
    if cfg.stack is None:
        return fn
    return make_stacked_fn(fn, EGNN(cfg.stack.model).apply, cfg.stack, cfg.consistency.sigma_min)


def stack_model(cfg, params, teacher_cfg, teacher_params, n_stages: int, source: str = ""):
    """(config, params) of ``cfg``'s consistency model with ``n_stages`` stages of the diffusion model
    ``teacher_cfg`` at the refinement levels of :func:`molgen.refine.refine_levels`."""
    from molgen import MolgenError
    from molgen.refine import refine_levels

    if cfg.mode == "diffusion":
        raise MolgenError("--stack: the model must be a consistency model (ct, ect or distill), not a diffusion model")
    if cfg.stack is not None:
        raise MolgenError("--stack: this model is stacked already")
    if teacher_cfg.mode != "diffusion":
        raise MolgenError(f"--stack: the stages must come from a diffusion model, not {teacher_cfg.mode!r}")
    if teacher_cfg.model.in_node_nf != cfg.model.in_node_nf or teacher_cfg.remove_h != cfg.remove_h:
        raise MolgenError("--stack: the diffusion model's atom features or hydrogen setting differ from the model's")
    if n_stages < 1:
        raise MolgenError("--stack must be at least 1")
    st = StackConfig(levels=tuple(refine_levels(n_stages)), model=teacher_cfg.model,
                     diffusion=teacher_cfg.diffusion, source=source)
    return cfg.replace(stack=st), {"base": params, "stage": teacher_params}


def restack(cfg, params, n_stages: int):
    """(config, params) of the stacked model ``cfg`` with its stages re-spread over ``n_stages`` levels
    (:func:`molgen.refine.refine_levels`), the trained base and stage networks kept: fewer stages make a
    cheaper call (a start for training a shallower stack), more a deeper one."""
    from molgen import MolgenError
    from molgen.refine import refine_levels

    if cfg.stack is None:
        raise MolgenError("this model has no denoising stages to re-spread; stack it first (--stack N with --refiner)")
    if n_stages < 1:
        raise MolgenError("--stack must be at least 1")
    return cfg.replace(stack=dataclasses.replace(cfg.stack, levels=tuple(refine_levels(n_stages)))), params


def describe(cfg) -> str:
    """The network in words, e.g. '64x4' or '64x4 + 4 stages of 64x4'."""
    net = f"{cfg.model.nf}x{cfg.model.n_layers}"
    if cfg.stack is not None:
        st = cfg.stack
        net += f" + {len(st.levels)} stage{'s' if len(st.levels) != 1 else ''} of {st.model.nf}x{st.model.n_layers}"
    return net
