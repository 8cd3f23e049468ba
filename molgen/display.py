"""What the command line shows: progress bars (off a terminal, a progress line now and then), tables of metrics,
of the QM9 cache and of the shipped models. Output only; no decisions."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from molgen.stdio import Stdio


class _Reports(Console):
    def on_broken_pipe(self) -> None:
        """Standard output's reader has gone (`| head`): on to the command's own handler, which ends it quietly
        with exit code 141, as a writer killed by SIGPIPE (rich would exit with 1, as for a failure)."""
        raise BrokenPipeError(32, "Broken pipe", "standard output")


report_stream = Stdio()
console = _Reports(file=report_stream, markup=False, emoji=False)  # what it prints holds file names: "[/x]" is text
err = Console(file=Stdio(stderr=True))  # markup for "error:"; what it prints of the user's is escaped


def report_to_stderr(on: bool = True) -> None:
    """What the commands print goes to stderr (``on``) or to stdout again: a command whose output file is standard
    output must not mix its report into it."""
    report_stream.stderr = on


def count(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless n is 1: "1 molecule", "1,000 molecules"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def say(msg: str) -> None:
    err.print(escape(msg), highlight=False, soft_wrap=True)


def error(e: Exception) -> None:
    """An expected failure as one line on stderr: the message, or for a file system error the path and why."""
    msg = (f"{e.filename}: {e.strerror or e}" if getattr(e, "filename", None) else
           e.strerror if isinstance(e, OSError) and e.strerror else str(e))
    msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())  # one line, whatever the cause said
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


LINE_EVERY_S = 10.0  # off a terminal, a progress line at most this often (training's train.log too)


def hms(seconds: float) -> str:
    """A duration as h:mm:ss (capped at 99:59:59)."""
    seconds = int(min(max(seconds, 0), 359999))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress(transient: bool = True):
    """Progress on stderr: a bar with elapsed and remaining time on a terminal; off one (a log file, a batch
    job), :class:`ProgressLines`."""
    if not err.is_terminal:
        return ProgressLines()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=transient)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    start: float = 0.0
    last_line: float = 0.0
    lines: int = 0
    ended: bool = False


class ProgressLines:
    """Progress as plain lines (what a log file can hold), with the part of rich's Progress that molgen uses
    (``add_task``, ``advance``, ``update``, ``tasks``): a line for a task at most every ``every`` seconds, the
    first only once it has run that long (short work prints none), and, for a task that printed one, a last line
    with its total time when it reaches its total (or, without one, when the work ends without an error)."""

    def __init__(self, show=None, every: float | None = None, clock=time.monotonic):
        self.tasks: list[_Task] = []
        self.show, self.every, self.clock = show or say, LINE_EVERY_S if every is None else every, clock

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            for t in self.tasks:
                self._done(t)
        return False

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        now = self.clock()
        self.tasks.append(_Task(description, total, start=now, last_line=now))
        return len(self.tasks) - 1

    def update(self, task: int, total: float | None = None, completed: float | None = None,
               advance: float | None = None, **_) -> None:
        t = self.tasks[task]
        if total is not None:
            t.total = total
            t.ended = t.ended and total <= t.completed  # more work added (another round): not done yet
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        if t.total and t.completed >= t.total:
            self._done(t)
        else:
            self._line(t)

    def advance(self, task: int, n: float = 1) -> None:
        self.update(task, advance=n)

    def _done(self, t: _Task) -> None:
        if t.lines and not t.ended:
            t.ended = True
            done = f"{t.completed:,.0f}" + (f"/{t.total:,.0f}" if t.total else "")
            self.show(f"{t.description}: {done}, done in {hms(self.clock() - t.start)}")

    def _line(self, t: _Task) -> None:
        now = self.clock()
        if t.ended or now - t.last_line < self.every:
            return
        t.last_line, t.lines = now, t.lines + 1
        elapsed = now - t.start
        if t.total:
            left = (t.total - t.completed) * elapsed / t.completed if t.completed else None
            self.show(f"{t.description}: {t.completed:,.0f}/{t.total:,.0f} ({100 * t.completed / t.total:.0f} %), "
                      f"{hms(elapsed)} elapsed" + (f", {hms(left)} left" if left is not None else ""))
        else:
            self.show(f"{t.description}: {t.completed:,.0f} done, {hms(elapsed)} elapsed")


def progress_factory(bar):
    """The library's progress protocol (description, total) -> tick(n), on a rich Progress."""

    def make(desc: str, total: int | None):
        task = bar.add_task(desc, total=total)
        return lambda n: bar.advance(task, n)

    return make


