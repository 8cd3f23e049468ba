"""A training run's folder: which runs it can take (new or resumed), the metrics log cut back to a checkpoint, and
the batch shape plan saved beside each checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from molgen import MolgenError
from molgen.io_utils import atomic_write_text
from molgen.parallel import is_main


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run folder that cannot take this run: a file, a new run over checkpoints, a resume without one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MolgenError(f"{run_dir} is a file, not a run folder")
    ckpts = run_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if resume and not has_ckpt:
        what = "does not exist" if not run_dir.exists() else f"holds no finished checkpoint ({_contents(run_dir)})"
        raise MolgenError(f"--resume: {run_dir} {what}; start a new run without --resume")
    if not resume and has_ckpt:
        raise MolgenError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")


def _contents(run_dir: Path) -> str:
    names = sorted(p.name for p in run_dir.iterdir())
    return "empty" if not names else ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


def cut_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a run killed after its last checkpoint logged them)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


PLAN_NAME = "plan.json"


def save_plan(run_dir: Path, step: int, plan) -> None:
    """The batch shape plan at a checkpoint's step, so that a run resumed there assembles its batches in the same
    shapes (the grouped layout's noise rows depend on them): plan.json maps a step to the plan's state; the
    latest 10 are kept. Written before the checkpoint."""
    if not is_main():
        return
    path = Path(run_dir) / PLAN_NAME
    plans = json.loads(path.read_text()) if path.exists() else {}
    plans[str(step)] = plan.state()
    keep = sorted(plans, key=int)[-10:]
    atomic_write_text(path, json.dumps({k: plans[k] for k in keep}))


def saved_plan(run_dir: Path, step: int) -> dict | None:
    """The plan state saved at ``step`` (None when there is none: the run plans its shapes afresh)."""
    path = Path(run_dir) / PLAN_NAME
    try:
        state = json.loads(path.read_text()).get(str(step))
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, dict) else None
