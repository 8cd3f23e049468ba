"""Completing fragments: molecules of the QM9 test split with ~40 % of their atoms removed, completed by a model
(`molgen sample --fix`), against unconstrained sampling at the same sizes.

    python benchmarks/fragments.py [--molecules 20] [--n 100] [--runs edm-small-inpaint:100,edm-small-inpaint:50+8,edm-small-diffusion:100:4]

Two fragments per molecule: "branch" (the molecule minus a branch: heavy atoms removed from a leaf of the
heavy-atom graph outwards, with their hydrogens, until ~40 % of the atoms are gone) and "random" (a random 60 %
of the atoms kept). Each model run (model:steps, model:steps+p with p polishing calls after the sampler's steps, by
the card's polisher or, as model:steps+p@polisher, another, or model:steps:r with r rounds of RePaint's resampling) completes
every fragment --n times at the molecule's own size, with the model's own way for fragments (the ``inpaint``
sampler for a model trained to complete them, else replacement after each call: molgen.fragment). One line per
run and fragment kind:

    FRAGMENTS <model>:<steps>[+p][:r] <kind> max_dev=... kept=...% atom=...% mol=...% valid=...% unique=...% recovered=...% connected=...% distinct_stable=...%

max_dev: the largest distance of a fragment atom from its input position (Å); kept: completions holding the
fragment's bond graph; unique: distinct valid SMILES among the valid ones, per fragment, averaged; recovered:
completions whose SMILES is the original molecule's (EDM's bond perception and RDKit both ways); connected:
completions in one piece (EDM's validity and stability do not ask for it); distinct_stable: distinct SMILES among
the stable valid completions, per completion made (what `--keep stable --unique` can collect per draw).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def fragments_of(pos, typ, rng):
    """(branch fragment indices, random fragment indices) of one molecule."""
    from molgen.chem.bonds import bond_orders, pad_molecules

    n = len(typ)
    target = round(0.4 * n)
    p, t, m = pad_molecules([pos], [typ])
    bonded = bond_orders(p, t, m)[0][:n, :n] > 0
    heavy = [i for i in range(n) if typ[i] != 0]
    deg = {i: sum(bonded[i, j] for j in heavy if j != i) for i in heavy}
    start = min(heavy, key=lambda i: (deg[i], -np.linalg.norm(pos[i] - pos.mean(0))))  # a far leaf
    removed, frontier = [], [start]
    while frontier and len(removed) < target:
        i = frontier.pop(0)
        if i in removed:
            continue
        removed += [i] + [h for h in range(n) if typ[h] == 0 and bonded[i, h] and h not in removed]
        frontier += [j for j in heavy if bonded[i, j] and j not in removed]
    branch = np.array(sorted(set(range(n)) - set(removed[:max(target, 1)])))
    random_keep = np.sort(rng.choice(n, n - target, replace=False))
    return branch, random_keep


def smiles_of(positions, types):
    from molgen.evaluate import evaluate_molecules

    return [p.smiles if p.valid else "" for p in evaluate_molecules(positions, types).per_molecule]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", type=int, default=20)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--runs", default="edm-small-inpaint:100,edm-small-stack:4,edm-small-diffusion:100")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="branch,random,none", help="fragment kinds to run; none: no fragment")
    ap.add_argument("--spacing", type=float, default=None,
                    help="respaced diffusion steps at t = (i / k)^SPACING (default: molgen's, edm.SPACING)")
    args = ap.parse_args()
    import molgen.diffusion.edm as edm
    from molgen.data.qm9 import load_qm9
    from molgen.evaluate import evaluate_molecules
    from molgen.jax_setup import add_cpu_vector_flags, enable_compilation_cache

    if args.spacing is not None:
        edm.SPACING = args.spacing

    add_cpu_vector_flags()  # as `molgen sample` does
    enable_compilation_cache()
    from molgen.fragment import Fragment, contains_fragment
    from molgen.models import load_model, polisher_for
    from molgen.sample import sample

    ds = load_qm9(args.data_dir)
    rng = np.random.default_rng(args.seed)
    test = rng.choice(ds.split("test"), args.molecules, replace=False)
    mols = [ds.molecule(int(i)) for i in test]
    originals = smiles_of([p.astype(np.float64) for p, _ in mols], [t for _, t in mols])
    kinds = {"branch": [], "random": []}
    for pos, typ in mols:
        b, r = fragments_of(pos.astype(np.float64), typ.astype(np.int32), rng)
        for kind, keep in (("branch", b), ("random", r)):
            kinds[kind].append(Fragment(typ[keep].astype(np.int32), pos[keep].astype(np.float64)))
    print(f"{args.molecules} test molecules, mean {np.mean([len(t) for _, t in mols]):.1f} atoms; fragments keep "
          f"{np.mean([f.size for f in kinds['branch']]):.1f} (branch) / {np.mean([f.size for f in kinds['random']]):.1f}"
          f" (random) atoms on average", flush=True)
    for run in args.runs.split(","):
        run_spec, _, polisher_name = run.partition("@")
        name, steps, *more = run_spec.split(":")
        steps, _, polish = steps.partition("+")
        resample = int(more[0]) if more else 0
        model = load_model(name)
        polisher = polisher_for(model, polisher_name or None, calls=int(polish or 0))
        for kind in [k for k in args.kinds.split(",") if not (resample and k == "none")]:
            t0 = time.time()
            dev, kept, atom, mol, valid, unique, rec, conn, distinct = [], [], [], [], [], [], [], [], []
            for k, (pos, typ) in enumerate(mols):
                frag = kinds["branch"][k] if kind == "none" else kinds[kind][k]
                res = sample(model, args.n, int(steps), seed=k, atoms=len(typ),
                             fragment=None if kind == "none" else frag, resample=resample,
                             polish_calls=int(polish or 0), polisher=polisher)
                out = res.molecules
                met = evaluate_molecules([m.positions for m in out], [m.types for m in out])
                smi = [p.smiles for p in met.per_molecule if p.valid]
                if kind != "none":
                    dev.append(max(float(np.abs(m.positions[: frag.size] - frag.positions).max()) for m in out))
                    kept.append(float(np.mean(contains_fragment(frag, out))))
                atom.append(met.atom_stability)
                mol.append(met.mol_stability)
                valid.append(met.validity)
                conn.append(np.mean([p.n_fragments == 1 for p in met.per_molecule]))
                unique.append(len(set(smi)) / max(len(smi), 1))
                distinct.append(len({p.smiles for p in met.per_molecule if p.valid and p.stable}) / len(out))
                rec.append(sum(s == originals[k] for s in smi) / len(out) if originals[k] else 0.0)
            def pct(v):
                return f"{100 * np.mean(v):.1f}%"

            head = f"FRAGMENTS {run} {kind}"
            frag_part = f"max_dev={max(dev):.1e} kept={pct(kept)} " if kind != "none" else ""
            print(f"{head} {frag_part}atom={pct(atom)} mol={pct(mol)} valid={pct(valid)} unique={pct(unique)} "
                  f"recovered={pct(rec)} connected={pct(conn)} distinct_stable={pct(distinct)} "
                  f"seconds={time.time() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
