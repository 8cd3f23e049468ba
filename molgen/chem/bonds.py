"""EDM's bond perception and stability, vectorised over padded batches of molecules.

A pair of atoms at distance d (in pm) gets bond order
    1 if d < single + 10,  2 if also d < double + 5,  3 if also d < triple + 3  (strict comparisons),
with the typical bond lengths of EDM's tables (which come from standard bond-length tables); pairs without
a double or triple entry cannot have that order.  An atom is stable when the sum of its bond orders equals
its allowed valence (H 1, C 4, N 3, O 2, F 1); a molecule is stable when all its atoms are.
"""

from __future__ import annotations

import numpy as np

from molgen.chem.elements import N_TYPES, SYMBOLS, VALENCE

# Typical bond lengths in pm (EDM's bonds1 / bonds2 / bonds3, restricted to H, C, N, O, F).
SINGLE = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
    ("O", "O"): 148, ("O", "F"): 142, ("F", "F"): 142,
}
DOUBLE = {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121, ("O", "O"): 121}
TRIPLE = {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}
MARGINS = (10, 5, 3)


def _table(lengths: dict, margin: float) -> np.ndarray:
    t = np.zeros((N_TYPES, N_TYPES), np.float32)  # 0 pm: never satisfied
    for (a, b), v in lengths.items():
        i, j = SYMBOLS.index(a), SYMBOLS.index(b)
        t[i, j] = t[j, i] = v + margin
    return t


THRESHOLDS = np.stack([_table(SINGLE, MARGINS[0]), _table(DOUBLE, MARGINS[1]), _table(TRIPLE, MARGINS[2])])


def pad_molecules(positions: list[np.ndarray], types: list[np.ndarray]):
    """Pad to [M, n_max, 3] float32 positions, [M, n_max] types and a boolean mask."""
    m = len(types)
    n_max = max((len(t) for t in types), default=1) or 1
    pos = np.zeros((m, n_max, 3), np.float32)
    typ = np.zeros((m, n_max), np.int64)
    mask = np.zeros((m, n_max), bool)
    for k, (p, t) in enumerate(zip(positions, types)):
        n = len(t)
        with np.errstate(over="ignore"):  # beyond float32: inf, which makes no bond
            pos[k, :n] = p
        typ[k, :n] = t
        mask[k, :n] = True
    return pos, typ, mask


def bond_orders(pos: np.ndarray, typ: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[M, n, n] int8 bond orders (0-3) for padded molecules; distances in float32 as EDM computes them."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 (inf - inf): no bond, not a warning
        pos = pos.astype(np.float32)
        diff = pos[:, :, None, :] - pos[:, None, :, :]
        d = np.sqrt(np.sum(diff * diff, axis=-1, dtype=np.float32)) * np.float32(100.0)
    ti, tj = typ[:, :, None], typ[:, None, :]
    order = np.zeros(d.shape, np.int8)
    for k in range(3):
        order += (d < THRESHOLDS[k][ti, tj]).astype(np.int8)
    pair = mask[:, :, None] & mask[:, None, :]
    n = d.shape[1]
    pair &= ~np.eye(n, dtype=bool)[None]
    order[~pair] = 0
    order[~np.isfinite(d)] = 0
    return order


def stability(pos: np.ndarray, typ: np.ndarray, mask: np.ndarray, chunk: int = 2048,
              orders: np.ndarray | None = None):
    """Per-atom stability [M, n] (False on padding), per-molecule stability [M] and summed bond orders [M, n].

    Pass ``orders`` (from :func:`bond_orders`) when the caller already has them.  Molecules with any
    non-finite coordinate are unstable in every atom.
    """
    m = len(mask)
    atom_ok = np.zeros(mask.shape, bool)
    valence = np.zeros(mask.shape, np.int32)
    for s in range(0, m, chunk):
        sl = slice(s, s + chunk)
        o = orders[sl] if orders is not None else bond_orders(pos[sl], typ[sl], mask[sl])
        v = o.sum(axis=2, dtype=np.int32)
        valence[sl] = v
        atom_ok[sl] = (v == VALENCE[typ[sl]]) & mask[sl]
    finite = np.all(np.isfinite(pos) | ~mask[..., None], axis=(1, 2))
    atom_ok &= finite[:, None]
    mol_ok = np.all(atom_ok | ~mask, axis=1) & finite & mask.any(axis=1)
    return atom_ok, mol_ok, valence
