"""A training run's folder: which runs it can take (new or resumed), the lock a run holds on it while it writes,
the metrics log cut back to a checkpoint, and the batch shape plan saved beside each checkpoint."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from molgen import MolgenError
from molgen.io_utils import STDIO, atomic_write_text, check_folder
from molgen.parallel import is_main

CHECKPOINTS = "checkpoints"  # a run folder's checkpoints, one folder a step (orbax's)
METRICS_NAME = "metrics.jsonl"  # a run's metrics log (molgen.runlog)
PLAN_NAME = "plan.json"  # the batch shape plans of a run's checkpoints (save_plan)
# What a run writes into its folder (also molgen.state's config, molgen.runlog's log, molgen.launch's pairs and
# anchor of a distillation) and `molgen plot`'s default picture: a new run takes a folder that holds nothing else
# (hidden files aside)
RUN_FILES = frozenset({CHECKPOINTS, METRICS_NAME, PLAN_NAME, "config.json", "train.log", "pairs.npz",
                       "anchor.msgpack", "curves.png"})


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run folder that cannot take this run: a file, a new run over checkpoints, a resume without one."""
    run_dir = Path(run_dir)
    if str(run_dir) == STDIO:
        raise MolgenError("--out -: a run is a folder and cannot go to standard output; give a folder's name")
    if run_dir.exists() and not run_dir.is_dir():
        raise MolgenError(f"{run_dir} is a file, not a run folder")
    check_folder(run_dir, "--out")
    has_ckpt = last_checkpoint_step(run_dir) is not None
    if resume and not has_ckpt:
        what = "does not exist" if not run_dir.exists() else f"holds no finished checkpoint ({_contents(run_dir)})"
        raise MolgenError(f"--resume: {run_dir} {what}; start a new run without --resume")
    if not resume and has_ckpt:
        raise MolgenError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith(".")) \
        if run_dir.is_dir() else []
    if others:  # a new run would write its files among them (config.json, train.log: over a file of that name)
        listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise MolgenError(f"--out {run_dir} holds files that are not a training run's ({listed}); give a new or "
                          "empty folder")


def run_folder_at(path: Path) -> Path | None:
    """The training run folder that ``path`` is, or whose checkpoints folder it is or lies directly in (where a
    file of another kind would sit among the run's own), else None. A run folder: one with a checkpoints folder
    or a metrics log."""
    path = Path(path).absolute()
    candidates = [path] + [d.parent for d in (path, path.parent) if d.name == CHECKPOINTS]
    return next((d for d in candidates if (d / CHECKPOINTS).is_dir() or (d / METRICS_NAME).is_file()), None)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a run folder's finished checkpoints, in order (orbax renames a checkpoint's folder to its step
    when it is complete)."""
    ckpts = Path(run_dir) / CHECKPOINTS
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def last_checkpoint_step(run_dir: Path) -> int | None:
    """The step of a run folder's last finished checkpoint, None when it has none."""
    return max(checkpoint_steps(run_dir), default=None)


def remove_unfinished_checkpoints(run_dir: Path) -> list[str]:
    """Remove the checkpoint folders that a run killed while it saved them left unfinished (orbax names them
    ``STEP.orbax-checkpoint-tmp...`` until they are complete): only for the process that holds the run folder.
    Their names, for the log."""
    import shutil

    ckpts = Path(run_dir) / CHECKPOINTS
    left = sorted(p for p in ckpts.glob("*.orbax-checkpoint-tmp*") if p.is_dir()) if ckpts.is_dir() else []
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in left]


LOCK_NAME = ".lock"
IN_USE = "{} is in use: another molgen train is writing into it; wait for it to end or choose another --out"


def refuse_if_in_use(run_dir: Path) -> None:
    """Refuse, before any work, a run folder that another process holds (:func:`hold_run`), asked without taking
    it. Not for the other processes of a multi-process run, which share their folder with the one that holds it."""
    try:
        import fcntl

        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except (ImportError, OSError):  # no flock, or no lock file: nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MolgenError(IN_USE.format(run_dir)) from None
    except OSError:  # a file system without locks
        pass
    finally:
        os.close(fd)


@contextmanager
def hold_run(run_dir: Path):
    """Take the run folder for this process while it trains: a second `molgen train` on it (the same command
    started twice, a --resume while the run still trains) is refused instead of writing into the same files. An
    OS lock (flock) on run_dir/.lock, let go when the process ends, however it ends; where the OS or the file
    system has no flock, no lock. A folder made here for a run refused before it wrote anything is removed again."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MolgenError(IN_USE.format(run_dir)) from None
        except OSError:  # a file system without locks (e.g. Lustre mounted without flock): train unlocked
            pass
        try:
            yield
        except BaseException:
            if made and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink()
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)


def _contents(run_dir: Path) -> str:
    names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    return "empty" if not names else ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


def cut_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a run killed after its last checkpoint logged them), and any line
    that is not a JSON record (a kill in the middle of writing one)."""
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= step

    keep = [ln for ln in path.read_text(errors="replace").splitlines() if kept(ln)]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))




def save_plan(run_dir: Path, step: int, plan) -> None:
    """The batch shape plan at a checkpoint's step, so that a run resumed there assembles its batches in the same
    shapes (the grouped layout's noise rows depend on them): plan.json maps a step to the plan's state; the
    latest 10 are kept. Written before the checkpoint."""
    if not is_main():
        return
    path = Path(run_dir) / PLAN_NAME
    try:
        plans = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # damaged by hand (molgen writes it whole): start it again
        plans = {}
    plans = plans if isinstance(plans, dict) else {}
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


def resumed_plan(run_dir: Path, step: int, log) -> dict | None:
    """:func:`saved_plan` for a run resumed at ``step``; where plan.json holds none (damaged or removed), a warning in
    ``log``: the shapes are planned afresh and the run goes on, but its batches may be padded otherwise than an
    uninterrupted run's (in the grouped layout, its noise drawn otherwise too)."""
    state = saved_plan(run_dir, step)
    if state is None and step > 0:
        log(f"warning: {PLAN_NAME} holds no batch plan for step {step} (damaged or removed): the batches' shapes are "
            "planned afresh, so the run goes on, but not exactly as it would have")
    return state
