"""Recipes: training settings as TOML files, read with the standard library.

A recipe holds ``objective`` and ``seed`` at the top and one table per section of :class:`molgen.config.RunConfig`:
``[model]`` (``preset`` = tiny | small | base | edm, and/or any EGNN field), ``[diffusion]``, ``[consistency]``,
``[distill]``, ``[inpaint]``, ``[polish]``, ``[optim]``, ``[data]``. What a recipe leaves out keeps its default.
``molgen train --recipe R`` takes a file or the name of a recipe shipped in ``molgen/recipes/`` (one per
objective); ``--set section.key=value`` overrides single values (TOML syntax; bare words are strings). Unknown keys
are errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

from molgen import MolgenError, did_you_mean
from molgen.config import RunConfig
from molgen.consistency.distill import KEEPS, TARGETS
from molgen.data.device import LAYOUTS
from molgen.networks import PRECISIONS
from molgen.nn.egnn import PRESETS

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
SECTIONS = ("model", "diffusion", "consistency", "stack", "distill", "inpaint", "polish", "optim", "data")
TOP = ("objective", "seed", "init")


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


def read_recipe(recipe: str | Path) -> dict:
    """A recipe file's tables, or a shipped recipe's by name."""
    path = Path(recipe)
    if not path.exists():
        shipped = shipped_recipes()
        if str(recipe) not in shipped:
            raise MolgenError(f"{recipe}: no such recipe file or shipped recipe ({did_you_mean(recipe, shipped)}"
                              f"shipped: {', '.join(shipped)})")
        path = shipped[str(recipe)]
    if path.is_dir():
        raise MolgenError(f"{path}: a folder; --recipe takes a TOML file or a shipped recipe's name")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark, as some editors save
    except tomllib.TOMLDecodeError as e:
        raise MolgenError(f"{path}: not a valid TOML recipe ({e})") from None
    except UnicodeDecodeError as e:
        raise MolgenError(f"{path}: not a valid TOML recipe (not UTF-8 text: {e.reason} at byte {e.start})") from None
    _check_tables(recipe, str(path))  # before a merge could replace a value with a table
    return recipe


def _check_tables(recipe: dict, where: str) -> None:
    for name in SECTIONS:
        if name in recipe and not isinstance(recipe[name], dict):
            raise MolgenError(f"{where}: {name} must be a table of settings ([{name}]), got {recipe[name]!r}")


def parse_set(items: list[str]) -> dict:
    """``--set section.key=value`` items as nested tables (value in TOML syntax, else a string)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MolgenError(f"--set {item!r}: expected section.key=value")
        try:
            v = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            v = value.strip()
        *path, last = key.split(".")
        if not path and last in SECTIONS and not isinstance(v, dict):
            hint = " (a preset: --model NAME)" if last == "model" else ""
            raise MolgenError(f"--set {item!r}: [{last}] is a table; set one of its settings, "
                              f"--set {last}.SETTING=VALUE{hint}")
        node = out
        for i, p in enumerate(path):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MolgenError(f"--set {item!r}: {'.'.join(path[:i + 1])} is a value, not a table")
        node[last] = v
    return out


def merge(base: dict, over: dict) -> dict:
    """``over``'s values on top of ``base``'s, table by table."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_table(cls, name: str, table: dict, base):
    """``base`` (a dataclass instance of ``cls``) with the table's values, checked against its fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in table.items():
        if k not in fields:
            raise MolgenError(f"recipe: [{name}] has no setting {k!r} (settings: {', '.join(fields)})")
        cur = getattr(base, k)
        if isinstance(cur, bool) and not isinstance(v, bool):
            raise MolgenError(f"recipe: {name}.{k} must be true or false, got {v!r}")
        if isinstance(cur, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        elif cur is not None and not isinstance(v, type(cur)):
            kind = {"int": "an integer", "float": "a number", "str": "a string"}.get(type(cur).__name__, type(cur).__name__)
            raise MolgenError(f"recipe: {name}.{k} must be {kind}, got {v!r}")
        kw[k] = v
    return dataclasses.replace(base, **kw)


def _at_least(lo):
    return lambda v: v >= lo, f"at least {lo}"


POSITIVE = (lambda v: v > 0, "positive")


def _within(lo, hi, closed_hi=False):
    return (lambda v: lo <= v <= hi) if closed_hi else (lambda v: lo <= v < hi), f"in [{lo}, {hi}{']' if closed_hi else ')'}"


# What each numeric setting must be for a run to make sense (checked before any work starts).
LIMITS: dict[str, dict[str, tuple]] = {
    "model": {"nf": _at_least(1), "n_layers": _at_least(1), "inv_sublayers": _at_least(1),
              "coords_range": POSITIVE, "normalization_factor": POSITIVE, "norm_constant": _at_least(0)},
    "diffusion": {"timesteps": _at_least(1), "precision": (lambda v: 0 < v < 0.5, "in (0, 0.5)"),
                  "power": POSITIVE},
    "consistency": {"sigma_min": POSITIVE, "sigma_max": POSITIVE, "rho": POSITIVE,
                    "sigma_data_x": POSITIVE, "sigma_data_h": POSITIVE, "p_std": POSITIVE,
                    "s0": _at_least(1), "s1": _at_least(1), "total_steps": _at_least(0), "huber_scale": POSITIVE},
    "distill": {"pairs": _at_least(2), "teacher_steps": _at_least(1), "polish_calls": _at_least(0),
                "pair_temperature": POSITIVE, "anchor_fraction": _within(0, 1, closed_hi=True),
                "bond_weight": _at_least(0), "balance": _within(0, 1, closed_hi=True)},
    "inpaint": {"share": _within(0, 1, closed_hi=True), "kept_min": _within(0, 1), "kept_max": _within(0, 1),
                "contiguous": _within(0, 1, closed_hi=True)},
    "polish": {"molecules": _at_least(2), "calls": _at_least(1), "temperature": POSITIVE, "type_weight": _at_least(0),
               "start_calls": (lambda v: len(v) > 0 and all(type(c) is int and c >= 1 for c in v),
                               "a list of call counts, each at least 1")},
    "optim": {"steps": _at_least(1), "batch_size": _at_least(1), "lr": POSITIVE, "warmup": _at_least(0),
              "ema": _within(0, 1), "clip": POSITIVE, "ckpt_every": _at_least(0), "eval_every": _at_least(0),
              "keep": _at_least(1)},
}
# Settings that name one of a few choices (``auto``: the platform's measured fastest; docs/performance.md).
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "optim": {"precision": ("auto", *PRECISIONS), "layout": ("auto", *LAYOUTS)},
    "distill": {"targets": TARGETS, "keep": KEEPS},
}


