"""molgen's command line: commands only. Each parses its options, calls the library and prints; every expected
failure (bad input, unreadable or unwritable files, memory that runs out) is one line on stderr and exit code 2
(:func:`molgen.failures.friendly`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from molgen import MolgenError, __version__
from molgen.display import console, count, err, report_to_stderr, say
from molgen.failures import INTERRUPTED, TERMINATED, friendly, run_program

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Generate 3D molecules with E(3)-equivariant diffusion and consistency models (QM9).")
Opt = typer.Option


def main() -> None:
    """The `molgen` program: the app run by :func:`molgen.failures.run_program` (usage errors as one line, exit code
    2; after Ctrl-C or SIGTERM an exit that does not wait for the computations still queued)."""
    run_program(app, "molgen", typer.main.get_command)


def _version(value: bool):
    if value:
        console.print(f"molgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = Opt(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    """molgen: QM9 download, training, sampling and evaluation of 3D molecule generators."""


@app.command()
@friendly
def download(
    data_dir: Optional[Path] = Opt(None, "--data-dir", help="Cache folder (default: $MOLGEN_HOME or the platform cache dir)."),
    source: Optional[str] = Opt(None, "--source", metavar="<archive|qm9pack|file>", help="Use only this source (default: archive, then qm9pack)."),
    from_path: Optional[Path] = Opt(None, "--from", help="A local QM9 archive (.tar.bz2), folder of .xyz, or qm9pack CSVs."),
    force: bool = Opt(False, "--force", help="Rebuild the cache even if a valid one exists."),
    show: bool = Opt(False, "--info", help="Print what is in the cache afterwards."),
    timeout: float = Opt(10.0, "--timeout", help="Network timeout in seconds for the publisher's archive."),
):
    """Get QM9 (130,831 molecules) and write the processed cache with EDM's split."""
    import time

    from molgen.data.qm9 import default_data_dir
    from molgen.data.sources import download as get
    from molgen.display import progress, progress_factory

    if not timeout > 0:
        raise MolgenError(f"--timeout must be a positive number of seconds, got {timeout}")
    t0 = time.time()
    with progress() as bar:
        path, did = get(data_dir, source, from_path, force, progress_factory(bar), log=say, timeout=timeout)
    console.print(f"QM9 cache {'written to' if did else 'already present at'} {path}"
                  + (f" in {time.time() - t0:.1f} s" if did else ""))
    if show:
        info(data_dir or default_data_dir())


@app.command()
@friendly
def info(data_dir: Optional[Path] = Opt(None, "--data-dir", help="Cache folder.")):
    """Show where molgen runs (versions, the devices JAX sees, the default model, cache folders) and the QM9
    cache: its counts, split sizes and atom-count histogram."""
    import os

    from molgen.data.qm9 import cache_is_valid, default_data_dir, load_qm9, read_manifest, require_cache
    from molgen.display import cache_tables, setting_table

    require_cache(data_dir, "--data-dir")
    d = data_dir or default_data_dir()
    console.print(setting_table(d))
    if d.exists() and not d.is_dir():
        named = "$MOLGEN_HOME" if os.environ.get("MOLGEN_HOME") else "the cache folder"
        console.print(f"no QM9 cache: {named} {d} is a file, not a folder", soft_wrap=True)
        return
    if not cache_is_valid(d, verify_hash=False):  # a fresh install: where molgen runs is still worth showing
        console.print(f"no QM9 cache in {d} yet: `molgen download` makes it", soft_wrap=True)
        return
    cache_tables(d, read_manifest(d) or {}, load_qm9(d))


