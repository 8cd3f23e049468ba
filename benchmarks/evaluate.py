"""Where `molgen evaluate`'s time goes, in one process: reading a molecule file, judging its molecules (EDM's bonds,
stability, validity and SMILES, RDKit's own perception), and the distances to QM9's test split on top of that,
each the median of --repeat runs taken in turn (the host's drift spreads over all of them alike); with
--workers 1,2 judging is also timed with each number of worker processes, in turn (molgen.workers).

    python benchmarks/evaluate.py FILE [--repeat 3] [--data-dir DIR] [--workers 1,2]

FILE: an SDF or XYZ file (e.g. `molgen sample -n 10000 -o s10k.sdf`). Needs the QM9 cache (`molgen download`) for
novelty and the distances. One line per figure:

    EVAL read_s=<X> judge_s=<Y> distances_s=<Z> molecules=<N>

distances_s is what the distances add to judging (judging with them minus judging without, pair by pair).
With --workers, one more line per count (the ratio: to the first count's time, pair by pair, median):

    EVAL workers=<W> judge_s=<Y> ratio=<R>
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
    ap.add_argument("--workers", default="", help="comma-separated worker counts to judge with, in turn")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w]
    smiles, fractions = reference_for(args.data_dir, False, True)
    ref = reference_statistics(args.data_dir)
    if smiles is None or ref is None:
        raise SystemExit("needs the QM9 cache: run `molgen download` (or pass --data-dir)")
    reads, judges, extra, by_count = [], [], [], {w: [] for w in counts}
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
        for w in counts:
            t_w, m = timed(lambda: evaluate_molecules(pos, types, smiles, fractions, reference_stats=ref, workers=w))
            assert m.per_molecule == full.per_molecule
            by_count[w].append(t_w)
            print(f"# run: judge with distances in {w} processes {t_w:.2f} s", flush=True)
    med = statistics.median
    print(f"EVAL read_s={med(reads):.2f} judge_s={med(judges):.2f} distances_s={med(extra):.2f} molecules={len(mols)}")
    for w, times in by_count.items():
        ratio = med(t / t0 for t, t0 in zip(times, by_count[counts[0]]))
        print(f"EVAL workers={w} judge_s={med(times):.2f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
