"""Molecules by their number of N, O and F atoms: how many there are, and how many of them are stable, valid and
distinct, beside QM9's training split (and a distillation run's training targets, with --pairs).

    molgen evaluate out.sdf --per-molecule out.csv
    python benchmarks/heteroatoms.py out.csv [--pairs RUN/pairs.npz] [--data-dir DIR]

One line per count (5: five or more), then the mean count of each source:

    HETERO n=<K> share=<S> qm9_share=<Q> stable=<X> valid=<V> distinct_of_valid=<U>
    MEAN molecules=<M> stable_molecules=<MS> qm9_train=<MQ> [targets=<MT>]

Distinct: the valid molecules whose SMILES (EDM's, as `molgen evaluate`'s uniqueness) no earlier one of the file has.
"""

from __future__ import annotations

import argparse
import csv
import re

import numpy as np

from molgen.chem.elements import heteroatom_counts
from molgen.consistency.distill import BALANCE_TOP as TOP  # counts of TOP or more are one row
from molgen.data.qm9 import load_qm9


def count_of_formula(formula: str) -> int:
    return sum(int(m.group(2) or 1) for m in re.finditer(r"([NOF])(\d*)", formula))


def shares(counts: np.ndarray) -> np.ndarray:
    return np.bincount(np.minimum(counts, TOP), minlength=TOP + 1) / max(len(counts), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("per_molecule", help="a CSV of `molgen evaluate --per-molecule`")
    ap.add_argument("--pairs", help="a distillation run's pairs.npz: its targets' counts too")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    rows = list(csv.DictReader(open(args.per_molecule, encoding="utf-8")))
    het = np.array([count_of_formula(r["formula"]) for r in rows])
    stable = np.array([r["mol_stable"] == "1" for r in rows])
    valid = np.array([r["valid"] == "1" for r in rows])
    seen: set[str] = set()
    distinct = np.zeros(len(rows), bool)
    for i, r in enumerate(rows):
        if valid[i] and r["smiles"] not in seen:
            distinct[i] = True
            seen.add(r["smiles"])
    ds = load_qm9(args.data_dir, verify=False)
    qm9 = heteroatom_counts(ds.types, ds.n_atoms)[ds.split("train")]
    q = shares(qm9)
    for k in range(TOP + 1):
        m = np.minimum(het, TOP) == k
        n_valid = int(valid[m].sum())
        print(f"HETERO n={k} share={m.mean():.4f} qm9_share={q[k]:.4f} stable={stable[m].mean() if m.any() else 0:.4f} "
              f"valid={valid[m].mean() if m.any() else 0:.4f} "
              f"distinct_of_valid={distinct[m].sum() / n_valid if n_valid else 0:.4f}")
    line = f"MEAN molecules={het.mean():.3f} stable_molecules={het[stable].mean():.3f} qm9_train={qm9.mean():.3f}"
    if args.pairs:
        with np.load(args.pairs) as z:
            targets = heteroatom_counts(z["types"], z["n_atoms"])
        line += f" targets={targets.mean():.3f}"
    print(line)


if __name__ == "__main__":
    main()