@app.command()
@friendly
def train(
    recipe: Optional[str] = Opt(None, "--recipe", help="Recipe file (TOML), or the name of a shipped recipe: diffusion, inpaint, ct, ect, distill, polish. Default: --objective's."),
    objective: Optional[str] = Opt(None, "--objective", "--mode", metavar="<diffusion|inpaint|ct|ect|distill|polish>", help="diffusion (EDM), inpaint (EDM's, completing fragments given clean), ct (consistency training), ect (consistency tuning of --init), distill (one-call regression of --init onto --teacher), polish (a diffusion model --init taught to polish as --teacher does)."),
    model: Optional[str] = Opt(None, "--model", metavar="<tiny|small|base|edm>", help="Network preset: tiny 32x2, small 64x4, base 128x6, edm 256x9."),
    steps: Optional[int] = Opt(None, "--steps", help="Optimiser steps of the whole run."),
    batch_size: Optional[int] = Opt(None, "--batch-size", help="Molecules per optimiser step, split over the devices."),
    lr: Optional[float] = Opt(None, "--lr", help="Adam's learning rate after the warm-up."),
    precision: Optional[str] = Opt(None, "--precision", metavar="<auto|float32|tf32|bf16>", help="Matrix products in training: auto (the platform's measured choice: float32 on a CPU, tf32 on a GPU), float32, tf32 (TensorFloat-32) or bf16; parameters, optimiser state, coordinates and neighbour sums stay float32."),
    out: Path = Opt(Path("runs/run"), "--out", help="Run folder: config.json, checkpoints, metrics.jsonl."),
    resume: bool = Opt(False, "--resume", help="Continue the run in --out from its last checkpoint (--steps, --batch-size, --lr, --precision may change)."),
    init: Optional[str] = Opt(None, "--init", help="Model or run to start from: a diffusion model (diffusion warm start, ect, polish), a consistency model (distill)."),
    teacher: Optional[str] = Opt(None, "--teacher", help="distill: the diffusion model whose targets the student learns; polish: the diffusion model whose polishing is learnt."),
    seed: Optional[int] = Opt(None, "--seed", help="Seed of initialisation, data order and noise."),
    sets: List[str] = Opt([], "--set", help="Override one recipe setting, e.g. --set optim.warmup=200 (repeatable)."),
    data_dir: Optional[Path] = Opt(None, "--data-dir", help="QM9 cache folder."),
    max_minutes: Optional[float] = Opt(None, "--max-minutes", help="Stop with a checkpoint after this wall time."),
    devices: Optional[int] = Opt(None, "--devices", min=1, help="Without a GPU: split the CPU into N devices (default: one per core, up to 8)."),
    distributed: bool = Opt(False, "--distributed", help="Multi-process training: jax.distributed.initialize() (SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."),
):
    """Train a model on QM9 from a recipe; Ctrl-C saves a checkpoint, --resume continues exactly."""
    from molgen.display import progress, progress_factory
    from molgen.jax_setup import init_distributed, setup_training_devices, start_devices
    from molgen.data.qm9 import require_reference
    from molgen.launch import Request, launch, resolve_config
    from molgen.objectives import get_objective
    from molgen.rundir import check_run_dir, last_checkpoint_step, refuse_if_in_use

    if max_minutes is not None and not max_minutes > 0:
        raise MolgenError(f"--max-minutes must be positive, got {max_minutes}")
    req = Request(out, recipe, objective, tuple(sets), resume, init, teacher, model, steps, batch_size, lr, seed,
                  precision)
    cfg = resolve_config(req)
    if not distributed:  # a multi-process run's folder is held by its main process (molgen.launch)
        refuse_if_in_use(out)
    check_run_dir(out, resume)
    if resume and (done := last_checkpoint_step(out)) >= cfg.optim.steps:  # nothing to train: say so, start nothing
        state = (f"has finished its {done:,} steps" if done == cfg.optim.steps else
                 f"is at step {done:,}, past --steps {cfg.optim.steps:,}")
        console.print(f"{out} {state} (checkpoint at step {done:,}): nothing to train; to train further: "
                      f"molgen train --resume --out {out} --steps N, N > {done:,}", soft_wrap=True)
        return
    require_reference(data_dir, None if get_objective(cfg.objective).pairs else f"{cfg.objective} trains on QM9")
    setup_training_devices(cfg.optim.batch_size, devices)
    if distributed:
        init_distributed()
    start_devices()
    with progress(transient=False) as bar:
        cfg, res = launch(req, data_dir, "bar" if err.is_terminal else "lines", say, progress_factory(bar),
                          max_minutes * 60 if max_minutes else None)
    rate = f"{res.steps_per_s:.2f} steps/s"
    if res.step >= cfg.optim.steps:
        console.print(f"finished at step {res.step} ({rate}); checkpoint in {out}")
    else:  # an interruption has said how to resume already
        hint = "" if res.interrupted else f"; continue with: molgen train --resume --out {out}"
        kept = f"checkpoint in {out}" if last_checkpoint_step(out) is not None else "no checkpoint saved"
        console.print(f"stopped at step {res.step} of {cfg.optim.steps} ({rate}); {kept}{hint}")
    if res.interrupted:
        raise typer.Exit(TERMINATED if res.interrupted == "SIGTERM" else INTERRUPTED)


