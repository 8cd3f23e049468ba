"""Pictures as files (matplotlib, headless): a training run's curves and a molecule set's distributions against
QM9's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import N_TYPES, SYMBOLS
from molgen.fidelity import ANGLE_BIN, LENGTH_BIN, Stats, bond_key

HIDDEN = {"step", "time", "steps_per_s", "lr", "grad_norm"}  # not loss-like


def _figure(**kw):
    """A figure of its own, outside pyplot: drawn without a display, and without changing the backend or the
    figures of a program (a notebook) that imports molgen."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, out: Path) -> None:
    from molgen.io_utils import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")


def metrics_path(run_dir: Path) -> Path:
    """A training run folder's metrics.jsonl; a MolgenError when the folder or the file does not exist."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise MolgenError(f"{run_dir}: no such folder (give a training run folder)")
    if not path.is_file():
        raise MolgenError(f"{run_dir}: no metrics.jsonl (not a training run folder?)")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (a MolgenError when there is none or it holds no step)."""
    path = metrics_path(run_dir)
    rows = []
    # the last: "" after a whole line, else one being written (or cut short); bytes not UTF-8 make a line not JSON
    lines = path.read_text(errors="replace").split("\n")
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if k == len(lines) - 1:
                break
            raise MolgenError(f"{path}: line {k + 1} is not JSON") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise MolgenError(f"{path}: no logged step yet")
    return rows


def _loss_axis(ax, lowest: float) -> None:
    """A log scale for losses (symmetric-log where one is 0 or below), labelled, with a grid and the legend."""
    if lowest <= 0:
        ax.set_yscale("symlog", linthresh=1e-3)
    else:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def training_curves(run_dir: Path, out: Path) -> list[str]:
    """Loss-like series (training, validation, their parts, logged sample metrics) against step on a log scale,
    and the learning rate (and gradient norm) below; returns the series drawn."""
    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in HIDDEN})
    fig = _figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and np.isfinite(r[k])]
        if pts:
            x, y = zip(*pts)
            main = k in ("loss", "val_loss")
            top.plot(x, y, "o-" if k.startswith("val") else "-", lw=1.6 if main else 0.8, ms=3,
                     alpha=1.0 if main else 0.6, label=k)
    _loss_axis(top, min((r[k] for k in keys for r in rows if isinstance(r.get(k), (int, float))), default=1))
    top.set_title(f"{Path(run_dir).name}: {rows[-1]['step']:,} steps", fontsize=10)
    for k, style in (("lr", "-"), ("grad_norm", ":")):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            x, y = zip(*pts)
            ax = bottom if k == "lr" else bottom.twinx()
            ax.plot(x, y, style, color="C0" if k == "lr" else "C3", lw=1, label=k)
            ax.set_ylabel("learning rate" if k == "lr" else "gradient norm", fontsize=8)
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(out))
    return keys


def compare_curves(run_dirs: list[Path], out: Path) -> list[str]:
    """Several runs' training loss (lines) and validation loss of the EMA parameters (points) against step, log
    scale, a colour a run, and their learning rates below; returns the series drawn, as "RUN: key"."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) < len(names):  # two runs of one name in different folders: their paths tell them apart
        names = [str(r) for r in run_dirs]
    runs = [read_metrics(r) for r in run_dirs]  # every run read (or refused) before anything is drawn
    fig = _figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    drawn, lowest = [], np.inf
    for i, (name, rows) in enumerate(zip(names, runs)):
        for k, style in (("loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and np.isfinite(r[k])]
            if pts:
                x, y = zip(*pts)
                top.plot(x, y, style, color=f"C{i % 10}", lw=1.4 if k == "loss" else 1.0, ms=3,
                         alpha=0.75 if k == "loss" else 1.0, label=f"{name}: {k}")
                drawn.append(f"{name}: {k}")
                lowest = min(lowest, min(y))
        pts = [(r["step"], r["lr"]) for r in rows if isinstance(r.get("lr"), (int, float))]
        if pts:
            bottom.plot(*zip(*pts), "-", color=f"C{i % 10}", lw=1)
    if not drawn:
        raise MolgenError(f"no run logs a loss ({', '.join(map(str, run_dirs))})")
    _loss_axis(top, lowest)
    top.set_title(f"{len(runs)} runs: training loss (lines), validation loss of the EMA parameters (points)",
                  fontsize=10)
    bottom.set_ylabel("learning rate", fontsize=8)
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(out))
    return drawn


def _density(counts: np.ndarray, factor: int) -> np.ndarray:
    c = counts[: len(counts) // factor * factor].reshape(-1, factor).sum(1).astype(np.float64)
    return c / c.sum() if c.sum() else c


def fidelity_plots(st: Stats, ref: Stats, out_dir: Path, label: str = "molecules") -> list[Path]:
    """atom_types.png, bond_lengths.png and bond_angles.png in ``out_dir``: the set against QM9's test split."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig = _figure(figsize=(5, 3.2))
    ax = fig.subplots()
    w = 0.38
    for off, counts, name in ((-w / 2, st.types, label), (w / 2, ref.types, "QM9 test")):
        ax.bar(np.arange(N_TYPES) + off, counts / max(counts.sum(), 1), w, label=name)
    ax.set_xticks(range(N_TYPES), SYMBOLS)
    ax.set_ylabel("fraction of atoms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_dir / "atom_types.png")
    written.append(out_dir / "atom_types.png")

    flat = ref.lengths.reshape(-1, ref.lengths.shape[-1]).sum(1)
    top = [np.unravel_index(i, ref.lengths.shape[:3]) for i in np.argsort(-flat)[:6] if flat[i] > 0]
    fig = _figure(figsize=(10, 5.4))
    axes = fig.subplots(2, 3)
    factor = 5  # 0.01 Å bins
    x = (np.arange(ref.lengths.shape[-1] // factor) + 0.5) * LENGTH_BIN * factor
    for ax, (a, b, o) in zip(axes.ravel(), top):
        dr, ds = _density(ref.lengths[a, b, o], factor), _density(st.lengths[a, b, o], factor)
        lo, hi = x[np.nonzero(dr)[0][[0, -1]]] if dr.any() else (0.8, 1.8)
        ax.plot(x, dr, label="QM9 test", color="black", lw=1)
        ax.plot(x, ds, label=label, color="C1", lw=1)
        ax.set_xlim(lo - 0.1, hi + 0.1)
        ax.set_title(f"{bond_key(a, b, o + 1)} ({int(st.lengths[a, b, o].sum()):,} bonds)", fontsize=9)
        ax.set_xlabel("length (Å)", fontsize=8)
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_dir / "bond_lengths.png")
    written.append(out_dir / "bond_lengths.png")

    centres = [e for e in range(N_TYPES) if ref.angles[e].sum()]
    fig = _figure(figsize=(3.4 * len(centres), 3.2))
    axes = fig.subplots(1, len(centres), squeeze=False)
    factor = 8  # 2 degree bins
    x = (np.arange(ref.angles.shape[-1] // factor) + 0.5) * ANGLE_BIN * factor
    for ax, e in zip(axes[0], centres):
        ax.plot(x, _density(ref.angles[e], factor), color="black", lw=1, label="QM9 test")
        ax.plot(x, _density(st.angles[e], factor), color="C1", lw=1, label=label)
        ax.set_title(f"angles at {SYMBOLS[e]} ({int(st.angles[e].sum()):,})", fontsize=9)
        ax.set_xlabel("angle (degrees)", fontsize=8)
        ax.set_xlim(40, 180)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_dir / "bond_angles.png")
    written.append(out_dir / "bond_angles.png")
    return written
