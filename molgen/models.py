"""Models on disk: a model folder (config.json, params.msgpack with the EMA parameters in float32, meta.json
with the card's recommended sampling settings and headline, README.md the card, recipe files), the shipped
models inside the package, and training run folders read as models (their latest checkpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from molgen import MolgenError, did_you_mean
from molgen.config import RunConfig
from molgen.io_utils import STDIO, atomic_write_bytes, atomic_write_text, check_folder, read_json_object
from molgen.rundir import CHECKPOINTS, checkpoint_steps, run_folder_at

CONFIG_NAME = "config.json"
PARAMS_NAME = "params.msgpack"
META_NAME = "meta.json"


@dataclass
class Model:
    """A loaded model: its config, its (EMA) parameters, and its card's meta.json (plus ``source``, the folder)."""

    cfg: RunConfig
    params: Any
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.meta.get("source", "")).name

    @property
    def temperature(self) -> float:
        """The card's recommended sampling temperature (1: the plain samplers)."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def renoise(self) -> float | None:
        """The card's recommended re-noising scale of the multistep sampler (None: the temperature)."""
        r = self.meta.get("renoise")
        return None if r is None else float(r)

    @property
    def type_bias(self) -> dict[str, float]:
        """The card's recommended type bias, by element, for molecules of two or more calls (none: {})."""
        return self._card_bias("type_bias")

    @property
    def type_bias_one_call(self) -> dict[str, float]:
        """The card's recommended type bias for molecules of one call (none: {})."""
        return self._card_bias("type_bias_one_call")

    @property
    def polisher(self) -> str | None:
        """The diffusion model the card names to polish this model's molecules (`--polish N`; None: none named)."""
        name = self.meta.get("polisher")
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise MolgenError(f"{self.name}: meta.json's polisher must name a model, e.g. \"edm-small-polisher\", "
                              f"got {name!r}")
        return name

    def _card_bias(self, key: str) -> dict[str, float]:
        from molgen.readout import parse_type_bias

        given = self.meta.get(key) or {}
        try:
            return parse_type_bias(",".join(f"{k}={v}" for k, v in given.items())) if given else {}
        except (MolgenError, AttributeError):
            raise MolgenError(f"{self.name}: meta.json's {key} must map elements to biases from 0 to below 0.25, "
                              f'e.g. {{"N": 0.2}}, got {given!r}') from None


def weights_root() -> Path:
    """The folder of shipped models: inside the installed package, or ``weights/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "weights", here.parent / "weights"):
        if cand.is_dir() and any(cand.glob(f"*/{PARAMS_NAME}")):
            return cand
    return here / "weights"


def shipped_models() -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sorted(weights_root().glob(f"*/{PARAMS_NAME}"))}


def default_model(fix: bool = False) -> str | None:
    """The shipped model ``molgen sample`` uses without ``--checkpoint`` (weights/DEFAULT); with ``fix``, the one
    it completes a fragment with (weights/DEFAULT-FIX, else the same)."""
    for name in ("DEFAULT-FIX", "DEFAULT") if fix else ("DEFAULT",):
        f = weights_root() / name
        if f.exists():
            return f.read_text().strip()
    return next(iter(shipped_models()), None)


def write_params(path: Path, params) -> None:
    """Parameters as float32 arrays in flax's msgpack format, written atomically."""
    from flax import serialization

    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    atomic_write_bytes(path, serialization.msgpack_serialize(params))


def read_params(path: Path, cfg: RunConfig, remedy: str = "export or download the model again"):
    """Parameters written by :func:`write_params`, checked against the network ``cfg`` describes; a damaged or
    foreign file: one line, MolgenError."""
    from flax import serialization

    try:
        params = serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as e:  # msgpack's errors for a truncated or foreign file
        raise MolgenError(f"{path}: damaged ({e}); {remedy}") from None
    check_params(params, cfg, path)
    return params


def save_model(out_dir: Path, cfg: RunConfig, params, meta: dict | None = None) -> None:
    """Write a model folder: config.json, params.msgpack (float32) and meta.json, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_params(out_dir / PARAMS_NAME, params)
    cfg.save(out_dir / CONFIG_NAME)
    if meta is not None:
        atomic_write_text(out_dir / META_NAME, json.dumps(meta, indent=2))


def checkpoint_of(path: str | Path) -> tuple[Path, int] | None:
    """(run folder, step) of one of a training run's checkpoints (RUN/checkpoints/STEP); None for any other path."""
    path = Path(path)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS and (path.parent.parent / CONFIG_NAME).is_file():
        return path.parent.parent, int(path.name)
    return None