@app.command()
@friendly
def sample(
    n: int = Opt(1000, "-n", "--n", help="Number of molecules."),
    steps: Optional[int] = Opt(None, "--steps", help="Sampler steps: network calls for ancestral (default 1000; fewer are respaced, denser at low noise), inpaint (default 100), multistep and anneal (default 1); Heun steps for ode (2 calls each, 1 for the last; default 18)."),
    out: Optional[str] = Opt(None, "-o", "--out", metavar="<path>", help="Output file: .sdf or .xyz, replaced if it exists, or - for standard output (SDF unless --format xyz; the report then goes to stderr). Default: out.sdf, or out-2.sdf, out-3.sdf, ... if taken; out.xyz with --format xyz."),
    checkpoint: Optional[str] = Opt(None, "--checkpoint", "--model", help="Shipped model name (molgen models lists them), model folder, training run folder (its latest checkpoint) or one of its checkpoints (RUN/checkpoints/STEP) (default: the shipped default; with --fix, the shipped fragment completer)."),
    atoms: Optional[str] = Opt(None, "--atoms", metavar="<n|a-b>", help="Atoms per molecule: N, or a range A-B drawn from the training histogram within it (default: drawn from the whole histogram)."),
    seed: int = Opt(0, "--seed", help="Random seed (same seed and --batch-size, same file; -n N writes the first N molecules of a larger -n, except with --keep or --fix)."),
    batch_size: Optional[int] = Opt(None, "--batch-size", help="Molecules generated together (less memory when smaller; the noise is drawn per batch, so another batch size draws other molecules of the same sizes). Default: 1000, fewer for molecules of more than 32 atoms (at most 1,000,000 atom pairs a batch)."),
    sampler: Optional[str] = Opt(None, "--sampler", metavar="<ancestral|ode|inpaint|multistep|anneal>", help="Diffusion models: ancestral (EDM's, default), ode (probability-flow ODE, Heun) or inpaint (--fix with a model trained to complete fragments: its default there). Consistency models: multistep (re-noise to each next level, default) or anneal (f on the molecule itself at levels 0.4 -> 0.1, no re-noising)."),
    sigmas: Optional[str] = Opt(None, "--sigmas", help="multistep / anneal: comma-separated noise levels, one per step (--steps: their number)."),
    temperature: Optional[float] = Opt(None, "--temperature", help="Scale every Gaussian the sampler draws (default: the model card's, else 1)."),
    renoise: Optional[float] = Opt(None, "--renoise", help="multistep: scale of the noise added before each call after the first (default: the card's, else the temperature)."),
    polish: int = Opt(0, "--polish", min=0, help="After sampling, N calls of a diffusion model's denoiser on each molecule at levels 0.4 -> 0.1 (no noise added; with --fix, a model trained to complete fragments keeps the fragment as it polishes)."),
    polisher: Optional[str] = Opt(None, "--polisher", help="--polish: the diffusion model to call (default: the one the model's card names, else the model itself, its teacher or the model it was tuned from)."),
    fmt: Optional[str] = Opt(None, "--format", help="sdf or xyz (default: from the extension)."),
    report: bool = Opt(True, "--report/--no-report", help="Print the stability report of the samples."),
    json_path: Optional[str] = Opt(None, "--json", metavar="<path>", help="Write the report as JSON (-: to standard output, the report to stderr)."),
    novelty: bool = Opt(False, "--novelty", help="Also compute novelty (needs the QM9 cache)."),
    data_dir: Optional[Path] = Opt(None, "--data-dir", help="QM9 cache folder (for novelty and the type mix)."),
    fix: Optional[str] = Opt(None, "--fix", metavar="<path>", help="Complete this fragment (SDF, MOL or XYZ, 3D; its first molecule; - reads standard input): every output keeps its atoms, types and coordinates. Without --checkpoint: the shipped fragment completer (molgen info)."),
    formula: Optional[str] = Opt(None, "--formula", help="Every molecule has this formula, e.g. C7H10O2 (H, C, N, O, F; consistency models): after each call, and before each stage of a stacked model, its atoms take the formula's types, where they fit best."),
    resample: int = Opt(0, "--resample", help="--fix with the ancestral sampler: repeat every step N more times after going back up by the forward process (RePaint); N extra calls per step."),
    keep: str = Opt("all", "--keep", metavar="<all|valid|stable>", help="Write only valid molecules (EDM's validity, in one piece) or stable ones (valid, and every atom's valence allowed), drawing more until -n are kept (at most 100 x n drawn)."),
    unique: bool = Opt(False, "--unique", help="With --keep: no two molecules of the same SMILES."),
    novel: bool = Opt(False, "--novel", help="With --keep: no molecule whose SMILES is among QM9's training split's (needs the QM9 cache; the report then shows novelty)."),
    type_bias: Optional[str] = Opt(None, "--type-bias", help="Add BIAS to the network's last output for ELEMENT before each atom's type is read from it, e.g. N=0.2,O=0.2 (each from 0 to below 0.25, so an atom the network typed with certainty keeps its type; 0: none). Default: the model card's for that many calls (molgen models NAME shows it)."),
):
    """Generate molecules and write them as SDF or XYZ, then print their stability report."""
    from molgen.chem.io import DECIMALS
    from molgen.display import sampling_progress
    from molgen.evaluate import annotate, reference_for
    from molgen.jax_setup import add_cpu_vector_flags, enable_compilation_cache, start_devices
    from molgen.keep import sample_kept
    from molgen.models import default_model, load_model, polisher_for
    from molgen.outputs import check_sample_room, sample_output, write_samples
    from molgen.sample import batch_size_for, parse_options, plan, preflight

    out, fmt, workers, reported, novelty = sample_output(out, fmt, json_path, fix, report, novelty, data_dir,
                                                         (keep, unique, novel))
    sig, bias, atoms, frag, form = parse_options(sigmas, type_bias, atoms, fix, formula)
    add_cpu_vector_flags()
    enable_compilation_cache()
    start_devices()
    m = load_model(checkpoint if checkpoint is not None or frag is None else default_model(fix=True))
    _, _, settings, _ = plan(m, steps, sampler, sig, temperature, renoise, polish, seed, resample, frag is not None,
                             form is not None, bias)
    pol = polisher_for(m, polisher, calls=polish)
    for warning in preflight(m, n, batch_size, atoms, frag, settings["molgen_calls"], form, polish):
        say(warning)
    check_sample_room(m, n, seed, atoms, frag, form, keep, out, fmt)
    with sampling_progress(settings["molgen_calls"], batch := batch_size_for(m, batch_size, atoms, form, frag)) \
            as (more, tick, tasks):
        # QM9's figures for the report are read first: a cache that cannot be read loses no sampling
        ref = reference_for(data_dir, m.cfg.data.remove_h, novelty, tasks, workers) if reported or novel else None
        res = sample_kept(m, n, keep, seed, batch, more, steps=steps, atoms=atoms, sampler=sampler, sigmas=sig,
                          temperature=temperature, renoise=renoise, polish_calls=polish, polisher=pol,
                          progress=tick, fragment=frag, resample=resample, unique=unique, decimals=DECIMALS,
                          formula=form, type_bias=bias, known=ref[0] if novel else None)
        metrics = annotate(res.molecules, ref, novelty, frag, tasks, workers) if reported else None
    write_samples(res, n, out, fmt, metrics, report, json_path)


