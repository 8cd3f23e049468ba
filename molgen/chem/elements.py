"""The atom types molgen models (QM9: H, C, N, O, F) and their properties."""

from __future__ import annotations

import numpy as np

SYMBOLS: tuple[str, ...] = ("H", "C", "N", "O", "F")
CHARGES: np.ndarray = np.array([1, 6, 7, 8, 9], dtype=np.int32)  # atomic numbers Z
N_TYPES = len(SYMBOLS)
TYPE_OF_SYMBOL = {s: i for i, s in enumerate(SYMBOLS)}
# Allowed valences used by EDM's stability metric.
VALENCE = np.array([1, 4, 3, 2, 1], dtype=np.int32)


def symbol_to_type(symbol: str) -> int:
    """Map an element symbol (any case) or atomic number (as some XYZ writers give it) to molgen's type index;
    raises KeyError for others."""
    s = symbol.strip()
    if s.isdigit() and int(s) in CHARGES:
        return int(np.flatnonzero(CHARGES == int(s))[0])
    s = s[:1].upper() + s[1:].lower()
    return TYPE_OF_SYMBOL[s]


def types_from_symbols(symbols) -> np.ndarray:
    return np.array([symbol_to_type(s) for s in symbols], dtype=np.int8)


def formula(types) -> str:
    """The molecular formula of type indices in Hill order: C, then H, then the rest alphabetically (without
    carbon, all alphabetically), e.g. C2H6O, H2O."""
    return hill_formula(np.bincount(np.asarray(types, np.int64), minlength=N_TYPES).tolist())


def hill_formula(counts) -> str:
    """:func:`formula` of the atom counts of each type (H, C, N, O, F)."""
    counts = dict(zip(SYMBOLS, counts))
    order = ["C", "H"] + sorted(s for s in SYMBOLS if s not in "CH") if counts["C"] else sorted(SYMBOLS)
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order if counts[s])


def heteroatom_counts(types: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Each molecule's number of N, O and F atoms, molecules stored flat (``types`` of molecule after molecule)."""
    seg = np.repeat(np.arange(len(n_atoms)), np.asarray(n_atoms, np.int64))
    return np.bincount(seg, weights=(np.asarray(types) >= TYPE_OF_SYMBOL["N"]).astype(np.float64),
                       minlength=len(n_atoms)).astype(np.int64)
