"""The samplers, by name. Each owns its noise levels, its count of network calls and its loop:

* ``ancestral`` (diffusion models): EDM's stochastic sampler on a respaced time grid; k steps = k calls (with a
  fragment and ``resample`` r, RePaint's resampling: every step but the last is repeated r times after going back
  up by the forward process, (k - 1)(r + 1) + 1 calls);
* ``ode`` (diffusion models): the probability-flow ODE, Heun's method on Karras levels from 80 to 0.002, then 0;
  k steps = 2k - 1 calls;
* ``inpaint`` (diffusion models trained with the ``inpaint`` objective, and a fragment to complete; the default
  then): the ancestral steps of the free atoms only, the fragment's atoms given clean at time 0
  (:mod:`molgen.diffusion.inpaint`); k steps = k calls;
* ``multistep`` (consistency models): x = f(sigma_max z), then for each further level x = f(x + renoise
  sqrt(s^2 - sigma_min^2) z, s); k steps = k calls;
* ``anneal`` (consistency models): the same first call, then f(x, s) on the molecule itself at the low
  ladder's levels, no noise added, types re-read in between (:mod:`molgen.diffusion.polish`); k steps = k calls.

``temperature`` scales every Gaussian a sampler draws (the start noise; the ancestral steps' noise; the
multistep re-noising unless ``renoise`` is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from molgen import MolgenError
from molgen.config import RunConfig
from molgen.consistency.ict import make_multistep_step, multistep_levels
from molgen.diffusion.edm import make_forward_step, make_sampler_step, respaced_times
from molgen.diffusion.inpaint import make_inpaint_step
from molgen.diffusion.levels import low_ladder, ode_levels
from molgen.diffusion.noise import sample_noise
from molgen.diffusion.ode import heun_solve, n_calls
from molgen.diffusion.polish import make_polish_step
from molgen.networks import model_fn, network

ODE_SIGMA_MAX, ODE_SIGMA_MIN = 80.0, 0.002  # the ODE sampler's Karras levels (VE noise levels), then 0


@dataclass(frozen=True)
class Sampler:
    name: str
    kind: str  # the models it applies to: "diffusion" or "consistency"
    default_steps: int
    takes_sigmas: bool = False
    takes_renoise: bool = False
    takes_resample: bool = False

    def levels(self, cfg: RunConfig, steps: int, sigmas: Sequence[float] | None = None) -> list[float]:
        raise NotImplementedError

    def calls(self, levels: list[float], resample: int = 0) -> int:
        return len(levels)

    def prepare(self, cfg: RunConfig, apply: Callable | None = None):
        """The jitted functions :meth:`run` uses. A consistency sampler also takes ``between``: applied to the
        molecule before each stage of a stacked model (:func:`molgen.networks.model_fn`)."""
        raise NotImplementedError

    def run(self, fns, params, graph, nf: int, key, levels, temperature: float, renoise: float | None,
            tick: Callable, fix: Callable | None = None, resample: int = 0):
        """(x, h) of one packed batch (``nf`` features per atom); ``tick(out)`` as every network call is queued, with
        its output (:class:`molgen.calls.Calls` follows them). ``fix(x, h,
        level, scale)``, when given, imposes known atoms on the state after every network call (level: the state's
        variance-exploding noise level, 0 for a clean molecule; scale: alpha_t for a variance-preserving state);
        the ``inpaint`` sampler takes the batch's known rows instead (:class:`molgen.fragment.Known`).
        ``resample``: rounds of RePaint's resampling per step (samplers with ``takes_resample``)."""
        raise NotImplementedError


