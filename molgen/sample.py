"""Sampling: N molecules from a model, in batches packed as one graph each.

Atom counts come from the training histogram stored in the model's config (or are fixed). Every batch's random
key is ``fold_in(seed, batch)``, so the same model, seed and settings give the same molecules. Settings left out
are the model card's (meta.json: temperature, re-noising), so Python callers and the command line sample alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import jax
import numpy as np

from molgen import MolgenError
from molgen.calls import Calls
from molgen.chem.io import Molecule
from molgen.consistency.stack import describe_network
from molgen.data.batching import sampling_graph
from molgen.diffusion.edm import denoiser
from molgen.diffusion.levels import low_ladder
from molgen.diffusion.inpaint import make_inpaint_polish_step
from molgen.diffusion.polish import make_polish_step
from molgen.fragment import first_rows
from molgen.models import Model
from molgen.networks import network
from molgen.readout import bias_text, parse_type_bias, read_types
from molgen.samplers import get_sampler
from molgen.sizes import BATCH, atoms_text, check_request, check_whole, default_batch_size, draw_sizes, parse_atoms

FEW_DIFFUSION_STEPS = (50, 30)  # a fragment completed by a diffusion model in fewer sampler steps (without, with
#                               --polish) is warned of (docs/models.md, "Completing a fragment")
FRAGMENT_STREAM = 104729  # the fixed noise of a fragment's atoms: its own random stream


# The jitted functions of a (sampler, model config), kept so that later calls on the same model (--keep's rounds,
# a Python caller's loop) reuse their traced and compiled programs instead of compiling them again.
@lru_cache(maxsize=8)
def _prepared(s, cfg, formula=None):
    return _prepare(s, cfg, None, formula)


def _prepare(s, cfg, apply=None, formula=None):
    """The sampler's jitted functions; with a formula, a stacked model imposes it before each of its stages too."""
    if formula is None or cfg.stack is None:
        return s.prepare(cfg, apply)
    from molgen.formula import formula_types

    return s.prepare(cfg, apply, between=formula_types(formula))


@lru_cache(maxsize=4)
def _polish_step(cfg, keeps_fragment: bool = False):
    """A polishing step of the diffusion model ``cfg``: step(params, x, h, sigma, graph, fixed); ``keeps_fragment``
    (a model trained to complete fragments, given one): the fragment's atoms are given clean and kept
    (:func:`molgen.diffusion.inpaint.make_inpaint_polish_step`), else ``fixed`` is ignored."""
    apply = network(cfg)[1]
    if keeps_fragment:
        return jax.jit(make_inpaint_polish_step(apply, cfg.diffusion))
    step = make_polish_step(denoiser(apply, cfg.diffusion))
    return jax.jit(lambda params, x, h, sigma, graph, fixed: step(params, x, h, sigma, graph))


@dataclass
class Samples:
    molecules: list[Molecule]
    settings: dict  # what made them, as recorded in every SDF record / XYZ frame (molgen_*)
    calls: int  # network calls per molecule, polishing included
    seconds: float = 0.0
    description: str = ""
    drawn: int = 0  # molecules drawn to keep these (--keep); 0: all drawn are kept


def parse_levels(text: str | None) -> list[float] | None:
    """``--sigmas``: comma-separated noise levels."""
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise MolgenError(f"--sigmas: expected comma-separated numbers, got {text!r}") from None


def parse_options(sigmas: str | None = None, type_bias: str | None = None, atoms: str | None = None, fix=None,
                  formula: str | None = None):
    """`molgen sample`'s options given as text, read and checked: (levels, type bias, atoms, fragment, formula),
    each None when not given (the type bias: {}). ``fix``: the fragment file's name as given (one that ends with a
    separator names a folder, and is refused)."""
    from molgen.formula import parse_formula
    from molgen.fragment import read_fragment
    from molgen.io_utils import file_path

    return (parse_levels(sigmas), parse_type_bias(type_bias), parse_atoms(atoms),
            read_fragment(file_path(str(fix), "--fix")) if fix is not None else None,
            parse_formula(formula) if formula is not None else None)