@app.command()
@friendly
def evaluate(
    files: List[Path] = typer.Argument(..., help="SDF / XYZ files or folders of them; - reads standard input (its format from --format, else from what it holds)."),
    fmt: Optional[str] = Opt(None, "--format", help="Force sdf or xyz (xyz also reads a folder's .txt files: EDM's samples)."),
    json_path: Optional[str] = Opt(None, "--json", metavar="<path>", help="Write all metrics as JSON (-: to standard output, the report to stderr)."),
    per_molecule: Optional[str] = Opt(None, "--per-molecule", metavar="<path>", help="Write each molecule's results as CSV (-: to standard output, the report to stderr)."),
    reference: Optional[Path] = Opt(None, "--reference", help="QM9 cache folder: its training split for novelty, its test split for the distribution distances."),
    remove_h: bool = Opt(False, "--remove-h", help="Compare against the training set without hydrogens."),
    no_novelty: bool = Opt(False, "--no-novelty", help="Skip novelty."),
    fidelity: bool = Opt(True, "--fidelity/--no-fidelity", help="Distribution distances to QM9's test split (atom, size, bond-type and valency TV; bond-length and angle W1), when the QM9 cache exists."),
    strain: bool = Opt(False, "--strain", help="MMFF94 strain of the molecules RDKit accepts (energy drop and heavy-atom RMSD of a relaxation; ~2 ms per molecule)."),
    plots: Optional[Path] = Opt(None, "--plots", help="Write histograms of atom types, bond lengths and bond angles against QM9's test split into this folder (PNG)."),
    skip_invalid: bool = Opt(False, "--skip-invalid", help="Report unreadable molecules and evaluate the rest."),
    each: bool = Opt(False, "--each", help="A report per file or folder given, side by side (default: one report of all their molecules)."),
):
    """Stability, validity, uniqueness and novelty (EDM's definitions), RDKit's validity, distances to QM9 and
    optionally strain of molecules in files."""
    from molgen.chem.checks import input_warnings
    from molgen.data.qm9 import require_cache
    from molgen.display import evaluation_report, progress, progress_factory
    from molgen.evaluate import evaluate_files, write_json, write_per_molecule_csv
    from molgen.fidelity import reference_statistics, statistics
    from molgen.io_utils import check_folder, check_outputs, file_path
    from molgen.workers import default_workers

    json_path, per_molecule = file_path(json_path, "--json"), file_path(per_molecule, "--per-molecule")
    report_to_stderr(check_outputs({"--json": json_path, "--per-molecule": per_molecule}, inputs=files))
    workers = default_workers()
    require_cache(reference, "--reference")
    if plots is not None:
        if str(plots) == "-":
            raise MolgenError("--plots -: the plots are files; give a folder")
        check_folder(plots, "--plots")
    ref = reference_statistics(reference) if plots is not None else None
    if plots is not None and ref is None:
        raise MolgenError("--plots compares with QM9's test split: run `molgen download` or pass --reference DIR")
    if each and (per_molecule or plots is not None):
        raise MolgenError("--each reports each file apart; --per-molecule and --plots describe one set of molecules")
    with progress() as bar:
        runs = [evaluate_files(part, fmt, skip_invalid, reference, remove_h, not no_novelty, progress_factory(bar),
                               fidelity, strain, workers) for part in ([[f] for f in files] if each else [files])]
    mols, errors = [m for r in runs for m in r[1]], [e for r in runs for e in r[2]]
    for warning in input_warnings(mols, hydrogens=not remove_h):
        say(warning)
    names = [str(f) for f in files] if each else [", ".join(str(f) for f in files)]
    metrics, written = runs[0][0], []
    if json_path:  # the files first: what is said after them cannot cost them (a reader of the report gone)
        write_json(json_path, dict(zip(names, (r[0] for r in runs))) if each else metrics,
                   {"files": [str(f) for f in files], "skipped": errors})
    if per_molecule:
        write_per_molecule_csv(per_molecule, metrics, [m.name for m in mols])
    if plots is not None:
        from molgen.plots import fidelity_plots

        st = metrics.stats or statistics([m.positions for m in mols], [m.types for m in mols])
        written = fidelity_plots(st, ref, plots, Path(files[0]).name if len(files) == 1 else "molecules")
    evaluation_report([(name, r[0]) for name, r in zip(names, runs)], errors)
    if written:
        console.print(f"wrote {', '.join(str(w) for w in written)}")