def _check_sigmas(cfg: RunConfig, steps: int, sigmas) -> list[float] | None:
    if not sigmas:
        return None
    s = [float(x) for x in sigmas]
    if len(s) != steps:
        raise MolgenError(f"--sigmas gives {len(s)} level{'s' * (len(s) != 1)} for --steps {steps}")
    lo, hi = cfg.consistency.sigma_min, cfg.consistency.sigma_max
    if not all(lo < x <= hi for x in s):  # NaN too
        raise MolgenError(f"--sigmas: every level must be above sigma_min {lo:g} and at most sigma_max {hi:g} "
                          f"(the model's training range), got {','.join(f'{x:g}' for x in s)}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise MolgenError("--sigmas must decrease")
    return s


class Ancestral(Sampler):
    def levels(self, cfg, steps, sigmas=None):
        if steps > cfg.diffusion.timesteps:
            raise MolgenError(f"--steps {steps} exceeds the model's {cfg.diffusion.timesteps} diffusion steps")
        return [float(t) for t in respaced_times(steps, cfg.diffusion.timesteps)]

    def calls(self, levels, resample=0):
        return len(levels) - 1 + resample * max(len(levels) - 2, 0)

    def prepare(self, cfg, apply=None):  # the step, the forward step and the schedule (for fix)
        return (jax.jit(make_sampler_step(apply or network(cfg)[1], cfg.diffusion)),
                jax.jit(make_forward_step(cfg.diffusion)), cfg.diffusion.gammas())

    def run(self, fns, params, graph, nf, key, levels, temperature, renoise, tick, fix=None, resample=0):
        step, forward, gammas = fns
        k0, key = jax.random.split(key)
        temp = jnp.float32(temperature)
        zx, zh = sample_noise(k0, graph, nf)
        zx, zh = temp * zx, temp * zh
        for t, s in zip(levels[:-1], levels[1:]):
            tj, sj = jnp.float32(t), jnp.float32(s)
            for r in range(1 + (resample if fix is not None and s > 0 else 0)):
                if r:  # RePaint: back up to level t by the forward process, then the step again
                    key, k = jax.random.split(key)
                    zx, zh = forward(zx, zh, tj, sj, graph, k, temp)
                key, k = jax.random.split(key)
                zx, zh = step(params, zx, zh, tj, sj, graph, k, temp)
                tick(zx)
                if fix is not None:  # z_s = alpha_s (x + (sigma_s / alpha_s) eps); the last step's output is clean
                    g = float(gammas[int(round(s * (len(gammas) - 1)))])
                    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
                    zx, zh = fix(zx, zh, 0.0 if s <= 0 else sigma / alpha, 1.0 if s <= 0 else alpha)
        return zx, zh


class Inpaint(Sampler):
    def levels(self, cfg, steps, sigmas=None):
        return SAMPLERS["ancestral"].levels(cfg, steps)

    def calls(self, levels, resample=0):
        return len(levels) - 1

    def prepare(self, cfg, apply=None):
        return jax.jit(make_inpaint_step(apply or network(cfg)[1], cfg.diffusion))

    def run(self, step, params, graph, nf, key, levels, temperature, renoise, tick, fix=None, resample=0):
        known = fix  # the fragment's rows, centred at 0: the frame of the whole sample
        k0, key = jax.random.split(key)
        kx, kh = jax.random.split(k0)
        temp = jnp.float32(temperature)
        m, f = graph.node_mask[:, None], known.mask[:, None] > 0
        zx = jnp.where(f, known.x, temp * jax.random.normal(kx, graph.positions.shape)) * m
        zh = jnp.where(f, known.h, temp * jax.random.normal(kh, (len(graph.node_mask), nf))) * m
        for t, s in zip(levels[:-1], levels[1:]):
            key, k = jax.random.split(key)
            zx, zh = step(params, zx, zh, jnp.float32(t), jnp.float32(s), graph, k, temp, known.mask)
            tick(zx)
        return zx, zh


class Ode(Sampler):
    def levels(self, cfg, steps, sigmas=None):
        return ode_levels(steps, ODE_SIGMA_MIN, ODE_SIGMA_MAX)

    def calls(self, levels, resample=0):
        return n_calls(levels)

    def prepare(self, cfg, apply=None):
        return jax.jit(model_fn(cfg, apply))

    def run(self, denoise, params, graph, nf, key, levels, temperature, renoise, tick, fix=None, resample=0):
        k0, _ = jax.random.split(key)
        temp = jnp.float32(temperature)
        zx, zh = sample_noise(k0, graph, nf)

        def counted(*a):
            out = denoise(*a)
            tick(out)
            return out

        after = None if fix is None else (lambda x, h, s: fix(x, h, s, 1.0))
        return heun_solve(counted, params, temp * zx, temp * zh, graph, levels, after)


class Multistep(Sampler):
    def levels(self, cfg, steps, sigmas=None):
        return _check_sigmas(cfg, steps, sigmas) or multistep_levels(steps, cfg.consistency)

    def prepare(self, cfg, apply=None, between=None):
        return jax.jit(make_multistep_step(model_fn(cfg, apply, between=between), cfg.consistency))

    def run(self, step, params, graph, nf, key, levels, temperature, renoise, tick, fix=None, resample=0):
        _, key = jax.random.split(key)
        temp = jnp.float32(temperature)
        later = temp if renoise is None else jnp.float32(renoise)
        zx, zh = _zeros(graph, nf)
        for i, s in enumerate(levels):
            key, k = jax.random.split(key)
            zx, zh = step(params, zx, zh, jnp.float32(s), jnp.bool_(i == 0), graph, k, temp if i == 0 else later)
            tick(zx)
            if fix is not None:  # each call's output is a clean molecule
                zx, zh = fix(zx, zh, 0.0, 1.0)
        return zx, zh


class Anneal(Sampler):
    def levels(self, cfg, steps, sigmas=None):
        return _check_sigmas(cfg, steps, sigmas) or [float(cfg.consistency.sigma_max)] + low_ladder(steps - 1)

    def prepare(self, cfg, apply=None, between=None):
        fn = model_fn(cfg, apply, between=between)
        return jax.jit(make_multistep_step(fn, cfg.consistency)), jax.jit(make_polish_step(fn))

    def run(self, fns, params, graph, nf, key, levels, temperature, renoise, tick, fix=None, resample=0):
        first, again = fns
        fix = fix or (lambda x, h, level, scale: (x, h))
        _, key = jax.random.split(key)
        zx, zh = _zeros(graph, nf)
        zx, zh = first(params, zx, zh, jnp.float32(levels[0]), jnp.bool_(True), graph, jax.random.split(key)[1],
                       jnp.float32(temperature))
        tick(zx)
        zx, zh = fix(zx, zh, 0.0, 1.0)
        for s in levels[1:]:
            zx, zh = again(params, zx, zh, jnp.float32(s), graph)
            tick(zx)
            zx, zh = fix(zx, zh, 0.0, 1.0)
        return zx, zh


def _zeros(graph, nf: int):
    return jnp.zeros(graph.positions.shape, jnp.float32), jnp.zeros((len(graph.node_mask), nf), jnp.float32)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Ancestral("ancestral", "diffusion", 1000, takes_resample=True),
    Ode("ode", "diffusion", 18),
    Inpaint("inpaint", "diffusion", 100),  # 1000 calls add ~2 points of stable completions (docs/models.md)
    Multistep("multistep", "consistency", 1, takes_sigmas=True, takes_renoise=True),
    Anneal("anneal", "consistency", 1, takes_sigmas=True),
)}
DEFAULT_SAMPLER = {"diffusion": "ancestral", "consistency": "multistep"}


def get_sampler(cfg: RunConfig, name: str | None = None) -> Sampler:
    """The sampler ``name`` (default: the model kind's), refused for a model of the other kind."""
    name = name or DEFAULT_SAMPLER[cfg.kind]
    if name not in SAMPLERS:
        raise MolgenError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    s = SAMPLERS[name]
    if s.kind != cfg.kind:
        fits = ", ".join(n for n, x in SAMPLERS.items() if x.kind == cfg.kind)
        raise MolgenError(f"--sampler {name} applies to {s.kind} models; this is a {cfg.kind} model ({fits})")
    return s
