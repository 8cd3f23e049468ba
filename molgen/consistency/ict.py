"""Consistency models on molecules (iCT, Song & Dhariwal 2024): the consistency function, consistency training
from scratch (`ct`) and consistency tuning from an EDM diffusion model (`ect`), and the multistep sampler.

Noise is variance-exploding: y = [x, h] + sigma * [eps_x, eps_h], eps_x on the zero-CoM subspace. Both
parametrisations are exact at the boundary, f(y, sigma_min) = y:

* ``ict``: f = c_skip(s) y + c_out(s) F(c_in(s) y, log(s) / 4) with iCT's c_skip / c_out / c_in and a data
  standard deviation measured separately for positions and for features (training from scratch);
* ``ict-vp``: f = c_skip(s) y - c_out(s) F(y / sqrt(1 + s^2), t(s)): iCT's bounded c_skip / c_out, with the
  network fed exactly what an EDM network sees (the variance-preserving latent and EDM's time), so a diffusion
  model initialises it. For small s, c_skip ~ 1 and c_out ~ s: f starts as EDM's denoiser y - s eps_hat.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from molgen.diffusion.edm import DiffusionConfig, edm_time, vp_input
from molgen.diffusion.levels import karras_grid, low_ladder
from molgen.diffusion.noise import per_molecule_sum, sample_noise
from molgen.nn.egnn import remove_mean

PARAMETRIZATIONS = ("ict", "ict-vp")


@dataclass(frozen=True)
class ConsistencyConfig:
    parametrization: str = "ict"  # PARAMETRIZATIONS; "ict-vp" reads the run's diffusion schedule
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data_x: float = 1.0  # measured on the data by `molgen train` (see measure_sigma_data)
    sigma_data_h: float = 0.25
    # training (ct / ect): iCT's lognormal pair distribution, discretisation curriculum and distance
    p_mean: float = -1.1
    p_std: float = 2.0
    s0: int = 10
    s1: int = 150
    total_steps: int = 0  # curriculum length in steps (0: the run's optim.steps)
    huber_scale: float = 0.00054


def n_discretisation(step, cfg: ConsistencyConfig):
    """iCT's curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1))."""
    k_prime = max(int(np.floor(cfg.total_steps / (np.log2(cfg.s1 / cfg.s0) + 1))), 1)
    n = jnp.minimum(cfg.s0 * 2 ** (step // k_prime), cfg.s1) + 1
    return n.astype(jnp.int32)


def training_levels(n, cfg: ConsistencyConfig, n_max: int):
    """The Karras grid of traced length n, in an array of static length n_max (entries past n repeat)."""
    i = jnp.minimum(jnp.arange(n_max, dtype=jnp.float32), n - 1)
    return karras_grid(i, n.astype(jnp.float32), cfg.sigma_min, cfg.sigma_max, cfg.rho)


def sample_pair_index(key, n, shape, cfg: ConsistencyConfig, n_max: int):
    """Index i in 0..n-2 of the pair (sigma_i, sigma_{i+1}) from iCT's discretised lognormal."""
    sig = training_levels(n, cfg, n_max)
    cdf = erf((jnp.log(sig) - cfg.p_mean) / (np.sqrt(2.0) * cfg.p_std))
    w = jnp.where(jnp.arange(n_max - 1) < n - 1, cdf[1:] - cdf[:-1], 0.0)
    return jax.random.categorical(key, jnp.log(jnp.maximum(w, 1e-30)), shape=shape), sig


def ict_scalings(sigma, sigma_data, sigma_min):
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma_data**2 + sigma**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def make_consistency_fn(apply_fn, cfg: ConsistencyConfig, schedule: DiffusionConfig | None = None):
    """f(params, yx, yh, sigma_node, graph) -> (x, h), exact at sigma_min. ``schedule``: the EDM noise schedule
    an ``ict-vp`` network was trained with."""
    if cfg.parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {cfg.parametrization!r}")
    vp = cfg.parametrization == "ict-vp"
    if vp and schedule is None:
        raise ValueError("the ict-vp parametrisation needs the diffusion schedule of its network")

    def f(params, yx, yh, sigma, graph):
        s = sigma[:, None]
        skx, cox, cix = ict_scalings(s, cfg.sigma_data_x, cfg.sigma_min)
        skh, coh, cih = ict_scalings(s, cfg.sigma_data_h, cfg.sigma_min)
        if vp:  # the variance-preserving latent and EDM's time, as the diffusion network was trained
            cix = cih = vp_input(s)
            cond = edm_time(sigma, schedule) * graph.node_mask
        else:
            cond = 0.25 * jnp.log(sigma) * graph.node_mask
        fx, fh = apply_fn(params, cix * yx, cih * yh, cond, graph)
        if vp:  # f ~ y - s F for small s: EDM's denoiser when F is the diffusion network's eps_hat
            fx, fh = -fx, -fh
        x = remove_mean(skx * yx + cox * fx, graph.node_mask, graph.segment, graph.n_atoms.shape[0])
        return x, (skh * yh + coh * fh) * graph.node_mask[:, None]

    return f


def pseudo_huber(sq_dist, dim, scale):
    """iCT's distance sqrt(d^2 + c^2) - c per molecule, c = scale sqrt(dim) (dim: the molecule's real numbers)."""
    c = scale * jnp.sqrt(jnp.maximum(dim, 1.0))  # dim 0 (the padding graph) must not give sqrt'(0)
    return jnp.sqrt(sq_dist + c**2) - c


def molecule_distance(ax, ah, bx, bh, graph, scale):
    """(pseudo-Huber distance per molecule, squared distance, real numbers per molecule) of two [x, h] states."""
    sq = per_molecule_sum(jnp.sum((ax - bx) ** 2, -1) + jnp.sum((ah - bh) ** 2, -1), graph)
    dim = graph.n_atoms.astype(jnp.float32) * (3 + ah.shape[-1])
    return pseudo_huber(sq, dim, scale), sq, dim


def mean_over_molecules(values, graph, weight=None):
    """Mean of a per-molecule quantity over the real molecules (times ``weight``), padding graph excluded."""
    real = (graph.n_atoms > 0).astype(jnp.float32)
    if weight is not None:
        real = real * weight
    return jnp.sum(values * real) / jnp.maximum(real.sum(), 1.0)


def consistency_loss(cfn, params, x, h, graph, key, step, cfg: ConsistencyConfig):
    """iCT loss: lambda(sigma_i) d(f(y + sigma_{i+1} z), stopgrad f(y + sigma_i z)) averaged over molecules."""
    n_seg = graph.n_atoms.shape[0]
    n = n_discretisation(step, cfg)
    k_i, k_z = jax.random.split(key)
    i, sig = sample_pair_index(k_i, n, (n_seg,), cfg, cfg.s1 + 1)
    s_lo, s_hi = sig[i], sig[i + 1]
    zx, zh = sample_noise(k_z, graph, h.shape[-1])
    seg = graph.segment
    m = graph.node_mask[:, None]
    lo, hi = s_lo[seg][:, None], s_hi[seg][:, None]
    ox, oh = cfn(params, x + hi * zx, (h + hi * zh) * m, s_hi[seg], graph)
    tx, th = cfn(jax.lax.stop_gradient(params), x + lo * zx, (h + lo * zh) * m, s_lo[seg], graph)
    tx, th = jax.lax.stop_gradient(tx), jax.lax.stop_gradient(th)
    dist, sq, dim = molecule_distance(ox, oh, tx, th, graph, cfg.huber_scale)
    loss = mean_over_molecules(dist / (s_hi - s_lo), graph)
    return loss, {"n_discretisation": n.astype(jnp.float32),
                  "mean_sq": mean_over_molecules(sq / jnp.maximum(dim, 1.0), graph)}


def multistep_levels(k: int, cfg: ConsistencyConfig) -> list[float]:
    """The multistep sampler's noise levels: sigma_max, then 0.2 (k = 2), or the low ladder's k - 1 levels
    from 0.4 down to 0.1 (k > 2): re-noising only slightly keeps the sample's layout and lets each call sharpen
    it (docs/models.md)."""
    if k < 1:
        raise ValueError("steps must be >= 1")
    rest = [] if k == 1 else low_ladder(k - 1) if k > 2 else [0.2]
    return [float(cfg.sigma_max)] + [float(s) for s in rest]


def make_multistep_step(cfn, cfg: ConsistencyConfig):
    """x <- f(x + renoise * sqrt(sigma^2 - sigma_min^2) z, sigma); with ``first`` the input is sigma * z itself
    (``temp`` scales that first z; ``renoise`` the later ones)."""

    def step(params, yx, yh, sigma, first, graph, key, scale=1.0):
        zx, zh = sample_noise(key, graph, yh.shape[-1])
        zx, zh = scale * zx, scale * zh
        amp = jnp.where(first, sigma, jnp.sqrt(jnp.maximum(sigma**2 - cfg.sigma_min**2, 0.0)))
        base = jnp.where(first, 0.0, 1.0)
        s = jnp.full(graph.node_mask.shape, sigma, jnp.float32)
        return cfn(params, base * yx + amp * zx, base * yh + amp * zh, s, graph)

    return step


def measure_sigma_data(ds, ids, feature_fn, max_molecules: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Standard deviation of positions (per coordinate) and of features over real atoms of a data set."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(ids, size=min(max_molecules, len(ids)), replace=False)
    xs, hs = [], []
    for i in pick:
        p, t = ds.molecule(int(i))
        xs.append(p)
        hs.append(feature_fn(t.astype(np.int32), np.ones(len(t), np.float32)))
    x, h = np.concatenate(xs), np.concatenate(hs)
    return float(np.sqrt(np.mean(x**2))), float(np.sqrt(np.mean(h**2)))