def config_file(path: Path) -> Path:
    """The config.json that describes the model in a model folder, a run folder or one of a run's checkpoints."""
    ck = checkpoint_of(path)
    return (ck[0] if ck else Path(path)) / CONFIG_NAME


def find_model(name: str | Path | None) -> Path:
    """The folder of a shipped model name, a model folder, a run folder or one of a run's checkpoints (None: the
    shipped default)."""
    if name is None:
        name = default_model()
        if name is None:
            raise MolgenError("no shipped model found; pass --checkpoint RUN_DIR")
    path = Path(name)
    models = shipped_models()
    if not path.exists() and str(name) in models:
        path = models[str(name)]
    if not path.exists() and (ck := checkpoint_of(path)) is not None:
        if ck[1] in checkpoint_steps(ck[0]):  # RUN/checkpoints/06: step 6, in the folder orbax names 6
            return ck[0] / CHECKPOINTS / str(ck[1])
        raise MolgenError(f"{ck[0]}: no finished checkpoint at step {ck[1]} (its checkpoints: "
                          f"{', '.join(map(str, checkpoint_steps(ck[0]))) or 'none'})")
    if not path.exists():
        raise MolgenError(f"{name}: no such model folder, run folder or shipped model ({did_you_mean(name, models)}"
                          f"shipped: {', '.join(models) or 'none'})")
    if path.is_file():
        raise MolgenError(f"{path}: a file; give a model folder, a run folder or a run's checkpoint")
    if not config_file(path).exists():
        raise MolgenError(f"{path}: not a molgen model folder, run folder or run's checkpoint (no {CONFIG_NAME})")
    return path


def load_model(name: str | Path | None) -> Model:
    """A shipped model by name, a model folder, a training run folder (its latest checkpoint's EMA parameters) or
    one of a run's checkpoints (RUN/checkpoints/STEP: its EMA parameters)."""
    path = find_model(name)
    if (path / PARAMS_NAME).exists():
        cfg = RunConfig.load(path / CONFIG_NAME)
        params = read_params(path / PARAMS_NAME, cfg)
        return Model(cfg, params, {**read_meta(path / META_NAME), "source": str(path)})
    from molgen.state import load_ema_params

    run, step = checkpoint_of(path) or (path, None)
    cfg, params, step = load_ema_params(run, step)
    return Model(cfg, params, {"source": str(run), "step": step})


def read_meta(path: Path) -> dict:
    """A model folder's meta.json ({} without one; damaged: one line, MolgenError)."""
    return read_json_object(path, "a model's meta.json") if path.exists() else {}


