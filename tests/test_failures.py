"""Nothing lost, nothing half-done: refused commands change nothing, bad input is one line and exit code 2,
resumes are honest, and `molgen evaluate` survives any bytes."""

import errno
import gc
import json

import hypothesis
import hypothesis.strategies
import numpy as np
import pytest
from conftest import TINY, cli, one_line_error
from typer.testing import CliRunner

from molgen.cli import app

run = cli


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ct") / "run"
    res = run("train", "--objective", "ct", *TINY, "--steps", 4, "--batch-size", 8, "--data-dir", data_dir,
              "--out", out, "--set", "optim.ckpt_every=2", "--set", "optim.eval_every=0")
    assert res.exit_code == 0, res.output
    return out


def test_a_refused_run_leaves_the_run_as_it_was(ct_run, data_dir):
    before = {p.name: p.read_bytes() for p in ct_run.iterdir() if p.is_file()}
    one_line_error(run("train", "--out", ct_run, "--steps", 5, "--data-dir", data_dir), "--resume")
    assert {p.name: p.read_bytes() for p in ct_run.iterdir() if p.is_file()} == before
    # resuming a run that has finished its steps trains nothing, says how to go on, and exits 0 before any work
    res = run("train", "--resume", "--out", ct_run, "--data-dir", data_dir)
    assert res.exit_code == 0 and "has finished its 4 steps (checkpoint at step 4)" in res.output, res.output
    assert "--steps N, N > 4" in res.output and "training" not in res.output
    res = run("train", "--resume", "--out", ct_run, "--steps", 2, "--data-dir", data_dir)  # fewer than it has done
    assert res.exit_code == 0 and "is at step 4, past --steps 2 (checkpoint at step 4)" in res.output, res.output
    assert {p.name: p.read_bytes() for p in ct_run.iterdir() if p.is_file()} == before
    assert json.loads((ct_run / "config.json").read_text())["objective"] == "ct"


def test_a_run_folder_in_use_is_refused_and_a_refused_new_run_leaves_no_folder(ct_run, tmp_path, data_dir,
                                                                              monkeypatch):
    import fcntl
    import os

    before = {p.name: p.read_bytes() for p in ct_run.iterdir() if p.is_file()}
    fd = os.open(ct_run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's `molgen train`, still writing into it, holds it
    try:
        res = run("train", "--resume", "--out", ct_run, "--steps", 6, "--data-dir", data_dir)
        one_line_error(res, "in use")
        assert "training" not in res.output  # refused before it announced a run
        one_line_error(run("train", "--objective", "ct", "--out", ct_run, "--data-dir", data_dir), "in use")
    finally:
        os.close(fd)
    assert {p.name: p.read_bytes() for p in ct_run.iterdir() if p.is_file()} == before
    new = tmp_path / "new"
    res = run("train", "--objective", "ct", *TINY, "--batch-size", 100000, "--out", new, "--data-dir",
              data_dir)
    one_line_error(res, "larger than the training split")
    assert "training" not in res.output.replace("training split", "")  # refused before it announced a run
    assert not new.exists()
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "empty"))  # the default cache folder, without a cache
    res = run("train", *TINY, "--out", new)
    one_line_error(res, "holds no QM9 cache: run `molgen download`")
    assert "training" not in res.output and not new.exists()


def _edit_config(folder, **model):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"].update(model)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_damaged_model_folder_is_one_line(tmp_path):
    """A truncated params.msgpack, a config.json or meta.json that is not JSON (or not an object), a config edited
    after training, another model's parameters: one line naming the file, nothing written."""
    import shutil

    from molgen.models import shipped_models

    src, other = shipped_models()["edm-small-distill"], shipped_models()["edm-small-stack2"]
    cases = [
        (lambda d: (d / "params.msgpack").write_bytes((src / "params.msgpack").read_bytes()[:1000]),
         "params.msgpack: damaged (", "export or download the model again"),
        (lambda d: (d / "config.json").write_text("{"), "config.json: damaged, not JSON ("),
        (lambda d: (d / "config.json").write_text("[1]"), "config.json: not a molgen config (a JSON list"),
        (lambda d: (d / "meta.json").write_text("{bad"), "meta.json: damaged, not JSON ("),
        (lambda d: _edit_config(d, nf=48), "params.msgpack: does not fit config.json's network: "
         "params/block_0/gcl_0/att/kernel is shape (64, 1) in the file, the network has shape (48, 1)"),
        (lambda d: _edit_config(d, n_layers="four"), "config.json: describes no network molgen can build (TypeError"),
        (lambda d: shutil.copy(other / "params.msgpack", d / "params.msgpack"),
         "params.msgpack: does not fit config.json's network: base/", "is shape (1,) in the file, the network has no such array"),
    ]
    for k, (damage, *message) in enumerate(cases):
        d = tmp_path / f"m{k}"
        shutil.copytree(src, d)
        damage(d)
        one_line_error(run("sample", "--checkpoint", d, "-n", 2, "-o", tmp_path / "x.sdf"), *message)
        assert not (tmp_path / "x.sdf").exists()


