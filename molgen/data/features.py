"""EDM's per-atom input features: one-hot(type) / 4 and Z / 10, zero on padding rows.

One definition for the host (numpy: batches, data statistics) and the device (jax: training, sampling, the
atom types re-read between denoising steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from molgen.chem.elements import CHARGES, N_TYPES

ONEHOT_SCALE = 0.25
CHARGE_SCALE = 0.1


def type_features(types, node_mask, xp=jnp):
    """[N, N_TYPES + 1] features of atom types ``types`` [N]; ``xp`` is numpy or jax.numpy."""
    onehot = xp.eye(N_TYPES, dtype=xp.float32)[types] * ONEHOT_SCALE
    charge = xp.asarray(CHARGES, xp.float32)[types][:, None] * CHARGE_SCALE
    return xp.concatenate([onehot, charge], axis=-1) * xp.asarray(node_mask, xp.float32)[:, None]


def expected_features(probs, node_mask):
    """The features of the expected type under per-atom type probabilities ``probs`` [N, N_TYPES]."""
    charge = probs @ jnp.asarray(CHARGES, jnp.float32)
    return jnp.concatenate([ONEHOT_SCALE * probs, CHARGE_SCALE * charge[:, None]], -1) * node_mask[:, None]


def read_types(h):
    """The atom types a feature array holds: the argmax over its one-hot block."""
    return jnp.argmax(h[:, :N_TYPES], axis=-1)


def clean_features(h, node_mask):
    """The features of the atom types read from ``h``: what a denoiser is given as an atom's clean type."""
    return type_features(read_types(h), node_mask)


def straight_through_features(h, node_mask, temperature: float):
    """Forward: :func:`clean_features` (the argmax); backward: the gradient of the expected features under
    softmax(h_types / temperature), so a stack of denoisers trains end to end through the type read-out."""
    soft = expected_features(jax.nn.softmax(h[:, :N_TYPES] / temperature, axis=-1), node_mask)
    return clean_features(h, node_mask) + (soft - jax.lax.stop_gradient(soft))