def check_params(params, cfg: RunConfig, where) -> None:
    """The parameters are the arrays the config's network has (names and shapes), else one line naming the first
    that differs: a params.msgpack from another model, or a config.json edited after training."""
    from molgen.networks import init_params

    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(a)) for p, a in flat}

    try:
        want = shapes(jax.eval_shape(lambda: init_params(cfg, 0)))
    except Exception as e:  # a config.json whose values build no network (edited by hand, say)
        raise MolgenError(f"{Path(where).parent / CONFIG_NAME}: describes no network molgen can build "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    have = shapes(params)
    for name in sorted(have.keys() | want.keys()):
        if have.get(name) != want.get(name):
            got = "absent" if name not in have else f"shape {have[name]}"
            need = "no such array" if name not in want else f"shape {want[name]}"
            raise MolgenError(f"{where}: does not fit {CONFIG_NAME}'s network: {name} is {got} in the file, the "
                              f"network has {need}")


def load_diffusion_model(name: str | Path, what: str) -> Model:
    """A model that must be a diffusion model (a teacher, a polisher, the source of stages)."""
    m = load_model(name)
    if m.cfg.consistency is not None:
        raise MolgenError(f"{what} {name}: must be a diffusion model, not a consistency model")
    return m


def diffusion_source(cfg: RunConfig) -> str | None:
    """The diffusion model a model came from: itself (None) for a diffusion model, the teacher of a distilled
    model, the diffusion model a consistency model on an EDM network was tuned from."""
    if cfg.distill is not None and cfg.distill.teacher:
        return cfg.distill.teacher
    if cfg.consistency is not None and cfg.diffusion is not None:
        return cfg.init
    return None


def polisher_for(model: Model, name: str | Path | None = None, option: str = "--polisher",
                 calls: int | None = None) -> Model | None:
    """The diffusion model `--polish` calls: ``name``, or by default the polisher the model's card names, else
    :func:`diffusion_model_for`'s. ``calls`` = 0 (no polishing): None, and ``name`` is refused."""
    if calls == 0:
        if name is not None:
            raise MolgenError(f"{option} names the model that --polish N calls; add --polish N")
        return None
    if name is None and model.polisher is not None:
        name = _recorded(model.polisher, "polisher", option)
    return diffusion_model_for(model, name, option)


def diffusion_model_for(model: Model, name: str | Path | None = None, option: str = "--polisher") -> Model:
    """``name``, or by default the model itself (diffusion), its teacher or the diffusion model it was tuned
    from."""
    if name is None:
        if model.cfg.consistency is None:
            return model
        name = diffusion_source(model.cfg)
        if name is None:
            raise MolgenError(f"this model records no diffusion model; name one with {option}")
        name = _recorded(name, "diffusion model", option)
    m = load_diffusion_model(name, option)
    if m.cfg.model.in_node_nf != model.cfg.model.in_node_nf or m.cfg.data.remove_h != model.cfg.data.remove_h:
        raise MolgenError(f"{option} {name}: its atom features or hydrogen setting differ from the model's")
    return m


def _recorded(name: str, what: str, option: str) -> str:
    """A model named by another model's files: a shipped model's bare name is that shipped model (whatever folder
    of that name the working folder holds); a path that is gone falls back to the shipped model of its name."""
    shipped = shipped_models()
    if str(name) in shipped:
        return str(shipped[str(name)])
    if Path(name).exists():
        return name
    if Path(name).name not in shipped:
        raise MolgenError(f"this model's {what} {name} is not here; name one with {option}")
    return str(shipped[Path(name).name])


def _check_destination(dest: Path, force: bool) -> None:
    """Refuse, before any work, a destination that cannot take an exported model: standard output, a file, a
    training run's folder or its checkpoints (even with ``force``: the model's files would replace or mix with the
    run's), a folder that is not empty (unless ``force``) or one that cannot be written."""
    if str(dest) == STDIO:
        raise MolgenError("export to -: a model is a folder and cannot go to standard output; give a folder's name")
    if dest.exists() and not dest.is_dir():
        raise MolgenError(f"{dest} is a file; a model is a folder: choose another destination")
    if (run_dir := run_folder_at(dest)) is not None:
        what = {run_dir: "a training run's folder", run_dir / CHECKPOINTS: "a training run's checkpoints folder"}.get(
            dest.absolute(), "in a training run's checkpoints folder")
        raise MolgenError(f"{dest} is {what}; a model goes into a folder of its own")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise MolgenError(f"{dest} exists and is not an empty folder; choose another destination or pass --force")
    check_folder(dest, "destination")


def export_model(run: str | Path, dest: Path, headline: str = "", temperature: float | None = None,
                 renoise: float | None = None, stack: int = 0, stages_from: str | None = None,
                 force: bool = False, unstack: bool = False) -> Model:
    """Write the latest EMA parameters of a run (or a model folder) as a model folder at ``dest``; with ``stack``
    N, as a stacked model: N denoising stages of ``stages_from`` (default: the model's diffusion source) after
    the network (after a stacked model's own stages), or, for a stacked model without ``stages_from``, its own
    stages re-spread over N levels; with ``unstack``, a stacked model without the stages that run last."""
    if unstack and stack:
        raise MolgenError("--unstack removes a stacked model's last stages and --stack adds or re-spreads them: give one")
    if stages_from is not None and not stack:
        raise MolgenError("--stages-from names the diffusion model whose network --stack N appends; add --stack N")
    if temperature is not None and not (np.isfinite(temperature) and temperature > 0):
        raise MolgenError(f"--temperature must be a positive number, got {temperature}")
    if renoise is not None and not (np.isfinite(renoise) and renoise >= 0):
        raise MolgenError(f"--renoise must be a number >= 0, got {renoise}")
    dest = Path(dest)
    _check_destination(dest, force)
    m = load_model(run)
    if renoise is not None and m.cfg.consistency is None:
        raise MolgenError("--renoise applies to consistency models; this is a diffusion model")
    # a model folder keeps its card's provenance; a run's is its checkpoint (the latest, or the one named)
    meta = {"source_run": m.meta.get("source_run", str(run) if checkpoint_of(run) is None else m.meta["source"]),
            "step": m.meta.get("step"),
            "trained": m.meta.get("trained") or f"{m.meta.get('step')} steps", "headline": headline}
    cfg, params, change, options = _changed_network(m, stack, stages_from, unstack)
    meta["trained"] += change
    # a model folder's sampling defaults go with it unless others are given (a run has none; a type bias is kept)
    temperature = m.meta.get("temperature") if temperature is None else temperature
    renoise = m.meta.get("renoise") if renoise is None else renoise
    if temperature is not None:
        meta["temperature"] = float(temperature)
    if renoise is not None:
        meta["renoise"] = float(renoise)
    for key, value in (("type_bias", m.type_bias), ("type_bias_one_call", m.type_bias_one_call),
                       ("polisher", m.polisher)):
        if value:
            meta[key] = value
    was = None if not dest.exists() else set(dest.iterdir())
    try:
        save_model(dest, cfg, params, meta)
        _write_recipes(Path(m.meta["source"]), m.cfg, dest, meta["trained"], options)
    except BaseException:  # a full disk, Ctrl-C: no half-written model folder is left
        _undo_export(dest, was)
        raise
    return Model(cfg, params, {**meta, "source": str(dest)})


def _changed_network(m: Model, stack: int, stages_from: str | None, unstack: bool):
    """(config, params, what the card's "trained" adds, the export's options) of ``m`` with the stages the export
    asks for: its last stages removed, its own re-spread, or a diffusion model's appended; unchanged without."""
    from molgen.consistency import stack as stacking

    cfg, params = m.cfg, m.params
    if unstack:  # the stages that run last removed
        ucfg, uparams = stacking.unstack(cfg, params)
        n = len(cfg.stack.levels)
        return ucfg, uparams, f", then its last {n} stage{'s' * (n != 1)} removed", "--unstack"
    if stack and cfg.stack is not None and stages_from is None:  # stacked already: its trained stages, at N levels
        old = len(cfg.stack.levels)
        cfg, params = stacking.restack(cfg, params, stack)
        levels = f"{stack} level{'s' * (stack != 1)}"
        return cfg, params, f", then its {old} stages re-spread over {levels} (not trained further)", f"--stack {stack}"
    if stack:  # N stages of a diffusion model appended (after a stacked model's own)
        if cfg.consistency is None:
            raise MolgenError("--stack: the model must be a consistency model, not a diffusion model")
        src = diffusion_model_for(m, stages_from, "--stages-from")
        cfg, params = stacking.stack_model(cfg, params, src.cfg, src.params, stack, source=src.name)
        options = f"--stack {stack}" + (f" --stages-from {stages_from}" if stages_from else "")
        return cfg, params, f", then {stack} denoising stages of {src.name} appended (not trained further)", options
    return cfg, params, "", ""


def _undo_export(dest: Path, was: set[Path] | None) -> None:
    """Remove what an export that failed wrote: the folder it made, or the files it added to an empty one (a
    --force export over a model folder replaced its files one by one, each whole, and is left as it is)."""
    import shutil

    if was is None:
        shutil.rmtree(dest, ignore_errors=True)
    elif not was:
        for p in set(dest.iterdir()) - was:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_recipes(source: Path, cfg: RunConfig, dest: Path, trained: str, options: str):
    """The recipe files of an exported model, unless ``dest`` has its own: a model folder's are copied; a run's
    settings are written as recipe.toml (:func:`molgen.recipes.recipe_of`), with the commands that made it.
    ``options``: the export's options that changed the network (e.g. "--stack 4"), or ""."""
    from molgen import __version__
    from molgen.recipes import recipe_of, to_toml

    if any(dest.glob("recipe*.toml")):  # a --force export into a model folder keeps the recipes its card names
        return
    then = f"\nthen: molgen export RUN {dest.name} {options}" if options else ""
    if (source / PARAMS_NAME).exists():  # a model folder's recipes, the export that changed its network on top
        head = f"# {dest.name}: this recipe's model, {then.strip().replace('RUN', source.name)} (not trained further)"
        for f in sorted(source.glob("recipe*.toml")):
            atomic_write_text(dest / f.name, (head + "\n" if options and f.name == "recipe.toml" else "") + f.read_text())
        return
    header = (f"The settings of the training run {source} ({trained}), written by molgen export {__version__}.\n"
              f"Train it again: molgen train --recipe {dest / 'recipe.toml'} --out runs/{dest.name}" + then)
    atomic_write_text(dest / "recipe.toml", to_toml(recipe_of(cfg), header))