def test_a_damaged_run_folder_is_one_line(ct_run, tmp_path, data_dir, caplog):
    """A run whose config.json was edited after its checkpoints, whose checkpoint data is cut short, or whose
    array data was overwritten (orbax wraps that read's error in a bare Exception): sampling from it and resuming
    it are one line each (no traceback, none of the abandoned reads' noise). With an earlier checkpoint the line
    says how to go on from it."""
    import shutil

    edited, cut, overwritten = tmp_path / "edited", tmp_path / "cut", tmp_path / "overwritten"
    shutil.copytree(ct_run, edited)
    _edit_config(edited, nf=48)
    for folder in (cut, overwritten):
        shutil.copytree(ct_run, folder)
    data = [f for f in (cut / "checkpoints").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data  # orbax's array data files
    for f in data:
        f.write_bytes(f.read_bytes()[:10])
    shutil.copytree(overwritten / "checkpoints" / "4", overwritten / "checkpoints" / "2")  # an earlier checkpoint
    arrays = list((overwritten / "checkpoints" / "4").glob("default/ocdbt.process_0/d/*"))
    assert arrays
    for f in arrays:
        f.write_bytes(bytes(100))
    earlier = "if only this checkpoint is damaged, delete its folder 4 there to go on from step 2"
    for folder, reasons in ((edited, ("Requested shape",)), (cut, ()), (overwritten, ("Error reading", earlier))):
        message = "the checkpoint at step 4 cannot be read: damaged, or not made for the model config.json describes"
        one_line_error(run("sample", "--checkpoint", folder, "-n", 2, "-o", tmp_path / "x.sdf"), message, *reasons)
        res = run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir)
        one_line_error(res, message, *reasons)
        assert "Traceback" not in res.output and "Event loop" not in res.output
    assert not (tmp_path / "x.sdf").exists()
    gc.collect()  # the abandoned reads end here, inside this test, and log nothing
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_checkpoint_that_cannot_be_written_is_one_line(ct_run, tmp_path, data_dir):
    """A disk that fills up while a checkpoint is written (here a file size limit, which refuses the checkpoint's
    array data as a full disk would, through orbax's own writes): one line that says which checkpoint is kept and
    how to go on, in train.log too; no partial checkpoint is left, and with room again the run resumes from it.
    So when metrics.jsonl cannot be written."""
    import resource
    import shutil
    import signal

    folder = tmp_path / "full"
    shutil.copytree(ct_run, folder)
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, limit[1]))  # the logs fit, the checkpoint's arrays do not
    try:
        res = run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    told = ("the checkpoint at step 6 cannot be written (File too large); the checkpoint at step 4 is kept; make "
            f"room, then continue with: molgen train --resume --out {folder}")
    one_line_error(res, told)
    assert "Traceback" not in res.output and "ERROR" not in res.output
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["4"]
    assert told in (folder / "train.log").read_text()
    # the disk full when metrics.jsonl is written (a buffered write's error names no file): the same, named
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.name = f, f.name

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full_metrics(path, *a, **k):
        f = real_open(path, *a, **k)
        return Full(f) if str(path).endswith("metrics.jsonl") else f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("molgen.runlog.open", full_metrics, raising=False)
        res = run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir)
    one_line_error(res, f"{folder / 'metrics.jsonl'}: No space left on device; the checkpoint at step 4 is kept")
    res = run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir)
    assert res.exit_code == 0 and "resumed from step 4" in res.output and "finished at step 6" in res.output


