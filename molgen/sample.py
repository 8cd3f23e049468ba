"""Sampling: N molecules in k network calls each, from a diffusion or a consistency checkpoint.

Atom counts come from the training histogram stored in the checkpoint's config (or are fixed).  Molecules
are generated in batches packed as one graph each; every batch's random key is ``fold_in(seed, batch)``, so
the same checkpoint, seed and options give identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from molgen import MolgenError
from molgen.chem.elements import N_TYPES
from molgen.chem.io import Molecule
from molgen.config import RunConfig
from molgen.data.batching import pack

WEIGHTS_CONFIG = "config.json"
WEIGHTS_PARAMS = "params.msgpack"


# ----------------------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------------------


def weights_root() -> Path:
    """The folder of shipped models: inside the installed package, or ``weights/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "weights", here.parent / "weights"):
        if cand.is_dir() and any(cand.glob(f"*/{WEIGHTS_PARAMS}")):
            return cand
    return here / "weights"


def shipped_models() -> dict[str, Path]:
    root = weights_root()
    return {p.parent.name: p.parent for p in sorted(root.glob(f"*/{WEIGHTS_PARAMS}"))}


def default_model() -> str | None:
    root = weights_root()
    f = root / "DEFAULT"
    if f.exists():
        return f.read_text().strip()
    models = shipped_models()
    return next(iter(models), None)


def save_weights(out_dir: Path, cfg: RunConfig, params, meta: dict | None = None) -> None:
    """A shipped model: config.json + EMA parameters as float32 msgpack (+ meta.json)."""
    from flax import serialization

    from molgen.io_utils import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    atomic_write_bytes(out_dir / WEIGHTS_PARAMS, serialization.msgpack_serialize(params))
    cfg.save(out_dir / WEIGHTS_CONFIG)
    if meta is not None:
        atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))


def load_model(checkpoint: str | Path | None) -> tuple[RunConfig, Any, dict]:
    """(config, parameters, info) from a shipped model name, a weights folder, or a training run folder."""
    from flax import serialization

    if checkpoint is None:
        name = default_model()
        if name is None:
            raise MolgenError("no shipped model found; pass --checkpoint RUN_DIR")
        checkpoint = name
    path = Path(checkpoint)
    models = shipped_models()
    if not path.exists() and str(checkpoint) in models:
        path = models[str(checkpoint)]
    if not path.exists():
        known = ", ".join(models) or "none"
        raise MolgenError(f"{checkpoint}: no such checkpoint folder or shipped model (shipped: {known})")
    if not (path / WEIGHTS_CONFIG).exists():
        raise MolgenError(f"{path}: not a molgen checkpoint (no {WEIGHTS_CONFIG})")
    if (path / WEIGHTS_PARAMS).exists():
        cfg = RunConfig.load(path / WEIGHTS_CONFIG)
        params = serialization.msgpack_restore((path / WEIGHTS_PARAMS).read_bytes())
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        return cfg, params, {"source": str(path), **meta}
    from molgen.train import load_ema_params

    cfg, params, step = load_ema_params(path)
    return cfg, params, {"source": str(path), "step": step}


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def load_refiner(cfg: RunConfig, name: str | Path | None = None) -> tuple[RunConfig, Any, str]:
    """The diffusion model that ``--refine`` calls: ``name``, or by default the model itself (diffusion),
    the teacher it was distilled from (distill) or the diffusion model it was tuned from (ect).

    A recorded path that is gone (a run folder, or ``weights/NAME`` outside the source tree) falls back to
    the shipped model of the same name."""
    if name is None:
        name = {"distill": cfg.teacher, "ect": cfg.init}.get(cfg.mode)
        if name is None and cfg.mode != "diffusion":
            raise MolgenError(f"--refine: a {cfg.mode} model records no diffusion model; name one with --refiner")
        if name is not None and not Path(name).exists():
            if Path(name).name not in shipped_models():
                raise MolgenError(f"--refine: this model's diffusion model {name} is not here; name one with --refiner")
            name = Path(name).name
    if name is None:
        return cfg, None, ""
    rcfg, rparams, meta = load_model(name)
    if rcfg.mode != "diffusion":
        raise MolgenError(f"--refiner {name}: the refiner must be a diffusion model, not {rcfg.mode!r}")
    if rcfg.model.in_node_nf != cfg.model.in_node_nf or rcfg.remove_h != cfg.remove_h:
        raise MolgenError(f"--refiner {name}: its atom features or hydrogen setting differ from the model's")
    return rcfg, rparams, Path(meta.get("source", str(name))).name


