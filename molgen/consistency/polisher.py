"""Teaching a small diffusion model to polish as a large one does (objective ``polish``).

`molgen sample --polish N` applies a diffusion model's denoiser D(x, s) to each finished molecule at the low
ladder's N levels (:mod:`molgen.diffusion.polish`). A large teacher polishes far better than a small model, at
many times the cost of a call. This objective regresses a small diffusion model's denoiser (``--init``) onto the
teacher's at those levels, on the molecules it will polish:

1. Examples, made once per run and kept in it (``pairs.npz``): ``molecules`` molecules of a consistency model
   (``start``, e.g. the shipped default) from T z, made with the multistep sampler in ``start_calls`` calls (a
   list: batches of 250 molecules take its counts in turn; the later calls re-noise by the start model's card),
   then two chains of ``calls`` polishing steps from each, the teacher's and the trained model's own (its
   starting parameters). Every state a chain reaches before a level is an input; its target is the teacher's
   denoised molecule from that input at that level. The start molecule begins both chains, so a molecule gives
   2 calls - 1 examples.
2. The loss: the squared error of the denoiser's positions and (times ``type_weight``) atom features against
   the teacher's, summed over atoms and divided by the batch's real atoms; the atom types are given clean, as
   polishing gives them.

The examples use the container of distillation pairs (:class:`molgen.consistency.distill.PairSet`): the input
molecule is the graph (positions, types), ``noise_x`` the target positions and ``noise_h`` the target features
with the example's level as a last column; ``polish_calls``, ``temperature`` and ``start_calls`` record how they
were made.
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
from molgen.consistency.distill import PairSet, _noise_batches, n_held_out
from molgen.consistency.ict import make_multistep_step, multistep_levels
from molgen.data.features import clean_features, read_types, type_features
from molgen.diffusion.levels import low_ladder

POLISH_STREAM = 7927  # the start molecules' sizes and first noise: a stream of its own
RENOISE_SEED = 11  # the start molecules' later calls: noise of PRNGKey(seed + 11), folded with batch and call
BATCH = 250  # start molecules made together


@dataclass(frozen=True)
class PolishConfig:
    teacher: str = ""  # the diffusion model whose polishing is learnt (as named when the run started)
    start: str = ""  # the consistency model whose molecules are polished (default: the shipped default)
    molecules: int = 8000  # start molecules drawn; each gives 2 calls - 1 examples (1/32 held out, at most 1000)
    calls: int = 4  # polishing levels (the low ladder's)
    temperature: float = 0.7  # the start molecules' first noise is T z (the start model's sampling temperature)
    type_weight: float = 1.0  # weight of the atom features' error beside the positions'
    start_calls: tuple[int, ...] = (1,)  # the start model's calls; batches of 250 molecules take them in turn


def n_examples(cfg: PolishConfig) -> int:
    return cfg.molecules * (2 * cfg.calls - 1)


def make_examples(start_fn: Callable, teacher_step: Callable, own_step: Callable, sizes: np.ndarray, seed: int,
                  cfg: PolishConfig, n_features: int, batch_size: int,
                  progress: Callable[[int], None] | None = None) -> PairSet:
    """The run's examples (module docstring), molecule by molecule, so the held-out last ones are whole molecules'.
    ``start_fn(graph, T z_x, T z_h, calls, batch)`` -> the start molecule; ``teacher_step`` / ``own_step`` ``(x,
    features, level, graph)`` -> the denoised molecule (jitted)."""
    levels = low_ladder(cfg.calls)
    cols: list[list[np.ndarray]] = [[], [], [], []]  # input x, input types, target x, target features + level
    n_atoms: list[int] = []
    for b, (g, zx, zh) in enumerate(_noise_batches(sizes, seed, n_features, BATCH, cfg.temperature)):
        m, n = g.node_mask, np.asarray(g.n_atoms)[:-1]
        cuts = np.cumsum(n)[:-1]
        x0, h0 = start_fn(g, zx, zh, cfg.start_calls[b % len(cfg.start_calls)], b)
        blocks = []  # per example block (a chain's state before a level): its four arrays, split by molecule
        for chain, step in (("teacher", teacher_step), ("own", own_step)):
            x, h = x0, h0
            for k, s in enumerate(levels):
                sig = jnp.full(m.shape, s, jnp.float32)
                feats = clean_features(h, m)
                tx, th = teacher_step(x, feats, sig, g)
                wait_ready(th)  # in naps: Ctrl-C acts at once
                if chain == "teacher" or k > 0:  # the start molecule is one example, not two
                    r = int(n.sum())
                    th_level = np.concatenate([np.asarray(th)[:r], np.full((r, 1), s, np.float32)], 1)
                    blocks.append([np.split(np.asarray(a)[:r], cuts) for a in (x, read_types(h), tx, th_level)])
                x, h = (tx, th) if chain == "teacher" else step(x, feats, sig, g)
        for j in range(len(n)):
            for block in blocks:
                for col, parts in zip(cols, block):
                    col.append(parts[j])
                n_atoms.append(int(n[j]))
        if progress:
            progress(len(n))
    n_valid = n_held_out(len(n_atoms), batch_size)
    return PairSet(np.asarray(n_atoms, np.int32), np.concatenate(cols[0]).astype(np.float32),
                   np.concatenate(cols[1]).astype(np.int8), np.concatenate(cols[2]).astype(np.float32),
                   np.concatenate(cols[3]).astype(np.float32), n_valid, cfg.calls, float(cfg.temperature),
                   drawn=cfg.molecules, start_calls=tuple(cfg.start_calls))


def check_examples(ex: PairSet, path: Path, cfg: PolishConfig, n_features: int) -> PairSet:
    """The run's saved examples, refused when they were made for other settings (or are a distillation's)."""
    if ex.noise_h.shape[-1] != n_features + 1:
        raise MolgenError(f"{path} holds a distillation's pairs, not polishing examples; remove it")
    have = (ex.drawn, ex.polish_calls, f"{ex.temperature:g}", list(ex.start_calls))
    want = (cfg.molecules, cfg.calls, f"{cfg.temperature:g}", list(cfg.start_calls))
    if have != want:
        raise MolgenError(f"{path} holds examples of {have[0]} molecules, {have[1]} calls, temperature {have[2]}, "
                          f"start calls {have[3]}; the run wants {', '.join(map(str, want))}: remove it or fix the "
                          "[polish] settings")
    return ex


def polish_loss(denoise, params, graph, targets, type_weight: float):
    """Squared error of D(x, s) against the teacher's denoised molecule, per real atom (positions, and features
    times ``type_weight``); the input's atom types are given as clean features. Returns (loss, aux)."""
    tx, th_level = targets
    m = graph.node_mask
    th, level = th_level[:, :-1], th_level[:, -1]
    sig = jnp.where(m > 0, level, 1.0)  # padding rows: any level the schedule knows
    ox, oh = denoise(params, graph.positions, type_features(graph.types, m), sig, graph)
    n = jnp.maximum(jnp.sum(m), 1.0)
    loss_x = jnp.sum(jnp.sum((ox - tx) ** 2, -1) * m) / n
    loss_h = jnp.sum(jnp.sum((oh - th) ** 2, -1) * m) / n
    same = jnp.argmax(oh[:, :N_TYPES], -1) == jnp.argmax(th[:, :N_TYPES], -1)
    return loss_x + type_weight * loss_h, {"loss_x": loss_x, "loss_h": loss_h,
                                           "type_agreement": jnp.sum(same * m) / n}


def example_steps(start_fn, start_params, teacher_fn, teacher_params, own_fn, own_params, consistency,
                  renoise: float, seed: int):
    """(start_fn, teacher_step, own_step) for :func:`make_examples` from model functions (jitted) and parameters;
    ``consistency``: the start model's config, ``renoise``: its card's."""
    sigma_max = consistency.sigma_max
    later = jax.jit(make_multistep_step(start_fn, consistency))

    def start(g, zx, zh, calls, b):
        x, h = start_fn(start_params, sigma_max * zx, sigma_max * zh, jnp.full(g.node_mask.shape, sigma_max,
                                                                               jnp.float32), g)
        key = jax.random.fold_in(jax.random.PRNGKey(seed + RENOISE_SEED), b)
        for i, s in enumerate(multistep_levels(calls, consistency)[1:]):
            x, h = later(start_params, x, h, jnp.float32(s), jnp.bool_(False), g, jax.random.fold_in(key, i),
                         jnp.float32(renoise))
        return x, h

    return start, (lambda x, f, s, g: teacher_fn(teacher_params, x, f, s, g)), \
        (lambda x, f, s, g: own_fn(own_params, x, f, s, g))