@app.command()
@friendly
def view(
    file: Path = typer.Argument(..., help="SDF or XYZ file, a folder of them, or - for standard input."),
    n: int = Opt(24, "-n", help="Molecules to draw (the first N; at most 100)."),
    out: Optional[str] = Opt(None, "-o", "--out", metavar="<path>", help="Image file: .png or .svg, replaced if it exists; - writes PNG to standard output. Default: grid.png, or grid-2.png, ... if taken."),
    per_row: int = Opt(6, "--per-row", help="Molecules per row."),
    fmt: Optional[str] = Opt(None, "--format", help="Force sdf or xyz (xyz also reads a folder's .txt files: EDM's samples)."),
):
    """Draw molecules as a grid of 2D depictions, bonds as EDM perceives them; legend: formula, S (every atom
    stable), V (valid), fragments (largest highlighted)."""
    from molgen.chem.depict import MAX_GRID, grid
    from molgen.chem.checks import input_warnings
    from molgen.chem.io import read_molecules
    from molgen.io_utils import check_writable, file_path, unused_path, where, writes_stdout

    if not 1 <= n <= MAX_GRID or per_row < 1:
        raise MolgenError(f"-n must be in 1 .. {MAX_GRID} and --per-row at least 1")
    out = file_path(out, "-o") or unused_path("grid.png")  # a default name never replaces a file
    check_writable(out, "-o", suffixes=(".png", ".svg"))
    report_to_stderr(writes_stdout(out))
    mols = read_molecules(file, fmt, limit=n)  # the rest of a large file is not read
    if not mols:
        raise MolgenError(f"{file}: no molecules")
    for warning in input_warnings(mols):
        say(warning)
    console.print(f"wrote {count(grid(mols, out, per_row), 'molecule')} to {where(out)}")


