"""Gaussian noise for molecules: positions on the zero-centre-of-mass subspace, features plain."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from molgen.nn.egnn import remove_mean


def sample_noise(key, graph, n_features: int):
    """(eps_x, eps_h): eps_x ~ N(0, I) projected to zero CoM per molecule; eps_h ~ N(0, I); 0 on padding."""
    kx, kh = jax.random.split(key)
    m = graph.node_mask
    eps_x = jax.random.normal(kx, graph.positions.shape, jnp.float32)
    eps_x = remove_mean(eps_x, m, graph.segment, graph.n_atoms.shape[0])
    eps_h = jax.random.normal(kh, (m.shape[0], n_features), jnp.float32) * m[:, None]
    return eps_x, eps_h


def per_molecule_sum(values, graph):
    """Sum a per-atom quantity [N] over each molecule's real atoms -> [B + 1]."""
    return jax.ops.segment_sum(values * graph.node_mask, graph.segment, num_segments=graph.n_atoms.shape[0],
                               indices_are_sorted=True)
