"""Distribution matching for the one-call student (DMD, Yin et al. 2024), on zero-CoM molecules.

The regression onto the teacher's ODE asks the student for one particular map from noise to molecules; a
small student cannot fit it and averages its errors into wrong bond lengths and fragments (docs/results.md,
session 9).  Distribution matching asks only that the student's *distribution* of molecules be the
teacher's: for a one-call molecule x (positions and features), noised to y = x + s xi at a level s drawn over
the teacher's schedule, the gradient of KL(p_student,s || p_teacher,s) with respect to x is proportional to
s_fake(y) - s_real(y) = (D_real(y, s) - D_fake(y, s)) / s^2, with D_real the teacher's denoiser and D_fake
that of a "fake" diffusion model trained at the same time, by EDM's own loss, on the student's molecules.

``dmd_terms`` returns both losses of one batch:

* the generator term 0.5 |x - stopgrad(x - g)|^2 / sqrt(dim) per molecule, whose gradient in x is
  g / sqrt(dim) with g = (D_fake - D_real) / w and w the mean absolute distance between x and D_real (DMD's
  normalisation: the step does not depend on the level's scale); dividing by sqrt(dim) gives it the same
  per-molecule scale as the pseudo-Huber regression, whose gradient has norm ~1;
* the fake model's EDM loss on the student's molecules (gradients stopped at x).

Gradients are separated by construction: the generator term sees the two denoisers only through a stopped
target, the fake loss sees the student's molecules only as stopped data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from molgen.diffusion.edm import DiffusionConfig, diffusion_loss
from molgen.diffusion.noise import per_molecule_sum, sample_noise

DMD_T = (0.02, 0.98)  # the share of the teacher's time range the generator term draws its levels from (as DMD)


@dataclass(frozen=True)
class DMD:
    denoise: Callable  # D(params, y_x, y_h, sigma_node, graph) of a diffusion network (molgen.diffusion.ode)
    apply: Callable  # the fake network's eps-prediction apply (same architecture as the teacher)
    teacher_params: Any
    diffusion: DiffusionConfig
    weight: float


def dmd_terms(dmd: DMD, fake_params, ox, oh, graph, key, keep):
    """(generator term, fake model's loss, aux) for one-call molecules (ox, oh); ``keep`` [B + 1] selects them."""
    m = graph.node_mask
    seg = graph.segment
    n_seg = graph.n_atoms.shape[0]
    k_t, k_n, k_f = jax.random.split(key, 3)
    gammas = jnp.asarray(dmd.diffusion.gammas())
    T = dmd.diffusion.timesteps
    t_int = jax.random.randint(k_t, (n_seg,), int(DMD_T[0] * T), int(DMD_T[1] * T) + 1)
    s = jnp.exp(0.5 * gammas[t_int])[seg]  # the VE level of EDM's time t: y = x + s xi
    xi_x, xi_h = sample_noise(k_n, graph, oh.shape[-1])
    x0, h0 = jax.lax.stop_gradient(ox), jax.lax.stop_gradient(oh)
    yx, yh = x0 + s[:, None] * xi_x, (h0 + s[:, None] * xi_h) * m[:, None]
    rx, rh = dmd.denoise(dmd.teacher_params, yx, yh, s, graph)
    fx, fh = dmd.denoise(jax.lax.stop_gradient(fake_params), yx, yh, s, graph)
    n = graph.n_atoms.astype(jnp.float32)
    dim = jnp.maximum(n * (3 + oh.shape[-1]), 1.0)
    mad = per_molecule_sum(jnp.sum(jnp.abs(x0 - rx), -1) + jnp.sum(jnp.abs(h0 - rh * m[:, None]), -1), graph) / dim
    w = jnp.maximum(mad, 1e-4)[seg][:, None]
    gx, gh = (fx - rx) / w, (fh - rh) * m[:, None] / w
    tx, th = jax.lax.stop_gradient(x0 - gx), jax.lax.stop_gradient(h0 - gh)
    sq = per_molecule_sum(jnp.sum((ox - tx) ** 2, -1) + jnp.sum((oh - th) ** 2, -1), graph)
    real = (graph.n_atoms > 0).astype(jnp.float32) * keep
    n_keep = jnp.maximum(real.sum(), 1.0)
    gen = jnp.sum(0.5 * sq / jnp.sqrt(dim) * real) / n_keep
    fake, _ = diffusion_loss(dmd.apply, fake_params, x0, h0, graph, k_f, dmd.diffusion, weight=keep)
    gap = per_molecule_sum(jnp.sum((fx - rx) ** 2, -1), graph) / jnp.maximum(n, 1.0)
    aux = {"dmd_gap": jnp.sum(jnp.sqrt(gap) * real) / n_keep}  # Å per atom between fake and real denoisings
    return gen, fake, aux
