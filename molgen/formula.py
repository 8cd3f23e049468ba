"""Molecules of a given formula (`molgen sample --formula C7H10O2`): the atom count is the formula's, and after
every network call each molecule's atoms take the formula's types, assigned to the atoms whose predicted types
fit them best (an optimal assignment of the formula's atoms to the molecule's rows, scored by the network's type
output). The next call then shapes the molecule around those types, and the last call's output gets them too, so
every molecule has exactly the formula. A stacked model also gets them inside each call, before each of its
stages (:func:`formula_types`): the stages then shape the molecule around them, so that one call suffices
(the default at one call: 22.4 % of its C4H4N2O2 draws stable molecules, against 3.9 % with the types given after
the call only; docs/models.md).

This needs a clean molecule after every call: the consistency samplers' outputs (multistep, anneal) and the
polishing calls. A diffusion model's ancestral or ODE state is a noisy one, where the types are read too late
to shape the geometry (measured: no valid molecule), so the formula is refused there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

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


def min_cost_assignment(cost):
    """The column given to each row of a square cost matrix [k, k] so that the summed cost is the least (an
    optimal assignment; int32 [k]). Shortest augmenting paths with row and column potentials (Kuhn-Munkres,
    O(k^3)), in JAX: traceable, vmappable, and run inside a network call without leaving the device."""
    k = cost.shape[0]
    a = jnp.pad(jnp.asarray(cost, jnp.float32), ((1, 0), (1, 0)))  # rows and columns counted from 1; 0: none
    inf = jnp.float32(jnp.inf)

    def add_row(i, carry):  # row i joins: a shortest augmenting path from it to a free column, then flipped
        u, v, p, way = carry
        p = p.at[0].set(i)

        def grow(c):  # one more column on the path tree (Dijkstra step on reduced costs)
            j0, u, v, minv, used, way = c
            used = used.at[j0].set(True)
            i0 = p[j0]
            cur = a[i0] - u[i0] - v
            better = ~used & (cur < minv)
            minv, way = jnp.where(better, cur, minv), jnp.where(better, j0, way)
            free = jnp.where(used, inf, minv)
            j1 = jnp.argmin(free)
            delta = free[j1]
            u = u.at[p].add(jnp.where(used, delta, 0.0))  # the rows of the used columns (each at most once)
            return j1, u, jnp.where(used, v - delta, v), jnp.where(used, minv, minv - delta), used, way

        start = (jnp.int32(0), u, v, jnp.full(k + 1, inf), jnp.zeros(k + 1, bool), way)
        j0, u, v, _, _, way = jax.lax.while_loop(lambda c: p[c[0]] != 0, grow, grow(start))

        def flip(c):
            j0, p = c
            j1 = way[j0]
            return j1, p.at[j0].set(p[j1])

        _, p = jax.lax.while_loop(lambda c: c[0] != 0, flip, (j0, p))
        return u, v, p, way

    zeros = jnp.zeros(k + 1, jnp.float32)
    _, _, p, _ = jax.lax.fori_loop(1, k + 1, add_row, (zeros, zeros, jnp.zeros(k + 1, jnp.int32),
                                                      jnp.zeros(k + 1, jnp.int32)))
    return jnp.zeros(k, jnp.int32).at[p[1:] - 1].set(jnp.arange(k, dtype=jnp.int32))  # p[j]: the row of column j


def _assign(scores, types):
    return types[min_cost_assignment(-scores[:, types])]


_assign_jitted = jax.jit(_assign)


def assign_types(scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The formula's ``types`` [k] given to a molecule's k atoms so that the summed ``scores`` [k, N_TYPES] of
    the types given is the largest (an optimal assignment, :func:`min_cost_assignment`)."""
    return np.asarray(_assign_jitted(jnp.asarray(scores, jnp.float32), jnp.asarray(types, jnp.int32)))


def formula_types(f: Formula):
    """impose(x, h, graph), traceable: in a packed batch whose molecules all have the formula's size (its first
    rows, one molecule after another), every molecule's atoms take the formula's types (:func:`assign_types`,
    scored by the type block of ``h``); padding rows are kept. After each sampler call (:func:`formula_fixer`)
    and, given to a stacked model (:func:`molgen.networks.model_fn`), before each of its stages."""
    k, types = f.size, jnp.asarray(f.types)

    def impose(x, h, graph):
        m = graph.node_mask
        n = len(m) // k  # every group of k rows: the molecules, then groups of padding (masked out below)
        t = jax.vmap(_assign, (0, None))(h[: n * k, :N_TYPES].reshape(n, k, N_TYPES), types).reshape(-1)
        t = jnp.concatenate([t, jnp.zeros(len(m) - n * k, jnp.int32)])
        return x, jnp.where(m[:, None] > 0, type_features(t, m, jnp), h)

    return impose


def formula_fixer(f: Formula, graph):
    """fix(x, h, level, scale) for a batch of molecules of the formula's size: :func:`formula_types` after a
    sampler call, jitted. For clean states only (level 0, scale 1)."""
    impose = _jitted(f)

    def fix(x, h, level, scale):
        assert level == 0 and scale == 1, "the formula is imposed on clean molecules only"
        return impose(x, h, graph)

    return fix


@lru_cache(maxsize=8)
def _jitted(f: Formula):
    return jax.jit(formula_types(f))
