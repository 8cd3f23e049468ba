"""A diffusion model that completes fragments: EDM's objective with some atoms given clean (DiffLinker's way of
conditioning, Igashov et al. 2024), and the ancestral sampler that keeps them.

Training picks, for a share of the molecules of each batch, a random fragment (a spatially contiguous part: the
atoms on one side of a random plane; or a random subset) and gives its atoms clean, at noise time 0, while the
other atoms are noised as usual; the loss counts the free atoms only. The network needs no new input: it reads
every atom's time, so "time 0" marks a fixed atom. A molecule with a fragment is centred on the fragment's atoms
(their mean at 0), and its free atoms' noise is plain Gaussian, not on the zero-centre-of-mass subspace: the
fragment anchors the frame. The other molecules train exactly as with EDM's objective, so the model still samples
molecules unconditionally.

Sampling (:func:`make_inpaint_step`): the fragment's atoms stay where they are, clean, at time 0; the free atoms
start from plain Gaussian noise around the fragment's centre and follow EDM's ancestral steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from molgen.data.features import clean_features
from molgen.diffusion.edm import DiffusionConfig, alpha_sigma, ancestral_update, edm_time, gamma_lookup, vp_input
from molgen.diffusion.noise import per_molecule_sum, sample_noise
from molgen.nn.pairs import segment_sum


@dataclass(frozen=True)
class InpaintConfig:
    share: float = 0.8  # of the molecules in a batch given a fragment (the others train unconditionally)
    kept_min: float = 0.2  # a fragment keeps a share of its molecule's atoms drawn from [kept_min, kept_max]
    kept_max: float = 0.9
    contiguous: float = 0.7  # of the fragments cut by a plane (the rest: random atoms)


def _per_atom(values, graph):
    return values[graph.segment]


def fragment_mask(key, graph, cfg: InpaintConfig):
    """float [N]: 1 on the atoms given as a fragment. Each molecule gets one with probability ``cfg.share``: a
    plane's side (atoms whose position along a random direction, scaled to [0, 1] over the molecule, is below
    the share kept) or random atoms (each kept with that probability). A fragment of no atom or of every atom is
    dropped (the molecule then trains unconditionally)."""
    n_seg = graph.n_atoms.shape[0]
    k_has, k_q, k_kind, k_dir, k_atom = jax.random.split(key, 5)
    has = jax.random.uniform(k_has, (n_seg,)) < cfg.share
    q = jax.random.uniform(k_q, (n_seg,), minval=cfg.kept_min, maxval=cfg.kept_max)
    plane = jax.random.uniform(k_kind, (n_seg,)) < cfg.contiguous
    d = jax.random.normal(k_dir, (n_seg, 3))
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
    m = graph.node_mask
    proj = jnp.sum(graph.positions * _per_atom(d, graph), -1)
    big = 1e6
    lo = jax.ops.segment_min(jnp.where(m > 0, proj, big), graph.segment, n_seg, indices_are_sorted=True)
    hi = jax.ops.segment_max(jnp.where(m > 0, proj, -big), graph.segment, n_seg, indices_are_sorted=True)
    scaled = (proj - _per_atom(lo, graph)) / jnp.maximum(_per_atom(hi - lo, graph), 1e-6)
    by_plane = scaled < _per_atom(q, graph)
    by_atom = jax.random.uniform(k_atom, m.shape) < _per_atom(q, graph)
    keep = jnp.where(_per_atom(plane, graph), by_plane, by_atom) & _per_atom(has, graph) & (m > 0)
    count = segment_sum(keep.astype(jnp.float32), graph.segment, n_seg, sorted_ids=True)
    ok = (count > 0) & (count < graph.n_atoms)
    return (keep & _per_atom(ok, graph)).astype(jnp.float32)


def fragment_centred(x, fixed, graph):
    """Positions moved so that each molecule's fixed atoms have their mean at 0 (molecules without: as given)."""
    n_seg = graph.n_atoms.shape[0]
    count = segment_sum(fixed, graph.segment, n_seg, sorted_ids=True)
    centre = segment_sum(x * fixed[:, None], graph.segment, n_seg, sorted_ids=True) / jnp.maximum(count, 1.0)[:, None]
    return (x - centre[graph.segment]) * graph.node_mask[:, None]


def inpaint_noise(key, graph, n_features: int, fixed):
    """(eps_x, eps_h) for a batch with fixed atoms: 0 on them; a molecule with a fragment gets plain Gaussian
    position noise on its free atoms, one without EDM's zero-centre-of-mass noise."""
    n_seg = graph.n_atoms.shape[0]
    k_free, k_com = jax.random.split(key)
    com_x, eps_h = sample_noise(k_com, graph, n_features)
    plain = jax.random.normal(k_free, graph.positions.shape) * graph.node_mask[:, None]
    has = segment_sum(fixed, graph.segment, n_seg, sorted_ids=True) > 0
    eps_x = jnp.where(_per_atom(has, graph)[:, None], plain, com_x)
    free = (1.0 - fixed)[:, None]
    return eps_x * free, eps_h * free


