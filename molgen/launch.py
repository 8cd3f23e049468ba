"""Starting or continuing a training run: the config from a recipe and the command line, the models the run
starts from or learns from (loaded here, once, and handed to the objective as parameters), the data (QM9, or
the distillation pairs made for the run and kept in it), then the loop (:func:`molgen.train.train`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax

from molgen import MolgenError
from molgen.config import RunConfig
from molgen.consistency.distill import (BALANCE_TOP, PAIR_STREAM, PAIRS_NAME, PairSet, balance_pairs, check_pairs,
                                        keep_stable, make_pairs, n_held_out, ode_solver, polish_solver)
from molgen.consistency.polisher import POLISH_STREAM, check_examples, example_steps, make_examples, n_examples
from molgen.io_utils import check_room
from molgen.models import Model, config_file, find_model, load_diffusion_model, load_model, read_params, write_params
from molgen.networks import model_fn
from molgen.objectives import get_objective
from molgen.nn.egnn import PRESETS
from molgen.recipes import CHOICES, apply_table, check_settings, merge, parse_set, read_recipe, to_config
from molgen.state import CONFIG_NAME

ANCHOR_NAME = "anchor.msgpack"  # a distillation run's copy of its anchor's parameters


@dataclass
class Request:
    """What `molgen train` was asked: a recipe, overrides, and the few common settings given directly."""

    out: Path
    recipe: str | None = None
    objective: str | None = None
    sets: tuple[str, ...] = ()
    resume: bool = False
    init: str | None = None
    teacher: str | None = None
    model: str | None = None  # a preset name
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    precision: str | None = None  # of training: auto, float32, tf32, bf16


def _direct(req: Request, teacher_section: str = "distill") -> dict:
    """The directly given settings as recipe tables (--teacher in the objective's section: distill or polish)."""
    d: dict = {}
    if req.objective:
        d["objective"] = req.objective
    if req.seed is not None:
        d["seed"] = req.seed
    if req.model:
        d["model"] = {"preset": req.model}
    given = (("steps", req.steps), ("batch_size", req.batch_size), ("lr", req.lr), ("precision", req.precision))
    optim = {k: v for k, v in given if v is not None}
    if optim:
        d["optim"] = optim
    if req.teacher:
        d[teacher_section] = {"teacher": str(req.teacher)}
    return d


def _teacher_section(objective: str | None) -> str:
    return "polish" if objective == "polish" else "distill"


def check_request(req: Request) -> None:
    """Refusals that need no file read: nonsense numbers."""
    if req.steps is not None and req.steps < 1:
        raise MolgenError(f"--steps must be at least 1, got {req.steps}")
    if req.batch_size is not None and req.batch_size < 1:
        raise MolgenError(f"--batch-size must be at least 1, got {req.batch_size}")
    if req.lr is not None and not 0 < req.lr < float("inf"):
        raise MolgenError(f"--lr must be a positive number, got {req.lr}")
    if req.seed is not None and not 0 <= req.seed < 2**32:
        raise MolgenError(f"--seed must be in 0 .. 2^32 - 1, got {req.seed}")
    choices = {"--model": (req.model, tuple(PRESETS)), "--precision": (req.precision, CHOICES["optim"]["precision"])}
    for option, (value, names) in choices.items():
        if value is not None and value not in names:
            raise MolgenError(f"{option} must be one of {', '.join(names)}, got {value!r}")


def resolve_config(req: Request) -> RunConfig:
    """The run's config before data and models are read: a resumed run's own (steps, batch size and learning
    rate may change), else recipe (default: the objective's shipped recipe) + --set + direct options."""
    check_request(req)
    if req.resume:
        path = Path(req.out) / CONFIG_NAME
        if not path.exists():
            raise MolgenError(f"--resume: {req.out} holds no run (no {CONFIG_NAME}); start a new run without --resume")
        return _resumed(RunConfig.load(path), req)
    if req.objective:
        get_objective(req.objective)  # a known one, before its recipe is looked for
    name = req.recipe or req.objective or "diffusion"
    base = read_recipe(name)
    if req.objective and req.recipe and base.get("objective", req.objective) != req.objective:
        raise MolgenError(f"--objective {req.objective} contradicts recipe {req.recipe}, whose objective is "
                          f"{base['objective']}; give one of them")
    given = merge(base, parse_set(list(req.sets)))
    recipe = merge(given, _direct(req, _teacher_section(req.objective or given.get("objective"))))
    cfg = to_config(recipe)
    get_objective(cfg.objective)  # a known objective
    check_settings(cfg)
    if req.teacher and cfg.objective not in ("distill", "polish"):
        raise MolgenError(f"--teacher names the diffusion model a distill or polish run learns from; objective "
                          f"{cfg.objective} has none")
    cfg = cfg.replace(init=str(req.init) if req.init else cfg.init)
    if cfg.init and req.model:
        raise MolgenError(f"--model: the run takes its network from --init {cfg.init}")
    _check_start(cfg)  # before the data and models are read
    return cfg


def _flat(tables: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tables.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resumed(cfg: RunConfig, req: Request) -> RunConfig:
    """A resumed run's own config with the optimiser settings asked for (steps, batch size, lr, precision,
    --set optim.*). Any other setting given (the same command again, with --resume) must be the run's own."""
    asked = merge(merge(read_recipe(req.recipe) if req.recipe else {}, parse_set(list(req.sets))),
                  _direct(req, _teacher_section(cfg.objective)))
    if req.init:
        asked["init"] = str(req.init)
    optim = asked.pop("optim", {})
    for key, want in _flat(asked).items():
        if key == "model.preset":  # a run records its network's size, not the preset's name
            p, sized = PRESETS.get(want), asked["model"]  # the preset's size, or the one asked with it
            size = p and f"{sized.get('nf', p.nf)}x{sized.get('n_layers', p.n_layers)}"
            have = f"{cfg.model.nf}x{cfg.model.n_layers}"
            if size != have:
                raise MolgenError(f"--resume continues the run in {req.out} as it was configured: its network is "
                                  f"{have}, not {want}{f' ({size})' if p else ''} (only optimiser settings may change)")
            continue
        have = cfg
        for part in key.split("."):
            have = getattr(have, part, None) if have is not None else None
        if have != want and not (isinstance(have, tuple) and list(have) == want):
            raise MolgenError(f"--resume continues the run in {req.out} as it was configured: its {key} is "
                              f"{have!r}, not {want!r} (only optimiser settings may change)")
    cfg = cfg.replace(optim=apply_table(type(cfg.optim), "optim", optim, cfg.optim))
    check_settings(cfg)
    return cfg


def _kind_of(name: str) -> str:
    """What a model or run computes (diffusion or consistency), from its config alone."""
    return RunConfig.load(config_file(find_model(name))).kind


def _check_start(cfg: RunConfig) -> None:
    """What --init (and a distill run's teacher) must be for the objective, checked from their configs before
    any parameters or data are read."""
    objective = get_objective(cfg.objective)
    want = objective.init
    teacher = (cfg.polish.teacher if cfg.objective == "polish" and cfg.polish else
               cfg.distill.teacher if cfg.distill is not None else "")
    if teacher and _kind_of(teacher) != "diffusion":
        raise MolgenError(f"--teacher {teacher}: must be a diffusion model, not a consistency model")
    if cfg.objective == "polish" and cfg.polish and cfg.polish.start and _kind_of(cfg.polish.start) != "consistency":
        raise MolgenError(f"polish.start {cfg.polish.start}: must be a consistency model (its molecules are polished)")
    if want == "none" and cfg.init:
        raise MolgenError(f"--init: objective {cfg.objective} trains from scratch")
    if want not in ("none", "optional") and not cfg.init:
        raise MolgenError(f"objective {cfg.objective} needs --init (a {want} model)")
    kind, have = (want if want != "optional" else objective.kind), cfg.init and _kind_of(cfg.init)
    if have and have != kind:
        raise MolgenError(f"--init {cfg.init}: objective {cfg.objective} starts from a {kind} model, not a {have} model")


def _start_model(cfg: RunConfig) -> Model | None:
    """The model --init names (of the kind the objective starts from: checked by :func:`resolve_config`)."""
    return load_model(cfg.init) if cfg.init else None


def _anchor(cfg: RunConfig, student: Model | None, run_dir: Path, resume: bool):
    """The distillation anchor's parameters (None without an anchor share). A new run keeps a copy in its folder
    (``anchor.msgpack``), which a resumed run reads: it needs neither the anchor's folder nor the directory a
    relative ``--init`` was given from."""
    if cfg.distill is None or cfg.distill.anchor_fraction <= 0:
        return None
    name, kept = cfg.distill.anchor or cfg.init, Path(run_dir) / ANCHOR_NAME
    if resume and kept.exists():
        return read_params(kept, cfg, f"delete it to read the anchor {name} again")
    a = student if student is not None and name == cfg.init else load_model(name)
    if a.cfg.model != cfg.model or a.cfg.consistency != cfg.consistency or a.cfg.stack != cfg.stack:
        raise MolgenError(f"anchor {name}: its network or noise levels differ from the student's")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_params(kept, a.params)
    return a.params  # molgen.train puts them on the devices as buffers of their own


def prepare_pairs(cfg: RunConfig, run_dir: Path, student: Model | None, progress_factory=None) -> PairSet:
    """The run's pairs: loaded from ``run_dir/pairs.npz``, or made with the teacher (and for polished targets,
    the student) and saved there."""
    from molgen.sizes import draw_sizes

    path = Path(run_dir) / PAIRS_NAME
    dcfg = cfg.distill
    if path.exists():
        return check_pairs(PairSet.load(path), path, dcfg)
    if not dcfg.teacher:
        raise MolgenError("objective distill needs --teacher (a diffusion model)")
    teacher = load_diffusion_model(dcfg.teacher, "--teacher")
    if teacher.cfg.model.in_node_nf != cfg.model.in_node_nf:
        raise MolgenError(f"--teacher {dcfg.teacher}: its atom features do not match the student's")
    sizes = draw_sizes(cfg, dcfg.pairs, cfg.seed, stream=PAIR_STREAM)
    # the stable ones kept are known only once made: room for all of them, rather than lose the teacher's work
    made = f"{dcfg.pairs:,} pairs" + (", before the stable ones are kept," if dcfg.keep == "stable" else "")
    check_room(path, PairSet.least_bytes(sizes, cfg.n_features), "--out", f"{made} take")
    denoise = jax.jit(model_fn(teacher.cfg))
    if dcfg.targets == "polished":
        solve = polish_solver(jax.jit(model_fn(student.cfg)), student.params, denoise, teacher.params,
                              dcfg.polish_calls, cfg.consistency)
    else:
        solve = ode_solver(denoise, teacher.params, dcfg.teacher_steps, cfg.consistency)
    progress = progress_factory(f"{dcfg.targets} targets", dcfg.pairs) if progress_factory else None
    pairs = make_pairs(solve, sizes, cfg.seed, cfg.n_features, n_held_out(dcfg.pairs, cfg.optim.batch_size), progress,
                       dcfg.polish_calls if dcfg.targets == "polished" else 0, dcfg.pair_temperature)
    if dcfg.keep == "stable":  # a batch larger than what is kept is refused after the pairs are saved
        pairs = keep_stable(pairs)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    pairs.save(path)
    return pairs


def prepare_examples(cfg: RunConfig, run_dir: Path, own: Model | None, progress_factory=None) -> PairSet:
    """A polish run's examples (:mod:`molgen.consistency.polisher`): loaded from ``run_dir/pairs.npz``, or made
    with the start model, the teacher and the trained model's starting parameters (``own``) and saved there."""
    from molgen.sizes import draw_sizes

    path, pcfg = Path(run_dir) / PAIRS_NAME, cfg.polish
    if path.exists():
        return check_examples(PairSet.load(path), path, pcfg, cfg.n_features)
    if own is None:
        raise MolgenError(f"{path} is gone: a polish run cannot make its examples again when resumed; start it anew")
    if not pcfg.teacher:
        raise MolgenError("objective polish needs --teacher (the diffusion model whose polishing is learnt)")
    teacher = load_diffusion_model(pcfg.teacher, "--teacher")
    start = load_model(pcfg.start or None)
    for name, m in (("--teacher", teacher), ("polish.start", start)):
        if m.cfg.model.in_node_nf != cfg.model.in_node_nf or m.cfg.data.remove_h != cfg.data.remove_h:
            raise MolgenError(f"{name} {m.meta.get('source')}: its atom features or hydrogen setting differ from "
                              "the trained model's")
    if start.cfg.consistency is None:
        raise MolgenError(f"polish.start {pcfg.start}: must be a consistency model (its molecules are polished)")
    sizes = draw_sizes(cfg, pcfg.molecules, cfg.seed, stream=POLISH_STREAM)
    each = n_examples(pcfg) // pcfg.molecules  # examples a molecule makes, with its atoms and features + level
    check_room(path, each * PairSet.least_bytes(sizes, cfg.n_features + 1), "--out",
               f"{n_examples(pcfg):,} polishing examples take")
    steps = example_steps(jax.jit(model_fn(start.cfg)), start.params, jax.jit(model_fn(teacher.cfg)), teacher.params,
                          jax.jit(model_fn(own.cfg)), own.params, start.cfg.consistency,
                          pcfg.temperature if start.renoise is None else start.renoise, cfg.seed)
    progress = progress_factory("polishing examples", pcfg.molecules) if progress_factory else None
    ex = make_examples(*steps, sizes, cfg.seed, pcfg, cfg.n_features, cfg.optim.batch_size, progress)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    ex.save(path)
    return ex


def _check_pair_count(cfg: RunConfig, run_dir: Path) -> None:
    """Enough pairs (examples) for two batches, checked before any are made."""
    if (Path(run_dir) / PAIRS_NAME).exists():
        return
    b = cfg.optim.batch_size
    if cfg.objective == "polish":
        if n_examples(cfg.polish) < 2 * b:
            raise MolgenError(f"polish.molecules {cfg.polish.molecules} make too few examples for batch size {b}")
    elif cfg.distill.pairs < 2 * b:
        raise MolgenError(f"distill.pairs {cfg.distill.pairs} is too few for batch size {b}")


def launch(req: Request, data_dir: Path | None = None, progress: str | None = None, log: Callable = print,
           progress_factory=None, max_seconds: float | None = None):
    """Resolve, check, prepare and run; returns (config, :class:`molgen.train.TrainResult`)."""
    from molgen.parallel import is_main
    from molgen.rundir import check_run_dir, hold_run
    from molgen.steps import check_devices

    cfg = resolve_config(req)
    check_run_dir(req.out, req.resume)  # before anything is read or made
    check_devices(cfg, jax.device_count())  # before a distillation's pairs are made, say
    _check_data(cfg, data_dir)
    log(f"training {cfg.objective} | batch {cfg.optim.batch_size} | {cfg.optim.steps} steps | devices "
        f"{jax.device_count()} ({jax.devices()[0].platform}) | {req.out}")
    if not is_main():  # the process that writes the run's files holds its folder
        return _run(cfg, req, data_dir, progress, log, progress_factory, max_seconds)
    with hold_run(req.out):  # refuses a folder that another process holds; train() checks it again inside
        return _run(cfg, req, data_dir, progress, log, progress_factory, max_seconds)


def _check_data(cfg: RunConfig, data_dir) -> None:
    """A run on QM9: the batch fits its training split (the cache's manifest says how large), checked before the
    run is announced."""
    from molgen.data.qm9 import default_data_dir, read_manifest

    if cfg.objective == "distill" and cfg.distill.balance > 0:  # before the pairs are made
        from molgen.data.qm9 import require_reference

        require_reference(data_dir, "distill.balance resamples the pairs toward QM9's molecules")
    if get_objective(cfg.objective).pairs:  # a distillation's pairs are checked when made or read
        return
    manifest = read_manifest(Path(data_dir) if data_dir else default_data_dir())
    if manifest is not None:  # without one, reading the cache says what to do
        _check_batch(cfg, int(manifest["splits"]["train"]))


def _check_batch(cfg: RunConfig, n_train: int, kept: str | None = None) -> None:
    """The batch fits the training split; ``kept``: a distillation's pairs were filtered (what was kept)."""
    b = cfg.optim.batch_size
    if b > n_train:
        why = (f"{kept}: too few for batch size {b}; draw more (distill.pairs) or" if kept else
               f"batch size {b} is larger than the training split ({n_train:,} molecules);")
        raise MolgenError(f"{why} give a smaller --batch-size")


def _run(cfg: RunConfig, req: Request, data_dir, progress, log, progress_factory, max_seconds):
    from molgen.data.qm9 import load_qm9
    from molgen.train import train

    objective = get_objective(cfg.objective)
    start = None if req.resume else _start_model(cfg)
    if objective.pairs:
        if start is not None:
            cfg = objective.configure(cfg, None, start.cfg)
        if cfg.objective == "polish" and not cfg.polish.start:  # the run records which model it polished
            from molgen.models import default_model

            cfg = cfg.replace(polish=dataclasses.replace(cfg.polish, start=default_model() or ""))
        _check_pair_count(cfg, req.out)
        prepare = prepare_examples if cfg.objective == "polish" else prepare_pairs
        ds = prepare(cfg, req.out, start, progress_factory)
        if cfg.objective == "distill" and cfg.distill.balance > 0:
            from molgen.data.qm9 import training_heteroatom_shares

            before = len(ds.split("train"))
            ds = balance_pairs(ds, training_heteroatom_shares(data_dir, BALANCE_TOP), cfg.distill.balance)
            log(f"training pairs resampled toward QM9's numbers of N, O and F atoms (distill.balance "
                f"{cfg.distill.balance:g}): {before:,} -> {len(ds.split('train')):,}")
    else:
        ds = load_qm9(data_dir, remove_h=cfg.data.remove_h)
        if not req.resume:
            cfg = objective.configure(cfg, ds, start.cfg if start else None)
    filtered = objective.pairs and ds.kept == "stable"
    kept = f"{ds.drawn:,} pairs drawn, {len(ds):,} with a stable target" if filtered else None
    _check_batch(cfg, len(ds.split("train")), kept)
    res = train(cfg, req.out, ds, resume=req.resume, init_params=start.params if start else None,
                anchor_params=_anchor(cfg, start, req.out, req.resume), progress=progress, log=log, max_seconds=max_seconds)
    return cfg, res