def test_a_compilation_cache_on_a_full_disk_is_silent_and_heals(tmp_path):
    """The compiled-program cache cannot take an entry (a full disk; here a file size limit): the programs run,
    with nothing printed for each (JAX warns once per entry). The entries it left cut short are removed at the next
    run, with one line, and written whole again; the run after that reads them and says nothing."""
    import subprocess
    import sys

    def jit_twice(limit: str = ""):
        code = (f"{limit}import jax; from molgen.jax_setup import enable_compilation_cache; "
                f"enable_compilation_cache({str(tmp_path / 'cache')!r}); "
                "print(float(jax.jit(lambda x: x * 2 + 1)(1.0)), float(jax.jit(lambda x: x - 3)(1.0)))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.split() == ["3.0", "-2.0"], res.stderr
        return res.stderr

    full = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); ")
    assert jit_twice(full) == ""
    cut = sorted(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert cut and max(cut) <= 100  # entries begun, none whole
    told = jit_twice().splitlines()
    assert told and all("held a damaged entry for jit__lambda" in t for t in told), told  # both are jit__lambda
    assert min(p.stat().st_size for p in (tmp_path / "cache").iterdir()) > 100
    assert jit_twice() == ""


def test_sample_reads_qm9s_figures_before_it_samples(tmp_path, data_dir, monkeypatch):
    """A QM9 cache damaged after it was written (a flipped byte, found only where the arrays are read): `molgen
    sample` refuses before sampling, so no sampling is lost, and writes nothing. The report reads the atom types
    (the training type mix), so a byte of theirs is flipped."""
    import shutil
    import zipfile

    d = tmp_path / "cache"
    shutil.copytree(data_dir, d)
    npz = d / "qm9_v1.npz"
    with zipfile.ZipFile(npz) as z:
        info = z.getinfo("types.npy")
    data = bytearray(npz.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    monkeypatch.setattr("molgen.keep.sample_kept", lambda *a, **k: pytest.fail("sampled before reading QM9"))
    out = tmp_path / "x.sdf"
    one_line_error(run("sample", "-n", 2, "-o", out, "--data-dir", d), f"the QM9 cache in {d} is damaged",
                   f"run `molgen download --data-dir {d}`")
    assert not out.exists()


def test_a_run_killed_while_writing_its_log_resumes(ct_run, tmp_path, data_dir):
    """metrics.jsonl ending in half a line (a kill while it was written), a plan.json damaged by hand and a
    checkpoint left unfinished (a kill while it was saved): the run resumes, saying (also in train.log) that its
    batch shapes are planned afresh and that the unfinished checkpoint is removed (the same step is saved again);
    the half line is dropped with the steps after the checkpoint, and the plan is written again."""
    import shutil

    folder = tmp_path / "killed"
    shutil.copytree(ct_run, folder)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')
    (folder / "plan.json").write_text("{")
    shutil.copytree(folder / "checkpoints" / "4", folder / "checkpoints" / "6.orbax-checkpoint-tmp")  # unfinished
    res = run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir)
    assert res.exit_code == 0 and "finished at step 6" in res.output, res.output
    removed = "removed checkpoints/6.orbax-checkpoint-tmp: a checkpoint left unfinished"
    assert removed in res.output and removed in (folder / "train.log").read_text() and "absl" not in res.output
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["4", "6"]
    warning = "warning: plan.json holds no batch plan for step 4 (damaged or removed)"
    assert warning in res.output and warning in (folder / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert "6" in json.loads((folder / "plan.json").read_text())


def test_a_file_system_without_locks_still_trains(tmp_path, monkeypatch):
    import errno
    import fcntl

    from molgen.rundir import hold_run

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_run(tmp_path / "run"):
        (tmp_path / "run" / "config.json").write_text("{}")
    assert (tmp_path / "run" / "config.json").exists()


def test_resume_needs_a_finished_checkpoint(tmp_path, data_dir):
    one_line_error(run("train", "--resume", "--out", tmp_path / "nothing", "--data-dir", data_dir), "holds no run")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((tmp_path / "x").as_posix() and "{}")
    (tmp_path / "half" / "metrics.jsonl").write_text("")
    one_line_error(run("train", "--resume", "--out", tmp_path / "half", "--data-dir", data_dir),
                   "holds no finished checkpoint", "config.json, metrics.jsonl")


def test_a_new_run_refuses_a_folder_of_other_files_and_leaves_them(data_dir, tmp_path):
    """A new run writes config.json, train.log, ... into --out: a folder that holds other files (`--out .` in a
    project) is refused before anything is written, and its files are left as they were; a folder of a run's own
    files (one stopped before its first checkpoint) or of hidden files only is taken."""
    from molgen import MolgenError
    from molgen.rundir import check_run_dir

    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("keep")
    one_line_error(run("train", *TINY, "--steps", 2, "--out", mine, "--data-dir", data_dir),
                   f"--out {mine} holds files that are not a training run's (notes.txt)", "give a new or empty folder")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"mine": 1}'
    for names in (("config.json", "metrics.jsonl", "train.log", "pairs.npz"), (".DS_Store",)):
        d = tmp_path / names[0].strip(".")
        d.mkdir()
        for name in names:
            (d / name).write_text("")
        check_run_dir(d, resume=False)
    many = tmp_path / "many"
    many.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        (many / name).write_text("")
    with pytest.raises(MolgenError, match=r"\(a, b, c, d, \.\.\.\)"):
        check_run_dir(many, resume=False)


def test_export_never_writes_a_model_among_a_runs_files(tmp_path):
    """`molgen export` into a training run's folder or its checkpoints (even with --force) is refused before
    anything is read or written: the model's config.json would replace the run's, its files sit among the run's."""
    from molgen.rundir import run_folder_at

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "5").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "config.json").write_text("{}")
    for dest, what in ((run_dir, "a training run's folder"),
                       (run_dir / "checkpoints", "a training run's checkpoints folder"),
                       (run_dir / "checkpoints" / "5", "in a training run's checkpoints folder"),
                       (run_dir / "checkpoints" / "new", "in a training run's checkpoints folder")):
        one_line_error(run("export", "edm-small-distill", dest, "--force"), f"{dest} is {what}; a model goes "
                       "into a folder of its own")
    assert (run_dir / "config.json").read_text() == "{}" and not (run_dir / "checkpoints" / "new").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["5"]
    assert run_folder_at(run_dir / "exported") is None and run_folder_at(tmp_path) is None
    only_log = tmp_path / "stopped"  # a run stopped before its first checkpoint: its metrics log tells it
    only_log.mkdir()
    (only_log / "metrics.jsonl").write_text("")
    assert run_folder_at(only_log) == only_log.absolute()