def check_settings(cfg: RunConfig) -> None:
    """Refuse settings that cannot train (from a recipe, --set or the options), naming the first one."""
    for section, limits in LIMITS.items():
        table = getattr(cfg, section, None)
        for key, (ok, what) in limits.items() if table is not None else ():
            v = getattr(table, key)
            if isinstance(v, float) and not math.isfinite(v) or not ok(v):
                raise MolgenError(f"{section}.{key} must be {what}, got {v}")
    for section, choices in CHOICES.items():
        table = getattr(cfg, section, None)
        for key, names in choices.items() if table is not None else ():
            v = getattr(table, key)
            if v not in names:
                raise MolgenError(f"{section}.{key} must be one of {', '.join(names)}, got {v!r}")
    if not 0 <= cfg.seed < 2**32:
        raise MolgenError(f"seed must be in 0 .. 2^32 - 1, got {cfg.seed}")
    c = cfg.consistency
    if c is not None and not (c.sigma_max > c.sigma_min and c.s1 >= c.s0):
        raise MolgenError("consistency: sigma_max must exceed sigma_min and s1 must be at least s0")
    if cfg.inpaint is not None and cfg.inpaint.kept_min > cfg.inpaint.kept_max:
        raise MolgenError("inpaint: kept_min must be at most kept_max")


def to_config(recipe: dict) -> RunConfig:
    """The run config a recipe describes (sections it leaves out keep their defaults; a section present in the
    recipe is built even when the default has none, e.g. [consistency] or [distill])."""
    from molgen.config import DataConfig, OptimConfig
    from molgen.consistency.distill import DistillConfig
    from molgen.consistency.ict import ConsistencyConfig
    from molgen.consistency.polisher import PolishConfig
    from molgen.diffusion.edm import DiffusionConfig
    from molgen.diffusion.inpaint import InpaintConfig

    unknown = set(recipe) - set(SECTIONS) - set(TOP)
    if unknown:
        raise MolgenError(f"recipe: unknown setting(s) {', '.join(sorted(unknown))} (tables: {', '.join(SECTIONS)})")
    _check_tables(recipe, "recipe")
    for key, kind, what in (("objective", str, "a string"), ("seed", int, "an integer"), ("init", str, "a string")):
        v = recipe.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise MolgenError(f"recipe: {key} must be {what}, got {v!r}")
    cfg = RunConfig(**{k: recipe[k] for k in TOP if k in recipe})
    model = dict(recipe.get("model", {}))
    preset = model.pop("preset", None)
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise MolgenError(f"recipe: model.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base_model = PRESETS[preset] if preset else cfg.model
    kw = {"model": apply_table(type(base_model), "model", model, base_model)}
    classes = {"diffusion": DiffusionConfig, "consistency": ConsistencyConfig, "distill": DistillConfig,
               "inpaint": InpaintConfig, "polish": PolishConfig, "optim": OptimConfig, "data": DataConfig}
    for name, cls in classes.items():
        if name in recipe:
            kw[name] = apply_table(cls, name, recipe[name], getattr(cfg, name) or cls())
    if "stack" in recipe:
        raise MolgenError("recipe: [stack] is made by `molgen export --stack N`, not by a recipe")
    return cfg.replace(**kw)


# Values a run measures on its data, not settings: a recipe leaves them out.
MEASURED = {"data": ("size_hist", "type_fractions"), "consistency": ("sigma_data_x", "sigma_data_h")}


def recipe_of(cfg: RunConfig) -> dict:
    """The recipe that trains a run of ``cfg`` again: objective, seed, --init and every setting of the sections the
    run takes from its recipe (those its objective takes from --init, the stages and measured values left out)."""
    from molgen.objectives import get_objective

    from_init = set(get_objective(cfg.objective).from_init) if cfg.init else set()
    out: dict = {"objective": cfg.objective, "seed": cfg.seed}
    if cfg.init:
        out["init"] = cfg.init
    for section in SECTIONS:
        table = getattr(cfg, section)
        if table is None or section == "stack" or section in from_init:
            continue
        out[section] = {k: v for k, v in dataclasses.asdict(table).items() if k not in MEASURED.get(section, ())}
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "nan" if v != v else "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML value for {v!r}")


def to_toml(recipe: dict, header: str = "") -> str:
    """A recipe (top-level values, then one table per section) as TOML text, ``header`` as comment lines."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    for name, table in recipe.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
