"""Consistency distillation by regression (Luhman & Luhman 2021): a consistency model's one-call sample
f(s_max z, s_max) is regressed onto a target made by a diffusion teacher from the same noise z.

1. Pairs (noise, target molecule), made once per run and kept in it (``pairs.npz``): atom counts from the
   training histogram, noise T z on the zero-CoM subspace (T: the pair temperature), and as target either
   * ``ode``: the end of the teacher's probability-flow ODE from s_max T z (Heun, :mod:`molgen.diffusion.ode`),
   * ``polished``: the student's own one-call molecule from T z, polished by the teacher's denoiser at the low
     ladder's levels (:mod:`molgen.diffusion.polish`): targets near the student's answers, with the bond
     lengths the teacher holds clean;
   with ``keep = "stable"`` only the pairs whose target is a stable molecule (EDM's molecule stability) are kept:
   the student learns from the noise that reaches stable molecules, and nothing from the rest.
2. The loss: the pseudo-Huber distance (iCT's, scaled by the molecule's size) between the student's one-call
   output and the target (positions, and EDM's clean features of the target's atom types), plus a term on
   the target's short interatomic distances (bond lengths decide stability). Regression at s_max alone also
   moves f at the low levels multistep sampling uses, so a share of each batch keeps an anchor model's f there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from molgen import MolgenError
from molgen.calls import wait_ready
from molgen.chem.elements import N_TYPES
from molgen.consistency.ict import ConsistencyConfig, mean_over_molecules, molecule_distance, pseudo_huber
from molgen.diffusion.levels import low_ladder, ode_levels
from molgen.diffusion.noise import sample_noise
from molgen.diffusion.ode import heun_solve
from molgen.diffusion.polish import make_polish_step, polish

PAIRS_NAME = "pairs.npz"
PAIR_STREAM = 7919  # pairs use their own random stream: `molgen sample --seed S` never reuses their noise
TARGETS = ("ode", "polished")  # what the student learns to reach (DistillConfig.targets)
KEEPS = ("all", "stable")  # which of the drawn pairs a run learns from (DistillConfig.keep)
ANCHOR_SIGMAS = (0.08, 0.5)  # the levels multistep sampling re-noises to (0.4 ... 0.1, and 0.2)
BOND_CUTOFF = 2.0  # Å: target atom pairs closer than this (bonds, and short 1-3 pairs) enter the bond term


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # the diffusion model the targets come from (as named when the run started)
    pairs: int = 32000  # noise -> target pairs drawn (1/32 held out for validation, at most 1000)
    targets: str = "ode"  # TARGETS
    keep: str = "all"  # KEEPS: "stable" keeps only the drawn pairs whose target is a stable molecule
    teacher_steps: int = 18  # "ode": Heun steps of the teacher's ODE (2 calls each, 1 for the last)
    polish_calls: int = 4  # "polished": teacher calls on each one-call molecule (low-ladder levels)
    pair_temperature: float = 1.0  # the pairs' noise is T z: the student learns where `--temperature T` samples
    anchor: str = ""  # the consistency model whose low-noise f is kept (default: the run's --init)
    anchor_fraction: float = 0.25  # share of each batch trained at the anchor's low levels (0: one-call only)
    bond_weight: float = 1.0  # weight of the short-pair distance term (0: off)
    balance: float = 0.0  # training pairs resampled toward QM9's counts of N, O and F atoms (balance_pairs); 0: off


@dataclass
class PairSet:
    """Noise -> molecule pairs, with the interface of :class:`molgen.data.qm9.QM9` that training uses."""

    n_atoms: np.ndarray  # [M]
    positions: np.ndarray  # [sum n, 3]: the targets' positions
    types: np.ndarray  # [sum n]
    noise_x: np.ndarray  # [sum n, 3]: T z on the zero-CoM subspace
    noise_h: np.ndarray  # [sum n, F]
    n_valid: int = 0  # the last n_valid pairs are held out (validation loss on unseen noise)
    polish_calls: int = 0  # 0: targets are the teacher's ODE ends; R > 0: polished one-call molecules
    temperature: float = 1.0
    drawn: int = 0  # pairs drawn, of which these were kept (0: all of them)
    kept: str = "all"  # KEEPS
    start_calls: tuple[int, ...] = (1,)  # polishing examples: the start molecules' calls (molgen.consistency.polisher)

    def __post_init__(self) -> None:
        self.drawn = self.drawn or len(self.n_atoms)
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

    @staticmethod
    def least_bytes(sizes, n_features: int) -> int:
        """A lower bound of the bytes of the saved pairs of molecules of ``sizes`` atoms (their arrays alone): per
        atom its target's position (float32) and type (int8) and its noise (float32)."""
        return int(np.sum(sizes)) * (3 * 4 + 1 + (3 + n_features) * 4) + 4 * len(sizes)

    def save(self, path: Path) -> None:
        from molgen.io_utils import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, n_atoms=self.n_atoms, positions=self.positions, types=self.types,
                         noise_x=self.noise_x, noise_h=self.noise_h, n_valid=self.n_valid,
                         refine_rounds=self.polish_calls, temperature=self.temperature, drawn=self.drawn,
                         kept=self.kept, start_calls=np.asarray(self.start_calls, np.int32))

    @classmethod
    def load(cls, path: Path) -> "PairSet":
        """The pairs saved in ``path`` (damaged: one line, MolgenError)."""
        from molgen.io_utils import NPZ_DAMAGE

        try:
            with np.load(path) as z:
                rounds = int(z["refine_rounds"]) if "refine_rounds" in z.files else 0
                temp = float(z["temperature"]) if "temperature" in z.files else 1.0
                drawn, kept = (int(z["drawn"]), str(z["kept"])) if "drawn" in z.files else (0, "all")
                calls = tuple(int(c) for c in z["start_calls"]) if "start_calls" in z.files else (1,)
                return cls(z["n_atoms"], z["positions"], z["types"], z["noise_x"], z["noise_h"], int(z["n_valid"]),
                           rounds, temp, drawn, kept, calls)
        except NPZ_DAMAGE as e:
            raise MolgenError(f"{path}: damaged ({e}); delete it and the run makes its pairs again") from None