def inpaint_loss(apply_fn, params, x, h, graph, key, cfg: DiffusionConfig, icfg: InpaintConfig):
    """EDM's L2 loss over the free atoms, a random fragment of each molecule given clean (:func:`fragment_mask`).
    Returns (loss, aux) as :func:`molgen.diffusion.edm.diffusion_loss` does, with the share of atoms fixed."""
    gammas = jnp.asarray(cfg.gammas())
    n_seg = graph.n_atoms.shape[0]
    k_frag, k_t, k_eps = jax.random.split(key, 3)
    fixed = fragment_mask(k_frag, graph, icfg)
    free = (1.0 - fixed) * graph.node_mask
    x = fragment_centred(x, fixed, graph)
    t_int = jax.random.randint(k_t, (n_seg,), 0, cfg.timesteps + 1)
    alpha, sigma = alpha_sigma(gammas[t_int][graph.segment])
    eps_x, eps_h = inpaint_noise(k_eps, graph, h.shape[-1], fixed)
    f = fixed[:, None] > 0
    zx = jnp.where(f, x, alpha[:, None] * x + sigma[:, None] * eps_x)
    zh = jnp.where(f, h, alpha[:, None] * h + sigma[:, None] * eps_h)
    t = (t_int.astype(jnp.float32) / cfg.timesteps)[graph.segment] * free
    px, ph = apply_fn(params, zx, zh, t, graph)
    ex = per_molecule_sum(jnp.sum((eps_x - px) ** 2, -1) * free, graph)
    eh = per_molecule_sum(jnp.sum((eps_h - ph) ** 2, -1) * free, graph)
    n_free = per_molecule_sum(free, graph)
    real = (graph.n_atoms > 0).astype(jnp.float32)
    denom = jnp.maximum(n_free, 1.0) * (3 + h.shape[-1])
    n_mol = jnp.maximum(real.sum(), 1.0)
    loss_x = jnp.sum(ex / denom * real) / n_mol
    loss_h = jnp.sum(eh / denom * real) / n_mol
    share = jnp.sum(fixed) / jnp.maximum(jnp.sum(graph.node_mask), 1.0)
    return loss_x + loss_h, {"loss_x": loss_x, "loss_h": loss_h, "fixed": share}


def make_inpaint_step(apply_fn, cfg: DiffusionConfig):
    """One ancestral step z_t -> z_s of the free atoms (s == 0: their denoised estimate), the fixed atoms (mask
    ``fixed`` [N]) kept as they are, clean, at time 0. No re-centring: the fragment holds the frame."""
    gamma_at = gamma_lookup(cfg)

    def step(params, zx, zh, t, s, graph, key, temp, fixed):
        g_t, g_s = gamma_at(t), gamma_at(s)
        free = (1.0 - fixed) * graph.node_mask
        ex, eh = apply_fn(params, zx, zh, t * free, graph)
        kx, kh = jax.random.split(key)
        nx, nh = jax.random.normal(kx, zx.shape) * temp, jax.random.normal(kh, zh.shape) * temp
        out_x, out_h = ancestral_update(zx, zh, ex, eh, g_t, g_s, nx, nh, s <= 0)
        f = fixed[:, None] > 0
        m = graph.node_mask[:, None]
        return jnp.where(f, zx, out_x) * m, jnp.where(f, zh, out_h) * m

    return step


def make_inpaint_polish_step(apply_fn, cfg: DiffusionConfig):
    """step(params, x, h, sigma, graph, fixed) -> (x, h): one polishing step (:mod:`molgen.diffusion.polish`) that
    keeps a fragment: the free atoms are read as a state at the variance-exploding level ``sigma`` and moved to the
    model's estimate of the clean molecule, x - sigma eps_hat, their types re-read first; the fixed atoms (mask
    ``fixed``) are given clean, at time 0, and kept as they are. The network sees each molecule centred on its
    fragment, as in training (the free atoms' scaling to the latent is about that centre), so the step is
    E(3)-equivariant; a molecule without fixed atoms is centred on all its atoms."""

    def step(params, x, h, sigma, graph, fixed):
        m = graph.node_mask[:, None]
        n_seg = graph.n_atoms.shape[0]
        has = segment_sum(fixed, graph.segment, n_seg, sorted_ids=True) > 0
        anchor = jnp.where(_per_atom(has, graph), fixed, 1.0) * graph.node_mask
        xc = fragment_centred(x, anchor, graph)
        f = fixed[:, None] > 0
        hc = jnp.where(f, h, clean_features(h, graph.node_mask))
        c = vp_input(sigma)
        free = (1.0 - fixed) * graph.node_mask
        ex, eh = apply_fn(params, jnp.where(f, xc, c * xc), jnp.where(f, hc, c * hc), edm_time(sigma, cfg) * free,
                          graph)
        # x and xc differ by a shift per molecule: the free atoms' update is the same in either frame, and the
        # fixed atoms keep their coordinates exactly
        return jnp.where(f, x, x - sigma * ex) * m, jnp.where(f, hc, hc - sigma * eh) * m

    return step
