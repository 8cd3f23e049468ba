"""Stage the data a GPU run of `scripts/gpu_teacher.sh` carries: the QM9 cache's training split and the validation
molecules whose loss `molgen train` logs (the first 1024; no SMILES, no test molecules), written as a regular
molgen cache to .gpu/qm9 (about half the full cache's size, so that it travels together with the teacher's
weights).

    python scripts/gpu_stage.py [--data-dir DIR] [--out .gpu/qm9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from molgen.data.qm9 import load_qm9, save_cache
from molgen.train import VAL_MOLECULES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="the full cache (default: molgen's)")
    ap.add_argument("--out", default=".gpu/qm9")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_qm9(args.data_dir).training_subset(VAL_MOLECULES)
    npz = save_cache(ds, out, source=f"training split and first {VAL_MOLECULES} validation molecules of the full cache")
    print(f"{npz}: {len(ds.split('train'))} training and {len(ds.split('valid'))} validation molecules, {npz.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