def test_a_resumed_run_logs_each_step_once(ct_run, data_dir, tmp_path):
    """A run killed after its last checkpoint has logged steps past it: the resume cuts them and logs them once."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(ct_run, run_dir)
    log = run_dir / "metrics.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    with log.open("a") as f:  # as a killed run would have left them
        for step in (last["step"] + 1, last["step"] + 2):
            f.write(json.dumps({**last, "step": step}) + "\n")
    res = run("train", "--resume", "--steps", 8, "--out", run_dir, "--data-dir", data_dir)
    assert res.exit_code == 0, res.output
    steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


@pytest.mark.parametrize("args,message", [
    (("sample", "-n", "abc"), "error: Invalid value for '-n' / '--n': "),
    (("sample", "--nosuch"), "error: No such option: --nosuch"),
    (("train", "--devices", "0"), "error: Invalid value for '--devices': "),
    (("evaluate",), "error: Missing argument 'files' (see molgen evaluate --help)"),
    (("nosuchcommand",), "error: No such command 'nosuchcommand' (see molgen --help)"),
    (("sample", "-n"), "error: Option '-n' requires an argument"),
    # an empty value, which Click would read as the current folder: `train --out ''` trained into it
    (("train", "--recipe", "diffusion", "--out", ""), "error: --out: an empty value (see molgen train --help)"),
    (("sample", "--out=", "-n", "1"), "error: --out: an empty value (see molgen sample --help)"),
    (("evaluate", ""), "error: an empty argument (see molgen evaluate --help)"),
    (("download", "--force", ""), "error: an empty argument (see molgen download --help)"),
])
def test_the_command_lines_own_usage_errors_are_one_line_too(args, message):
    """What Click refuses while parsing (an unknown option or command, a value of the wrong type, a missing
    argument): one line, exit code 2, as molgen's own errors; `molgen` alone still shows its help."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "molgen", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    if args == ("sample", "-n", "abc"):  # once: `molgen` alone shows its help
        bare = subprocess.run([sys.executable, "-m", "molgen"], capture_output=True, text=True, timeout=120)
        assert "Commands" in bare.stdout + bare.stderr and "sample" in bare.stdout + bare.stderr


