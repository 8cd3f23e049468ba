"""Batch size and learning rate per epoch: train the same network from scratch with several (batch, lr, warm-up,
EMA) recipes for the same number of molecules and compare the validation loss (EMA parameters, a fixed set of
1024 validation molecules with fixed noise, so the figures compare across batch sizes) at equal molecules seen.

    python benchmarks/batch_recipe.py --preset small --epochs 3 --out runs/batch_recipe
    python benchmarks/batch_recipe.py --init edm-small-diffusion --epochs 1    # continuing a trained network

A recipe is ``name:batch:lr:warmup:ema``. Warm-up and EMA decay are given per step; for a fair comparison a
larger batch takes proportionally fewer warm-up steps and a decay with the same horizon in molecules
(0.999 at batch 64 is 0.992 at batch 512).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = ("edm:64:1e-4:1:0.999,molgen:64:5e-4:500:0.999,"
           "b512-lr3e-4:512:3e-4:63:0.992,b512-lr1e-3:512:1e-3:63:0.992")
EVAL_MOLECULES = 25_600  # a validation point every this many training molecules (a quarter epoch)
TRAIN_MOLECULES = 100_000  # QM9's training split, rounded


def run(name, batch, lr, warmup, ema, args, steps=None):
    out = Path(args.out) / name
    every = EVAL_MOLECULES // batch if steps is None else steps
    steps = steps or -(-int(args.epochs * TRAIN_MOLECULES) // EVAL_MOLECULES) * every
    cmd = [sys.executable, "-m", "molgen", "train", "--recipe", "diffusion",
           "--out", str(out), "--batch-size", str(batch), "--lr", str(lr), "--steps", str(steps),
           "--seed", str(args.seed), "--set", f"optim.warmup={warmup}", "--set", f"optim.ema={ema}",
           "--set", f"optim.eval_every={every}", "--set", f"optim.ckpt_every={steps}"]
    cmd += ["--init", args.init] if args.init else ["--model", args.preset]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log = out / "metrics.jsonl"
    t0 = time.time()
    if not (args.reuse and log.exists() and _last_step(log) == steps):  # --reuse: a finished run is read back
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    curve = {r["step"] * batch: r["val_loss"] for r in rows if r.get("val_loss") is not None}
    print(f"# {name}: batch {batch}, lr {lr}, warm-up {warmup}, ema {ema}, {steps} steps, {wall:.0f} s",
          flush=True)
    return curve


def _last_step(log: Path) -> int:
    lines = log.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else -1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=DEFAULT)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/batch_recipe")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--reuse", action="store_true", help="read back runs in --out that already finished")
    ap.add_argument("--init", default=None,
                    help="continue this diffusion model instead of starting from scratch (its network, not --preset); "
                         "its own validation loss is printed first")
    args = ap.parse_args()
    curves = {}
    if args.init:  # the start: one step at a learning rate of 1e-12 leaves the EMA parameters the model's own
        start = next(iter(run("start", 64, 1e-12, 1, 0.999, args, steps=1).values()))
        print(f"# start: {args.init}, validation loss (EMA = its parameters) {start:.4f}", flush=True)
    for spec in args.recipes.split(","):
        name, batch, lr, warmup, ema = spec.split(":")
        curves[name] = run(name, int(batch), float(lr), int(warmup), float(ema), args)
    points = sorted(set.intersection(*(set(c) for c in curves.values())))
    print("| epochs | " + " | ".join(curves) + " |")
    print("|---" * (len(curves) + 1) + "|")
    for m in points:
        cells = " | ".join(f"{curves[n][m]:.4f}" for n in curves)
        print(f"| {m / TRAIN_MOLECULES:.2f} | {cells} |")


if __name__ == "__main__":
    main()
