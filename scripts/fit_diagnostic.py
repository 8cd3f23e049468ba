"""Diagnostic (docs/results.md, session 9): can the student fit the teacher's one-call map on K fixed pairs?

Trains the shipped edm-small-distill (optionally deepened to LAYERS blocks and widened to NF features) on the first K pairs of a
distillation run's pairs.npz with that run's settings minus the anchor and the relaxation term, then prints
JSON lines: on those same K noises, the one-call output's EDM atom / molecule stability against the targets'
own, its mean per-atom distance to the targets and the share of atom types equal, before and after training
(raw and EMA parameters).  Sample the result on fresh noise with `molgen sample --checkpoint OUT`.

    python scripts/fit_diagnostic.py PAIRS_RUN K STEPS LR OUT [LAYERS [NF]]   (PAIRS_RUN: a --mode distill run)
    python scripts/fit_diagnostic.py runs/kd4 256 1500 4e-4 runs/fit256        # session 9's first row
"""
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from molgen.chem.bonds import pad_molecules, stability
from molgen.chem.elements import N_TYPES
from molgen.config import RunConfig
from molgen.consistency.distill import PairSet
from molgen.consistency.ict import make_consistency_fn
from molgen.data.batching import pack
from molgen.nn.egnn import grow_params
from molgen.sample import load_model
from molgen.train import make_apply, train


def one_call(cfn, params, ds: PairSet, ids, sigma_max: float):
    """The student's one-call molecules (positions, argmax types) for the noises of pairs ``ids``."""
    sizes = [int(ds.n_atoms[i]) for i in ids]
    g = pack(None, [np.zeros(n, np.int32) for n in sizes])
    zx = np.zeros((len(g.node_mask), 3), np.float32)
    zh = np.zeros((len(g.node_mask), ds.noise_h.shape[1]), np.float32)
    real = int(sum(sizes))
    zx[:real] = np.concatenate([ds.noise(i)[0] for i in ids])
    zh[:real] = np.concatenate([ds.noise(i)[1] for i in ids])
    sig = jnp.full(g.node_mask.shape, sigma_max, jnp.float32)
    x, h = cfn(params, sigma_max * jnp.asarray(zx), sigma_max * jnp.asarray(zh), sig, g)
    cut = np.cumsum([0] + sizes)
    x, t = np.asarray(x), np.argmax(np.asarray(h)[:, :N_TYPES], -1)
    return [x[a:b] for a, b in zip(cut[:-1], cut[1:])], [t[a:b] for a, b in zip(cut[:-1], cut[1:])]


def stabilities(pos, typ):
    atom_ok, mol_ok, _ = stability(*pad_molecules(pos, typ))
    return float(atom_ok.sum() / sum(len(t) for t in typ)), float(mol_ok.mean())


def measure(cfn, params, ds: PairSet, sigma_max: float, tag: str) -> dict:
    pos, typ = [], []
    for s in range(0, len(ds), 256):
        p, t = one_call(cfn, params, ds, range(s, min(len(ds), s + 256)), sigma_max)
        pos += p
        typ += t
    targets = [ds.molecule(i) for i in range(len(ds))]
    atom, mol = stabilities(pos, typ)
    t_atom, t_mol = stabilities([x for x, _ in targets], [t.astype(np.int64) for _, t in targets])
    err = np.mean([np.linalg.norm(p - x, axis=-1).mean() for p, (x, _) in zip(pos, targets)])
    same = np.mean(np.concatenate([t == tt for t, (_, tt) in zip(typ, targets)]))
    r = dict(tag=tag, atom_stab=atom, mol_stab=mol, target_atom_stab=t_atom, target_mol_stab=t_mol,
             pos_err=float(err), types_equal=float(same))
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    run, k, steps, lr, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
    layers = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "-" else None
    nf = int(sys.argv[7]) if len(sys.argv) > 7 else None
    full = PairSet.load(run / "pairs.npz")
    end = full.offsets[k]
    ds = PairSet(full.n_atoms[:k], full.positions[:end], full.types[:end], full.noise_x[:end], full.noise_h[:end], 0)
    icfg, params, _ = load_model("edm-small-distill")
    cfg = RunConfig.load(run / "config.json").replace(
        n_pairs=k, anchor_fraction=0.0, anchor=None, relax_weight=0.0, relax_rounds=0, lr=lr, steps=steps,
        warmup=50, ckpt_every=10**9, eval_every=10**9, batch_size=128, seed=3)
    grown, params = grow_params(params, icfg.model, layers, seed=3, nf=nf)  # unchanged when neither is given
    cfg = cfg.replace(model=grown)
    _, apply = make_apply(cfg)
    cfn = jax.jit(make_consistency_fn(apply, cfg.consistency))
    s_max = float(cfg.consistency.sigma_max)
    measure(cfn, params, ds, s_max, "start")
    t0 = time.time()
    res = train(cfg, out, ds, init_params_from=params, progress=False, log=print)
    step = int(res.state.step)
    print(json.dumps({"train_s": round(time.time() - t0, 1), "steps": step}), flush=True)
    measure(cfn, res.state.params, ds, s_max, f"raw@{step}")
    measure(cfn, res.state.ema, ds, s_max, f"ema@{step}")


if __name__ == "__main__":
    main()