@contextmanager
def sampling_progress(calls: int, batch_size: int):
    """A bar of network calls for sampling in rounds: yields (on_round(m): add a round of m molecules, drawn in
    batches of ``batch_size``, each molecule ``calls`` calls; advance(k): k calls done; the library's progress
    protocol on the same display, for the work that follows, e.g. the report)."""
    with progress() as bar:
        task = bar.add_task("sampling (network calls)", total=0)
        yield (lambda m: bar.update(task, total=bar.tasks[task].total + calls * -(-m // max(batch_size, 1))),
               lambda k: bar.advance(task, k), progress_factory(bar))


def metrics_rows(m) -> list[tuple[str, str]]:
    """A report's rows (metric, value), as `molgen sample` and `molgen evaluate` print them."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    rows = [("molecules", f"{m.n_molecules:,}"), ("mean atoms", f"{m.mean_atoms:.2f}"),
            ("atom stability", pct(m.atom_stability)), ("molecule stability", pct(m.mol_stability)),
            ("validity", pct(m.validity)), ("uniqueness (of valid)", pct(m.uniqueness)),
            ("valid & unique", pct(m.valid_and_unique)),
            ("novelty (of unique)", pct(m.novelty) if m.novelty is not None else _why_no_novelty(m.novelty_note)),
            ("connected (1 fragment)", pct(m.connected)), ("non-finite coordinates", str(m.n_nonfinite))]
    if m.rdkit_validity is not None:
        rows.append(("validity (RDKit's own bonds)", pct(m.rdkit_validity)))
    if m.strain is not None:
        st = m.strain
        rows.append(("MMFF94 strain, median / p90", "n/a" if st["median_kcal_mol"] is None else
                     f"{st['median_kcal_mol']:.1f} / {st['p90_kcal_mol']:.1f} kcal/mol ({st['n_molecules']:,})"))
        rows.append(("relaxation RMSD (heavy, median)",
                     "n/a" if st["median_heavy_rmsd"] is None else f"{st['median_heavy_rmsd']:.3f} Å"))
    rows += fidelity_rows(m.fidelity) if m.fidelity else []
    ref = m.reference_type_fractions
    mix = "  ".join(f"{k} {v:.3f}" + (f" ({ref[k]:.3f})" if ref else "") for k, v in m.type_fractions.items())
    rows.append(("atom types" + (" (train)" if ref else ""), mix))
    if m.fragment_kept is not None:
        rows.append(("fragment kept (its bond graph)", pct(m.fragment_kept)))
    return rows


def metrics_table(m, title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics_rows(m):
        t.add_row(k, v)
    return t


def metrics_columns(reports: list[tuple[str, object]]) -> Table:
    """Several reports side by side, a column each: (name, metrics) pairs with the same rows. Columns are headed
    by the files' own names when those differ, else by the names given (wrapped, never cut)."""
    t = Table(title="molecules by file")
    t.add_column("metric")
    short = [Path(name).name for name, _ in reports]
    for name in short if len(set(short)) == len(short) else [name for name, _ in reports]:
        t.add_column(name, justify="right", overflow="fold")
    rows = [dict(metrics_rows(m)) for _, m in reports]
    for label in dict.fromkeys(k for r in rows for k in r):  # every row any report has, in order
        t.add_row(label, *(r.get(label, "") for r in rows))
    return t


def fidelity_rows(f: dict) -> list[tuple[str, str]]:
    """The distances to QM9's test split (molgen.fidelity) as table rows."""

    def num(v, fmt, unit=""):
        return "n/a" if v is None else format(v, fmt) + unit

    return [("vs QM9 test: atom types TV", num(f["atom_types_tv"], ".4f")),
            ("vs QM9 test: sizes TV", num(f["sizes_tv"], ".4f")),
            ("vs QM9 test: bond types TV", num(f["bond_types_tv"], ".4f")),
            ("vs QM9 test: valency TV", num(f["valency_tv"], ".4f")),
            ("vs QM9 test: bond lengths W1", num(f["bond_lengths_w1"], ".4f", " Å")),
            ("vs QM9 test: bond angles W1", num(f["bond_angles_w1"], ".2f", " °"))]


def _why_no_novelty(note: str) -> str:
    """The novelty row without a value: the note's short form ("not computed", "skipped (--no-novelty)")."""
    return note.split(":")[0] or "not computed"


def evaluation_report(reports: list[tuple[str, object]], errors: list[str]) -> None:
    """`molgen evaluate`'s output: what could not be read, the metrics (one report, or several side by side:
    (name, metrics) pairs), and why novelty is missing."""
    for e in errors:
        say(f"skipped: {e}")
    console.print(metrics_table(reports[0][1], reports[0][0]) if len(reports) == 1 else metrics_columns(reports))
    if errors:
        console.print(f"{len(errors)} molecule(s) could not be read and were skipped")
    metrics = reports[0][1]
    if metrics.novelty is None and metrics.novelty_note not in ("", _why_no_novelty(metrics.novelty_note)):
        console.print(f"novelty {metrics.novelty_note}")


def _derived_note(data_dir: Path) -> str:
    """Where what evaluation derives from a QM9 cache that it cannot write into is kept
    (:func:`molgen.data.qm9.derived_path`); nothing when it is kept beside the cache."""
    from molgen.data.qm9 import cache_is_valid, derived_path
    from molgen.evaluate import TRAIN_SMILES_NAME
    from molgen.fidelity import REFERENCE_NAME

    if not cache_is_valid(data_dir, verify_hash=False):
        return ""
    away = {derived_path(data_dir, name).parent for name in (TRAIN_SMILES_NAME, REFERENCE_NAME)} - {Path(data_dir)}
    return f" (read-only: what evaluation derives from it is kept in {away.pop()})" if away else ""


def setting_table(data_dir: Path) -> Table:
    """Where molgen runs: its version, JAX's and the devices JAX sees, the default model, the QM9 cache
    ``data_dir``, the folder of compiled programs and the processes evaluation may use."""
    import jax

    from molgen import MolgenError, __version__
    from molgen.io_utils import can_make
    from molgen.jax_setup import compilation_cache_dir, cpu_vectors, start_devices
    from molgen.models import default_model, weights_root
    from molgen.workers import MIN_PER_WORKER, default_workers, usable_cores

    try:
        devs = start_devices()
        seen = (f"cpu ({usable_cores()} cores), {cpu_vectors()}" if devs[0].platform == "cpu"
                else f"{devs[0].platform}: {len(devs)} x {devs[0].device_kind}")
    except MolgenError as e:  # what does not start is what `molgen info` is asked to show
        seen = f"no device: {e}"
    jax_cache = compilation_cache_dir()
    workers = default_workers()
    items = {
        "molgen": __version__,
        "JAX": f"{jax.__version__}, {seen}",
        "default model": f"{default_model() or 'none'} (in {weights_root()}); with --fix: "
                         f"{default_model(fix=True) or 'none'}",
        "QM9 cache": str(data_dir) + _derived_note(data_dir),
        "compiled programs": (str(jax_cache) if jax_cache and (jax_cache.is_dir() or can_make(jax_cache))
                              else f"not kept: {jax_cache} cannot be made" if jax_cache
                              else "not kept (MOLGEN_JAX_CACHE=off)"),
        "evaluation": f"{workers} process{'' if workers == 1 else 'es'} at most (MOLGEN_WORKERS), one per "
                      f"{MIN_PER_WORKER:,} molecules",
    }
    t = Table(title="molgen", show_header=False)
    t.add_column("item", no_wrap=True)
    t.add_column("value")
    for k, v in items.items():
        t.add_row(k, str(v))
    return t


def cache_tables(data_dir: Path, manifest: dict, ds) -> None:
    t = Table(title=f"QM9 cache: {data_dir}")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("source", str(manifest.get("source")))
    t.add_row("molecules", f"{len(ds):,}")
    t.add_row("atoms", f"{len(ds.types):,}")
    for k, v in ds.splits.items():
        t.add_row(f"split {k}", f"{len(v):,}")
    n = ds.n_atoms[ds.split("train")]
    t.add_row("atoms per molecule (train)", f"{n.min()}-{n.max()}, mean {n.mean():.2f}")
    console.print(t)
    hist = ds.size_histogram("train")
    h = Table(title="atom-count histogram (train)")
    for c in ("atoms", "molecules", ""):
        h.add_column(c, justify="right" if c else "left")
    for k in np.nonzero(hist)[0]:
        h.add_row(str(k), f"{hist[k]:,}", "#" * int(round(40 * hist[k] / hist.max())))
    console.print(h)


def models_table(models: dict, default: str | None, fix_default: str | None = None) -> Table:
    """The shipped models, a row each; ``default`` and ``fix_default`` (the one ``--fix`` uses) marked."""
    from molgen.config import RunConfig
    from molgen.consistency.stack import describe_network
    from molgen.models import read_meta

    t = Table(title="shipped models", caption="molgen models NAME: how one was trained, its recipes and its card")
    t.add_column("name", no_wrap=True)  # names are what users type: never cut (other columns wrap)
    for c in ("objective", "network", "headline (1000 samples unless it says)"):
        t.add_column(c)
    for name, path in models.items():
        cfg = RunConfig.load(path / "config.json")
        meta = read_meta(path / "meta.json")
        mark = "\n(default)" if name == default else "\n(with --fix)" if name == fix_default else ""
        t.add_row(name + mark, cfg.objective, describe_network(cfg),
                  meta.get("headline", ""))
    return t


def model_table(model, default: bool = False) -> Table:
    """One model (a loaded :class:`molgen.models.Model`) in full: what it is, how it was trained, where its
    recipes and card are."""
    import jax

    from molgen.consistency.stack import describe_network
    from molgen.models import diffusion_source

    cfg, meta, folder = model.cfg, model.meta, Path(model.meta["source"])
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(model.params))
    t = Table(title=folder.name + (" (the default)" if default else ""), show_header=False)
    t.add_column("item", no_wrap=True)
    t.add_column("value")
    rows = [("folder", str(folder)), ("objective", cfg.objective),
            ("network", describe_network(cfg)), ("size", f"{n_params:,} parameters"),
            ("data", "QM9 without hydrogens" if cfg.data.remove_h else "QM9 with hydrogens"),
            ("trained", meta.get("trained") or (f"{meta['step']:,} steps" if "step" in meta else "")),
            ("headline", meta.get("headline", "")),
            ("temperature", f"{meta['temperature']:g}" if "temperature" in meta else ""),
            ("re-noise", f"{meta['renoise']:g}" if "renoise" in meta else ""),
            ("type bias", "; ".join(", ".join(f"{e} {b:g}" for e, b in meta[key].items()) + f" ({calls})"
                                    for key, calls in (("type_bias_one_call", "1 call"), ("type_bias", "2 or more calls"))
                                    if meta.get(key))),
            ("diffusion model", diffusion_source(cfg) or ""),
            ("polisher", f"{model.polisher} (--polish N)" if model.polisher else ""),
            ("GPU runs", ", ".join(f"{r.get('date', '?')} ({r.get('steps', 0):,} steps)" for r in meta.get("gpu_runs", []))),
            ("recipes", ", ".join(p.name for p in sorted(folder.glob("recipe*.toml")))),
            ("card", str(folder / "README.md") if (folder / "README.md").exists() else "")]
    for item, value in rows:
        if value:
            t.add_row(item, value)
    return t
