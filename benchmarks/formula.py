"""Molecules of a given formula (`molgen sample --formula`) against unconstrained sampling at the formula's atom
count, whose molecules of that formula are kept: what each draw yields.

    python benchmarks/formula.py [--formulas C7H10O2,C4H4N2O2] [--steps 1,4,8] [--n 1000] [--free 10000]

One line per formula and sampling (seed 0, molecules judged with the 4 decimals an SDF file holds, as `molgen
sample` judges them):

    FORMULA <formula> <how> drawn=... formula=...% atom=...% valid=...% valid1=...% stable=...% unique1=...

formula: draws with the formula; atom: atom stability of those; valid: EDM's validity (a disconnected molecule
counts, by its largest fragment) of those; valid1: draws with the formula that are valid and in one piece (what
`--keep valid` keeps); stable: draws with the formula that are stable molecules; unique1: distinct SMILES among
the valid1 ones. Percentages are of all draws, but atom stability and validity, which are of the molecules with
the formula.
"""

from __future__ import annotations

import argparse
import time


def report(label: str, how: str, molecules, want: str, seconds: float) -> None:
    from molgen.chem.elements import formula
    from molgen.evaluate import judge

    hits = [m for m in molecules if formula(m.types) == want]
    ps = judge(hits) if hits else []
    n = len(molecules)
    atom = sum(p.stable_atoms for p in ps) / max(1, sum(p.n_atoms for p in ps))
    one = [p for p in ps if p.valid and p.n_fragments == 1]
    print(f"FORMULA {label} {how} drawn={n} formula={100 * len(hits) / n:.1f}% atom={100 * atom:.1f}% "
          f"valid={100 * sum(p.valid for p in ps) / max(1, len(ps)):.1f}% valid1={100 * len(one) / n:.1f}% "
          f"stable={100 * sum(p.stable and p.valid and p.n_fragments == 1 for p in ps) / n:.1f}% "
          f"unique1={len({p.smiles for p in one})} seconds={seconds:.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a consistency model (default: the shipped default)")
    ap.add_argument("--formulas", default="C7H10O2,C4H4N2O2")
    ap.add_argument("--steps", default="1,4,8", help="network calls per molecule with --formula")
    ap.add_argument("--free-steps", type=int, default=4, help="network calls per unconstrained molecule")
    ap.add_argument("--n", type=int, default=1000, help="molecules per --formula sampling")
    ap.add_argument("--free", type=int, default=10000, help="unconstrained molecules per formula (0: none)")
    args = ap.parse_args()

    from molgen.chem.io import DECIMALS
    from molgen.formula import parse_formula
    from molgen.models import load_model
    from molgen.sample import sample

    model = load_model(args.model)
    print(f"# {model.name}, seed 0; --formula: {args.n} molecules each; unconstrained: {args.free} at the formula's "
          f"size, {args.free_steps} calls")
    for text in args.formulas.split(","):
        f = parse_formula(text)
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.time()
            res = sample(model, args.n, steps, seed=0, formula=f, decimals=DECIMALS)
            report(str(f), f"--formula:{steps}", res.molecules, str(f), time.time() - t0)
        if not args.free:
            continue
        t0 = time.time()
        res = sample(model, args.free, args.free_steps, seed=0, atoms=f.size, decimals=DECIMALS)
        report(str(f), f"free:{args.free_steps}", res.molecules, str(f), time.time() - t0)


if __name__ == "__main__":
    main()
