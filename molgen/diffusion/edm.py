"""EDM (Hoogeboom et al. 2022): epsilon-prediction L2 loss and the ancestral sampler, respaced to k steps.

State z_t = alpha_t [x, h] + sigma_t eps with alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t);
x and its noise live on the zero-centre-of-mass subspace.  Time is t = t_int / T with t_int in 0..T, and
gamma is read from EDM's table at t_int (training draws t_int uniformly, as EDM does).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molgen.diffusion.noise import per_molecule_sum, sample_noise
from molgen.diffusion.schedule import gamma_table
from molgen.nn.egnn import remove_mean


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    precision: float = 1e-5
    power: float = 2.0

    def gammas(self) -> np.ndarray:
        return gamma_table(self.timesteps, self.precision, self.power)


def alpha_sigma(gamma):
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def diffusion_loss(apply_fn, params, x, h, graph, key, cfg: DiffusionConfig):
    """Mean over molecules of ||eps - eps_hat||^2 / (n_atoms * (3 + F)) (EDM's L2 objective, w(t) = 1).

    Returns (loss, aux) with the position and feature parts of the loss.
    """
    gammas = jnp.asarray(cfg.gammas())
    n_seg = graph.n_atoms.shape[0]
    k_t, k_eps = jax.random.split(key)
    t_int = jax.random.randint(k_t, (n_seg,), 0, cfg.timesteps + 1)
    gamma = gammas[t_int][graph.segment]
    alpha, sigma = alpha_sigma(gamma)
    eps_x, eps_h = sample_noise(k_eps, graph, h.shape[-1])
    zx = alpha[:, None] * x + sigma[:, None] * eps_x
    zh = alpha[:, None] * h + sigma[:, None] * eps_h
    t = (t_int.astype(jnp.float32) / cfg.timesteps)[graph.segment] * graph.node_mask
    px, ph = apply_fn(params, zx, zh, t, graph)
    ex = per_molecule_sum(jnp.sum((eps_x - px) ** 2, -1), graph)
    eh = per_molecule_sum(jnp.sum((eps_h - ph) ** 2, -1), graph)
    n = graph.n_atoms.astype(jnp.float32)
    real = (graph.n_atoms > 0).astype(jnp.float32)
    denom = jnp.maximum(n, 1.0) * (3 + h.shape[-1])
    n_mol = jnp.maximum(real.sum(), 1.0)
    loss_x = jnp.sum(ex / denom * real) / n_mol
    loss_h = jnp.sum(eh / denom * real) / n_mol
    return loss_x + loss_h, {"loss_x": loss_x, "loss_h": loss_h}


def edm_time(sigma, cfg: DiffusionConfig):
    """EDM's time t whose schedule has sigma_t / alpha_t = sigma (the VE level of a VP state), in [0, 1]."""
    gammas = jnp.asarray(cfg.gammas(), jnp.float32)
    return jnp.interp(2.0 * jnp.log(sigma), gammas, jnp.linspace(0.0, 1.0, gammas.shape[0]))


def vp_input(sigma):
    """The factor 1 / sqrt(1 + s^2) that turns a VE state y = x + s eps into EDM's VP latent alpha (x + s eps)."""
    return 1.0 / jnp.sqrt(1.0 + sigma**2)


def denoiser(apply_fn, cfg: DiffusionConfig):
    """D(params, y_x, y_h, sigma_node, graph): the diffusion model's estimate of the clean molecule from a VE
    state y = [x, h] + sigma eps, D = y - sigma eps_hat(y / sqrt(1 + sigma^2), t(sigma)); positions zero-CoM."""

    def denoise(params, yx, yh, sigma, graph):
        s = sigma[:, None]
        c_in = vp_input(s)
        ex, eh = apply_fn(params, c_in * yx, c_in * yh, edm_time(sigma, cfg) * graph.node_mask, graph)
        x = remove_mean(yx - s * ex, graph.node_mask, graph.segment, graph.n_atoms.shape[0])
        return x, (yh - s * eh) * graph.node_mask[:, None]

    return denoise


# Respaced sampling (k < T calls) takes its steps at t_i = (i / k)^SPACING on EDM's integer grid: more of them at
# low noise, where the polynomial_2 schedule's sigma_t ~ sqrt(2) t changes slowly, than EDM's uniform spacing
# (SPACING 1) takes. Measured in docs/models.md ("Respaced steps"). At k = T every step is taken.
SPACING = 1.5


def respaced_times(k: int, timesteps: int = 1000, spacing: float | None = None) -> np.ndarray:
    """k + 1 distinct times from 1 down to 0 on EDM's integer grid t_int / T, k <= T network calls, spaced as
    t_i = (i / k)^spacing (default :data:`SPACING`)."""
    if not 1 <= k <= timesteps:
        raise ValueError(f"respacing {timesteps} steps to {k}")
    power = SPACING if spacing is None else spacing
    ints = np.round(timesteps * (np.arange(k + 1) / k) ** power).astype(np.int64)
    for i in range(1, k + 1):  # strictly increasing; for power >= 1 the curve keeps ints[i] <= T - (k - i)
        ints[i] = max(ints[i], ints[i - 1] + 1)
    return ints[::-1] / timesteps


def gamma_lookup(cfg: DiffusionConfig):
    """gamma(t) read from EDM's table at the integer step nearest t * T."""
    gammas = jnp.asarray(cfg.gammas())
    return lambda t: gammas[jnp.round(t * cfg.timesteps).astype(jnp.int32)]


def ancestral_update(zx, zh, ex, eh, g_t, g_s, nx, nh, last):
    """EDM's ancestral step z_t -> z_s from the predicted noise (ex, eh) and fresh noise (nx, nh), or, where
    ``last``, the denoised estimate x0 = (z_t - sigma_t eps) / alpha_t (no noise)."""
    alpha_t, sigma_t = alpha_sigma(g_t)
    x0x, x0h = (zx - sigma_t * ex) / alpha_t, (zh - sigma_t * eh) / alpha_t
    sigma2_ts = -jnp.expm1(jax.nn.softplus(g_s) - jax.nn.softplus(g_t))
    alpha_ts = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_t) - jax.nn.log_sigmoid(-g_s)))
    sigma_s = jnp.sqrt(jax.nn.sigmoid(g_s))
    c = sigma2_ts / alpha_ts / sigma_t
    std = jnp.sqrt(sigma2_ts) * sigma_s / sigma_t  # EDM's sample_p_zs_given_zt
    out_x = jnp.where(last, x0x, zx / alpha_ts - c * ex + std * nx)
    return out_x, jnp.where(last, x0h, zh / alpha_ts - c * eh + std * nh)


