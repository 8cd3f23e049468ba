"""Refinement: x <- F(x, s) at decreasing low noise levels, without re-noising.

F is a denoiser in the VE variables: a consistency function f(y, sigma) or a diffusion model's D(y, sigma)
(:func:`molgen.diffusion.ode.edm_denoiser`).  Given a finished molecule x, F(x, s) reads it as a sample
at noise level s and returns its estimate of the clean molecule: D(x, s) = x + s^2 grad log p_s(x), one step
of gradient ascent on the data density smoothed at s.  A few such steps, s going down (0.4 -> 0.1 Å), move
each atom to the bond lengths and valences the model holds clean while the molecule keeps its layout; the
atom types are re-read (argmax) after each step and fed back as clean features.

Two uses (docs/results.md has the measurements):

* ``molgen sample --sampler refine --steps k``: a consistency model's k-step sampler that applies its own f
  at the k - 1 levels to its one-call molecule instead of re-noising it to them first;
* ``molgen sample --refine N``: N calls of a diffusion model (by default the one a distilled model learnt
  from) after any sampler.

Every step is E(3)-equivariant and keeps positions on the zero-CoM subspace, because F is.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from molgen.chem.elements import N_TYPES

# (first, last) level in Å.  Starting higher (0.6) gains a little stability by re-typing atoms: with 16 teacher
# steps from 0.6 the share of O atoms fell from 7.6 to 2.8 % (from 0.4: 6.0 %); docs/results.md.
REFINE_LEVELS = (0.4, 0.1)


def refine_levels(n: int) -> list[float]:
    """The n noise levels (Å) of n refinement steps: 0.1 for one step, else geometric from 0.4 to 0.1."""
    if n < 0:
        raise ValueError("the number of refinement steps must be >= 0")
    if n == 0:
        return []
    if n == 1:
        return [REFINE_LEVELS[1]]
    return [float(s) for s in np.geomspace(*REFINE_LEVELS, n)]


def clean_features(h, node_mask):
    """EDM's features of the atom types read from h (argmax over the type block), zero on padding."""
    from molgen.train import type_features

    return type_features(jnp.argmax(h[:, :N_TYPES], axis=-1), node_mask)


def make_refine_step(denoise: Callable) -> Callable:
    """step(params, x, h, sigma, graph) -> (x, h): one refinement step with the denoiser ``denoise``."""

    def step(params, x, h, sigma, graph):
        s = jnp.full(graph.node_mask.shape, sigma, jnp.float32)
        return denoise(params, x, clean_features(h, graph.node_mask), s, graph)

    return step


def refine(step: Callable, params, x, h, graph, levels) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Apply a (jitted) refinement step at each level in turn."""
    for s in levels:
        x, h = step(params, x, h, jnp.float32(s), graph)
    return x, h
