"""Calibration of `molgen evaluate`'s added figures on QM9 itself: the validation split scored against the test
split (the distances of two samples of one distribution), RDKit's validity of real molecules, and the MMFF94
strain of QM9's DFT geometries (a floor: they are not MMFF minima). Also the time of each part on 10,000
molecules.

    python benchmarks/calibrate_fidelity.py [--data-dir DIR] [--n 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=10000, help="validation molecules scored (and timed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from molgen.data.qm9 import load_qm9
    from molgen.evaluate import evaluate_molecules
    from molgen.fidelity import distances, reference_statistics, split_statistics, statistics

    ds = load_qm9(args.data_dir)
    ref = reference_statistics(args.data_dir)
    full = distances(split_statistics(ds, "valid"), ref)
    print("validation split (17,748) vs test split:", json.dumps(full), flush=True)
    ids = np.random.default_rng(0).choice(ds.split("valid"), min(args.n, len(ds.split("valid"))), replace=False)
    mols = [ds.molecule(int(i)) for i in ids]
    pos, typ = [p.astype(np.float64) for p, _ in mols], [t for _, t in mols]
    t0 = time.time()
    plain = evaluate_molecules(pos, typ)
    t_plain = time.time() - t0
    t0 = time.time()
    sub = distances(statistics(pos, typ), ref)
    t_fid = time.time() - t0
    t0 = time.time()
    strained = evaluate_molecules(pos, typ, with_strain=True)
    t_strain = time.time() - t0 - t_plain
    out = {"validation_vs_test": full, f"validation_{len(ids)}_vs_test": sub,
           "edm_validity": plain.validity, "rdkit_validity": plain.rdkit_validity, "strain": strained.strain,
           "seconds": {"evaluate_without_strain": round(t_plain, 1), "distances": round(t_fid, 1),
                       "strain_added": round(t_strain, 1)}}
    print(f"{len(ids)} validation molecules vs test:", json.dumps(sub), flush=True)
    print(f"EDM validity {100 * plain.validity:.2f} %, RDKit validity {100 * plain.rdkit_validity:.2f} %, "
          f"strain {json.dumps(strained.strain)}", flush=True)
    print(f"seconds: {json.dumps(out['seconds'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
