"""The probability-flow ODE of a diffusion model, solved with Heun's method (Karras et al. 2022, Alg. 1).

In variance-exploding form y = x + s eps the ODE is dy/ds = (y - D(y, s)) / s with D the model's denoiser.
For an EDM (variance-preserving) epsilon network, D(y, s) = y - s eps_hat(y / sqrt(1 + s^2), t(s)), which is
the ``eps`` consistency parametrisation with sigma_min = 0 (:func:`edm_denoiser`).  The solution from
y(s_max) = s_max z is a deterministic function of the noise z: it is the map a consistency model learns, and
the target of consistency distillation by regression (:mod:`molgen.consistency.distill`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def karras_levels(n_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n_steps + 1 decreasing levels: sigma_max ... sigma_min on the Karras grid, then 0."""
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    i = np.arange(n_steps, dtype=np.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    grid = (a + i / max(n_steps - 1, 1) * (b - a)) ** rho
    return [float(s) for s in grid] + [0.0]


def edm_denoiser(apply_fn, diffusion_cfg):
    """D(params, y_x, y_h, sigma_node, graph) of a diffusion checkpoint, in the VE variables."""
    from molgen.consistency.ict import ConsistencyConfig, make_consistency_fn

    d = diffusion_cfg
    cc = ConsistencyConfig(parametrization="eps", sigma_min=0.0, timesteps=d.timesteps, precision=d.precision,
                           power=d.power)
    return make_consistency_fn(apply_fn, cc)


def heun_solve(denoise, params, zx, zh, graph, levels: list[float]):
    """Integrate from y = levels[0] * z down to levels[-1] (0): 2 calls per step, 1 for the last step.

    ``denoise`` is jitted by the caller; the loop is unrolled in Python (levels are static).
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
    return x, h * mask[:, None]


def n_calls(levels: list[float]) -> int:
    """Network calls of :func:`heun_solve` on these levels."""
    return 2 * (len(levels) - 1) - (1 if levels[-1] == 0 else 0)