def _noise_batches(sizes: np.ndarray, seed: int, n_features: int, batch_size: int, temperature: float = 1.0):
    """(packed graph, T z_x, T z_h) per batch of molecules: batch b uses noise key fold_in(seed, b)."""
    from molgen.data.batching import pack

    base = jax.random.fold_in(jax.random.PRNGKey(seed), PAIR_STREAM)
    for b, s in enumerate(range(0, len(sizes), batch_size)):
        bs = sizes[s : s + batch_size]
        g = pack(None, [np.zeros(int(n), np.int32) for n in bs])
        zx, zh = sample_noise(jax.random.fold_in(base, b), g, n_features)
        yield g, temperature * zx, temperature * zh


def make_pairs(solve: Callable, sizes: np.ndarray, seed: int, n_features: int, n_valid: int = 0,
               progress: Callable[[int], None] | None = None, polish_calls: int = 0, temperature: float = 1.0,
               batch_size: int = 1000) -> PairSet:
    """Pairs (T z, target) for molecules of the given sizes, target = solve(graph, T z_x, T z_h) per noise batch."""
    xs, ts, zxs, zhs = [], [], [], []
    for g, zx, zh in _noise_batches(sizes, seed, n_features, batch_size, temperature):
        x, h = solve(g, zx, zh)
        wait_ready((x, h))  # the teacher's queued calls, waited for in naps: Ctrl-C acts at once
        n_real = int(g.n_atoms.sum())
        xs.append(np.asarray(x)[:n_real])
        ts.append(np.argmax(np.asarray(h)[:n_real, :N_TYPES], -1).astype(np.int8))
        zxs.append(np.asarray(zx)[:n_real])
        zhs.append(np.asarray(zh)[:n_real])
        if progress:
            progress(int((g.n_atoms > 0).sum()))
    return PairSet(np.asarray(sizes, np.int32), np.concatenate(xs).astype(np.float32), np.concatenate(ts),
                   np.concatenate(zxs).astype(np.float32), np.concatenate(zhs).astype(np.float32), n_valid,
                   polish_calls, float(temperature))


def ode_solver(teacher_denoise: Callable, teacher_params, ode_steps: int, cfg: ConsistencyConfig) -> Callable:
    """solve(graph, T z_x, T z_h): the end of the teacher's ODE from s_max T z (jitted denoiser given)."""
    levels = ode_levels(ode_steps, cfg.sigma_min, cfg.sigma_max)
    return lambda g, zx, zh: heun_solve(teacher_denoise, teacher_params, zx, zh, g, levels)


def polish_solver(student_fn: Callable, student_params, teacher_denoise: Callable, teacher_params, calls: int,
                  cfg: ConsistencyConfig) -> Callable:
    """solve(graph, T z_x, T z_h): the student's one-call molecule from T z, polished by ``calls`` teacher calls
    on the low ladder (what `molgen sample --steps 1 --polish R` does). Both functions jitted by the caller."""
    step = jax.jit(make_polish_step(teacher_denoise))
    levels = low_ladder(calls)
    s_max = float(cfg.sigma_max)

    def solve(g, zx, zh):
        x, h = student_fn(student_params, s_max * zx, s_max * zh, jnp.full(g.node_mask.shape, s_max, jnp.float32), g)
        return polish(step, teacher_params, x, h, g, levels)

    return solve


