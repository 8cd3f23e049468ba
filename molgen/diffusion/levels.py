"""Noise-level ladders shared by the samplers and the training objectives (variance-exploding levels, Å).

* the Karras grid (Karras et al. 2022, rho = 7): the ODE sampler's levels and consistency training's
  discretisation;
* the low-noise ladder 0.4 -> 0.1: the levels at which a finished molecule is polished (a denoiser applied to
  it with no noise added), and the levels of a stacked model's stages.
"""

from __future__ import annotations

import numpy as np

LOW_LADDER = (0.4, 0.1)  # (first, last) polishing level in Å


def karras_grid(i, n, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """Level i of n increasing levels from sigma_min to sigma_max on the Karras grid (numpy or jax arrays; n
    may be traced, i may be an array)."""
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def ode_levels(n_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n_steps + 1 decreasing levels for an ODE solve: sigma_max ... sigma_min on the Karras grid, then 0."""
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    i = np.arange(n_steps, dtype=np.float64)
    grid = karras_grid(i, max(n_steps, 2), sigma_max, sigma_min, rho)  # the grid walked from the top
    return [float(s) for s in grid] + [0.0]


def low_ladder(n: int) -> list[float]:
    """The n polishing levels (Å): none for 0, 0.1 for one, else geometric from 0.4 down to 0.1."""
    if n < 0:
        raise ValueError("the number of polishing levels must be >= 0")
    if n == 0:
        return []
    if n == 1:
        return [LOW_LADDER[1]]
    return [float(s) for s in np.geomspace(*LOW_LADDER, n)]
