"""How close a set of molecules is to a reference set (QM9's test split): distribution distances on what EDM's
bond perception sees.

A set's statistics (:class:`Stats`) are counts and fine histograms, so sets add up and a reference is computed
once and cached beside the QM9 data. The distances (:func:`distances`):

* ``atom_types_tv``, ``sizes_tv``, ``bond_types_tv``: total variation (half the L1 distance) between the
  distributions of atom types, atoms per molecule, and bond orders (single / double / triple) of perceived bonds;
* ``valency_tv``: per element, the total variation of its atoms' summed bond orders, averaged with the
  reference's element frequencies as weights;
* ``bond_lengths_w1`` (Å): per bond type (the two elements and the order, e.g. ``C-C1``, ``C-O2``), the
  Wasserstein-1 distance between bond-length distributions; the headline is their mean weighted by the
  reference's bond-type frequencies, and the five most frequent types are listed;
* ``bond_angles_w1`` (degrees): per centre element, the Wasserstein-1 distance between the distributions of the
  angles j-i-k over pairs of atoms bonded to it; weighted by the reference's angle counts.

Wasserstein-1 is computed from the histograms (bins of 0.002 Å and 0.25 degrees): the integral of the absolute
difference of the two cumulative distributions. A type absent from the evaluated set is left out of the mean
(its absence shows in the bond-type distance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molgen.chem.bonds import bond_orders, pad_molecules
from molgen.chem.elements import N_TYPES, SYMBOLS
from molgen.io_utils import NPZ_DAMAGE

MAX_ATOMS = 64  # sizes histogram; larger molecules share the last bin
MAX_VALENCE = 8
LENGTH_BIN, LENGTH_MAX = 0.002, 3.0  # Å: EDM perceives no bond beyond ~1.65 Å
ANGLE_BIN = 0.25  # degrees
N_LEN, N_ANG = int(round(LENGTH_MAX / LENGTH_BIN)), int(round(180 / ANGLE_BIN))
REFERENCE_NAME = "fidelity_reference_test_v1.npz"
TOP_BONDS = 5


def bond_key(a: int, b: int, order: int) -> str:
    a, b = sorted((a, b), key=lambda t: t if t else 99)  # C, N, O, F, then H: C-H, C-O, O-H
    return f"{SYMBOLS[a]}-{SYMBOLS[b]}{order}"


@dataclass
class Stats:
    """Counts of one set of molecules. Arrays: ``types`` [5], ``sizes`` [MAX_ATOMS + 1], ``orders`` [3],
    ``valency`` [5, MAX_VALENCE + 1], ``lengths`` [5, 5, 3, N_LEN] (element pair i <= j, order - 1),
    ``angles`` [5, N_ANG] (centre element)."""

    types: np.ndarray = field(default_factory=lambda: np.zeros(N_TYPES, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(MAX_ATOMS + 1, np.int64))
    orders: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    valency: np.ndarray = field(default_factory=lambda: np.zeros((N_TYPES, MAX_VALENCE + 1), np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros((N_TYPES, N_TYPES, 3, N_LEN), np.int64))
    angles: np.ndarray = field(default_factory=lambda: np.zeros((N_TYPES, N_ANG), np.int64))

    def add(self, other: Stats) -> None:
        """Add the counts of another set (the counts of both sets together)."""
        for name, counts in self.__dict__.items():
            counts += getattr(other, name)

    def save(self, path: Path) -> None:
        from molgen.io_utils import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **self.__dict__)

    @classmethod
    def load(cls, path: Path) -> Stats:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in cls().__dict__})


def statistics(positions: list[np.ndarray], types: list[np.ndarray], chunk: int = 256) -> Stats:
    """The counts of a set of molecules (non-finite molecules are left out)."""
    st = Stats()
    keep = [k for k, p in enumerate(positions) if len(p) and np.all(np.isfinite(p))]
    for s in range(0, len(keep), chunk):
        ids = keep[s : s + chunk]
        pos, typ, mask = pad_molecules([positions[k] for k in ids], [np.asarray(types[k]) for k in ids])
        add_counts(st, pos, typ, mask, bond_orders(pos, typ, mask))
    return st


def add_counts(st: Stats, pos, typ, mask, orders) -> None:
    """Add padded molecules (:func:`molgen.chem.bonds.pad_molecules`, finite, at least one atom each) and their
    bond orders to the counts ``st``."""
    pos = pos.astype(np.float64)
    n_atoms = mask.sum(1)
    st.types += np.bincount(typ[mask], minlength=N_TYPES)
    st.sizes += np.bincount(np.minimum(n_atoms, MAX_ATOMS), minlength=MAX_ATOMS + 1)
    val = orders.sum(2)
    np.add.at(st.valency, (typ[mask], np.minimum(val[mask], MAX_VALENCE)), 1)
    m, i, j = np.nonzero(np.triu(orders, 1))
    o = orders[m, i, j].astype(np.int64)
    st.orders += np.bincount(o - 1, minlength=3)
    ti, tj = typ[m, i], typ[m, j]
    a, b = np.minimum(ti, tj), np.maximum(ti, tj)
    d = np.linalg.norm(pos[m, i] - pos[m, j], axis=-1)
    np.add.at(st.lengths, (a, b, o - 1, np.minimum((d / LENGTH_BIN).astype(np.int64), N_LEN - 1)), 1)
    # angles j-i-k at every centre i over pairs of its bonded neighbours j < k
    bonded = orders > 0
    upper = np.triu(np.ones(bonded.shape[1:], bool), 1)
    m, i, j, k = np.nonzero(bonded[:, :, :, None] & bonded[:, :, None, :] & upper[None, None])
    u, v = pos[m, j] - pos[m, i], pos[m, k] - pos[m, i]
    cos = np.sum(u * v, -1) / np.maximum(np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1), 1e-12)
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    np.add.at(st.angles, (typ[m, i], np.minimum((ang / ANGLE_BIN).astype(np.int64), N_ANG - 1)), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two count vectors as distributions (1 when either is empty)."""
    p, q = np.asarray(p, np.float64).ravel(), np.asarray(q, np.float64).ravel()
    if p.sum() == 0 or q.sum() == 0:
        return 1.0
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def wasserstein1(p: np.ndarray, q: np.ndarray, bin_width: float) -> float | None:
    """W1 between two histograms on the same bins: the integral of |CDF_p - CDF_q| (None when either is empty)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return None
    return float(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum())).sum() * bin_width)


def _weighted(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    pairs = [(v, weights[k]) for k, v in values.items() if v is not None and weights[k] > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def distances(st: Stats, ref: Stats) -> dict:
    """The distances of ``st`` from ``ref`` (module docstring), as a JSON-ready dict."""
    out = {"atom_types_tv": total_variation(st.types, ref.types), "sizes_tv": total_variation(st.sizes, ref.sizes),
           "bond_types_tv": total_variation(st.orders, ref.orders)}
    el_w = ref.valency.sum(1)
    val = {SYMBOLS[e]: (total_variation(st.valency[e], ref.valency[e]) if st.valency[e].sum() else None)
           for e in range(N_TYPES)}
    out["valency_tv"] = _weighted(val, {SYMBOLS[e]: float(el_w[e]) for e in range(N_TYPES)})
    lengths, weights = {}, {}
    for a in range(N_TYPES):
        for b in range(a, N_TYPES):
            for o in range(3):
                if ref.lengths[a, b, o].sum():
                    key = bond_key(a, b, o + 1)
                    lengths[key] = wasserstein1(st.lengths[a, b, o], ref.lengths[a, b, o], LENGTH_BIN)
                    weights[key] = float(ref.lengths[a, b, o].sum())
    out["bond_lengths_w1"] = _weighted(lengths, weights)
    top = sorted(weights, key=weights.get, reverse=True)[:TOP_BONDS]
    out["bond_lengths_w1_by_type"] = {k: lengths[k] for k in top}
    angles = {SYMBOLS[e]: wasserstein1(st.angles[e], ref.angles[e], ANGLE_BIN) for e in range(N_TYPES)
              if ref.angles[e].sum()}
    out["bond_angles_w1"] = _weighted(angles, {SYMBOLS[e]: float(ref.angles[e].sum()) for e in range(N_TYPES)
                                               if ref.angles[e].sum()})
    out["bond_angles_w1_by_element"] = angles
    return out


def split_statistics(ds, split: str) -> Stats:
    """The statistics of one split of a QM9 data set."""
    mols = [ds.molecule(int(i)) for i in ds.split(split)]
    return statistics([p for p, _ in mols], [t for _, t in mols])


def reference_statistics(data_dir: Path | str | None = None) -> Stats | None:
    """QM9's test-split statistics, computed once and kept beside the data, or in the user's cache folder where
    the data's cannot be written (:func:`molgen.data.qm9.derived_path`; None without a QM9 cache)."""
    from molgen.data.qm9 import cache_is_valid, default_data_dir, derived_path, load_qm9
    from molgen.io_utils import keep_if_possible

    d = Path(data_dir) if data_dir else default_data_dir()
    if not cache_is_valid(d, verify_hash=False):
        return None
    path = derived_path(d, REFERENCE_NAME)
    if path.exists():
        try:
            return Stats.load(path)
        except NPZ_DAMAGE:  # damaged: made again below, and replaced
            pass
    st = split_statistics(load_qm9(d, verify=False), "test")
    keep_if_possible(lambda: st.save(path), path, "QM9's test-split statistics are")
    return st