@pytest.mark.parametrize("args,message", [
    (("sample", "--seed", -1), "--seed must be in 0 .. 2^32 - 1"),
    (("sample", "--seed", 18446744073709551616), "--seed must be in 0 .. 2^32 - 1"),
    (("sample", "--steps", -5), "--steps must be at least 1"),
    (("sample", "--format", "sdf", "-o", "{tmp}/x.xyz"), "--format sdf contradicts the extension"),
    (("sample", "-o", "{tmp}"), "is a folder; give a file name"),
    (("sample", "-o", "{tmp}/x.sdf/"), "-o {tmp}/x.sdf/ names a folder (it ends with /); give a file name"),
    (("evaluate", "{file}", "--json", "{tmp}/r.json/"), "--json {tmp}/r.json/ names a folder"),
    (("sample", "--fix", "{file}/", "-o", "{tmp}/x.sdf"), "--fix {file}/ names a folder (it ends with /)"),
    (("sample", "-o", "{file}/x.sdf"), "does not exist"),
    (("evaluate", "{file}", "--json", "{file}/x.json"), "does not exist"),
    (("train", "--out", "{file}", "--steps", 2), "is a file, not a run folder"),
    (("train", "--steps", -5, "--out", "{tmp}/r"), "--steps must be at least 1"),
    (("train", "--out", "-", "--steps", 2), "--out -: a run is a folder and cannot go to standard output"),
    (("export", "edm-small-distill", "-"), "export to -: a model is a folder and cannot go to standard output"),
    (("train", "--recipe", "diffusion", "--objective", "ct", "--out", "{tmp}/r"),
     "--objective ct contradicts recipe diffusion, whose objective is diffusion; give one of them"),
    (("evaluate", "{file}", "--plots", "-"), "--plots -: the plots are files; give a folder"),
    (("evaluate", "{file}", "--plots", "{file}"), "existing.xyz: is a file; give a folder"),
    # folders that cannot be made: under a file, or where nothing can be written (/proc, even for a superuser)
    (("train", "--out", "{file}/r", "--steps", 2), "--out {file}/r: {file} is a file, not a folder"),
    (("train", "--out", "/proc/r", "--steps", 2), "--out /proc/r: cannot write into /proc"),
    (("evaluate", "{file}", "--plots", "/proc/p"), "--plots /proc/p: cannot write into /proc"),
    (("export", "edm-small-distill", "/proc/m"), "destination /proc/m: cannot write into /proc"),
    (("sample", "-o", "/proc/x.sdf"), "-o /proc/x.sdf: "),
    (("download", "--data-dir", "/proc/q"), "--data-dir /proc/q: cannot write into /proc"),
    (("download", "--data-dir", "{file}"), "is a file, not a folder"),
    (("download", "--data-dir", "{tmp}/d", "--from", "{tmp}/missing.csv"), "no such file or folder"),
    (("sample", "--data-dir", "{tmp}/d", "-o", "{tmp}/x.sdf"), "--data-dir {tmp}/d: no QM9 cache there"),
    (("sample", "--atoms", 300, "-o", "{tmp}/x.sdf"), "--atoms must be in 1 .. 256"),
    (("sample", "--type-bias", "N=0.3", "-o", "{tmp}/x.sdf"), "--type-bias 'N=0.3': give ELEMENT=BIAS pairs"),
    (("sample", "--type-bias", "N=0.1", "--formula", "C2H6O", "-o", "{tmp}/x.sdf"),
     "--type-bias with --formula: the formula gives every atom's type"),
    (("sample", "--fix", "{file}", "--atoms", 300, "-o", "{tmp}/x.sdf"), "--atoms must be in 1 .. 256"),
    (("sample", "-n", 0, "--atoms", 40, "-o", "{tmp}/x.sdf"), "-n must be at least 1"),
    (("evaluate", "{file}", "--reference", "{tmp}"), "--reference {tmp}: no QM9 cache there"),
    (("train", "--data-dir", "{tmp}", "--steps", 2, "--out", "{tmp}/r"), "--data-dir {tmp}: no QM9 cache there"),
    (("evaluate", "{file}", "--per-molecule", "{file}"), "is also an input of this command"),
    (("evaluate", "{tmp}", "--json", "{file}"), "is also an input of this command"),
    (("sample", "--fix", "{file}", "-o", "{file}"), "is also an input of this command"),
    (("sample", "--fix", "{tmp}", "-o", "{tmp}/x.sdf"), "--fix {tmp}: give a .sdf, .sd, .mol, .xyz, .extxyz file"),
    (("sample", "-o", "{file}", "--json", "{file}"), "-o and --json name the same file"),
    (("evaluate", "{file}", "--json", "{tmp}/r.csv", "--per-molecule", "{tmp}/./r.csv"),
     "--json and --per-molecule name the same file"),
    (("download", "--timeout", 0, "--data-dir", "{tmp}/d"), "--timeout must be a positive number"),
    (("sample", "--polisher", "edm-small-diffusion", "-o", "{tmp}/x.sdf"), "add --polish N"),
    (("train", "--init", "edm-small-stack2", "--out", "{tmp}/r", "--steps", 2),
     "objective diffusion starts from a diffusion model, not a consistency model"),
    (("train", "--objective", "distill", "--init", "edm-small-distill", "--teacher", "edm-small-stack2", "--out",
      "{tmp}/r", "--steps", 2), "--teacher edm-small-stack2: must be a diffusion model"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run or model named - would land
    f = tmp_path / "existing.xyz"
    f.write_text("1\nH\nH 0 0 0\n")
    args = [str(a).format(tmp=tmp_path, file=f) for a in args]
    if args[0] == "train" and "--data-dir" not in args:
        args += ["--data-dir", str(data_dir)]
    res = run(*args)
    one_line_error(res, message.format(tmp=tmp_path, file=f))
    assert len(res.output.strip().splitlines()) == 1  # no advice or header before a refusal
    assert f.read_text() == "1\nH\nH 0 0 0\n" and not (tmp_path / "d").exists() and not (tmp_path / "r").exists()
    assert not (tmp_path / "-").exists()


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out.sdf"))

    monkeypatch.setattr("molgen.chem.write.atomic_path", read_only)
    one_line_error(run("sample", "-n", 2, "-o", tmp_path / "out.sdf", "--no-report"), "Read-only file system")


def test_an_output_without_room_is_refused_before_sampling(tmp_path, monkeypatch):
    """A file system with less room than the molecules' atoms take (a lower bound of the file: what the writers
    write for molecules without bonds and properties) is refused before any sampling; a stream, --keep (which keeps
    other draws) and a file system that tells no size are not checked."""
    import os
    from types import SimpleNamespace

    from molgen.chem.io import read_molecules
    from molgen.chem.write import least_bytes

    from molgen.chem.io import Molecule
    from molgen.chem.write import write_molecules

    for fmt in ("sdf", "xyz"):  # exact for molecules without bonds and properties
        for k in (1, 9, 10, 29, 256):
            pos = np.zeros((k, 3))
            pos[:, 0] = 10.0 * np.arange(k)
            write_molecules(tmp_path / f"one.{fmt}", [Molecule(np.ones(k, np.int8), pos, name="molgen_0")], fmt)
            assert least_bytes([k], fmt) == (tmp_path / f"one.{fmt}").stat().st_size, (fmt, k)
    bound = {}
    for fmt in ("sdf", "xyz"):  # the bound is below what is written, and not far below
        path = tmp_path / f"a.{fmt}"
        assert run("sample", "-n", 40, "-o", path, "--no-report", "--seed", 3).exit_code == 0
        bound[fmt] = least_bytes([len(m.types) for m in read_molecules(path)], fmt)
        assert 0.5 * path.stat().st_size < bound[fmt] <= path.stat().st_size, fmt
    free = {"bytes": bound["sdf"] - 1, "blocks": 10**9}
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=free["bytes"], f_frsize=1,  # disk_usage's
                                                                 f_blocks=free["blocks"], f_bfree=free["bytes"]))
    with monkeypatch.context() as mp:
        mp.setattr("molgen.keep.sample", lambda *a, **k: pytest.fail("sampled"))
        res = run("sample", "-n", 40, "-o", tmp_path / "b.sdf", "--seed", 3)
    one_line_error(res, f"-o {tmp_path / 'b.sdf'}: 40 molecules take at least", f"{tmp_path} has 0.")
    assert not (tmp_path / "b.sdf").exists() and "wrote" not in res.output
    free["bytes"] += 1  # room for the bound: written
    assert run("sample", "-n", 40, "-o", tmp_path / "b.sdf", "--no-report", "--seed", 3).exit_code == 0
    free["bytes"] = 0
    for args in (["-o", "-"], ["--keep", "valid", "-o", tmp_path / "c.sdf"]):
        res = CliRunner().invoke(app, ["sample", "-n", "3", "--no-report", *map(str, args)])
        assert res.exit_code == 0, res.output
    free["blocks"] = 0  # a file system that tells no size (some network and virtual ones)
    assert run("sample", "-n", 3, "-o", tmp_path / "d.sdf", "--no-report").exit_code == 0


def test_a_run_without_room_for_a_checkpoint_is_refused_before_training(ct_run, tmp_path, data_dir, monkeypatch):
    """Less room than a checkpoint's parameters and their EMA take: a new run leaves no folder, a resumed one is
    left as it was, before any step."""
    import os
    import shutil
    from types import SimpleNamespace

    import jax

    from molgen.config import RunConfig
    from molgen.state import state_shapes

    shapes = state_shapes(RunConfig.load(ct_run / "config.json"))
    least = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves((shapes.params, shapes.ema)))
    assert 0 < least < sum(f.stat().st_size for f in (ct_run / "checkpoints").rglob("*") if f.is_file())
    folder = tmp_path / "resumed"
    shutil.copytree(ct_run, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=least - 1, f_frsize=1, f_blocks=10**9,
                                                                 f_bfree=least - 1))
    monkeypatch.setattr("molgen.train.make_train_chunk", lambda *a, **k: pytest.fail("trained"))
    res = run("train", "--objective", "ct", *TINY, "--steps", 4, "--batch-size", 8, "--data-dir", data_dir,
              "--out", tmp_path / "new")
    one_line_error(res, f"--out {tmp_path / 'new'}: a checkpoint takes at least")
    assert not (tmp_path / "new").exists()
    one_line_error(run("train", "--resume", "--out", folder, "--steps", 6, "--data-dir", data_dir), "free")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # a distillation's pairs (the teacher's work, before any step) are checked before they are made
    monkeypatch.setattr("molgen.launch.make_pairs", lambda *a, **k: pytest.fail("made pairs"))
    res = run("train", "--objective", "distill", "--init", "edm-small-distill", "--teacher", "edm-small-diffusion",
              "--set", "distill.pairs=500", "--out", tmp_path / "d", "--data-dir", data_dir)
    one_line_error(res, f"--out {tmp_path / 'd' / 'pairs.npz'}: 500 pairs take at least")
    assert not (tmp_path / "d").exists()
    res = run("train", "--objective", "distill", "--init", "edm-small-distill", "--teacher", "edm-small-diffusion",
              "--set", "distill.pairs=500", "--set", "distill.keep=stable", "--set", "distill.targets=polished",
              "--out", tmp_path / "d", "--data-dir", data_dir)  # those kept are known once made: all are counted
    one_line_error(res, f"--out {tmp_path / 'd' / 'pairs.npz'}: 500 pairs, before the stable ones are kept, take "
                        "at least")
    assert not (tmp_path / "d").exists()