def make_sampler_step(apply_fn, cfg: DiffusionConfig):
    """One reverse step z_t -> z_s (s < t), or, when s == 0, the final denoised estimate of [x, h].

    ``temp`` scales the step's fresh noise (the sampling temperature; 1 is EDM's sampler)."""
    gamma_at = gamma_lookup(cfg)

    def step(params, zx, zh, t, s, graph, key, temp=1.0):
        g_t, g_s = gamma_at(t), gamma_at(s)
        cond = jnp.full(graph.node_mask.shape, t, jnp.float32) * graph.node_mask
        ex, eh = apply_fn(params, zx, zh, cond, graph)
        nx, nh = sample_noise(key, graph, zh.shape[-1])
        out_x, out_h = ancestral_update(zx, zh, ex, eh, g_t, g_s, temp * nx, temp * nh, s <= 0)
        out_x = remove_mean(out_x, graph.node_mask, graph.segment, graph.n_atoms.shape[0])
        return out_x, out_h * graph.node_mask[:, None]

    return step


def make_forward_step(cfg: DiffusionConfig):
    """z_s -> z_t (s < t) by the forward process q(z_t | z_s): alpha_ts z_s + sigma_ts eps (positions' noise on the
    zero-CoM subspace; ``temp`` scales it). RePaint's resampling goes back up one step with it."""
    gamma_at = gamma_lookup(cfg)

    def forward(zx, zh, t, s, graph, key, temp=1.0):
        g_t, g_s = gamma_at(t), gamma_at(s)
        alpha_ts = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_t) - jax.nn.log_sigmoid(-g_s)))
        sigma_ts = jnp.sqrt(-jnp.expm1(jax.nn.softplus(g_s) - jax.nn.softplus(g_t)))
        nx, nh = sample_noise(key, graph, zh.shape[-1])
        return alpha_ts * zx + sigma_ts * temp * nx, (alpha_ts * zh + sigma_ts * temp * nh) * graph.node_mask[:, None]

    return forward

