"""Bring one GPU run of the teacher campaign home (docs/training.md, "The teacher"): what
`scripts/gpu_teacher.sh` left under $OUT becomes the teacher's next shipped state.

    python scripts/gpu_ingest.py OUT [OUT2]      # OUT2: the folder of a RESUME=1 second call on the same machine

1. joins and unpacks the weights (weights.tar.*) of the last folder that has them, and loads them as a model;
2. evaluates that folder's samples (`molgen evaluate samples.xyz --json`, with novelty against the QM9 cache)
   and adds the figures to the run's `gpu_runs` entry in meta.json, with the commit and a new headline
   (--no-samples: a run whose sampling did not finish lands its weights without a point on the curve);
3. replaces params.msgpack, config.json, meta.json and eval_steps1000.json in the teacher's folder (the card
   README.md and recipe.toml stay);
4. copies the benchmark log to benchmarks/results/ (DATE_h200_gpu_runN.log on an H200), redraws the learning curve
   (scripts/plot_teacher.py) and prints the card's new table row and whether the teacher now beats
   edm-small-diffusion at 1000 calls (molecule stability, then validity).

Nothing in the repository changes until every step before 3. has succeeded. A run whose atom stability fell by
more than --max-drop (2 points) below the last point is refused, so a run thrown back does not replace a better
state (--accept-worse lands it). --weights, --results and --plot point elsewhere for a rehearsal on the output
of `DRY=1 bash scripts/gpu_teacher.sh` (with --min-samples 8 --accept-worse).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("params.msgpack", "config.json", "meta.json")
LEFT = ("recipe.toml",)  # written by `molgen export` too; the teacher's folder keeps its own


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def unpack(parts: list[Path], into: Path) -> Path:
    """The model folder inside the joined tar parts: its three files, checked by name, are extracted (an exported
    recipe.toml, also allowed, is left in the archive)."""
    numbers = [p.name.rsplit(".", 1)[-1] for p in parts]
    if numbers != [f"{i:02d}" for i in range(len(parts))]:
        fail(f"{parts[0].parent}: weights parts {', '.join(numbers)}: not numbered 00 to {len(parts) - 1:02d}, "
             f"a part is missing")
    joined = into / "weights.tar"
    with joined.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    try:
        with tarfile.open(joined) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            tops = {Path(m.name).parts[0] for m in members}
            names = sorted(Path(m.name).name for m in members)
            wanted = names in (sorted(KEEP), sorted(KEEP + LEFT))
            if len(tops) != 1 or not wanted or any(len(Path(m.name).parts) != 2 for m in members):
                fail(f"{parts[0]}: expected one folder with {', '.join(KEEP)} (and {', '.join(LEFT)}), found "
                     f"{[m.name for m in members]}")
            tar.extractall(into, members=[m for m in members if Path(m.name).name in KEEP], filter="data")
    except (tarfile.TarError, EOFError) as e:
        fail(f"{', '.join(p.name for p in parts)}: not a whole weights archive ({e}); a part missing or cut short?")
    joined.unlink()
    return into / tops.pop()


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def jax_version(folder: Path) -> str:
    """JAX's version as the run's pipeline log printed it ("jax X flax Y ...")."""
    for line in (folder / "pipeline.txt").read_text().splitlines() if (folder / "pipeline.txt").exists() else []:
        words = line.split()
        if len(words) > 1 and words[0] == "jax":
            return words[1]
    return "?"


def pct(x: float | None) -> str:
    return f"{100 * x:.2f} %" if x is not None else "n/a"


def evaluate(folder: Path, ev_path: Path, min_samples: int) -> dict:
    """`molgen evaluate` of the run's samples.xyz into ev_path (novelty against the QM9 cache)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "molgen", "evaluate", "samples.xyz", "--json", str(ev_path)],
                       capture_output=True, text=True, cwd=folder, env=env)  # the JSON names samples.xyz alone
    if r.returncode != 0:
        fail(f"molgen evaluate {folder / 'samples.xyz'}: {r.stderr.strip().splitlines()[-1:]}")
    ev = json.loads(ev_path.read_text())
    if ev["n_molecules"] < min_samples:
        fail(f"{folder / 'samples.xyz'}: {ev['n_molecules']} molecules, fewer than --min-samples {min_samples}")
    return ev