def keep_stable(pairs: PairSet) -> PairSet:
    """The pairs whose target is a stable molecule (every atom's valence allowed, EDM's bonds), in their order;
    the last ``pairs.n_valid`` of them (at most half) held out."""
    from molgen.chem.bonds import pad_molecules, stability

    cut = pairs.offsets[1:-1]
    stable = stability(*pad_molecules(np.split(pairs.positions, cut), np.split(pairs.types, cut)))[1]
    keep, rows = np.flatnonzero(stable), np.repeat(stable, pairs.n_atoms)  # the molecules, and their atoms' rows
    return PairSet(pairs.n_atoms[keep], pairs.positions[rows], pairs.types[rows], pairs.noise_x[rows],
                   pairs.noise_h[rows], min(pairs.n_valid, len(keep) // 2), pairs.polish_calls, pairs.temperature,
                   pairs.drawn, "stable")


BALANCE_TOP = 5  # molecules with this many N, O and F atoms or more are one class when balancing


def balance_pairs(pairs: PairSet, reference: np.ndarray, power: float) -> PairSet:
    """The training pairs resampled toward a reference's numbers of N, O and F atoms a molecule (``reference``:
    the share of molecules with 0, 1, ..., BALANCE_TOP or more): each pair is taken w = (reference share / the
    pairs' share of its class) ** power times on average, scaled so that the count stays the same, as floor(w) copies
    and one more with probability w - floor(w), drawn from a fixed stream: the same pairs always give the same set.
    The held-out pairs stay as they are. Few-heteroatom molecules are what a model's stable targets hold too many
    of (docs/models.md, "Where the default repeats itself")."""
    n_train = len(pairs) - pairs.n_valid
    if power <= 0 or n_train == 0:
        return pairs
    from molgen.chem.elements import heteroatom_counts

    cls = np.minimum(heteroatom_counts(pairs.types, pairs.n_atoms)[:n_train], BALANCE_TOP)
    share = np.bincount(cls, minlength=BALANCE_TOP + 1) / n_train
    w = (np.asarray(reference, np.float64) / np.maximum(share, 1e-12)) ** power
    expected = n_train * w[cls] / w[cls].sum()
    copies = np.floor(expected).astype(np.int64)
    copies += np.random.default_rng(0).random(n_train) < expected - copies
    ids = np.concatenate([np.repeat(np.arange(n_train), copies), np.arange(n_train, len(pairs))])
    sizes = pairs.n_atoms[ids].astype(np.int64)  # each chosen molecule's atom rows, in order, without a loop
    rows = np.repeat(pairs.offsets[ids] - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
    return PairSet(pairs.n_atoms[ids], pairs.positions[rows], pairs.types[rows], pairs.noise_x[rows],
                   pairs.noise_h[rows], pairs.n_valid, pairs.polish_calls, pairs.temperature, pairs.drawn, pairs.kept,
                   pairs.start_calls)


def n_held_out(n_pairs: int, batch_size: int) -> int:
    return min(max(n_pairs // 32, 1), 1000) if n_pairs >= 2 * batch_size else 0


def check_pairs(pairs: PairSet, path: Path, cfg: DistillConfig) -> PairSet:
    """The run's saved pairs, refused when they were made for other settings."""
    want_polish = cfg.polish_calls if cfg.targets == "polished" else 0
    if pairs.drawn != cfg.pairs:
        raise MolgenError(f"{path} holds {pairs.drawn} pairs, the run wants {cfg.pairs}; remove it or fix the pairs setting")
    if pairs.kept != cfg.keep:
        raise MolgenError(f"{path} keeps {pairs.kept} targets, the run wants {cfg.keep}; remove it or fix the keep setting")
    if pairs.polish_calls != want_polish:
        raise MolgenError(f"{path} holds targets of {pairs.polish_calls} polishing calls, the run wants "
                          f"{want_polish}; remove it or fix the targets setting")
    if not np.isclose(pairs.temperature, cfg.pair_temperature):
        raise MolgenError(f"{path} holds pairs at temperature {pairs.temperature:g}, the run wants "
                          f"{cfg.pair_temperature:g}; remove it or fix the pair temperature")
    return pairs


def _anchor_inputs(key, x, h, graph, anchor_fraction):
    """(mask of the molecules trained at a low level, their VE inputs x + s xi, their levels s)."""
    n_seg = graph.n_atoms.shape[0]
    k_u, k_s, k_n = jax.random.split(key, 3)
    low = jax.random.uniform(k_u, (n_seg,)) < anchor_fraction
    lo, hi = np.log(ANCHOR_SIGMAS[0]), np.log(ANCHOR_SIGMAS[1])
    s_low = jnp.exp(jax.random.uniform(k_s, (n_seg,), minval=lo, maxval=hi))
    ex, eh = sample_noise(k_n, graph, h.shape[-1])
    s_node = s_low[graph.segment][:, None]
    return low, x + s_node * ex, (h + s_node * eh) * graph.node_mask[:, None], s_low[graph.segment]


def _bond_term(ox, x, graph, one, low, scale):
    """Pseudo-Huber distance between the output's and the target's lengths of the target's short pairs."""
    snd, rcv, seg = graph.senders, graph.receivers, graph.segment
    n_seg = graph.n_atoms.shape[0]

    def dist(p):
        return jnp.sqrt(jnp.sum((p[snd] - p[rcv]) ** 2, -1) + 1e-12)

    d_t = jax.lax.stop_gradient(dist(x))
    near = graph.edge_mask * (d_t < BOND_CUTOFF) * (1.0 - low.astype(jnp.float32))[seg[rcv]]
    sq_b = jax.ops.segment_sum(near * (dist(ox) - d_t) ** 2, seg[rcv], num_segments=n_seg)
    n_b = jax.ops.segment_sum(near, seg[rcv], num_segments=n_seg)
    bond = jnp.sum(pseudo_huber(sq_b, n_b, scale) * one) / jnp.maximum(one.sum(), 1.0)
    error = jnp.sum(jnp.sqrt(sq_b / jnp.maximum(n_b, 1.0)) * one) / jnp.maximum(one.sum(), 1.0)
    return bond, error


def distill_loss(cfn, params, x, h, noise, graph, cfg: ConsistencyConfig, dcfg: DistillConfig, key=None,
                 anchor_params=None):
    """Mean over molecules of the pseudo-Huber distance between f(s_max z, s_max) and the target (x, h), plus
    ``dcfg.bond_weight`` times the bond term. With ``anchor_params`` a random ``dcfg.anchor_fraction`` of the
    molecules is used instead at a low level s in ANCHOR_SIGMAS: input x + s xi, target the anchor model's f
    at the same input (gradients stopped)."""
    zx, zh = noise
    m = graph.node_mask
    n_seg = graph.n_atoms.shape[0]
    s_max = jnp.float32(cfg.sigma_max)
    yx, yh, sig = s_max * zx, s_max * zh * m[:, None], jnp.full(m.shape, s_max, jnp.float32)
    tx, th = x, h
    low = jnp.zeros((n_seg,), bool)
    anchored = anchor_params is not None and dcfg.anchor_fraction > 0
    if anchored:
        low, ax_in, ah_in, s_low = _anchor_inputs(key, x, h, graph, dcfg.anchor_fraction)
        node_low = low[graph.segment][:, None]
        yx, yh = jnp.where(node_low, ax_in, yx), jnp.where(node_low, ah_in, yh)
        sig = jnp.where(low[graph.segment], s_low, sig)
        ax, ah = cfn(anchor_params, yx, yh, sig, graph)
        tx = jnp.where(node_low, jax.lax.stop_gradient(ax), tx)
        th = jnp.where(node_low, jax.lax.stop_gradient(ah), th)
    ox, oh = cfn(params, yx, yh, sig, graph)
    per_mol, _, _ = molecule_distance(ox, oh, tx, th, graph, cfg.huber_scale)
    real = (graph.n_atoms > 0).astype(jnp.float32)
    one = real * (1.0 - low.astype(jnp.float32))
    loss = mean_over_molecules(per_mol, graph)
    per_atom = jnp.sqrt(jnp.sum((ox - tx) ** 2, -1) + 1e-12)
    pos_err = jax.ops.segment_sum(per_atom * m, graph.segment, n_seg) / jnp.maximum(graph.n_atoms, 1)
    aux = {"position_error": jnp.sum(pos_err * one) / jnp.maximum(one.sum(), 1.0)}  # one-call molecules only
    if anchored:
        aux["anchor_loss"] = jnp.sum(per_mol * (real - one)) / jnp.maximum((real - one).sum(), 1.0)
    if dcfg.bond_weight > 0:
        bond, error = _bond_term(ox, x, graph, one, low, cfg.huber_scale)
        loss = loss + dcfg.bond_weight * bond
        aux.update(bond_loss=bond, bond_error=error)
    return loss, aux
