"""Consistency training (iCT, Song & Dhariwal 2024) on molecules, and consistency tuning from an EDM model.

Noise is variance-exploding: y = [x, h] + sigma * [eps_x, eps_h], eps_x on the zero-CoM subspace.
The consistency function has one of three parametrisations, all exact at the boundary f(y, sigma_min) = y:

* ``ict``  f = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s)) with iCT's c_skip / c_out / c_in and a data
  standard deviation measured separately for positions and for features;
* ``eps``  f = y - (s - sigma_min) eps_hat(y / sqrt(1 + s^2), t(s)), where eps_hat is an EDM
  (variance-preserving) epsilon network and t(s) inverts s = sigma_t / alpha_t = exp(gamma(t) / 2).  At
  initialisation from a diffusion checkpoint f is EDM's own denoiser (up to sigma_min), so tuning starts from
  a model that already knows the data.  Its weakness: at s = 80 an error e in eps_hat becomes an error 80 e in
  f, so a one-step sample needs eps_hat to ~1e-3, which a small network does not reach (types come out
  nearly uniform).
* ``ict-vp``  f = c_skip(s) y - c_out(s) F(y / sqrt(1 + s^2), t(s)): iCT's bounded c_skip / c_out (per-channel
  sigma_data), with the network fed exactly what an EDM network sees (the variance-preserving latent and
  EDM's time), so a diffusion checkpoint can initialise it.  For small s, c_skip ~ 1 and c_out ~ s, so f
  starts as EDM's denoiser y - s eps_hat; for large s, f -> -sigma_data F and an error in F costs only
  sigma_data times as much.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from molgen.diffusion.noise import per_molecule_sum, sample_noise
from molgen.diffusion.schedule import gamma_table
from molgen.nn.egnn import remove_mean


@dataclass(frozen=True)
class ConsistencyConfig:
    parametrization: str = "ict"  # "ict", "eps" or "ict-vp"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data_x: float = 1.0  # measured on the data by `molgen train` (see measure_sigma_data)
    sigma_data_h: float = 0.25
    p_mean: float = -1.1
    p_std: float = 2.0
    s0: int = 10
    s1: int = 150
    total_steps: int = 10000  # curriculum length
    huber_scale: float = 0.00054
    # for the "eps" parametrisation: the EDM schedule the network was trained with
    timesteps: int = 1000
    precision: float = 1e-5
    power: float = 2.0


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float):
    """n increasing noise levels on the Karras grid (n >= 2)."""
    i = jnp.arange(n, dtype=jnp.float32)
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def n_discretisation(step, cfg: ConsistencyConfig):
    """iCT's curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1))."""
    k_prime = max(int(np.floor(cfg.total_steps / (np.log2(cfg.s1 / cfg.s0) + 1))), 1)
    n = jnp.minimum(cfg.s0 * 2 ** (step // k_prime), cfg.s1) + 1
    return n.astype(jnp.int32)


def sample_pair_index(key, n, shape, cfg: ConsistencyConfig, n_max: int):
    """Index i in 0..n-2 of the pair (sigma_i, sigma_{i+1}) from iCT's discretised lognormal."""
    sig = karras_sigmas_dynamic(n, cfg, n_max)
    logs = jnp.log(sig)
    cdf = erf((logs - cfg.p_mean) / (np.sqrt(2.0) * cfg.p_std))
    w = cdf[1:] - cdf[:-1]
    w = jnp.where(jnp.arange(n_max - 1) < n - 1, w, 0.0)
    return jax.random.categorical(key, jnp.log(jnp.maximum(w, 1e-30)), shape=shape), sig


def karras_sigmas_dynamic(n, cfg: ConsistencyConfig, n_max: int):
    """Karras grid of traced length n, stored in an array of static length n_max (entries past n repeat)."""
    i = jnp.minimum(jnp.arange(n_max, dtype=jnp.float32), n - 1)
    a, b = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
    return (a + i / (n - 1).astype(jnp.float32) * (b - a)) ** cfg.rho


def ict_scalings(sigma, sigma_data, sigma_min):
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma_data**2 + sigma**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def make_consistency_fn(apply_fn, cfg: ConsistencyConfig):
    """f(params, yx, yh, sigma_node, graph) -> (x, h) with the boundary condition exact at sigma_min."""
    gammas = jnp.asarray(gamma_table(cfg.timesteps, cfg.precision, cfg.power), jnp.float32)
    t_grid = jnp.linspace(0.0, 1.0, gammas.shape[0])

    def edm_time(sigma, node_mask):  # t(s): EDM's time whose schedule has sigma_t / alpha_t = s
        return jnp.interp(2.0 * jnp.log(sigma), gammas, t_grid) * node_mask

    if cfg.parametrization in ("ict", "ict-vp"):
        vp = cfg.parametrization == "ict-vp"

        def f(params, yx, yh, sigma, graph):
            s = sigma[:, None]
            skx, cox, cix = ict_scalings(s, cfg.sigma_data_x, cfg.sigma_min)
            skh, coh, cih = ict_scalings(s, cfg.sigma_data_h, cfg.sigma_min)
            if vp:  # the variance-preserving latent and EDM's time, as the diffusion network was trained
                cix = cih = 1.0 / jnp.sqrt(1.0 + s**2)
                cond = edm_time(sigma, graph.node_mask)
            else:
                cond = 0.25 * jnp.log(sigma) * graph.node_mask
            fx, fh = apply_fn(params, cix * yx, cih * yh, cond, graph)
            if vp:  # f ~ y - s F for small s: EDM's denoiser when F is the diffusion network's eps_hat
                fx, fh = -fx, -fh
            x = remove_mean(skx * yx + cox * fx, graph.node_mask, graph.segment, graph.n_atoms.shape[0])
            return x, (skh * yh + coh * fh) * graph.node_mask[:, None]

        return f
    if cfg.parametrization == "eps":

        def f(params, yx, yh, sigma, graph):
            s = sigma[:, None]
            c_in = 1.0 / jnp.sqrt(1.0 + s**2)
            ex, eh = apply_fn(params, c_in * yx, c_in * yh, edm_time(sigma, graph.node_mask), graph)
            c_out = s - cfg.sigma_min
            x = remove_mean(yx - c_out * ex, graph.node_mask, graph.segment, graph.n_atoms.shape[0])
            return x, (yh - c_out * eh) * graph.node_mask[:, None]

        return f
    raise ValueError(f"unknown parametrization {cfg.parametrization!r}")


def pseudo_huber(sq_dist, dim, scale):
    c = scale * jnp.sqrt(jnp.maximum(dim, 1.0))  # dim 0 (the padding graph) must not give sqrt'(0)
    return jnp.sqrt(sq_dist + c**2) - c


def consistency_loss(cfn, params, x, h, graph, key, step, cfg: ConsistencyConfig):
    """iCT loss: lambda(sigma_i) d(f(y + sigma_{i+1} z), stopgrad f(y + sigma_i z)) averaged over molecules."""
    n_seg = graph.n_atoms.shape[0]
    n_max = cfg.s1 + 1
    n = n_discretisation(step, cfg)
    k_i, k_z = jax.random.split(key)
    i, sig = sample_pair_index(k_i, n, (n_seg,), cfg, n_max)
    s_lo, s_hi = sig[i], sig[i + 1]
    weight = 1.0 / (s_hi - s_lo)
    zx, zh = sample_noise(k_z, graph, h.shape[-1])
    seg = graph.segment
    m = graph.node_mask[:, None]
    lo, hi = s_lo[seg][:, None], s_hi[seg][:, None]
    ox, oh = cfn(params, x + hi * zx, (h + hi * zh) * m, s_hi[seg], graph)
    tx, th = cfn(jax.lax.stop_gradient(params), x + lo * zx, (h + lo * zh) * m, s_lo[seg], graph)
    tx, th = jax.lax.stop_gradient(tx), jax.lax.stop_gradient(th)
    sq = per_molecule_sum(jnp.sum((ox - tx) ** 2, -1) + jnp.sum((oh - th) ** 2, -1), graph)
    dim = graph.n_atoms.astype(jnp.float32) * (3 + h.shape[-1])
    real = (graph.n_atoms > 0).astype(jnp.float32)
    per_mol = weight * pseudo_huber(sq, dim, cfg.huber_scale)
    loss = jnp.sum(per_mol * real) / jnp.maximum(real.sum(), 1.0)
    return loss, {"n_discretisation": n.astype(jnp.float32),
                  "mean_sq": jnp.sum(sq / jnp.maximum(dim, 1.0) * real) / jnp.maximum(real.sum(), 1.0)}


def default_sigmas(k: int, cfg: ConsistencyConfig) -> list[float]:
    """Noise levels for k-step sampling: sigma_max, then (k = 2) 0.2, or (k > 2) k-1 levels geometrically from
    0.4 down to 0.1.  Chosen on the shipped model with seed 1 (docs/results.md): re-noising only slightly
    keeps the sample's layout and lets each call sharpen it; the earlier levels (1.0 down to 0.05) gave
    5-13 points less atom stability at 2, 3 and 4 calls."""
    if k < 1:
        raise ValueError("steps must be >= 1")
    rest = [] if k == 1 else list(np.geomspace(0.4, 0.1, k - 1)) if k > 2 else [0.2]
    return [float(cfg.sigma_max)] + [float(s) for s in rest]


def make_sampler_step(cfn, cfg: ConsistencyConfig):
    """x <- f(x + sqrt(sigma^2 - sigma_min^2) z, sigma); with ``first`` the input is sigma_max * z itself.

    ``temp`` scales the Gaussian z (the sampling temperature; 1 is the plain sampler)."""

    def step(params, yx, yh, sigma, first, graph, key, temp=1.0):
        zx, zh = sample_noise(key, graph, yh.shape[-1])
        zx, zh = temp * zx, temp * zh
        amp = jnp.where(first, sigma, jnp.sqrt(jnp.maximum(sigma**2 - cfg.sigma_min**2, 0.0)))
        base = jnp.where(first, 0.0, 1.0)
        ix, ih = base * yx + amp * zx, base * yh + amp * zh
        s = jnp.full(graph.node_mask.shape, sigma, jnp.float32)
        return cfn(params, ix, ih, s, graph)

    return step


def measure_sigma_data(ds, ids, feature_fn, max_molecules: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Standard deviation of normalised positions (per coordinate) and of features over real atoms."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(ids, size=min(max_molecules, len(ids)), replace=False)
    xs, hs = [], []
    for i in pick:
        p, t = ds.molecule(int(i))
        xs.append(p)
        hs.append(feature_fn(t.astype(np.int32), np.ones(len(t), np.float32)))
    x, h = np.concatenate(xs), np.concatenate(hs)
    return float(np.sqrt(np.mean(x**2))), float(np.sqrt(np.mean(h**2)))
