"""molgen's command line: parse options, call the library, print with rich.  Errors in the user's input
are one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from molgen import MolgenError, __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Generate 3D molecules with E(3)-equivariant diffusion and consistency models (QM9).",
)
console = Console()
err = Console(stderr=True)


def _fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _say(msg: str) -> None:
    err.print(escape(msg), highlight=False, soft_wrap=True)


def friendly(fn):
    """Turn MolgenError (and unreadable files) into a one-line error with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except MolgenError as e:
            _fail(str(e))
        except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            _fail(str(e))

    return wrapper


def _version(value: bool):
    if value:
        console.print(f"molgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """molgen: QM9 download, training, sampling and evaluation of 3D molecule generators."""


def _progress_factory(progress):
    """Adapter from the library's progress protocol (description, total) -> tick(n) to a rich Progress."""

    def make(desc: str, total: int | None):
        task = progress.add_task(desc, total=total)
        return lambda n: progress.advance(task, n)

    return make


def _progress(transient: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=transient, disable=not err.is_terminal)


# ----------------------------------------------------------------------------------------------------------
# download / info
# ----------------------------------------------------------------------------------------------------------


class Source(str, Enum):
    archive = "archive"
    qm9pack = "qm9pack"
    file = "file"


@app.command()
@friendly
def download(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Cache folder (default: $MOLGEN_HOME or the platform cache dir)."),
    source: Optional[Source] = typer.Option(None, "--source", help="Use only this source (default: archive, then qm9pack)."),
    from_path: Optional[Path] = typer.Option(None, "--from", help="A local QM9 archive (.tar.bz2), folder of .xyz, or qm9pack CSVs."),
    force: bool = typer.Option(False, "--force", help="Rebuild the cache even if a valid one exists."),
    info: bool = typer.Option(False, "--info", help="Print what is in the cache afterwards."),
    timeout: float = typer.Option(10.0, "--timeout", help="Network timeout in seconds for the publisher's archive."),
):
    """Get QM9 (130,831 molecules) and write the processed cache with EDM's split."""
    from molgen.data.qm9 import default_data_dir
    from molgen.data.qm9 import download as do_download

    t0 = time.time()
    with _progress() as progress:
        path, did = do_download(data_dir, source.value if source else None, from_path, force,
                                _progress_factory(progress), log=_say, timeout=timeout)
    if did:
        console.print(f"QM9 cache written to {path} in {time.time() - t0:.1f} s")
    else:
        console.print(f"QM9 cache already present at {path}")
    if info:
        _info(data_dir or default_data_dir())


def _info(data_dir: Path):
    import numpy as np

    from molgen.data.qm9 import load_qm9, read_manifest

    m = read_manifest(data_dir)
    ds = load_qm9(data_dir)
    t = Table(title=f"QM9 cache: {data_dir}")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("source", str(m.get("source")))
    t.add_row("molecules", f"{len(ds):,}")
    t.add_row("atoms", f"{len(ds.types):,}")
    for k, v in ds.splits.items():
        t.add_row(f"split {k}", f"{len(v):,}")
    n = ds.n_atoms[ds.split("train")]
    t.add_row("atoms per molecule (train)", f"{n.min()}-{n.max()}, mean {n.mean():.2f}")
    console.print(t)
    hist = ds.size_histogram("train")
    h = Table(title="atom-count histogram (train)")
    h.add_column("atoms", justify="right")
    h.add_column("molecules", justify="right")
    h.add_column("")
    peak = hist.max()
    for k in np.nonzero(hist)[0]:
        h.add_row(str(k), f"{hist[k]:,}", "#" * int(round(40 * hist[k] / peak)))
    console.print(h)


@app.command()
@friendly
def info(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Cache folder.")):
    """Show where the QM9 cache is, its counts, split sizes and atom-count histogram."""
    from molgen.data.qm9 import default_data_dir

    _info(data_dir or default_data_dir())


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------


class Mode(str, Enum):
    diffusion = "diffusion"
    ct = "ct"
    ect = "ect"
    distill = "distill"


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"
    edm = "edm"


@app.command()
@friendly
def train(
    mode: Mode = typer.Option(Mode.diffusion, "--mode", help="diffusion (EDM), ct (consistency training), ect (consistency tuning from --init), distill (one-step regression of a consistency model --init onto a diffusion --teacher's ODE)."),
    model: Preset = typer.Option(Preset.small, "--model", help="Network preset: tiny 32x2, small 64x4, base 128x6, edm 256x9."),
    nf: Optional[int] = typer.Option(None, "--nf", help="Override the preset's feature width; with --mode distill, widen the --init network to N features (the new channels start silent, so the student starts as --init)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Override the preset's number of blocks; with --mode distill, deepen the --init network to N blocks (the new blocks start as the identity, so the student starts as --init)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Molecules per step, split across devices (default 64; with --resume, replaces the run's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate after a linear warm-up (default 5e-4, 2e-4 for --mode distill; with --resume, replaces the run's)."),
    warmup: int = typer.Option(500, "--warmup", help="Warm-up steps."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimisation steps (default 10000)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Total epochs instead of --steps."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, data order and noise."),
    remove_h: bool = typer.Option(False, "--remove-h", help="Train on QM9 without hydrogens."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the evaluation parameters."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient clipping (global norm)."),
    out: Path = typer.Option(Path("runs/run"), "--out", help="Run folder (config, checkpoints, metrics.jsonl)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Run or weights folder to start from: a diffusion model for --mode ect (required) or diffusion (a warm start; its network shape is kept), a consistency model for --mode distill (required)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="--mode distill: the diffusion model (run, weights folder or shipped name) whose probability-flow ODE gives the targets."),
    pairs: int = typer.Option(32000, "--pairs", min=2, help="--mode distill: noise -> molecule pairs solved with the teacher (1/32 held out, at most 1000); saved as pairs.npz in --out."),
    teacher_steps: int = typer.Option(18, "--teacher-steps", min=1, help="--mode distill: Heun steps of the teacher's ODE (2 network calls each)."),
    anchor_fraction: float = typer.Option(0.25, "--anchor-fraction", min=0.0, max=0.9, help="--mode distill: share of each batch trained at the low noise levels of k-step sampling to keep the --anchor model's output there (0: one-step only)."),
    anchor: Optional[Path] = typer.Option(None, "--anchor", help="--mode distill: the consistency model whose low-noise behaviour is kept (default: --init)."),
    bond_weight: float = typer.Option(1.0, "--bond-weight", min=0.0, help="--mode distill: weight of a loss on the distances of the target's atom pairs closer than 2 Å (bond lengths; 0 turns it off)."),
    relax_weight: float = typer.Option(0.0, "--relax-weight", min=0.0, help="--mode distill: weight of a term that pulls each one-call molecule towards the teacher's denoising of it at low noise (0.05-0.3), i.e. towards geometries the teacher holds clean (0: off)."),
    relax_rounds: int = typer.Option(0, "--relax-rounds", min=0, help="--mode distill --relax-weight: R > 0 makes that term's target the teacher's R-step refinement of the one-call molecule itself (as `molgen sample --refine R`, no noise) instead of one call on a re-noised copy."),
    dmd_weight: float = typer.Option(0.0, "--dmd-weight", min=0.0, help="--mode distill: weight of distribution matching (DMD): each one-call molecule is pulled towards the teacher's distribution by the difference of the teacher's and a fake model's denoisings of it, the fake model (the teacher's network, from the teacher) being trained on the student's molecules at the same time (0: off; docs/training.md)."),
    refine: int = typer.Option(0, "--refine", min=0, help="--mode distill: R > 0 regresses onto --init's own one-call molecules, each relaxed by R calls of the teacher as `molgen sample --refine R` does (no ODE solve), instead of the teacher's ODE ends (an experiment: docs/training.md)."),
    refine_sigma: float = typer.Option(0.0, "--refine-sigma", min=0.0, max=2.0, help="--mode distill --refine: one noise level (Å) for every teacher call (default 0: levels 0.4 -> 0.1, as in sampling)."),
    pair_temperature: float = typer.Option(1.0, "--pair-temperature", min=0.05, max=2.0, help="--mode distill: draw the pairs' noise at this temperature (the teacher's ODE starts from s_max T z), so the student learns the map where `molgen sample --temperature T` calls it (docs/training.md)."),
    freeze_stages: bool = typer.Option(False, "--freeze-stages", help="--mode distill with a stacked --init (`molgen export --stack`): train its base network only, keeping the denoising stages as they are."),
    eval_every: int = typer.Option(1000, "--eval-every", help="Validation loss every N steps (EMA parameters)."),
    ckpt_every: int = typer.Option(500, "--ckpt-every", help="Checkpoint every N steps."),
    parametrization: Optional[str] = typer.Option(
        None, "--parametrization", metavar="<ict|eps|ict-vp>",
        help="Consistency function: ict (iCT's c_skip/c_out; default for ct), eps (y - sigma * EDM epsilon), "
             "ict-vp (iCT's bounded c_skip/c_out around an EDM network; default for ect)."),
    s1: Optional[int] = typer.Option(None, "--s1", help="Consistency curriculum: final number of discretisation steps."),
    curriculum_steps: Optional[int] = typer.Option(None, "--curriculum-steps", help="Consistency curriculum: steps until it reaches --s1 (default: --steps); later steps stay at --s1."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="QM9 cache folder."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop (with a checkpoint) after this wall time."),
    precision: Optional[str] = typer.Option(
        None, "--precision", metavar="<auto|float32|tf32|bf16>",
        help="Training arithmetic: float32; tf32 (float32 numbers, TensorFloat-32 matrix products on NVIDIA GPUs); "
             "bf16 (bfloat16 matrix products and edge activations, float32 parameters, optimiser, loss, coordinates "
             "and sums). auto (default): float32 on a CPU, tf32 on a GPU, the fastest measured (docs/performance.md). "
             "With --resume, replaces the run's."),
    distributed: bool = typer.Option(False, "--distributed", help="Call jax.distributed.initialize() for multi-host runs."),
    cpu_devices: Optional[int] = typer.Option(
        None, "--cpu-devices", min=1,
        help="Without a GPU: split the CPU into N devices for data parallelism (default: one per core, up to 8, "
             "while the batch splits evenly with >= 8 molecules each). Ignored on a GPU."),
):
    """Train a model on QM9; Ctrl-C saves a checkpoint, --resume continues exactly."""
    import dataclasses

    import jax

    from molgen.config import RunConfig
    from molgen.data.qm9 import load_qm9
    from molgen.nn.egnn import PRESETS
    from molgen.jax_setup import auto_cpu_devices, configure_cpu_devices, enable_compilation_cache
    from molgen.train import CONFIG_NAME, prepare_config
    from molgen.train import train as do_train

    # Before anything starts JAX's backends: the batch size decides how the CPU is split.
    if (batch_size is not None and batch_size < 1) or (lr is not None and lr <= 0):
        raise MolgenError("--batch-size must be >= 1 and --lr > 0")
    if precision is not None and precision not in ("auto", "float32", "tf32", "bf16"):
        raise MolgenError(f"--precision must be auto, float32, tf32 or bf16, not {precision!r}")
    resumed = RunConfig.load(out / CONFIG_NAME) if resume and (out / CONFIG_NAME).exists() else None
    planned_batch = batch_size or (resumed.batch_size if resumed else RunConfig.batch_size)
    if cpu_devices is not None and planned_batch % cpu_devices:
        raise MolgenError(f"--batch-size {planned_batch} is not divisible by --cpu-devices {cpu_devices}")
    if cpu_devices is not None or "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        configure_cpu_devices(cpu_devices or auto_cpu_devices(planned_batch))
    enable_compilation_cache()
    if distributed:
        jax.distributed.initialize()
    if not (0 <= ema < 1):
        raise MolgenError("0 <= --ema < 1 is required")
    init_params = None
    if resumed is not None:
        # A resumed run may change its length, learning rate and batch size; everything else is the run's.
        cfg = resumed.replace(**{k: v for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size))
                                 if v is not None})
    distill = mode == Mode.distill or (resumed is not None and resumed.mode == "distill")
    if distill:  # the data are the teacher's ODE pairs, solved once per run
        from molgen.consistency.distill import prepare_pairs

        if resumed is None:
            cfg, init_params = _distill_config(init, teacher, pairs, teacher_steps, anchor, anchor_fraction,
                                               bond_weight, batch_size, lr, warmup, steps, seed, ema, clip,
                                               ckpt_every, eval_every, out, layers, relax_weight, refine,
                                               refine_sigma, relax_rounds, dmd_weight, pair_temperature, nf,
                                               freeze_stages)
        with _progress(transient=False) as progress:
            ds = prepare_pairs(cfg, out, _progress_factory(progress))
    else:
        ds = load_qm9(data_dir, remove_h=remove_h)
    if resumed is None and not distill:
        batch_size, lr = batch_size or RunConfig.batch_size, lr or RunConfig.lr
        n_steps = steps
        if epochs is not None:
            n_steps = int(round(epochs * len(ds.split("train")) / batch_size))
        n_steps = n_steps or 10000
        net = PRESETS[model.value].replace(nf=nf, n_layers=layers)
        cfg = RunConfig(mode=mode.value, model=net, batch_size=batch_size, lr=lr, warmup=warmup, steps=n_steps,
                        ema=ema, clip=clip, seed=seed, remove_h=remove_h, ckpt_every=ckpt_every,
                        eval_every=eval_every)
        if curriculum_steps is not None and curriculum_steps < 1:
            raise MolgenError("--curriculum-steps must be >= 1")
        cons = dataclasses.replace(cfg.consistency, total_steps=curriculum_steps or n_steps, **({"s1": s1} if s1 else {}))
        if parametrization not in (None, "ict", "eps", "ict-vp"):
            raise MolgenError(f"--parametrization must be ict, eps or ict-vp, not {parametrization!r}")
        if mode == Mode.diffusion and parametrization is not None:
            raise MolgenError("--parametrization is for --mode ct or ect")
        if mode == Mode.ect and init is None:
            raise MolgenError("--mode ect needs --init DIR (a diffusion run or weights folder)")
        if init is not None:
            if mode == Mode.ct:
                raise MolgenError("--init is for --mode ect or diffusion")
            from molgen.sample import load_model

            icfg, init_params, _ = load_model(init)
            if icfg.mode != "diffusion":
                raise MolgenError(f"{init}: --init must be a diffusion model, not {icfg.mode!r}")
            # The network and its diffusion schedule come from the model the run starts from.
            if nf is not None or layers is not None:
                raise MolgenError(f"--nf / --layers: --mode {mode.value} --init takes its network from {init} "
                                  f"({icfg.model.nf} x {icfg.model.n_layers}); only --mode distill can grow it")
            cfg = cfg.replace(model=icfg.model, diffusion=icfg.diffusion, init=str(init), remove_h=icfg.remove_h)
        if mode == Mode.ect:
            if parametrization == "ict":
                raise MolgenError("--mode ect needs --parametrization eps or ict-vp (the network is an EDM network)")
            d = cfg.diffusion
            cons = dataclasses.replace(cons, parametrization=parametrization or "ict-vp", timesteps=d.timesteps,
                                       precision=d.precision, power=d.power)
        elif parametrization is not None:
            cons = dataclasses.replace(cons, parametrization=parametrization)
        cfg = prepare_config(cfg.replace(consistency=cons), ds)
    from molgen.train import resolve_precision

    cfg = cfg.replace(precision=resolve_precision(precision or cfg.precision))
    stacked = "" if cfg.stack is None else f" + {len(cfg.stack.levels)} stages" + (" (frozen)" if cfg.freeze_stages else "")
    err.print(f"training {cfg.mode} | model nf={cfg.model.nf} layers={cfg.model.n_layers}{stacked} | batch {cfg.batch_size} "
              f"| {cfg.steps} steps | devices {jax.device_count()} ({jax.devices()[0].platform}) | precision {cfg.precision} | {out}")
    res = do_train(cfg, out, ds, resume=resume, init_params_from=init_params, progress=err.is_terminal,
                   log=_say, max_seconds=max_minutes * 60 if max_minutes else None)
    console.print(f"stopped at step {int(res.state.step)} ({res.steps_per_s:.2f} steps/s); checkpoint in {out}")
    if res.interrupted:
        raise typer.Exit(130)


def _distill_config(init, teacher, n_pairs, teacher_steps, anchor, anchor_fraction, bond_weight, batch_size, lr,
                    warmup, steps, seed, ema, clip, ckpt_every, eval_every, out, layers=None, relax_weight=0.0,
                    refine=0, refine_sigma=0.0, relax_rounds=0, dmd_weight=0.0, pair_temperature=1.0, nf=None,
                    freeze_stages=False):
    """A new --mode distill run: the student, its network and its noise levels come from --init.

    With ``layers`` / ``nf`` the student is --init deepened to that many blocks / widened to that many features
    (:func:`molgen.nn.egnn.grow_params`).
    With ``dmd_weight`` > 0 the parameters are {"student": --init's, "fake": the teacher's}.
    """
    from molgen.nn.egnn import grow_params
    from molgen.sample import load_model

    if init is None or teacher is None:
        raise MolgenError("--mode distill needs --init (a consistency model) and --teacher (a diffusion model)")
    if relax_rounds > 0 and relax_weight <= 0:
        raise MolgenError("--relax-rounds needs --relax-weight > 0 (it sets how that term's target is made)")
    icfg, init_params, _ = load_model(init)
    if icfg.mode == "diffusion":
        raise MolgenError(f"{init}: --init must be a consistency model (ct, ect or distill), not 'diffusion'")
    if anchor is not None:
        acfg, _, _ = load_model(anchor)
        if acfg.mode == "diffusion" or acfg.model != icfg.model or acfg.stack != icfg.stack:
            raise MolgenError(f"{anchor}: --anchor must be a consistency model with --init's network")
    if layers is not None and layers < icfg.model.n_layers:
        raise MolgenError(f"--layers {layers}: --mode distill can deepen --init's {icfg.model.n_layers} blocks, "
                          "not remove any")
    if nf is not None and nf < icfg.model.nf:
        raise MolgenError(f"--nf {nf}: --mode distill can widen --init's {icfg.model.nf} features, not remove any")
    if freeze_stages and icfg.stack is None:
        raise MolgenError(f"--freeze-stages: {init} has no denoising stages (make a stacked model with `molgen export --stack N`)")
    if icfg.stack is not None and (layers is not None or nf is not None):
        raise MolgenError(f"--layers / --nf: {init} is a stacked model; grow the model before stacking it")
    grown, init_params = grow_params(init_params, icfg.model, layers, seed=seed, nf=nf)  # as is when neither
    icfg = icfg.replace(model=grown)
    cfg = icfg.replace(mode="distill", init=str(init), teacher=str(teacher), n_pairs=n_pairs,
                       teacher_steps=teacher_steps, anchor=str(anchor) if anchor else None,
                       anchor_fraction=anchor_fraction, bond_weight=bond_weight, relax_weight=relax_weight,
                       relax_rounds=relax_rounds, dmd_weight=dmd_weight, refine_rounds=refine, refine_sigma=refine_sigma,
                       pair_temperature=pair_temperature, freeze_stages=freeze_stages,
                       batch_size=batch_size or icfg.batch_size,
                       lr=lr or 2e-4, warmup=warmup, steps=steps or 10000, seed=seed, ema=ema, clip=clip,
                       ckpt_every=ckpt_every, eval_every=eval_every)
    if not (out / "pairs.npz").exists() and n_pairs < 2 * cfg.batch_size:
        raise MolgenError(f"--pairs {n_pairs} is too few for --batch-size {cfg.batch_size}")
    if dmd_weight > 0:
        tcfg, tparams, _ = load_model(teacher)
        if tcfg.mode != "diffusion":
            raise MolgenError(f"{teacher}: the teacher must be a diffusion model, not {tcfg.mode!r}")
        init_params = {"student": init_params, "fake": tparams}
    return cfg, init_params


# ----------------------------------------------------------------------------------------------------------
# sample / evaluate / models
# ----------------------------------------------------------------------------------------------------------


def _metrics_table(m, title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    t.add_row("molecules", f"{m.n_molecules:,}")
    t.add_row("mean atoms", f"{m.mean_atoms:.2f}")
    t.add_row("atom stability", pct(m.atom_stability))
    t.add_row("molecule stability", pct(m.mol_stability))
    t.add_row("validity", pct(m.validity))
    t.add_row("uniqueness (of valid)", pct(m.uniqueness))
    t.add_row("valid & unique", pct(m.valid_and_unique))
    t.add_row("novelty (of unique)", pct(m.novelty) if m.novelty is not None else "not computed")
    t.add_row("connected (1 fragment)", pct(m.connected))
    t.add_row("non-finite coordinates", str(m.n_nonfinite))
    ref = m.reference_type_fractions
    mix = "  ".join(f"{k} {v:.3f}" + (f" ({ref[k]:.3f})" if ref else "") for k, v in m.type_fractions.items())
    t.add_row("atom types" + (" (train)" if ref else ""), mix)
    return t


def _reference(data_dir, remove_h, novelty: bool):
    """(training SMILES or None, training type fractions or None)."""
    from molgen.data.qm9 import cache_is_valid, default_data_dir, load_qm9
    from molgen.evaluate import training_smiles

    d = data_dir or default_data_dir()
    if not cache_is_valid(d, verify_hash=False):
        return None, None
    fr = load_qm9(d, remove_h=remove_h, verify=False).type_fractions("train")
    if not novelty:
        return None, fr
    with _progress() as progress:
        smiles = training_smiles(d, remove_h, _progress_factory(progress))
    return smiles, fr


@app.command()
@friendly
def sample(
    n: int = typer.Option(1000, "-n", "--n", help="Number of molecules."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Network calls per molecule (default: 1 for consistency models, 1000 for diffusion); with --sampler ode, Heun steps (2 calls each, 1 for the last; default 18)."),
    out: Path = typer.Option(Path("out.sdf"), "-o", "--out", help="Output file: .sdf or .xyz."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Shipped model name, weights folder or training run folder (default: the shipped default)."),
    atoms: Optional[int] = typer.Option(None, "--atoms", help="Fix the number of atoms (default: drawn from the training histogram)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    batch_size: int = typer.Option(1000, "--batch-size", help="Molecules generated together."),
    sigmas: Optional[str] = typer.Option(None, "--sigmas", help="Consistency models: comma-separated noise levels, one per step."),
    sampler: str = typer.Option("ancestral", "--sampler", metavar="<ancestral|ode|refine>", help="Diffusion models: EDM's stochastic sampler (ancestral), or the deterministic probability-flow ODE (ode: Heun's method on Karras levels). Consistency models: ancestral re-noises to each next level before calling f again; refine calls f on the molecule itself at levels 0.4 -> 0.1 (no re-noising), which gives more stable molecules per call."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Scale every Gaussian the sampler draws by this factor (the start noise; the re-noising too, unless --renoise or the model's card sets that): below 1 trades a little diversity for stabler molecules (default: the model's recommended value from its card, else 1)."),
    renoise: Optional[float] = typer.Option(None, "--renoise", help="Consistency models, k-step sampler: scale of the noise added before each call after the first (1: the standard multistep sampler, 0: none; default: the model's recommended value from its card, else the temperature)."),
    refine: int = typer.Option(0, "--refine", min=0, help="After sampling, N calls of a diffusion model's denoiser on each molecule at levels 0.4 -> 0.1 (no re-noising): better bonds for N more calls."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="--refine: the diffusion model to call (default: the model itself, its distillation teacher or the diffusion model it was tuned from)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="sdf or xyz (default: from the extension)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Print the stability report of the samples."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    novelty: bool = typer.Option(False, "--novelty", help="Also compute novelty (needs the QM9 cache)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="QM9 cache folder (for novelty and the type mix)."),
):
    """Generate molecules and write them as SDF or XYZ, then print their stability report."""
    from molgen.chem.io import format_of, write_molecules
    from molgen.jax_setup import enable_compilation_cache
    from molgen.sample import (check_renoise, check_temperature, load_model, load_refiner, network_calls,
                               noise_levels, sampler_kind)
    from molgen.sample import sample as do_sample

    enable_compilation_cache()
    fmt = format_of(out, fmt)
    if not out.parent.exists():
        raise MolgenError(f"{out.parent}: output folder does not exist")
    sig = None
    if sigmas:
        try:
            sig = [float(s) for s in sigmas.split(",")]
        except ValueError:
            raise MolgenError(f"--sigmas: expected comma-separated numbers, got {sigmas!r}") from None
    cfg, params, meta = load_model(checkpoint)
    trained_max = max((i for i, c in enumerate(cfg.size_hist) if c > 0), default=0)
    if atoms is not None and trained_max and atoms > trained_max:
        err.print(f"warning: this model was trained on molecules of at most {trained_max} atoms; expect poor "
                  f"molecules with --atoms {atoms}", soft_wrap=True)
    if steps is None:
        steps = 1 if cfg.mode != "diffusion" else (18 if sampler == "ode" else 1000)
    temperature = check_temperature(float(meta.get("temperature", 1.0)) if temperature is None else temperature)
    kstep = sampler_kind(cfg, sampler) == "consistency"
    if kstep:
        renoise = check_renoise(float(meta.get("renoise", temperature) if renoise is None else renoise))
    elif renoise is not None:
        raise MolgenError("--renoise applies to the k-step sampler of consistency models (no re-noising here)")
    calls = network_calls(cfg, noise_levels(cfg, steps, sig, sampler), sampler)  # checks the options too
    if refiner is not None and not refine:
        raise MolgenError("--refiner names the model that --refine N calls; add --refine N")
    polisher, r_name = None, ""
    if refine:
        r_cfg, r_params, r_name = load_refiner(cfg, refiner)
        if r_params is None:  # a diffusion model refines its own samples
            r_params, r_name = params, Path(meta.get("source", "")).name
        polisher = (r_cfg, r_params)
    t0 = time.time()
    with _progress() as progress:
        task = progress.add_task(f"sampling ({steps} step{'s' if steps > 1 else ''}"
                                 f"{f' + {refine} refinement' if refine else ''})", total=n)
        mols = do_sample(cfg, params, n, steps, seed, atoms, batch_size, sig, lambda k: progress.advance(task, k),
                         sampler=sampler, refine_steps=refine, refiner=polisher, temperature=temperature,
                         renoise=renoise)
    t_sample = time.time() - t0
    settings = {"molgen_model": Path(meta.get("source", "")).name, "molgen_mode": cfg.mode,
                "molgen_steps": steps, "molgen_seed": seed, "molgen_temperature": temperature}
    if cfg.mode == "diffusion" or sampler != "ancestral" or refine or cfg.stack is not None:
        settings.update(molgen_sampler=sampler, molgen_calls=calls + refine)
    if cfg.stack is not None:
        from molgen.consistency.stack import describe

        settings.update(molgen_network=describe(cfg))
    if refine:
        settings.update(molgen_refine=refine, molgen_refiner=r_name)
    if kstep and steps > 1:
        settings.update(molgen_renoise=renoise)
    metrics = None
    if report or json_path:
        from molgen.evaluate import evaluate_molecules

        smiles, fr = _reference(data_dir, cfg.remove_h, novelty)
        metrics = evaluate_molecules([m.positions for m in mols], [m.types for m in mols], smiles, fr)
        for m, p in zip(mols, metrics.per_molecule):
            m.props.update(settings)
            m.props.update({"molgen_stable_atoms": f"{p.stable_atoms}/{p.n_atoms}", "molgen_mol_stable": int(p.stable),
                            "molgen_valid": int(p.valid), "molgen_smiles": p.smiles})
    else:
        for m in mols:
            m.props.update(settings)
    write_molecules(out, mols, fmt)
    how = f"{cfg.mode}, ODE {steps} Heun step{'s' if steps > 1 else ''}, " if sampler == "ode" else f"{cfg.mode}, "
    if sampler == "refine":
        how += "refine sampler, "
    if cfg.stack is not None:
        how += f"stacked network {settings['molgen_network']}, "
    if temperature != 1.0:
        how += f"temperature {temperature:g}, "
    if kstep and steps > 1 and renoise != temperature:
        how += f"re-noise {renoise:g}, "
    total = calls + refine
    if refine:
        how += f"{calls} + {refine} of {r_name} = "
    console.print(f"wrote {len(mols)} molecules to {out} ({how}{total} network call{'s' if total > 1 else ''} "
                  f"per molecule, {t_sample:.1f} s sampling)", soft_wrap=True)  # one line, however long the path
    if metrics is not None:
        if report:
            console.print(_metrics_table(metrics, f"samples: {out}"))
        if json_path:
            from molgen.evaluate import write_json

            write_json(json_path, metrics, {"file": str(out), **settings})


@app.command()
@friendly
def evaluate(
    files: list[Path] = typer.Argument(..., help="SDF / XYZ files or folders of them."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Force sdf or xyz."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all metrics as JSON."),
    per_molecule: Optional[Path] = typer.Option(None, "--per-molecule", help="Write each molecule's results as CSV."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="QM9 cache folder whose training split is the novelty reference."),
    remove_h: bool = typer.Option(False, "--remove-h", help="Compare against the training set without hydrogens."),
    no_novelty: bool = typer.Option(False, "--no-novelty", help="Skip novelty."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Report unreadable molecules and evaluate the rest."),
):
    """Atom/molecule stability, validity, uniqueness and novelty (EDM's definitions) of molecules in files."""
    from molgen.chem.io import read_molecules
    from molgen.evaluate import evaluate_molecules, write_json, write_per_molecule_csv

    mols, errors = [], []
    for f in files:
        mols += read_molecules(f, fmt, skip_invalid, errors)
    for e in errors:
        err.print(f"[yellow]skipped:[/] {escape(e)}", highlight=False, soft_wrap=True)
    if not mols:
        raise MolgenError("no readable molecules in the input")
    smiles, fr = _reference(reference, remove_h, not no_novelty)
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(mols))
        metrics = evaluate_molecules([m.positions for m in mols], [m.types for m in mols], smiles, fr,
                                     lambda k: progress.advance(task, k))
    if no_novelty:
        metrics.novelty_note = "skipped (--no-novelty)"
    console.print(_metrics_table(metrics, ", ".join(str(f) for f in files)))
    if errors:
        console.print(f"{len(errors)} molecule(s) could not be read and were skipped")
    if metrics.novelty is None and metrics.novelty_note:
        console.print(f"novelty {metrics.novelty_note}")
    if json_path:
        write_json(json_path, metrics, {"files": [str(f) for f in files], "skipped": errors})
    if per_molecule:
        write_per_molecule_csv(per_molecule, metrics, [m.name for m in mols])


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="Training run folder (its latest checkpoint is exported)."),
    dest: Path = typer.Argument(..., help="Destination folder, e.g. weights/my-model."),
    headline: str = typer.Option("", "--headline", help="One line of measured figures for `molgen models`."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Recommended sampling temperature, stored in meta.json: `molgen sample`'s default for this model."),
    renoise: Optional[float] = typer.Option(None, "--renoise", help="Consistency models: recommended re-noising scale of the k-step sampler, stored in meta.json."),
    stack: int = typer.Option(0, "--stack", min=0, help="Consistency models: append N denoising stages of a diffusion model (--refiner) to the network, so that one call computes what `molgen sample --refine N` adds after it; a stacked model: run its own trained stages at N levels instead (docs/training.md)."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="--stack: the diffusion model whose network the stages use (default: the model's distillation teacher or the diffusion model it was tuned from)."),
):
    """Export a run's EMA parameters (float32) and config as a self-contained model folder."""
    from molgen.sample import check_renoise, check_temperature, load_model, load_refiner, save_weights

    if refiner is not None and not stack:
        raise MolgenError("--refiner names the model whose stages --stack N appends; add --stack N")
    cfg, params, info = load_model(run_dir)
    # a shipped model or weights folder keeps its card's provenance; a run's is its latest checkpoint
    meta = {"source_run": info.get("source_run", str(run_dir)), "step": info.get("step"),
            "trained": info.get("trained") or f"{info.get('step')} steps", "headline": headline}
    if stack and cfg.stack is not None:  # stacked already: keep its trained stages, at N levels
        from molgen.consistency.stack import restack

        if refiner is not None:
            raise MolgenError("this model is stacked already: --stack N re-spreads its own trained stages; "
                              "leave out --refiner")
        old = len(cfg.stack.levels)
        cfg, params = restack(cfg, params, stack)
        meta["trained"] += f", then its {old} stages re-spread over {stack} levels (not trained further)"
    elif stack:
        from molgen.consistency.stack import stack_model

        r_cfg, r_params, r_name = load_refiner(cfg, refiner)  # stack_model refuses a diffusion model
        cfg, params = stack_model(cfg, params, r_cfg, r_params, stack, source=r_name)
        meta["trained"] += f", then {stack} denoising stages of {r_name} appended (not trained further)"

    if temperature is not None:
        meta["temperature"] = check_temperature(temperature)
    if renoise is not None:
        if cfg.mode == "diffusion":
            raise MolgenError("--renoise applies to consistency models; this is a diffusion model")
        meta["renoise"] = check_renoise(renoise)
    save_weights(dest, cfg, params, meta)
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    console.print(f"exported step {info.get('step')} of {run_dir} to {dest} ({size:.2f} MiB)")


@app.command()
@friendly
def models():
    """List the shipped models with their cards' headline figures."""
    from molgen.config import RunConfig
    from molgen.consistency.stack import describe
    from molgen.sample import default_model, shipped_models

    ms = shipped_models()
    if not ms:
        console.print("no shipped models found")
        return
    default = default_model()
    t = Table(title="shipped models")
    # Names are what users type: never truncated (the other columns wrap instead).
    t.add_column("name", no_wrap=True)
    for c in ("mode", "network", "trained", "headline (1000 samples)"):
        t.add_column(c)
    for name, path in ms.items():
        cfg = json.loads((path / "config.json").read_text())
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        net = describe(RunConfig.from_dict(cfg))
        t.add_row(name + ("\n(default)" if name == default else ""), cfg["mode"], net, meta.get("trained", ""),
                  meta.get("headline", ""))
    console.print(t)


def run():  # pragma: no cover - entry point for python -m molgen
    app()


if __name__ == "__main__":  # pragma: no cover
    run()