def test_a_download_without_room_for_qm9_is_refused_before_it_reads_it(tmp_path, monkeypatch):
    """QM9 from its sources (the archive, qm9pack) needs room for at least its atoms' positions and types: a disk
    without it is refused before anything is fetched or read, and no folder is left; a file of one's own (--from,
    maybe an excerpt) is not checked."""
    import os
    from types import SimpleNamespace

    from conftest import DATA_CSV

    from molgen.data import sources

    free = 29 * 2**20  # the cache of QM9's 2,359,210 atoms takes at least 29.25 MiB
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=free, f_frsize=1, f_blocks=10**12,
                                                                 f_bfree=free))
    monkeypatch.setattr(sources, "_read_source", lambda *a, **k: pytest.fail("read QM9"))
    one_line_error(run("download", "--data-dir", tmp_path / "q"),
                   f"--data-dir {tmp_path / 'q'}: QM9's cache takes at least 29.25 MiB; {tmp_path} has 29.00 MiB free")
    assert not (tmp_path / "q").exists()
    monkeypatch.undo()
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=1, f_frsize=1, f_blocks=10**12, f_bfree=1))
    assert run("download", "--data-dir", tmp_path / "mini", "--from", DATA_CSV).exit_code == 0


def _out_of_memory(*a, **k):
    import jax.numpy as jnp

    jnp.zeros((2**40,), jnp.float32).block_until_ready()  # 4 TiB: JAX's own RESOURCE_EXHAUSTED error


