"""The kill -9 fault run: a training run is killed (SIGKILL) at random moments and resumed each time; at the end
its parameters must equal an uninterrupted run's, and no file of the run may be corrupt.

    python benchmarks/fault_kill.py [--kills 10] [--steps 400] [--seed 0] [--data-dir DIR]

Each trial starts `molgen train --resume` (the first one a new run), waits a random time, kills the process
group with SIGKILL, and checks the run folder: config.json loads, every metrics.jsonl line parses, the latest
checkpoint restores. After the kills the run is resumed to the end; its EMA and raw parameters are compared
with an uninterrupted run of the same recipe. Prints one line per trial and a summary line:

    FAULT kills=10 resumes=10 final_params_equal=True corrupt_files=0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_cmd(out: Path, steps: int, data_dir: str | None, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "molgen", "train", "--model", "tiny", "--batch-size", "8", "--steps", str(steps),
           "--seed", "0", "--devices", "1", "--out", str(out), "--set", "optim.ckpt_every=50",
           "--set", "optim.eval_every=0"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return cmd + (["--resume"] if resume else [])


def check_run(out: Path) -> list[str]:
    """What is wrong with the run folder (empty: nothing)."""
    from molgen.config import RunConfig
    from molgen.state import load_ema_params

    problems = []
    try:
        RunConfig.load(out / "config.json")
    except Exception as e:  # noqa: BLE001 - any failure to read is what this reports
        problems.append(f"config.json: {e}")
    if (out / "metrics.jsonl").exists():
        for k, line in enumerate((out / "metrics.jsonl").read_text().splitlines()):
            try:
                json.loads(line)
            except ValueError:
                problems.append(f"metrics.jsonl line {k + 1} does not parse")
    if (out / "checkpoints").exists() and any(p.name.isdigit() for p in (out / "checkpoints").iterdir()):
        try:
            load_ema_params(out)
        except Exception as e:  # noqa: BLE001
            problems.append(f"latest checkpoint: {e}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-wait", type=float, default=25.0, help="longest wait before a kill, seconds")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="molgen_fault_"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(train_cmd(work / "straight", args.steps, args.data_dir, False), env=env, check=True,
                   capture_output=True)
    out = work / "killed"
    corrupt = resumes = 0
    for k in range(args.kills):
        started = (out / "config.json").exists() and (out / "checkpoints").exists() and any(
            p.name.isdigit() for p in (out / "checkpoints").iterdir())
        p = subprocess.Popen(train_cmd(out, args.steps, args.data_dir, started), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait = rng.uniform(2.0, args.max_wait)
        time.sleep(wait)
        finished = p.poll() is not None
        if not finished:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        resumes += started
        problems = check_run(out)
        corrupt += len(problems)
        step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip() else 0
        print(f"trial {k + 1}: {'resumed' if started else 'new run'}, killed after {wait:.1f} s"
              f"{' (it had finished)' if finished else ''}, last logged step {step}, problems: {problems or 'none'}",
              flush=True)
    done = subprocess.run(train_cmd(out, args.steps, args.data_dir, True), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    import jax
    import numpy as np

    from molgen.state import CONFIG_NAME, checkpoint_manager, restore_checkpoint, state_shapes
    from molgen.config import RunConfig

    def state_of(run):
        cfg = RunConfig.load(run / CONFIG_NAME)
        return restore_checkpoint(checkpoint_manager(run, cfg.optim.keep), state_shapes(cfg))

    a, b = state_of(work / "straight"), state_of(out)
    equal = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                zip(jax.tree_util.tree_leaves((a.params, a.ema)), jax.tree_util.tree_leaves((b.params, b.ema))))
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    once = steps == sorted(set(steps))
    print(f"FAULT kills={args.kills} resumes={resumes} final_step={int(b.step)} final_params_equal={equal} "
          f"log_steps_once={once} corrupt_files={corrupt}")


if __name__ == "__main__":
    main()