def draw_sizes(cfg: RunConfig, n: int, seed: int, atoms: int | None = None, stream: int = 7) -> np.ndarray:
    """Atom counts: ``atoms`` each, or drawn from the training histogram with the random stream (seed, stream)."""
    if atoms is not None:
        if atoms < 1:
            raise MolgenError("--atoms must be at least 1")
        return np.full(n, atoms, np.int32)
    hist = np.asarray(cfg.size_hist, np.float64)
    if hist.sum() <= 0:
        raise MolgenError("the checkpoint has no atom-count histogram; pass --atoms")
    rng = np.random.default_rng([seed, stream])
    return rng.choice(len(hist), size=n, p=hist / hist.sum()).astype(np.int32)


SAMPLERS = ("ancestral", "ode", "refine")
ODE_SIGMA_MAX, ODE_SIGMA_MIN = 80.0, 0.002  # the ODE sampler's Karras levels (VE noise levels), then 0


def check_temperature(temperature: float) -> float:
    """The sampling temperature must be a positive, finite number."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise MolgenError(f"--temperature must be a positive number, got {temperature}")
    return float(temperature)


def check_renoise(renoise: float) -> float:
    """The re-noising scale of the k-step consistency sampler: a finite number >= 0 (0: no noise added)."""
    if not (np.isfinite(renoise) and renoise >= 0):
        raise MolgenError(f"--renoise must be a number >= 0, got {renoise}")
    return float(renoise)


def sampler_kind(cfg: RunConfig, sampler: str = "ancestral") -> str:
    """'diffusion' (EDM's ancestral sampler), 'ode' (a diffusion model's probability-flow ODE), 'consistency'
    (one call, then re-noise and call again) or 'refine' (one call, then f at lower levels, no re-noising)."""
    if sampler not in SAMPLERS:
        raise MolgenError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if cfg.mode != "diffusion":
        if sampler == "ode":
            raise MolgenError(f"--sampler {sampler} applies to diffusion models; this is a {cfg.mode} model")
        return "refine" if sampler == "refine" else "consistency"
    if sampler == "refine":
        raise MolgenError("--sampler refine applies to consistency models; for a diffusion model use --refine N")
    return "ode" if sampler == "ode" else "diffusion"


def noise_levels(cfg: RunConfig, steps: int, sigmas: Sequence[float] | None = None,
                 sampler: str = "ancestral") -> list[float]:
    """The per-step schedule: times 1 -> 0 for diffusion, noise levels sigma for consistency models and for
    the ODE sampler (``steps`` Heun steps on Karras levels from 80 to 0.002, then 0)."""
    if steps < 1:
        raise MolgenError("--steps must be at least 1")
    kind = sampler_kind(cfg, sampler)
    if kind not in ("consistency", "refine") and sigmas:
        raise MolgenError("--sigmas applies to consistency models only")
    if kind == "ode":
        from molgen.diffusion.ode import karras_levels

        return karras_levels(steps, ODE_SIGMA_MIN, ODE_SIGMA_MAX)
    if kind == "diffusion":
        from molgen.diffusion.edm import respaced_times

        if steps > cfg.diffusion.timesteps:
            raise MolgenError(f"--steps {steps} exceeds the model's {cfg.diffusion.timesteps} diffusion steps")
        return [float(t) for t in respaced_times(steps)]
    from molgen.consistency.ict import default_sigmas

    if sigmas:
        s = [float(x) for x in sigmas]
        if len(s) != steps:
            raise MolgenError(f"--sigmas gives {len(s)} levels for --steps {steps}")
        if any(b >= a for a, b in zip(s, s[1:])) or s[-1] <= cfg.consistency.sigma_min:
            raise MolgenError("--sigmas must decrease and stay above sigma_min")
        return s
    if kind == "refine":
        from molgen.refine import refine_levels

        return [float(cfg.consistency.sigma_max)] + refine_levels(steps - 1)
    return default_sigmas(steps, cfg.consistency)


def network_calls(cfg: RunConfig, levels: list[float], sampler: str = "ancestral") -> int:
    """Network calls per molecule of a schedule from :func:`noise_levels`."""
    kind = sampler_kind(cfg, sampler)
    if kind == "ode":
        from molgen.diffusion.ode import n_calls

        return n_calls(levels)
    return len(levels) - 1 if kind == "diffusion" else len(levels)


def make_step_fn(cfg: RunConfig, apply_fn: Callable | None = None, sampler: str = "ancestral"):
    from molgen.train import make_apply

    if apply_fn is None:
        _, apply_fn = make_apply(cfg)
    kind = sampler_kind(cfg, sampler)
    if kind == "ode":  # the denoiser D(y, sigma); heun_solve calls it
        from molgen.diffusion.ode import edm_denoiser

        return jax.jit(edm_denoiser(apply_fn, cfg.diffusion))
    if kind == "diffusion":
        from molgen.diffusion.edm import make_sampler_step

        return jax.jit(make_sampler_step(apply_fn, cfg.diffusion))
    from molgen.consistency.ict import make_sampler_step as cm_step
    from molgen.consistency.stack import make_model_fn

    cfn = make_model_fn(cfg, apply_fn)  # a stacked model's stages run inside this one call
    first = jax.jit(cm_step(cfn, cfg.consistency))
    if kind == "refine":  # the first call as in 'consistency', then f without re-noising
        from molgen.refine import make_refine_step

        return first, jax.jit(make_refine_step(cfn))
    return first


def sample_batch(cfg: RunConfig, params, step_fn, sizes: np.ndarray, levels: list[float], key,
                 sampler: str = "ancestral", polish=None, temperature: float = 1.0,
                 renoise: float | None = None):
    """Generate one packed batch; returns (positions list, types list).

    ``polish = (refine_step, params, levels)`` refines the result with another model (``--refine``).
    ``temperature`` scales every Gaussian the sampler draws: the starting noise and, for the ancestral
    samplers, the noise added at each later step (1: the plain samplers). ``renoise`` (default: the
    temperature) replaces it for the noise the k-step consistency sampler adds before each call after the
    first: x + renoise * sqrt(s^2 - sigma_min^2) z (1: the standard multistep sampler; 0: none)."""
    from molgen.diffusion.noise import sample_noise

    g = pack(None, [np.zeros(int(n), np.int32) for n in sizes])
    nf = cfg.n_features
    k0, key = jax.random.split(key)
    kind = sampler_kind(cfg, sampler)
    temp = jnp.float32(temperature)
    later = temp if renoise is None else jnp.float32(renoise)  # the k-step sampler's re-noising
    if kind == "ode":
        from molgen.diffusion.ode import heun_solve

        zx, zh = sample_noise(k0, g, nf)
        zx, zh = heun_solve(step_fn, params, temp * zx, temp * zh, g, levels)
    elif kind == "diffusion":
        zx, zh = sample_noise(k0, g, nf)
        zx, zh = temp * zx, temp * zh
        for i in range(len(levels) - 1):
            key, k = jax.random.split(key)
            zx, zh = step_fn(params, zx, zh, jnp.float32(levels[i]), jnp.float32(levels[i + 1]), g, k, temp)
    elif kind == "refine":
        from molgen.refine import refine

        first, again = step_fn
        zx = jnp.zeros(g.positions.shape, jnp.float32)
        zh = jnp.zeros((len(g.node_mask), nf), jnp.float32)
        zx, zh = first(params, zx, zh, jnp.float32(levels[0]), jnp.bool_(True), g, jax.random.split(key)[1], temp)
        zx, zh = refine(again, params, zx, zh, g, levels[1:])
    else:
        zx = jnp.zeros(g.positions.shape, jnp.float32)
        zh = jnp.zeros((len(g.node_mask), nf), jnp.float32)
        for i, s in enumerate(levels):
            key, k = jax.random.split(key)
            zx, zh = step_fn(params, zx, zh, jnp.float32(s), jnp.bool_(i == 0), g, k, temp if i == 0 else later)
    if polish is not None:
        from molgen.refine import refine

        p_step, p_params, p_levels = polish
        zx, zh = refine(p_step, p_params, zx, zh, g, p_levels)
    x = np.asarray(zx)
    types = np.argmax(np.asarray(zh)[:, :N_TYPES], axis=-1)
    out_x, out_t = [], []
    o = 0
    for n in sizes:
        out_x.append(x[o : o + n].astype(np.float64))
        out_t.append(types[o : o + n].astype(np.int8))
        o += n
    return out_x, out_t


def sample(
    cfg: RunConfig,
    params,
    n: int,
    steps: int,
    seed: int = 0,
    atoms: int | None = None,
    batch_size: int = 1000,
    sigmas: Sequence[float] | None = None,
    progress: Callable[[int], None] | None = None,
    apply_fn: Callable | None = None,
    sampler: str = "ancestral",
    refine_steps: int = 0,
    refiner: tuple[RunConfig, Any] | None = None,
    temperature: float = 1.0,
    renoise: float | None = None,
) -> list[Molecule]:
    """``n`` molecules in ``steps`` steps: network calls for the ancestral, consistency and refine samplers;
    Heun steps (2 calls each, 1 for the last) for ``sampler="ode"`` (diffusion models).  ``refine_steps``
    more calls of the diffusion model ``refiner = (config, params)`` follow (:mod:`molgen.refine`).
    ``temperature`` scales the sampler's Gaussian noise, ``renoise`` the k-step consistency sampler's
    re-noising (:func:`sample_batch`)."""
    if n < 1:
        raise MolgenError("-n must be at least 1")
    if batch_size < 1:
        raise MolgenError("--batch-size must be at least 1")
    check_temperature(temperature)
    if renoise is not None:
        check_renoise(renoise)
    levels = noise_levels(cfg, steps, sigmas, sampler)
    sizes = draw_sizes(cfg, n, seed, atoms)
    step_fn = make_step_fn(cfg, apply_fn, sampler)
    polish = None
    if refine_steps > 0:
        if refiner is None:
            raise MolgenError("refinement needs a diffusion model (--refiner)")
        from molgen.diffusion.ode import edm_denoiser
        from molgen.refine import make_refine_step, refine_levels
        from molgen.train import make_apply

        rcfg, rparams = refiner
        _, r_apply = make_apply(rcfg)
        polish = (jax.jit(make_refine_step(edm_denoiser(r_apply, rcfg.diffusion))), rparams,
                  refine_levels(refine_steps))
    base = jax.random.PRNGKey(seed)
    mols: list[Molecule] = []
    for b, s in enumerate(range(0, n, batch_size)):
        bs = sizes[s : s + batch_size]
        xs, ts = sample_batch(cfg, params, step_fn, bs, levels, jax.random.fold_in(base, b), sampler, polish,
                              temperature, renoise)
        for x, t in zip(xs, ts):
            mols.append(Molecule(t, x, name=f"molgen_{len(mols)}"))
        if progress:
            progress(len(bs))
    return mols