def test_running_out_of_memory_is_one_line_that_says_what_to_change(tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr("molgen.keep.sample_kept", _out_of_memory)
    res = run("sample", "-n", 2, "-o", tmp_path / "out.sdf", "--no-report")
    one_line_error(res, "out of memory (Out of memory allocating 4096.0 GiB); sample fewer molecules (-n), or fewer "
                        "at a time (a smaller --batch-size)")
    assert not (tmp_path / "out.sdf").exists()
    monkeypatch.setattr("molgen.keep.sample_kept", lambda *a, **k: np.zeros(2**50))  # Python's MemoryError
    res = run("sample", "-n", 2, "-o", tmp_path / "out.sdf", "--no-report")
    one_line_error(res, "out of memory (Unable to allocate 8.00 PiB for an array with shape (1125899906842624,) and "
                        "data type float64); sample fewer molecules (-n)")
    tiny = (*TINY, "--batch-size", 8, "--data-dir", data_dir)
    assert run("train", *tiny, "--steps", 2, "--out", tmp_path / "kept").exit_code == 0
    monkeypatch.setattr("molgen.train.make_train_chunk", lambda *a, **k: _out_of_memory)
    for out, resume, kept in (("r", (), "no checkpoint was saved"), ("kept", ("--resume",), "the checkpoint at step 2 "
                                                                                            "is kept")):
        res = run("train", *tiny, "--steps", 4, "--out", tmp_path / out, *resume)
        one_line_error(res, "out of memory (Out of memory allocating 4096.0 GiB); train with a smaller --batch-size")
        log = (tmp_path / out / "train.log").read_text()
        assert "stopped, out of memory at batch size 8 (RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 " \
               f"bytes.); {kept}" in log
    monkeypatch.setattr("molgen.keep.sample_kept", lambda *a, **k: jax_error("INTERNAL: something else"))
    with pytest.raises(RuntimeError, match="INTERNAL: something else"):  # any other failure keeps its traceback
        run("sample", "-n", 2, "-o", tmp_path / "out.sdf", "--no-report")


def jax_error(text):
    import jax

    raise jax.errors.JaxRuntimeError(text)


def test_download_from_another_file_rebuilds_and_garbage_is_refused(tmp_path):
    from conftest import DATA_CSV

    d = tmp_path / "c"
    assert run("download", "--data-dir", d, "--from", DATA_CSV).exit_code == 0
    assert "already present" in run("download", "--data-dir", d, "--from", DATA_CSV).output
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("not,a,qm9,file\n1,2,3,4\n")
    one_line_error(run("download", "--data-dir", d, "--from", garbage))
    assert run("info", "--data-dir", d).exit_code == 0  # the valid cache is still there


def test_export_refuses_a_folder_that_holds_something(tmp_path, ct_run):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "notes.txt").write_text("keep")
    one_line_error(run("export", ct_run, tmp_path / "dest"), "not an empty folder")
    assert (tmp_path / "dest" / "notes.txt").read_text() == "keep" and len(list((tmp_path / "dest").iterdir())) == 1


