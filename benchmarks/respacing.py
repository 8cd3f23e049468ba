"""Respaced ancestral sampling: a diffusion model's molecules at k calls with the steps at t_i = (i / k)^p on EDM's
integer grid, for several p (1: EDM's uniform respacing; molgen's default: molgen.diffusion.edm.SPACING).

    python benchmarks/respacing.py [--model edm-small-diffusion] [--steps 25,50,100] [--spacings 1,1.5,2] [--n 1000] [--temperature T]

One line per (steps, p), seed --seed, EDM's metrics of the molecules (connected: in one piece):

    RESPACING <model>:<steps> p=<p> T=<temperature> n=... atom=...% mol=...% valid=...% valid_unique=...% connected=...% seconds=...
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="edm-small-diffusion")
    ap.add_argument("--steps", default="25,50,100")
    ap.add_argument("--spacings", default="1,1.5,2")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="default: the model card's")
    args = ap.parse_args()
    import molgen.diffusion.edm as edm
    from molgen.evaluate import evaluate_molecules
    from molgen.jax_setup import add_cpu_vector_flags, enable_compilation_cache
    from molgen.models import load_model
    from molgen.sample import sample

    add_cpu_vector_flags()  # as `molgen sample` does
    enable_compilation_cache()
    model = load_model(args.model)
    for steps in [int(k) for k in args.steps.split(",")]:
        for p in [float(x) for x in args.spacings.split(",")]:
            edm.SPACING = p
            s = sample(model, args.n, steps=steps, seed=args.seed, temperature=args.temperature)
            r = evaluate_molecules([m.positions for m in s.molecules], [m.types for m in s.molecules], workers=None)
            print(f"RESPACING {args.model}:{steps} p={p:g} T={s.settings.get('molgen_temperature', '')} n={args.n} atom={100 * r.atom_stability:.1f}% "
                  f"mol={100 * r.mol_stability:.1f}% valid={100 * r.validity:.1f}% "
                  f"valid_unique={100 * r.valid_and_unique:.1f}% connected={100 * r.connected:.1f}% "
                  f"seconds={s.seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
