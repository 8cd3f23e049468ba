"""EDM's noise schedules, as a table gamma[t] = log(sigma_t^2 / alpha_t^2) over t = 0..T."""

from __future__ import annotations

import numpy as np


def clip_noise_schedule(alphas2: np.ndarray, clip_value: float = 0.001) -> np.ndarray:
    """Clip alpha_t^2 / alpha_{t-1}^2 from below for stability at the end of the chain (as EDM does)."""
    alphas2 = np.concatenate([np.ones(1), alphas2], axis=0)
    step = np.clip(alphas2[1:] / alphas2[:-1], a_min=clip_value, a_max=1.0)
    return np.cumprod(step, axis=0)


def polynomial_schedule(timesteps: int, s: float = 1e-5, power: float = 2.0) -> np.ndarray:
    """alpha_t^2 for t = 0..T of EDM's ``polynomial_<power>`` schedule with precision ``s``."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas2 = (1 - np.power(x / steps, power)) ** 2
    alphas2 = clip_noise_schedule(alphas2, clip_value=0.001)
    precision = 1 - 2 * s
    return precision * alphas2 + s


def gamma_table(timesteps: int = 1000, s: float = 1e-5, power: float = 2.0) -> np.ndarray:
    alphas2 = polynomial_schedule(timesteps, s, power)
    sigmas2 = 1 - alphas2
    return (-(np.log(alphas2) - np.log(sigmas2))).astype(np.float32)