def test_an_export_that_fails_leaves_no_half_model(tmp_path, ct_run, monkeypatch):
    """The disk fills up after the parameters are written: one line, and no model folder without its recipe (the
    folder the export made is gone; an empty one given is empty again)."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "recipe.toml")

    monkeypatch.setattr("molgen.models._write_recipes", full)
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "new", tmp_path / "empty"):
        one_line_error(run("export", ct_run, dest), "recipe.toml: No space left on device")
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=hypothesis.strategies.binary(max_size=600),
                  cut=hypothesis.strategies.integers(min_value=0, max_value=400),
                  fmt=hypothesis.strategies.sampled_from(["xyz", "sdf"]))
def test_evaluate_survives_any_bytes(data, cut, fmt, tmp_path_factory):
    """Random bytes, and a valid file cut short, end in a report or in one line with exit code 2."""
    d = tmp_path_factory.mktemp("fuzz")
    valid = {"xyz": "5\nmethane\nC 0 0 0\nH 0.63 0.63 0.63\nH 0.63 -0.63 -0.63\nH -0.63 0.63 -0.63\nH -0.63 -0.63 0.63\n",
             "sdf": "x\n  molgen\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n    0.0000    0.0000    0.0000 H"
                    "   0  0\n    0.7400    0.0000    0.0000 H   0  0\n  1  2  1  0\nM  END\n$$$$\n"}[fmt]
    for body in (data, valid.encode()[:cut], valid.encode() + data):
        f = d / f"in.{fmt}"
        f.write_bytes(body)
        res = CliRunner().invoke(app, ["evaluate", str(f), "--no-novelty"])
        assert res.exit_code in (0, 2), (res.exit_code, res.output, body)
        assert "Traceback" not in res.output
        if res.exit_code == 2:
            assert len(res.output.strip().splitlines()) == 1, res.output
        else:
            assert "atom stability" in res.output


def test_a_multi_line_cause_is_still_one_line(tmp_path, capsys):
    from molgen import MolgenError
    from molgen.display import error

    error(MolgenError("x.tar: could not be opened successfully:\n- method gz: not a gzip file\n- method tar: bad"))
    assert capsys.readouterr().err == "error: x.tar: could not be opened successfully: - method gz: not a gzip file - method tar: bad\n"
    junk = tmp_path / "qm9.tar.bz2"
    junk.write_text("not an archive")
    res = run("download", "--data-dir", tmp_path / "d", "--from", junk)
    one_line_error(res, "not a tar archive; --from takes QM9's archive")
    assert not (tmp_path / "d").exists()  # nor the folder it would have been written to
