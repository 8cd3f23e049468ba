"""The teacher's learning curve: stability at 1000 calls (1000 samples each) after each GPU run, from the
`gpu_runs` list in its meta.json, against the shipped small teacher and EDM's published model.

    python scripts/plot_teacher.py [--model weights/edm-diffusion] [--out docs/img/teacher_curve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="weights/edm-diffusion")
    ap.add_argument("--out", default="docs/img/teacher_curve.png")
    args = ap.parse_args()
    runs = json.loads((Path(args.model) / "meta.json").read_text())["gpu_runs"]
    epochs, atom, mol = [], [], []
    total = 0.0
    for r in runs:
        total += r["epochs"]
        if "eval_1000_calls" in r:
            epochs.append(total)
            atom.append(100 * r["eval_1000_calls"]["atom_stability"])
            mol.append(100 * r["eval_1000_calls"]["mol_stability"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, ys, what, small, edm in ((axes[0], atom, "atom stability (%)", 92.7, 98.7),
                                     (axes[1], mol, "molecule stability (%)", 32.2, 82.0)):
        ax.plot(epochs, ys, "o-", label=f"{Path(args.model).name} (256 x 9)")
        ax.axhline(small, color="gray", ls="--", label="edm-small-diffusion (64 x 4, ~250 epochs)")
        ax.axhline(edm, color="black", ls=":", label="EDM, published (256 x 9, ~1000 epochs)")
        ax.set_xlabel("epochs trained (cumulative over GPU runs)")
        ax.set_ylabel(what)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle("teacher: 1000 molecules, 1000 calls each, after each GPU run", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {len(epochs)} points")


if __name__ == "__main__":
    main()
