"""Polishing a finished molecule: x <- F(x, s) at decreasing low noise levels, with no noise added.

F is a denoiser in the variance-exploding variables: a diffusion model's D(y, s) (:func:`molgen.diffusion.edm.
denoiser`) or a consistency function f(y, s). Given a finished molecule x, F(x, s) reads it as a sample at
level s and returns its estimate of the clean molecule; for D that is x + s^2 grad log p_s(x), a step of
gradient ascent on the data density smoothed at s. A few such steps on the ladder 0.4 -> 0.1 Å
(:func:`molgen.diffusion.levels.low_ladder`) move atoms to the bond lengths the model holds clean while the
molecule keeps its layout. The atom types are re-read (argmax) before each step and given as clean features.

Uses: `molgen sample --polish N` (N calls of a diffusion model after any sampler), the consistency models'
`anneal` sampler (their own f at the ladder's levels), the stages of a stacked model, and distillation onto
polished targets. Every step is E(3)-equivariant and keeps positions zero-CoM, because F is.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from molgen.data.features import clean_features


def make_polish_step(denoise: Callable) -> Callable:
    """step(params, x, h, sigma, graph) -> (x, h): one polishing step with the denoiser ``denoise``."""

    def step(params, x, h, sigma, graph):
        s = jnp.full(graph.node_mask.shape, sigma, jnp.float32)
        return denoise(params, x, clean_features(h, graph.node_mask), s, graph)

    return step


def polish(step: Callable, params, x, h, graph, levels) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Apply a (jitted) polishing step at each level in turn."""
    for s in levels:
        x, h = step(params, x, h, jnp.float32(s), graph)
    return x, h
