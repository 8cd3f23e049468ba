"""The probability-flow ODE of a diffusion model, solved with Heun's method (Karras et al. 2022, Alg. 1).

In variance-exploding form y = x + s eps the ODE is dy/ds = (y - D(y, s)) / s with D the model's denoiser
(:func:`molgen.diffusion.edm.denoiser`). The solution from y(s_max) = s_max z is a deterministic function of
the noise z: the map a consistency model learns, and the target of distillation by regression
(:mod:`molgen.consistency.distill`). Levels: :func:`molgen.diffusion.levels.ode_levels`.
"""

from __future__ import annotations

import jax.numpy as jnp


def heun_solve(denoise, params, zx, zh, graph, levels: list[float], after=None):
    """Integrate from y = levels[0] * z down to levels[-1] (0): 2 calls per step, 1 for the last step.

    ``denoise`` is jitted by the caller; the loop is unrolled in Python (levels are static). ``after(x, h, s)``,
    when given, may change the state after each step (at level s).
    """
    x, h = levels[0] * zx, levels[0] * zh
    mask = graph.node_mask
    for s, s2 in zip(levels[:-1], levels[1:]):
        dx, dh = denoise(params, x, h, jnp.full(mask.shape, s, jnp.float32), graph)
        kx, kh = (x - dx) / s, (h - dh) / s
        nx, nh = x + (s2 - s) * kx, h + (s2 - s) * kh
        if s2 > 0:
            ex, eh = denoise(params, nx, nh, jnp.full(mask.shape, s2, jnp.float32), graph)
            kx2, kh2 = (nx - ex) / s2, (nh - eh) / s2
            nx, nh = x + (s2 - s) * 0.5 * (kx + kx2), h + (s2 - s) * 0.5 * (kh + kh2)
        x, h = nx, nh
        if after is not None:
            x, h = after(x, h, s2)
    return x, h * mask[:, None]


def n_calls(levels: list[float]) -> int:
    """Network calls of :func:`heun_solve` on these levels."""
    return 2 * (len(levels) - 1) - (1 if levels[-1] == 0 else 0)