@app.command()
@friendly
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="Training run folder (its metrics.jsonl); several: their losses compared."),
    out: Optional[str] = Opt(None, "-o", "--out", metavar="<path>", help="Image file, .png or .svg (default: RUN/curves.png; several runs: curves.png, or curves-2.png, ... if taken); - writes PNG to standard output."),
):
    """Training and validation loss (and their parts) against step, log scale, with the learning rate; several
    runs: their training and validation losses in one plot, a colour a run."""
    from molgen.io_utils import check_writable, file_path, unused_path, where, writes_stdout
    from molgen.plots import compare_curves, metrics_path, training_curves

    for run_dir in run_dirs:
        metrics_path(run_dir)
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:  # a, a/ and ./a are one run
        if seen.setdefault(Path(run_dir).resolve(), run_dir) is not run_dir:
            raise MolgenError(f"{run_dir}: the same run given twice; name each run once")
    out = file_path(out, "-o") or (Path(run_dirs[0]) / "curves.png" if len(run_dirs) == 1 else unused_path("curves.png"))
    check_writable(out, "-o", suffixes=(".png", ".svg"))
    report_to_stderr(writes_stdout(out))
    drawn = training_curves(run_dirs[0], out) if len(run_dirs) == 1 else compare_curves(run_dirs, out)
    console.print(f"drew {', '.join(drawn)} to {where(out)}")


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="Training run folder (its latest checkpoint), one of its checkpoints (RUN/checkpoints/STEP) or model folder."),
    dest: Path = typer.Argument(..., help="Destination folder, e.g. weights/my-model."),
    headline: str = Opt("", "--headline", help="One line of measured figures for `molgen models`."),
    temperature: Optional[float] = Opt(None, "--temperature", help="Recommended sampling temperature (meta.json): `molgen sample`'s default for this model (default: a model folder's own)."),
    renoise: Optional[float] = Opt(None, "--renoise", help="Consistency models: recommended re-noising of the multistep sampler (meta.json; default: a model folder's own)."),
    stack: int = Opt(0, "--stack", min=0, help="Consistency models: append N denoising stages of a diffusion model (--stages-from), so one call computes what `--polish N` adds; a stacked model: re-spread its own stages over N levels, or with --stages-from append N stages after them."),
    stages_from: Optional[str] = Opt(None, "--stages-from", help="--stack: the diffusion model whose network the stages use (default: the model's teacher or the model it was tuned from)."),
    unstack: bool = Opt(False, "--unstack", help="A stacked model without the stages that run last: e.g. the default's trained stack without its appended polishing stages, to train it further."),
    force: bool = Opt(False, "--force", help="Write into a destination folder that is not empty."),
):
    """Export a run's EMA parameters (float32), config and recipe as a self-contained model folder."""
    from molgen.consistency.stack import describe_network
    from molgen.jax_setup import start_devices
    from molgen.models import export_model

    start_devices()
    m = export_model(run_dir, dest, headline, temperature, renoise, stack, stages_from, force, unstack)
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    console.print(f"exported {run_dir} to {dest} ({describe_network(m.cfg)}, {size:.2f} MiB)")


@app.command()
@friendly
def models(
    name: Optional[str] = typer.Argument(None, help="One model in full (a shipped name or a model or run folder): how it was trained, its recipes and card."),
):
    """List the shipped models with their cards' headline figures, or show one model in full."""
    from molgen.display import model_table, models_table
    from molgen.models import default_model, load_model, shipped_models

    if name is not None:
        m = load_model(name)
        console.print(model_table(m, default=Path(m.meta["source"]) == shipped_models().get(default_model() or "")))
        return
    ms = shipped_models()
    console.print(models_table(ms, default_model(), default_model(fix=True)) if ms else "no shipped models found")
