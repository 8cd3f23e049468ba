"""Molecules of a given formula (`molgen sample --formula C7H10O2`): the atom count is the formula's, and after
every network call each molecule's atoms take the formula's types, assigned to the atoms whose predicted types
fit them best (an optimal assignment of the formula's atoms to the molecule's rows, scored by the network's type
output). The next call then shapes the molecule around those types, and the last call's output gets them too, so
every molecule has exactly the formula. A stacked model also gets them inside each call, before each of its
stages (:func:`formula_between`): the stages then shape the molecule around them, so that one call suffices
(the default at one call: 22.4 % of its C4H4N2O2 draws stable molecules, against 3.9 % with the types given after
the call only; docs/models.md).

This needs a clean molecule after every call: the consistency samplers' outputs (multistep, anneal) and the
polishing calls. A diffusion model's ancestral or ODE state is a noisy one, where the types are read too late
to shape the geometry (measured: no valid molecule), so the formula is refused there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molgen import MolgenError
from molgen.chem.elements import N_TYPES, SYMBOLS, TYPE_OF_SYMBOL, hill_formula
from molgen.chem.io import MAX_ATOMS
from molgen.data.features import type_features

_TERM = re.compile(r"([A-Z][a-z]?)(\d*)")


@dataclass(frozen=True)
class Formula:
    counts: tuple[int, ...]  # atoms of each type (H, C, N, O, F)

    @property
    def types(self) -> np.ndarray:
        """The formula's atom types, as many of each as it holds (type order)."""
        return np.repeat(np.arange(N_TYPES, dtype=np.int32), self.counts)

    @property
    def size(self) -> int:
        return int(sum(self.counts))

    def __str__(self) -> str:
        return hill_formula(self.counts)


def parse_formula(text: str) -> Formula:
    """A formula such as C7H10O2 or CH3CH2OH (elements H, C, N, O, F; a count after each, 1 when absent; an
    element may recur)."""
    s = text.strip()
    terms = _TERM.findall(s)
    if not s or "".join(e + n for e, n in terms) != s:
        raise MolgenError(f"--formula {text!r}: write elements and counts, e.g. C7H10O2")
    counts = [0] * N_TYPES
    for element, n in terms:
        if element not in TYPE_OF_SYMBOL:
            raise MolgenError(f"--formula {s}: {element} is not an element molgen's models know "
                              f"({', '.join(SYMBOLS)})")
        if n and int(n) == 0:
            raise MolgenError(f"--formula {s}: a count of 0 ({element}0); leave the element out")
        counts[TYPE_OF_SYMBOL[element]] += int(n or 1)
    f = Formula(tuple(counts))
    if f.size > MAX_ATOMS:
        raise MolgenError(f"--formula {s}: {f.size} atoms, more than the {MAX_ATOMS} molgen reads back")
    return f


def assign_types(scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The formula's ``types`` [k] given to a molecule's k atoms so that the summed ``scores`` [k, N_TYPES] of
    the types given is the largest (an optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    rows, slots = linear_sum_assignment(-scores[:, types])
    out = np.empty(len(types), np.int32)
    out[rows] = types[slots]
    return out


def formula_fixer(f: Formula, n_mols: int, graph):
    """fix(x, h, level, scale) for a packed batch of ``n_mols`` molecules of the formula's size (its first rows,
    one molecule after another): every molecule's atoms take the formula's types (:func:`assign_types`, scored by
    the type block of ``h``). For clean states only (level 0, scale 1)."""
    k, types = f.size, f.types
    rows = n_mols * k
    mask = np.asarray(graph.node_mask)

    def fix(x, h, level, scale):
        assert level == 0 and scale == 1, "the formula is imposed on clean molecules only"
        scores = np.asarray(h)[:rows, :N_TYPES].reshape(n_mols, k, N_TYPES)
        t = np.zeros(len(mask), np.int32)
        t[:rows] = np.concatenate([assign_types(s, types) for s in scores])
        return x, _put(h, type_features(t, mask, np), mask)

    return fix


def formula_between(f: Formula):
    """between(x, h, graph), traceable: every molecule's atoms take the formula's types (:func:`assign_types`,
    on the host), for a packed batch whose molecules all have the formula's size, one after another. Given to a
    stacked model (:func:`molgen.networks.model_fn`), it imposes the formula before each of its stages."""
    k, types = f.size, f.types

    def assign(h, mask):
        h, n = np.asarray(h), int(np.asarray(mask).sum()) // k
        t = np.zeros(len(mask), np.int32)
        if n:
            scores = h[: n * k, :N_TYPES].reshape(n, k, N_TYPES)
            t[: n * k] = np.concatenate([assign_types(s, types) for s in scores])
        return t

    def between(x, h, graph):
        m = graph.node_mask
        t = jax.pure_callback(assign, jax.ShapeDtypeStruct(m.shape, jnp.int32), h, m)
        return x, jnp.where(m[:, None] > 0, type_features(t, m, jnp), h)

    return between


@jax.jit
def _put(h, given, mask):
    """``h`` with the real atoms' rows (``mask``) replaced by ``given``, its feature columns; padding rows kept."""
    return jnp.where(mask[:, None] > 0, given, h)
