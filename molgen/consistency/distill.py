"""Consistency distillation by regression onto the teacher's probability-flow ODE (Luhman & Luhman 2021).

A consistency model's one-step sample f(s_max z, s_max) should equal the end of the teacher's PF-ODE started
from the same noise z.  Consistency training and tuning reach that map only through a chain of neighbouring
noise levels, which leaves ~0.2-0.4 Å of error in one-step geometry.  Here the map is supervised directly:

1. ``generate_pairs``: draw atom counts from the training histogram and noise z on the zero-CoM subspace,
   solve the teacher's ODE from s_max z (Heun, :mod:`molgen.diffusion.ode`), keep the end positions and the
   atom types (argmax of the end features).  Deterministic for a seed; saved as ``pairs.npz`` in the run.
2. ``distill_loss``: the pseudo-Huber distance (as in iCT, scaled by the molecule's dimension) between the
   student's one-step output and the target (positions and EDM's clean features of the target types), plus
   a term on the target's short interatomic distances (bond lengths decide stability).

The student starts from a consistency checkpoint (``--init``).  Regression at s_max alone also moves f at the
low noise levels k-step sampling uses, so a share of each batch keeps an anchor model's f there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from molgen.chem.elements import N_TYPES
from molgen.consistency.ict import ConsistencyConfig, pseudo_huber
from molgen.diffusion.noise import per_molecule_sum, sample_noise

PAIRS_NAME = "pairs.npz"
PAIR_STREAM = 7919  # pairs use their own random stream: `molgen sample --seed S` never reuses their noise


@dataclass
class PairSet:
    """Noise -> molecule pairs, with the interface of :class:`molgen.data.qm9.QM9` that training uses."""

    n_atoms: np.ndarray  # [M]
    positions: np.ndarray  # [sum n, 3]: the teacher's end positions
    types: np.ndarray  # [sum n]
    noise_x: np.ndarray  # [sum n, 3]: z on the zero-CoM subspace
    noise_h: np.ndarray  # [sum n, F]
    n_valid: int = 0  # the last n_valid pairs are held out (validation loss on unseen noise)
    refine_rounds: int = 0  # 0: targets are the teacher's ODE ends; R > 0: see refine_pairs
    temperature: float = 1.0  # the noise is temperature * z (the start noise of `molgen sample --temperature`)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.n_atoms)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.n_atoms)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.positions[a:b], self.types[a:b]

    def noise(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.noise_x[a:b], self.noise_h[a:b]

    def split(self, name: str) -> np.ndarray:
        n = len(self)
        if name == "train":
            return np.arange(0, n - self.n_valid)
        if name == "valid":
            return np.arange(n - self.n_valid, n)
        return np.arange(0, 0)

    def save(self, path: Path) -> None:
        from molgen.io_utils import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, n_atoms=self.n_atoms, positions=self.positions, types=self.types,
                         noise_x=self.noise_x, noise_h=self.noise_h, n_valid=self.n_valid,
                         refine_rounds=self.refine_rounds, temperature=self.temperature)

    @classmethod
    def load(cls, path: Path) -> "PairSet":
        with np.load(path) as z:
            rounds = int(z["refine_rounds"]) if "refine_rounds" in z.files else 0
            temp = float(z["temperature"]) if "temperature" in z.files else 1.0
            return cls(z["n_atoms"], z["positions"], z["types"], z["noise_x"], z["noise_h"], int(z["n_valid"]),
                       rounds, temp)


def _noise_batches(sizes: np.ndarray, seed: int, n_features: int, batch_size: int, temperature: float = 1.0):
    """(packed graph, T z_x, T z_h) per batch of molecules: batch b uses noise key fold_in(seed, b)."""
    from molgen.data.batching import pack

    base = jax.random.fold_in(jax.random.PRNGKey(seed), PAIR_STREAM)
    for b, s in enumerate(range(0, len(sizes), batch_size)):
        bs = sizes[s : s + batch_size]
        g = pack(None, [np.zeros(int(n), np.int32) for n in bs])
        zx, zh = sample_noise(jax.random.fold_in(base, b), g, n_features)
        yield g, temperature * zx, temperature * zh


def _solve_pairs(solve: Callable, sizes: np.ndarray, seed: int, n_features: int, batch_size: int, n_valid: int,
                 progress: Callable[[int], None] | None, refine_rounds: int = 0,
                 temperature: float = 1.0) -> PairSet:
    """Pairs (T z, target) for molecules of the given sizes, target = solve(graph, T z_x, T z_h) per noise batch."""
    xs, ts, zxs, zhs = [], [], [], []
    for g, zx, zh in _noise_batches(sizes, seed, n_features, batch_size, temperature):
        x, h = solve(g, zx, zh)
        n_real = int(g.n_atoms.sum())
        xs.append(np.asarray(x)[:n_real])
        ts.append(np.argmax(np.asarray(h)[:n_real, :N_TYPES], -1).astype(np.int8))
        zxs.append(np.asarray(zx)[:n_real])
        zhs.append(np.asarray(zh)[:n_real])
        if progress:
            progress(int((g.n_atoms > 0).sum()))
    return PairSet(np.asarray(sizes, np.int32), np.concatenate(xs).astype(np.float32), np.concatenate(ts),
                   np.concatenate(zxs).astype(np.float32), np.concatenate(zhs).astype(np.float32), n_valid,
                   refine_rounds, float(temperature))


def generate_pairs(teacher_cfg, teacher_params, sizes: np.ndarray, seed: int, ode_steps: int,
                   sigma_max: float, sigma_min: float = 0.002, batch_size: int = 1000, n_valid: int = 0,
                   progress: Callable[[int], None] | None = None, temperature: float = 1.0) -> PairSet:
    """Solve the teacher's ODE for molecules of the given sizes; batch b uses noise key fold_in(seed, b).

    With ``temperature`` T the ODE starts from s_max T z: the targets are the teacher's reduced-temperature
    molecules, and the student learns the map where ``molgen sample --temperature T`` will call it.
    """
    from molgen.diffusion.ode import edm_denoiser, heun_solve, karras_levels
    from molgen.train import make_apply

    _, apply = make_apply(teacher_cfg)
    denoise = jax.jit(edm_denoiser(apply, teacher_cfg.diffusion))
    levels = karras_levels(ode_steps, sigma_min, sigma_max)
    return _solve_pairs(lambda g, zx, zh: heun_solve(denoise, teacher_params, zx, zh, g, levels), sizes, seed,
                        teacher_cfg.n_features, batch_size, n_valid, progress, temperature=temperature)


def refine_pairs(student_cfg, student_params, teacher_cfg, teacher_params, sizes: np.ndarray, seed: int,
                 rounds: int, sigma: float = 0.0, batch_size: int = 1000, n_valid: int = 0,
                 progress: Callable[[int], None] | None = None, temperature: float = 1.0) -> PairSet:
    """Targets near the student's own answers: its one-call molecule from z, relaxed by the teacher.

    x_0 = f(s_max z, s_max) (the student, one call), then ``rounds`` times x <- D(x, s): the teacher's
    denoising of x read as a sample at a low level s, with the atom types re-read (argmax) and fed back as
    clean features each round (:mod:`molgen.refine`).  s runs over ``refine_levels(rounds)`` (0.4 -> 0.1 Å,
    what ``molgen sample --steps 1 --refine R`` does), or stays at ``sigma`` when that is > 0.
    D(x, s) = x + s^2 grad log p_s(x), so the rounds are gradient ascent on the teacher's log-density
    smoothed at s: each molecule moves to a nearby geometry the teacher holds clean (bond lengths, valences).
    Deterministic: the noise is generate_pairs' for the same seed.
    """
    from molgen.consistency.stack import make_model_fn
    from molgen.diffusion.ode import edm_denoiser
    from molgen.refine import make_refine_step, refine, refine_levels
    from molgen.train import make_apply

    cfn = jax.jit(make_model_fn(student_cfg))
    _, t_apply = make_apply(teacher_cfg)
    step = jax.jit(make_refine_step(edm_denoiser(t_apply, teacher_cfg.diffusion)))
    levels = [float(sigma)] * rounds if sigma > 0 else refine_levels(rounds)
    s_max = float(student_cfg.consistency.sigma_max)

    def solve(g, zx, zh):
        x, h = cfn(student_params, s_max * zx, s_max * zh, jnp.full(g.node_mask.shape, s_max, jnp.float32), g)
        return refine(step, teacher_params, x, h, g, levels)

    return _solve_pairs(solve, sizes, seed, student_cfg.n_features, batch_size, n_valid, progress, rounds,
                        temperature)


ANCHOR_SIGMAS = (0.08, 0.5)  # the levels k-step sampling re-noises to (default_sigmas: 0.4 ... 0.1, and 0.2)
BOND_CUTOFF = 2.0  # Å: target atom pairs closer than this (bonds, and H-X-H / short 1-3 pairs) enter the bond term
RELAX_SIGMAS = (0.05, 0.3)  # noise levels (Å) of the teacher-relaxation term: the scale of one-call bond errors


def distill_loss(cfn, params, x, h, noise, graph, cfg: ConsistencyConfig, key=None, anchor_params=None,
                 anchor_fraction: float = 0.0, bond_weight: float = 0.0, relax=None, dmd=None, fake_params=None):
    """Mean over molecules of the pseudo-Huber distance between f(s_max z, s_max) and the target (x, h).

    With ``anchor_params`` a random ``anchor_fraction`` of the molecules is used instead at a low level s in
    ANCHOR_SIGMAS: input x + s xi (fresh noise), target the anchor model's f at the same input, so the student
    keeps the behaviour k-step sampling relies on while its one-step map moves to the teacher's ODE.

    ``bond_weight`` adds, for the one-step molecules, the pseudo-Huber distance between the student's and the
    target's interatomic distances over the target's pairs closer than BOND_CUTOFF: stability and validity
    are read from those distances, and the coordinate loss spends its effort equally on far pairs.

    ``relax = (denoise, teacher_params, weight, 0)`` adds, for the one-step molecules, the teacher's relaxation:
    the output (ox, oh) is noised to a low level s (log-uniform in RELAX_SIGMAS, fresh zero-CoM noise) and
    pulled towards the teacher's denoising of it, D(ox + s xi, s) with gradients stopped (pseudo-Huber as
    above).  Its expected gradient is -s^2 times the teacher's score of the output smoothed at s: the
    output moves towards geometries the teacher holds clean (bond lengths), which the regression onto the
    teacher's ODE end alone does not reach when the student cannot fit that map exactly (its errors average
    into wrong bond lengths).  It is the real-score half of distribution matching distillation (Yin et al.
    2024), used only at low noise, where it acts on local geometry and the regression term keeps diversity.
    ``relax = (denoise, teacher_params, weight, rounds)`` with rounds R > 0 instead pulls the output towards
    the teacher's refinement of the output itself: R steps x <- D(x, s) at ``refine_levels(R)`` with no noise
    and the types re-read (what ``molgen sample --refine R`` does to it), gradients stopped.  The target is
    then deterministic: the noise of the version above moves its target ~s per coordinate, more than the
    ~0.1 Å bond errors the term is meant to fix.  The target moves with the student, so it stays within
    reach (unlike fixed refined targets, ``refine_pairs``, which it cannot predict from z and averages).

    ``dmd`` (a :class:`molgen.consistency.dmd.DMD`) with ``fake_params`` adds, for the one-step molecules,
    distribution matching (``dmd.weight`` times its generator term) and the fake model's EDM loss on them
    (:func:`molgen.consistency.dmd.dmd_terms`): the one-call molecules are pulled towards the teacher's
    distribution rather than onto its ODE's map alone.
    """
    zx, zh = noise
    m = graph.node_mask
    seg = graph.segment
    n_seg = graph.n_atoms.shape[0]
    s_max = jnp.float32(cfg.sigma_max)
    yx, yh, sig = s_max * zx, s_max * zh * m[:, None], jnp.full(m.shape, s_max, jnp.float32)
    tx, th = x, h
    low = jnp.zeros((n_seg,), bool)
    anchored = anchor_params is not None and anchor_fraction > 0
    if anchored:
        k_u, k_s, k_n = jax.random.split(key, 3)
        low = jax.random.uniform(k_u, (n_seg,)) < anchor_fraction
        lo, hi = np.log(ANCHOR_SIGMAS[0]), np.log(ANCHOR_SIGMAS[1])
        s_low = jnp.exp(jax.random.uniform(k_s, (n_seg,), minval=lo, maxval=hi))
        ex, eh = sample_noise(k_n, graph, h.shape[-1])
        node_low = low[seg][:, None]
        s_node = s_low[seg][:, None]
        yx = jnp.where(node_low, x + s_node * ex, yx)
        yh = jnp.where(node_low, (h + s_node * eh) * m[:, None], yh)
        sig = jnp.where(low[seg], s_low[seg], sig)
        ax, ah = cfn(anchor_params, yx, yh, sig, graph)
        tx = jnp.where(node_low, jax.lax.stop_gradient(ax), tx)
        th = jnp.where(node_low, jax.lax.stop_gradient(ah), th)
    ox, oh = cfn(params, yx, yh, sig, graph)
    sq = per_molecule_sum(jnp.sum((ox - tx) ** 2, -1) + jnp.sum((oh - th) ** 2, -1), graph)
    dim = graph.n_atoms.astype(jnp.float32) * (3 + h.shape[-1])
    real = (graph.n_atoms > 0).astype(jnp.float32)
    one = real * (1.0 - low.astype(jnp.float32))
    per_mol = pseudo_huber(sq, dim, cfg.huber_scale)
    loss = jnp.sum(per_mol * real) / jnp.maximum(real.sum(), 1.0)
    pos_err = per_molecule_sum(jnp.sqrt(jnp.sum((ox - tx) ** 2, -1) + 1e-12), graph) / jnp.maximum(graph.n_atoms, 1)
    aux = {"position_error": jnp.sum(pos_err * one) / jnp.maximum(one.sum(), 1.0)}  # one-step molecules only
    if anchored:
        anc = real - one
        aux["anchor_loss"] = jnp.sum(per_mol * anc) / jnp.maximum(anc.sum(), 1.0)
    if relax is not None:
        denoise, tparams, relax_weight, rounds = relax
        if rounds > 0:  # deterministic: the teacher's refinement of the output itself (molgen.refine)
            from molgen.refine import make_refine_step, refine, refine_levels

            dx, dh = refine(make_refine_step(denoise), tparams, jax.lax.stop_gradient(ox),
                            jax.lax.stop_gradient(oh), graph, refine_levels(rounds))
            dx, dh = jax.lax.stop_gradient(dx), jax.lax.stop_gradient(dh)
        else:
            k_rs, k_rn = jax.random.split(jax.random.fold_in(key, 1))
            lo, hi = np.log(RELAX_SIGMAS[0]), np.log(RELAX_SIGMAS[1])
            s_r = jnp.exp(jax.random.uniform(k_rs, (n_seg,), minval=lo, maxval=hi))[seg]
            rx, rh = sample_noise(k_rn, graph, h.shape[-1])
            px = jax.lax.stop_gradient(ox) + s_r[:, None] * rx
            ph = (jax.lax.stop_gradient(oh) + s_r[:, None] * rh) * m[:, None]
            dx, dh = jax.lax.stop_gradient(denoise(tparams, px, ph, s_r, graph))
        sq_r = per_molecule_sum(jnp.sum((ox - dx) ** 2, -1) + jnp.sum((oh - dh * m[:, None]) ** 2, -1), graph)
        relax_term = jnp.sum(pseudo_huber(sq_r, dim, cfg.huber_scale) * one) / jnp.maximum(one.sum(), 1.0)
        loss = loss + relax_weight * relax_term
        aux["relax_loss"] = relax_term
    if dmd is not None:
        from molgen.consistency.dmd import dmd_terms

        gen, fake, dmd_aux = dmd_terms(dmd, fake_params, ox, oh, graph, jax.random.fold_in(key, 2),
                                       1.0 - low.astype(jnp.float32))
        loss = loss + dmd.weight * gen + fake
        aux.update(dmd_loss=gen, fake_loss=fake, **dmd_aux)
    if bond_weight > 0:
        snd, rcv = graph.senders, graph.receivers

        def dist(p):
            return jnp.sqrt(jnp.sum((p[snd] - p[rcv]) ** 2, -1) + 1e-12)

        d_t = jax.lax.stop_gradient(dist(x))
        near = graph.edge_mask * (d_t < BOND_CUTOFF) * (1.0 - low.astype(jnp.float32))[seg[rcv]]
        seg_e = seg[rcv]
        sq_b = jax.ops.segment_sum(near * (dist(ox) - d_t) ** 2, seg_e, num_segments=n_seg)
        n_b = jax.ops.segment_sum(near, seg_e, num_segments=n_seg)
        bond = jnp.sum(pseudo_huber(sq_b, n_b, cfg.huber_scale) * one) / jnp.maximum(one.sum(), 1.0)
        loss = loss + bond_weight * bond
        aux["bond_loss"] = bond
        aux["bond_error"] = jnp.sum(jnp.sqrt(sq_b / jnp.maximum(n_b, 1.0)) * one) / jnp.maximum(one.sum(), 1.0)
    return loss, aux


def prepare_pairs(cfg, run_dir: Path, progress_factory=None) -> PairSet:
    """The run's pairs: loaded from ``run_dir/pairs.npz``, or generated from ``cfg.teacher`` and saved there."""
    from molgen import MolgenError
    from molgen.sample import draw_sizes, load_model

    path = Path(run_dir) / PAIRS_NAME
    if path.exists():
        pairs = PairSet.load(path)
        if len(pairs) != cfg.n_pairs:
            raise MolgenError(f"{path} holds {len(pairs)} pairs, the run wants {cfg.n_pairs}; remove it or fix --pairs")
        if pairs.refine_rounds != cfg.refine_rounds:
            raise MolgenError(f"{path} holds targets of {pairs.refine_rounds} refinement rounds, the run wants "
                              f"{cfg.refine_rounds}; remove it or fix --refine")
        if not np.isclose(pairs.temperature, cfg.pair_temperature):
            raise MolgenError(f"{path} holds pairs at temperature {pairs.temperature:g}, the run wants "
                              f"{cfg.pair_temperature:g}; remove it or fix --pair-temperature")
        return pairs
    tcfg, tparams, _ = load_model(cfg.teacher)
    if tcfg.mode != "diffusion":
        raise MolgenError(f"{cfg.teacher}: the teacher must be a diffusion model, not {tcfg.mode!r}")
    if tcfg.model.in_node_nf != cfg.model.in_node_nf:
        raise MolgenError(f"{cfg.teacher}: the teacher's atom features do not match the student's")
    sizes = draw_sizes(cfg, cfg.n_pairs, cfg.seed, stream=PAIR_STREAM)
    n_valid = min(max(cfg.n_pairs // 32, 1), 1000) if cfg.n_pairs >= 2 * cfg.batch_size else 0
    if cfg.refine_rounds > 0:  # the --init student's answers, relaxed by the teacher
        scfg, sparams, _ = load_model(cfg.init)
        progress = progress_factory("refined targets", cfg.n_pairs) if progress_factory else None
        pairs = refine_pairs(scfg, sparams, tcfg, tparams, sizes, cfg.seed, cfg.refine_rounds, cfg.refine_sigma,
                             n_valid=n_valid, progress=progress, temperature=cfg.pair_temperature)
        pairs.save(path)
        return pairs
    progress = progress_factory("teacher ODE pairs", cfg.n_pairs) if progress_factory else None
    pairs = generate_pairs(tcfg, tparams, sizes, cfg.seed, cfg.teacher_steps, cfg.consistency.sigma_max,
                           cfg.consistency.sigma_min, n_valid=n_valid, progress=progress,
                           temperature=cfg.pair_temperature)
    pairs.save(path)
    return pairs