def headline(runs: list[dict]) -> str:
    """The card's headline: the last evaluated run's figures, and how long the teacher has trained."""
    epochs, at, figures = 0.0, 0.0, None
    for r in runs:
        epochs += r["epochs"]
        if r.get("eval_1000_calls"):
            at, figures = epochs, r["eval_1000_calls"]
    head = f"teacher in training (256 x 9), {epochs:.1f} epochs"
    if figures is None:
        return head + ": not sampled yet"
    return (head + f": {100 * figures['atom_stability']:.1f} % atom / {100 * figures['mol_stability']:.1f} % molecule "
            f"stability at 1000 calls" + (f" after {at:.1f} epochs" if at != epochs else ""))


def card_row(n: int, run: dict, ev: dict | None, jax: str) -> str:
    how = f"{run['batch']}, {run['lr']}, {run['precision']}" + (f" {run['layout']}" if run.get("layout") else "")
    if run.get("xla_flags"):
        how += f" ({run['xla_flags']})"
    return (f"| {n} ({run['start']}, seed {run['seed']}) | {run['date']} | {run['device']}, JAX {jax} | {how} | "
            f"{run['steps']:,} ({run['epochs']}) | {run['seconds']:.0f} s | {run['median_steps_per_s']} | "
            + (f"{pct(ev['atom_stability'])} | {pct(ev['mol_stability'])} | {pct(ev['validity'])} | "
               f"{pct(ev.get('novelty'))} |" if ev is not None else "not sampled | | | |"))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="+", type=Path, help="what the run brought back, in call order")
    ap.add_argument("--teacher", default="edm-diffusion")
    ap.add_argument("--weights", type=Path, help="the teacher's folder (default: weights/TEACHER)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "teacher_curve.png")
    ap.add_argument("--min-samples", type=int, default=1000)
    ap.add_argument("--baseline", default="edm-small-diffusion", help="the teacher to beat")
    ap.add_argument("--no-samples", action="store_true",
                    help="land the weights of a run whose sampling did not finish, without a point on the curve")
    ap.add_argument("--max-drop", type=float, default=0.02,
                    help="refuse a run whose atom stability fell by more than this below the last point's "
                         "(a run thrown back, e.g. by a diverging step): the last state stays (default 0.02)")
    ap.add_argument("--accept-worse", action="store_true", help="land a run that fell by more than --max-drop")
    return ap.parse_args()


def check_inputs(args) -> tuple[Path, Path]:
    """The teacher's folder and the output folder whose weights land; one-line errors before any work."""
    dest = args.weights or ROOT / "weights" / args.teacher
    for d in args.out:
        if not d.is_dir():
            fail(f"{d}: no such folder")
    last = next((d for d in reversed(args.out) if (d / "weights.tar.00").exists()), None)
    if last is None:
        fail("no weights.tar.00 in " + ", ".join(map(str, args.out)))
    if not args.no_samples and not (last / "samples.xyz").exists():
        fail(f"{last}: no samples.xyz (the run's sampling did not finish); --no-samples lands its weights alone")
    if not (dest / "meta.json").exists():
        fail(f"{dest}: no meta.json (not the teacher's folder)")
    return dest, last


def check_not_worse(runs: list[dict], ev: dict, max_drop: float) -> dict | None:
    """Refuse the run if its atom stability fell by more than ``max_drop`` below the last evaluated run's; the
    evaluation it was compared with (None: no earlier run was evaluated)."""
    prev = next((r["eval_1000_calls"] for r in reversed(runs[:-1]) if r.get("eval_1000_calls")), None)
    if prev and ev["atom_stability"] < prev["atom_stability"] - max_drop:
        fail(f"atom stability fell from {pct(prev['atom_stability'])} to {pct(ev['atom_stability'])} at 1000 calls: "
             f"the teacher keeps its last state (--accept-worse lands this run anyway; the next run would draw the "
             f"same batches: give it another SEED or a lower LR)")
    return prev


def land(args, dest: Path, last: Path) -> tuple[list[dict], dict | None]:
    """Steps 1-3: unpack, load, evaluate and replace the teacher's files; the runs and the evaluation."""
    sys.path.insert(0, str(ROOT))
    from molgen.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack(sorted(last.glob("weights.tar.*")), Path(tmp))
        m = load_model(model_dir)
        meta = json.loads((model_dir / "meta.json").read_text())
        runs = meta.get("gpu_runs", [])
        old = json.loads((dest / "meta.json").read_text()).get("gpu_runs", [])
        if len(runs) != len(old) + 1 or runs[:-1] != old:
            fail(f"{last}: its gpu_runs ({len(runs)} entries) do not continue {dest}'s ({len(old)})")
        run = runs[-1]
        ev_path, ev = model_dir / "eval_steps1000.json", None
        if not args.no_samples:
            ev = evaluate(last, ev_path, args.min_samples)
            if not args.accept_worse:
                check_not_worse(runs, ev, args.max_drop)
            run["eval_1000_calls"] = {k: round(ev[k], 4) if ev.get(k) is not None else None
                                      for k in ("atom_stability", "mol_stability", "validity", "novelty")}
        run["commit"] = git_commit()
        epochs = round(sum(x["epochs"] for x in runs), 1)
        steps = sum(x["steps"] for x in runs)
        meta["step"] = steps
        meta["trained"] = (f"{steps:,} steps over {len(runs)} GPU runs ({epochs} epochs), last on "
                           f"{run['date']}: {run['device']}, batch {run['batch']}, {run['precision']}")
        meta["headline"] = headline(runs)
        (model_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

        dest.mkdir(parents=True, exist_ok=True)
        files = (*KEEP, ev_path.name) if ev is not None else KEEP  # without samples the last evaluation stays
        for name in files:
            shutil.copyfile(model_dir / name, dest / f".{name}.new")
        for name in files:  # all written before any replaces the old one
            (dest / f".{name}.new").replace(dest / name)
    print(f"{dest}: {m.cfg.model.nf} x {m.cfg.model.n_layers} network, run {len(runs)} of {len(runs)}, "
          f"{(dest / 'params.msgpack').stat().st_size / 2**20:.1f} MiB")
    return runs, ev


def compare(baseline: str, ev: dict) -> str:
    """Whether the teacher beats ``baseline`` at 1000 calls (molecule stability, then validity)."""
    b = json.loads((ROOT / "weights" / baseline / "eval_steps1000.json").read_text())
    beats = (ev["mol_stability"], ev["validity"]) > (b["mol_stability"], b["validity"])
    return (f"against {baseline} at 1000 calls: molecules {100 * ev['mol_stability']:.1f} % vs "
            f"{100 * b['mol_stability']:.1f} %, valid {100 * ev['validity']:.1f} % vs {100 * b['validity']:.1f} %: "
            + ("better - distil the few-call models from it (scripts/gpu_distill.sh)" if beats else "not better yet"))


def bench_target(results: Path, date: str, device_kind: str, kept: int) -> Path:
    """Where a run's benchmark log goes: DATE_DEVICE_gpu_runN.log, N the kept runs, or the next free number (a run
    that was not kept filed its log too), so that no log is overwritten."""
    device = device_kind.lower().replace("nvidia ", "").replace(" ", "_")
    n = kept
    while (target := results / f"{date}_{device}_gpu_run{n}.log").exists():
        n += 1
    return target


def main() -> None:
    args = parse_args()
    dest, last = check_inputs(args)
    runs, ev = land(args, dest, last)
    run = runs[-1]
    bench = next((d / "bench.log" for d in args.out if (d / "bench.log").exists()), None)
    if bench is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        target = bench_target(args.results, run["date"], run["device"], len(runs))
        shutil.copyfile(bench, target)
        print(f"benchmark log: {target}")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_teacher.py"), "--model", str(dest), "--out",
                    str(args.plot)], check=True)
    print("card row:\n" + card_row(len(runs), run, ev, jax_version(args.out[0])))
    for key, whose in (("val_loss", "the EMA parameters"), ("val_loss_trained", "the trained parameters")):
        if run.get(key):
            print(f"validation loss of {whose}, first and last logged: %.4f -> %.4f" % tuple(run[key]))
    if ev is not None and (ROOT / "weights" / args.baseline / "eval_steps1000.json").exists():
        print(compare(args.baseline, ev))


if __name__ == "__main__":
    main()
