"""Where `molgen evaluate`'s time goes, in one process: reading a molecule file, judging its molecules (EDM's bonds,
stability, validity and SMILES, RDKit's own perception), and the distances to QM9's test split on top of that,
each the median of --repeat runs taken in turn (the host's drift spreads over all of them alike).

    python benchmarks/evaluate.py FILE [--repeat 3] [--data-dir DIR]

FILE: an SDF or XYZ file (e.g. `molgen sample -n 10000 -o s10k.sdf`). Needs the QM9 cache (`molgen download`) for
novelty and the distances. One line per figure:

    EVAL read_s=<X> judge_s=<Y> distances_s=<Z> molecules=<N>

distances_s is what the distances add to judging (judging with them minus judging without, pair by pair).
"""

from __future__ import annotations

import argparse
import statistics
import time

from molgen.chem.io import read_molecules
from molgen.evaluate import evaluate_molecules, reference_for
from molgen.fidelity import reference_statistics


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    smiles, fractions = reference_for(args.data_dir, False, True)
    ref = reference_statistics(args.data_dir)
    if smiles is None or ref is None:
        raise SystemExit("needs the QM9 cache: run `molgen download` (or pass --data-dir)")
    reads, judges, extra = [], [], []
    for _ in range(args.repeat):
        t_read, mols = timed(lambda: read_molecules(args.file))
        pos, types = [m.positions for m in mols], [m.types for m in mols]
        t_judge, plain = timed(lambda: evaluate_molecules(pos, types, smiles, fractions))
        t_both, full = timed(lambda: evaluate_molecules(pos, types, smiles, fractions, reference_stats=ref))
        assert (plain.mol_stability, plain.validity) == (full.mol_stability, full.validity)
        reads.append(t_read)
        judges.append(t_judge)
        extra.append(t_both - t_judge)
        print(f"# run: read {t_read:.2f} s, judge {t_judge:.2f} s, judge with distances {t_both:.2f} s", flush=True)
    med = statistics.median
    print(f"EVAL read_s={med(reads):.2f} judge_s={med(judges):.2f} distances_s={med(extra):.2f} molecules={len(mols)}")


if __name__ == "__main__":
    main()