def check_positive(name: str, value: float, zero_ok: bool = False) -> float:
    if not (np.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        raise MolgenError(f"{name} must be a {'number >= 0' if zero_ok else 'positive number'}, got {value}")
    return float(value)


def plan(model: Model, steps: int | None = None, sampler: str | None = None, sigmas: Sequence[float] | None = None,
         temperature: float | None = None, renoise: float | None = None, polish_calls: int = 0, seed: int = 0,
         resample: int = 0, fixing: bool = False, formula: bool = False, type_bias: dict | None = None):
    """(sampler, levels, settings, renoise): every choice checked and resolved (the card's defaults) before any
    work. ``fixing``: a fragment will be completed (``resample`` needs one); ``formula``: molecules of a formula
    (a consistency sampler's, whose calls end on clean molecules: :mod:`molgen.formula`); ``type_bias``
    (:func:`parse_type_bias`; None: the card's for that many calls) is recorded as ``molgen_type_bias``."""
    if not 0 <= seed < 2**32:
        raise MolgenError(f"--seed must be in 0 .. 2^32 - 1, got {seed}")
    if fixing and formula:
        raise MolgenError("--formula and --fix: give one of them")
    if sampler is None and fixing and model.cfg.inpaint is not None:
        sampler = "inpaint"  # a model trained to complete fragments completes them so
    s = get_sampler(model.cfg, sampler)
    if s.name == "inpaint" and not (fixing and model.cfg.inpaint is not None):
        why = "is not" if model.cfg.inpaint is None else "needs --fix"
        raise MolgenError(f"--sampler inpaint completes a fragment (--fix FILE) with a model trained to (objective "
                          f"inpaint); {model.name} {why}")
    if steps is None:  # levels given: one step each
        steps = len(sigmas) if sigmas and s.takes_sigmas else s.default_steps
    check_whole("--steps", steps)
    if steps < 1:
        raise MolgenError("--steps must be at least 1")
    if sigmas and not s.takes_sigmas:
        raise MolgenError(f"--sigmas applies to the consistency samplers, not {s.name}")
    if polish_calls < 0 or resample < 0:
        raise MolgenError(f"--{'polish' if polish_calls < 0 else 'resample'} must be >= 0")
    if resample and not fixing:
        raise MolgenError("--resample applies when completing a fragment; add --fix FILE")
    if formula and s.kind != "consistency":
        raise MolgenError(f"--formula needs a consistency model (each call ends on a clean molecule, whose atoms take "
                          f"the formula's types); {model.name} is a {s.kind} model (molgen models lists the others)")
    if resample and not s.takes_resample:
        raise MolgenError(f"--resample applies to the ancestral sampler of diffusion models, not {s.name}")
    temperature = check_positive("--temperature", model.temperature if temperature is None else temperature)
    if renoise is not None and not s.takes_renoise:
        raise MolgenError(f"--renoise applies to the multistep sampler of consistency models, not {s.name}")
    if s.takes_renoise:  # given, else the card's, else the temperature
        r = renoise if renoise is not None else model.renoise if model.renoise is not None else temperature
        renoise = check_positive("--renoise", r, zero_ok=True)
    levels = s.levels(model.cfg, steps, sigmas)
    settings = {"molgen_model": model.name, "molgen_sampler": s.name, "molgen_steps": steps,
                "molgen_calls": s.calls(levels, resample) + polish_calls, "molgen_temperature": temperature}
    if "step" in model.meta and "source_run" not in model.meta:  # read from a training run: which checkpoint
        settings["molgen_checkpoint_step"] = model.meta["step"]
    if resample:
        settings["molgen_resample"] = resample
    if model.cfg.stack is not None:
        settings["molgen_network"] = describe_network(model.cfg)
    if s.takes_renoise and steps > 1:
        settings["molgen_renoise"] = renoise
    if formula and type_bias:
        raise MolgenError("--type-bias with --formula: the formula gives every atom's type")
    if type_bias is None:  # the card's, where it was measured to help (its own for one call), never a formula's
        one = settings["molgen_calls"] == 1
        type_bias = {} if formula else model.type_bias_one_call if one else model.type_bias
    if any(type_bias.values()):
        settings["molgen_type_bias"] = bias_text(type_bias)
    return s, levels, settings, renoise


def sample(model: Model, n: int, steps: int | None = None, seed: int = 0, atoms: int | tuple[int, int] | None = None,
           batch_size: int | None = None, sampler: str | None = None, sigmas: Sequence[float] | None = None,
           temperature: float | None = None, renoise: float | None = None, polish_calls: int = 0,
           polisher: Model | None = None, progress: Callable[[int], None] | None = None,
           apply: Callable | None = None, fragment=None, resample: int = 0, decimals: int | None = None,
           formula=None, type_bias: dict | None = None, shapes: list | None = None) -> Samples:
    """``n`` molecules in ``steps`` sampler steps (default: the sampler's), then ``polish_calls`` calls of the
    diffusion model ``polisher`` on the low ladder. ``progress(k)`` is told of every k network calls done on a batch
    (the total is calls x batches). ``atoms``: every molecule's atom count, or a range (lo, hi) to draw them from
    the training histogram within (default: the whole histogram). ``apply``: the network's apply function (default:
    the model's). ``fragment`` (:class:`molgen.fragment.Fragment`): every molecule completes it, its first atoms
    being the fragment's, in the fragment's own frame (:mod:`molgen.fragment`); ``resample``: RePaint's resampling
    rounds per step (ancestral sampler). ``decimals``: coordinates rounded to as many decimals (`molgen sample`
    rounds them to what its file holds, :data:`molgen.chem.io.DECIMALS`, so that its report describes the file).
    ``formula`` (:class:`molgen.formula.Formula`): every molecule has it (:mod:`molgen.formula`). ``type_bias``
    ({element: bias}, :func:`parse_type_bias`; None: the card's): added to the network's last type outputs before
    each atom's type is read from them. ``shapes``: padded batch shapes to share with other calls
    (:func:`molgen.data.batching.sampling_graph`). ``batch_size``: molecules sampled together (default:
    :func:`molgen.sizes.default_batch_size`)."""
    atoms = formula_atoms(formula, atoms, fragment)
    check_request(model.cfg, n, batch_size, atoms, fragment.size if fragment is not None else 0)
    batch_size = batch_size_for(model, batch_size, atoms)
    s, levels, settings, renoise = plan(model, steps, sampler, sigmas, temperature, renoise, polish_calls, seed,
                                        resample, fragment is not None, formula is not None, type_bias)
    if polish_calls and polisher is None:
        raise MolgenError("polishing needs a diffusion model (--polisher)")
    sizes = sample_sizes(model, n, seed, atoms, fragment)
    fns = _prepare(s, model.cfg, apply, formula) if apply is not None else _prepared(s, model.cfg, formula)
    if fragment is not None:
        settings["molgen_fixed_atoms"] = fragment.size
    if formula is not None:
        settings["molgen_formula"] = str(formula)
    settings.update(molgen_seed=seed, molgen_batch_size=batch_size)  # with the rest, what draws these molecules again
    pol = None
    if polish_calls:
        keeps = fragment is not None and polisher.cfg.inpaint is not None
        pol = (_polish_step(polisher.cfg, keeps), polisher.params, low_ladder(polish_calls), keeps)
        settings.update(molgen_polish=polish_calls, molgen_polisher=polisher.name)
    calls = Calls(progress)  # followed as they finish: progress, and signals acting within a call
    base = jax.random.PRNGKey(seed)
    mols: list[Molecule] = []
    t0 = time.time()
    for b, start in enumerate(range(0, n, batch_size)):
        bs = sizes[start : start + batch_size]
        g = sampling_graph(bs, shapes)
        nf, key = model.cfg.n_features, jax.random.fold_in(jax.random.fold_in(base, FRAGMENT_STREAM), b)
        fix = _fixer(fragment, formula, bs, g, nf, key, s.name == "inpaint")
        x, h = s.run(fns, model.params, g, nf, jax.random.fold_in(base, b), levels,
                     settings["molgen_temperature"], renoise, calls, fix, resample)
        if pol is not None:
            x, h = _polish(pol, x, h, g, bs, fragment, fix, nf, key, calls)
        calls.finish()
        mols += _molecules(x, h, bs, len(mols), settings, fragment, decimals)
    return Samples(mols, settings, settings["molgen_calls"], time.time() - t0, _describe(model, s, settings))


def _polish(pol, x, h, g, sizes, fragment, fix, nf: int, key, tick):
    """A batch after the polishing calls ``pol`` = (step, parameters, levels, keeps the fragment). A polisher not
    trained with fragments moves the whole molecule: the fragment (or formula) is put back after each call, as
    replacement does (the inpaint sampler's fix is its known rows, not a replacement: one is made here)."""
    step, params, levels, keeps = pol
    fixed = first_rows(fragment.size if keeps else 0, sizes, len(g.node_mask))
    put = None
    if fix is not None and not keeps:
        put = fix if callable(fix) else _fixer(fragment, None, sizes, g, nf, key)
    for lv in levels:
        x, h = step(params, x, h, np.float32(lv), g, fixed)
        tick(x)
        x, h = (x, h) if put is None else put(x, h, 0.0, 1.0)
    return x, h


def _molecules(x, h, sizes, first: int, settings: dict, fragment=None, decimals: int | None = None) -> list[Molecule]:
    """A packed batch's molecules (named from ``molgen_{first}`` on): positions in the fragment's input frame when
    completing one, rounded to ``decimals``; types read from ``h``, plus the settings' type bias."""
    x, types = np.asarray(x), read_types(h, parse_type_bias(settings.get("molgen_type_bias", "0")))
    out, o = [], 0
    for k in sizes:
        pos = x[o : o + k].astype(np.float64)
        if fragment is not None:
            from molgen.fragment import to_input_frame

            pos = to_input_frame(fragment, pos)
        if decimals is not None:
            pos = np.round(pos, decimals)
        out.append(Molecule(types[o : o + k].astype(np.int8), pos, name=f"molgen_{first + len(out)}",
                            props=dict(settings)))
        o += k
    return out


def sample_sizes(model: Model, n: int, seed: int = 0, atoms: int | tuple[int, int] | None = None, fragment=None,
                 formula=None) -> np.ndarray:
    """The atom counts of the molecules :func:`sample` draws with these arguments, in order."""
    return draw_sizes(model.cfg, n, seed, formula_atoms(formula, atoms, fragment),
                      above=fragment.size if fragment is not None else 0)


def formula_atoms(formula, atoms: int | tuple[int, int] | None, fragment=None) -> int | tuple[int, int] | None:
    """The atom count (or range) to sample: ``atoms``, or with a formula its size (``atoms``, when given, must
    agree)."""
    if formula is None:
        return atoms
    if fragment is not None:
        raise MolgenError("--formula and --fix: give one of them")
    lo, hi = atoms if isinstance(atoms, tuple) else (atoms, atoms) if atoms is not None else (0, formula.size)
    if not lo <= formula.size <= hi:
        raise MolgenError(f"--atoms {atoms_text(lo, hi)} contradicts --formula {formula} ({formula.size} atoms); "
                          "drop --atoms")
    return formula.size


def _fixer(fragment, formula, sizes, graph, nf: int, key, rows: bool = False):
    """fix(x, h, level, scale) for one batch (None without a constraint): its known atoms are the fragment's
    (molgen.fragment), or its atoms take the formula's types (molgen.formula). ``rows``: the fragment's known rows
    themselves (:class:`molgen.fragment.Known`), for the ``inpaint`` sampler."""
    if formula is not None:
        from molgen.formula import formula_fixer

        return formula_fixer(formula, graph)
    if fragment is None:
        return None
    from molgen.fragment import constrain, known_rows

    known = known_rows(fragment, np.asarray(sizes), len(graph.node_mask), nf, key)
    if rows:
        return known
    step = jax.jit(constrain)
    return lambda x, h, level, scale: step(known, x, h, graph, np.float32(level), np.float32(scale))


def batch_size_for(model: Model, batch_size: int | None, atoms: int | tuple[int, int] | None, formula=None,
                   fragment=None) -> int:
    """The molecules :func:`sample` samples together: ``batch_size``, else
    :func:`molgen.sizes.default_batch_size` for the molecules asked for."""
    return batch_size or default_batch_size(model.cfg, formula_atoms(formula, atoms, fragment))


def preflight(model: Model, n: int, batch_size: int | None, atoms: int | tuple[int, int] | None, fragment,
              calls: int, formula=None, polish: int = 0) -> list[str]:
    """Before sampling: refuse counts that cannot be sampled (:func:`check_request`), then say when large molecules
    make the default batch smaller, and warn of ``atoms`` beyond the trained sizes, a fragment completed in one call
    (or in few steps of a diffusion model), a formula given in one call, a polisher sampling alone. ``calls``: per
    molecule, ``polish`` polishing calls included."""
    given, atoms = atoms, formula_atoms(formula, atoms, fragment)
    check_request(model.cfg, n, batch_size, atoms, fragment.size if fragment is not None else 0)
    out = []
    batch = batch_size_for(model, batch_size, atoms)
    if batch < min(n, BATCH):
        out.append(f"note: {batch:,} molecules at a time, to bound the memory that large molecules take "
                   "(--batch-size sets it)")
    sizes = [i for i, c in enumerate(model.cfg.data.size_hist) if c > 0]
    if isinstance(atoms, int) and sizes and not sizes[0] <= atoms <= sizes[-1]:
        out.append(f"warning: this model was trained on molecules of {sizes[0]}-{sizes[-1]} atoms; expect poor "
                   f"molecules with " + (f"--atoms {atoms}" if given is not None else f"--formula {formula}"))
    if fragment is not None and calls == 1 and model.cfg.kind == "consistency":
        out.append("warning: with one call the fragment is placed after the only call; use --steps 4")
    steps = calls - polish
    if fragment is not None and model.cfg.kind == "diffusion" and steps < FEW_DIFFUSION_STEPS[polish > 0]:
        out.append(f"warning: a diffusion model completes fragments poorly in {steps} sampler steps; use --steps 100, "
                   f"or --steps 50 --polish 16")
    if formula is not None and calls == 1 and model.cfg.stack is None:  # a stacked call gives them to its stages
        out.append("warning: with one call the formula's types are given after the only call, to a molecule made "
                   "without them; use --steps 4")
    if model.cfg.objective == "polish":
        out.append("warning: this model was taught to polish molecules, not to make them; give it as --polisher")
    return out


def nonfinite_warning(molecules: list[Molecule], fmt: str) -> str | None:
    """A warning when some molecules' coordinates are not finite (the sampler diverged, e.g. at a huge
    temperature or noise level): SDF cannot hold them."""
    bad = sum(not np.all(np.isfinite(m.positions)) for m in molecules)
    if not bad:
        return None
    how = "SDF writes their coordinates as 0 and marks them (molgen_nonfinite)" if fmt == "sdf" else "XYZ writes nan"
    return f"warning: {bad} of {len(molecules)} molecules have non-finite coordinates (the sampler diverged); {how}"


def _describe(model: Model, s, settings: dict) -> str:
    """How the molecules were made, in words (the command line's summary)."""
    parts = [f"{model.cfg.objective} model, {s.name} sampler, {settings['molgen_steps']} step"
             + ("s" if settings["molgen_steps"] > 1 else "")]
    if "molgen_network" in settings:
        parts.append(f"network {settings['molgen_network']}")
    if settings["molgen_temperature"] != 1.0:
        parts.append(f"temperature {settings['molgen_temperature']:g}")
    if "molgen_renoise" in settings and settings["molgen_renoise"] != settings["molgen_temperature"]:
        parts.append(f"re-noise {settings['molgen_renoise']:g}")
    if "molgen_formula" in settings:
        parts.append(f"formula {settings['molgen_formula']}")
    if "molgen_type_bias" in settings:
        parts.append(f"type bias {settings['molgen_type_bias']}")
    if "molgen_resample" in settings:
        parts.append(f"{settings['molgen_resample']} resampling rounds per step")
    if "molgen_polish" in settings:
        parts.append(f"+ {settings['molgen_polish']} polishing calls of {settings['molgen_polisher']}")
    calls = settings["molgen_calls"]
    parts.append(f"{calls} network call{'s' if calls > 1 else ''} per molecule")
    return ", ".join(parts)
