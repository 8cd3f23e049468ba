"""The command line, end to end on tiny data: errors are one line with exit code 2."""

import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, cli, one_line_error

from molgen.data import qm9, sources
from molgen.jax_setup import compilation_cache_dir



run = cli


def test_help_and_version():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("download", "info", "train", "sample", "evaluate", "models"):
        assert cmd in res.output
    res = run("--version")
    assert res.exit_code == 0 and "molgen 0.1.0" in res.output
    for cmd in ("train", "sample", "evaluate", "download", "export"):
        assert run(cmd, "--help").exit_code == 0
    options = [ln for ln in run("train", "--help").output.splitlines() if ln.startswith("  --")]
    assert len(options) <= 18, options  # the common settings; the rest live in recipes (--set)


def test_download_from_file_then_noop_then_info(tmp_path):
    from conftest import DATA_CSV

    d = tmp_path / "c"
    res = run("download", "--data-dir", d, "--from", DATA_CSV)
    assert res.exit_code == 0 and "written" in res.output
    res = run("download", "--data-dir", d)
    assert res.exit_code == 0 and "already present" in res.output
    res = run("info", "--data-dir", d)
    assert res.exit_code == 0 and "59" in res.output and "histogram" in res.output
    from molgen import __version__
    from molgen.models import default_model

    assert f"{__version__}" in res.output and f"{jax.__version__}, cpu (" in res.output  # where molgen runs
    assert default_model() in res.output and "compiled programs" in res.output
    assert f"with --fix: {default_model(fix=True)}" in " ".join(res.output.replace("│", " ").split())  # the fragment completer


def test_info_on_a_fresh_install_and_a_wrong_data_dir(tmp_path, monkeypatch):
    """Without a QM9 cache `molgen info` still shows where molgen runs, and says how to make one; a --data-dir
    that holds none is refused before anything is shown."""
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "home"))
    res = run("info")
    assert res.exit_code == 0 and "default model" in res.output, res.output
    assert f"no QM9 cache in {tmp_path / 'home'} yet" in res.output and "molgen download" in res.output
    res = run("info", "--data-dir", tmp_path / "none")
    one_line_error(res, "--data-dir", "molgen download --data-dir")
    assert "default model" not in res.output


def test_info_and_the_compiled_programs_where_a_cache_folder_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    monkeypatch.delenv("MOLGEN_JAX_CACHE", raising=False)
    res = run("info")
    assert res.exit_code == 0 and f"$MOLGEN_HOME {tmp_path / 'home'} is a file, not a folder" in res.output
    assert compilation_cache_dir() == tmp_path / "user" / "molgen" / "jax"  # the user's own, as when read-only
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "molgen").write_text("not a folder either")
    monkeypatch.delenv("MOLGEN_HOME")
    res = run("info")
    out = " ".join(res.output.replace("│", " ").split())
    assert f"the cache folder {tmp_path / 'user' / 'molgen'} is a file" in out, out
    assert re.search(r"compiled programs not kept: \S+ cannot be made", out), out  # the path is cut to the width


def test_download_without_any_source(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "qm9pack_csvs", lambda: None)
    monkeypatch.setattr(sources, "_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    one_line_error(run("download", "--data-dir", tmp_path / "x"), "molgen[qm9]", "--from")
    one_line_error(run("download", "--data-dir", tmp_path / "x", "--from", tmp_path / "nope.tar.bz2"),
                   "no such file")


def _xyz(path, body):
    path.write_text(body)
    return path


METHANE = "5\nmethane\nC 0 0 0\nH 0.6293 0.6293 0.6293\nH 0.6293 -0.6293 -0.6293\nH -0.6293 0.6293 -0.6293\nH -0.6293 -0.6293 0.6293\n"


def test_evaluate_each_reports_every_file_apart(tmp_path):
    """--each: a report per file side by side (JSON: one per name); by default one report of all molecules."""
    stable = _xyz(tmp_path / "a.xyz", METHANE * 3)
    broken = _xyz(tmp_path / "b.xyz", METHANE.replace("0.6293 0.6293 0.6293", "2.5 2.5 2.5"))  # an H far away
    res = run("evaluate", stable, broken, "--each", "--json", tmp_path / "e.json", "--no-fidelity", "--no-novelty")
    assert res.exit_code == 0 and "a.xyz" in res.output and "b.xyz" in res.output, res.output
    rep = json.loads((tmp_path / "e.json").read_text())["reports"]
    assert (rep[str(stable)]["n_molecules"], rep[str(stable)]["mol_stability"]) == (3, 1.0)
    assert (rep[str(broken)]["n_molecules"], rep[str(broken)]["mol_stability"]) == (1, 0.0)
    res = run("evaluate", stable, broken, "--json", tmp_path / "p.json", "--no-fidelity", "--no-novelty")
    pooled = json.loads((tmp_path / "p.json").read_text())
    assert res.exit_code == 0 and (pooled["n_molecules"], pooled["mol_stability"]) == (4, 0.75)
    one_line_error(run("evaluate", stable, broken, "--each", "--per-molecule", tmp_path / "m.csv"), "--each")


def test_evaluate_outputs(tmp_path, data_dir):
    ds = qm9.load_qm9(data_dir)
    pos, typ = ds.molecule(int(ds.split("train")[0]))  # a training molecule: not novel
    frame = f"{len(typ)}\ntrain\n" + "".join(f"{'HCNOF'[t]} {x} {y} {z}\n" for t, (x, y, z) in zip(typ, pos))
    f = _xyz(tmp_path / "m.xyz", METHANE * 2 + frame)
    res = run("evaluate", f, "--json", tmp_path / "m.json", "--per-molecule", tmp_path / "m.csv",
              "--reference", data_dir)
    assert res.exit_code == 0, res.output
    assert "atom stability" in res.output and "100.00 %" in res.output
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["n_molecules"] == 3 and data["mol_stability"] == 1.0
    assert data["uniqueness"] == 2 / 3 and data["novelty"] == 0.5  # methane is not in this tiny train split
    from molgen import __version__

    assert data["molgen_version"] == __version__ and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["written_utc"])
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("index,name,formula,n_atoms,")
    assert rows[1].startswith("0,methane,CH4,5,5,1,1,1,")


def test_a_terminal_that_cannot_show_a_character_gets_a_question_mark_not_a_traceback(tmp_path, data_dir):
    import subprocess
    import sys

    f = _xyz(tmp_path / "m.xyz", METHANE * 2)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # as a terminal set to an ASCII-only locale
    res = subprocess.run([sys.executable, "-m", "molgen", "evaluate", str(f), "--reference", str(data_dir),
                          "--no-novelty"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    row = next(ln for ln in res.stdout.splitlines() if "bond lengths W1" in ln)
    assert row.split("|")[-2].strip().endswith(" ?"), res.stdout  # Å


def test_a_platform_that_cannot_start_is_one_line_and_info_shows_it(tmp_path, data_dir):
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "nosuchplatform"}  # as `cuda` where no GPU or CUDA plugin is
    for args, made in ((("sample", "-n", 2, "-o", tmp_path / "x.sdf"), tmp_path / "x.sdf"),
                       (("train", "--model", "tiny", "--steps", 2, "--out", tmp_path / "r", "--data-dir", data_dir),
                        tmp_path / "r")):
        res = subprocess.run([sys.executable, "-m", "molgen", *map(str, args)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("error: JAX could not start its devices for JAX_PLATFORMS=nosuchplatform ("), res.stderr
        assert "without JAX_PLATFORMS molgen runs on the CPU" in res.stderr and not made.exists()
    res = subprocess.run([sys.executable, "-m", "molgen", "info", "--data-dir", str(data_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "no device: JAX could not start" in res.stdout, res.stdout + res.stderr


def test_evaluate_without_a_valid_molecule_says_novelty_is_not_applicable(tmp_path, data_dir):
    """Novelty is a share of the unique valid molecules: with none it is n/a (like uniqueness), not "not
    computed", and no empty note follows the table."""
    lost = _xyz(tmp_path / "lost.xyz", "2\nlost\nC nan 0 0\nH 1 0 0\n")  # no finite geometry: not valid
    res = run("evaluate", lost, "--reference", data_dir, "--json", tmp_path / "f.json", "--no-fidelity")
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if "novelty" in ln)
    assert row.split("│")[-2].strip() == "n/a", res.output
    assert not any(ln.strip().startswith("novelty") for ln in res.output.splitlines()), res.output
    data = json.loads((tmp_path / "f.json").read_text())
    assert (data["validity"], data["novelty"], data["novelty_note"]) == (0.0, None, "n/a")


def test_evaluate_bad_inputs(tmp_path):
    one_line_error(run("evaluate", tmp_path / "missing.sdf"), "missing.sdf", "no such file")
    one_line_error(run("evaluate", _xyz(tmp_path / "e.xyz", "")), "empty")
    cl = _xyz(tmp_path / "cl.xyz", METHANE + "2\nHCl\nH 0 0 0\nCl 0 0 1.27\n")
    one_line_error(run("evaluate", cl), "cl.xyz:8", "unknown element 'Cl'")
    res = run("evaluate", cl, "--skip-invalid", "--no-novelty")
    assert res.exit_code == 0 and "skipped" in res.output and "Cl" in res.output
    one_line_error(run("evaluate", _xyz(tmp_path / "m.xyz", "3\nx\nC 0 0\n")), "m.xyz")
    one_line_error(run("evaluate", _xyz(tmp_path / "n.xyz", "two\nx\n")), "n.xyz:1", "atom count")
    one_line_error(run("evaluate", _xyz(tmp_path / "a.pdb", "x")), "cannot tell the format")


def test_evaluate_and_view_warn_of_flat_molecules(tmp_path):
    """A 2D drawing (every z = 0, the record not marked 3D) is evaluated, with a warning that its bonds are read as
    drawn; 3D ones are not warned about, nor planar and linear ones whose 3D coordinates have z = 0."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.Compute2DCoords(mol)  # a depiction: z = 0
    with Chem.SDWriter(str(tmp_path / "drawn.sdf")) as w:
        w.write(mol)
    blank = Chem.MolToMolBlock(mol).splitlines()
    blank[1] = blank[1].replace("2D", "  ")  # no dimension given, every z = 0: drawn too
    (tmp_path / "blank.sdf").write_text("\n".join(blank) + "\n$$$$\n")
    hcn = Chem.AddHs(Chem.MolFromSmiles("C#N"))
    hcn.AddConformer(Chem.Conformer(3))
    for i, x in enumerate((-1.066, 0.0, 1.156)):  # linear along x: every z = 0, marked 3D
        hcn.GetConformer().SetAtomPosition(i, (x, 0.0, 0.0))
    hcn.GetConformer().Set3D(True)
    with Chem.SDWriter(str(tmp_path / "hcn.sdf")) as w:
        w.write(hcn)
    planar = _xyz(tmp_path / "planar.xyz", "4\nformaldehyde\nC 0 0 0\nO 1.21 0 0\nH -0.55 0.94 0\nH -0.55 -0.94 0\n")
    three_d = _xyz(tmp_path / "m.xyz", METHANE)
    for cmd in (("evaluate", "--no-novelty"), ("view", "-o", tmp_path / "grid.png")):
        for drawn in ("drawn.sdf", "blank.sdf"):
            res = run(cmd[0], tmp_path / drawn, *cmd[1:])
            assert res.exit_code == 0, res.output
            assert "warning: 1 of 1 molecules are 2D drawings" in " ".join(res.output.split()), res.output
        for solid in (three_d, planar, tmp_path / "hcn.sdf"):
            res = run(cmd[0], solid, *cmd[1:])
            assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_molecules_without_hydrogens_are_warned_about(tmp_path):
    """A file written with implicit hydrogens: its heavy atoms count as unstable, so say why; not with
    --remove-h, and not when any molecule has a hydrogen."""
    heavy = _xyz(tmp_path / "heavy.xyz", "3\nethanol\nC 0 0 0\nC 1.52 0 0\nO 2.0 1.35 0.1\n")
    both = _xyz(tmp_path / "both.xyz", (tmp_path / "heavy.xyz").read_text() + METHANE)
    warned = "warning: no molecule has a hydrogen atom; stability counts bonds to the atoms in the file"
    for args in (("evaluate", heavy, "--no-novelty"), ("view", heavy, "-o", tmp_path / "grid.png")):
        res = run(*args)
        assert res.exit_code == 0 and warned in " ".join(res.output.split()), res.output
    for args in (("evaluate", heavy, "--no-novelty", "--remove-h"), ("evaluate", both, "--no-novelty")):
        res = run(*args)
        assert res.exit_code == 0 and "warning" not in res.output, res.output


def _opt(**kw):
    """--set optim.KEY=VALUE arguments."""
    return [a for k, v in kw.items() for a in ("--set", f"optim.{k}={v}")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("run") / "diff"
    res = run("train", "--recipe", "diffusion", *TINY, "--steps", 4, "--batch-size", 8,
              "--data-dir", data_dir, "--out", out, *_opt(ckpt_every=2, eval_every=2))
    assert res.exit_code == 0, res.output
    return out


def test_train_resume_and_sample(tmp_path, trained, data_dir):
    assert (trained / "config.json").exists() and (trained / "metrics.jsonl").exists()
    one_line_error(run("train", *TINY, "--steps", 6, "--batch-size", 8, "--data-dir", data_dir,
                       "--out", trained), "--resume")
    assert json.loads((trained / "config.json").read_text())["optim"]["steps"] == 4  # the refused run wrote nothing
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    at4 = tmp_path / "at4.sdf"
    assert run("sample", "--model", trained, "-n", 3, "--steps", 2, "-o", at4, "--no-report").exit_code == 0
    res = run("train", "--resume", "--steps", 6, "--data-dir", data_dir, "--out", trained)
    assert res.exit_code == 0 and "finished at step 6" in res.output
    # one of a run's checkpoints is a model too: the same molecules as the run gave at that step
    for step, same in ((4, True), (6, False)):
        o = tmp_path / f"ck{step}.sdf"
        res = run("sample", "--model", trained / "checkpoints" / str(step), "-n", 3, "--steps", 2, "-o", o,
                  "--no-report")
        assert res.exit_code == 0 and (o.read_bytes() == at4.read_bytes()) == same, res.output
        assert f"<molgen_checkpoint_step>  (1) \n{step}\n" in o.read_text()  # which checkpoint made them
    one_line_error(run("sample", "--model", trained / "checkpoints" / "5", "-o", tmp_path / "x.sdf"),
                   f"{trained}: no finished checkpoint at step 5 (its checkpoints: 4, 6)")
    o = tmp_path / "ck04.sdf"  # a step written with a leading zero is that step
    assert run("sample", "--model", trained / "checkpoints" / "04", "-n", 3, "--steps", 2, "-o", o,
               "--no-report").exit_code == 0 and o.read_bytes() == at4.read_bytes()
    one_line_error(run("sample", "--model", trained / "config.json", "-o", tmp_path / "x.sdf"),
                   f"{trained / 'config.json'}: a file; give a model folder, a run folder or a run's checkpoint")
    res = run("export", trained / "checkpoints" / "4", tmp_path / "m4")
    meta = json.loads((tmp_path / "m4" / "meta.json").read_text())
    assert res.exit_code == 0 and (meta["source_run"], meta["step"]) == (str(trained), 4), res.output
    # a time limit stops at the end of a chunk (steps 4 -> 50) and says how to go on (a limit that any chunk
    # exceeds: the chunk's program may be compiled already)
    res = run("train", "--resume", "--steps", 60, "--max-minutes", 1e-9, "--data-dir", data_dir, "--out", copy)
    assert res.exit_code == 0 and "stopped at step 50 of 60" in res.output
    squeezed = "".join(res.output.split())  # however the console wrapped the line
    assert "".join(f"continue with: molgen train --resume --out {copy}".split()) in squeezed
    # train.log: the run's story with UTC times, continued by the resumed run; the refused one wrote nothing
    log = [ln.split("  ", 1) for ln in (trained / "train.log").read_text().splitlines()]
    assert all(len(t) == 19 and t[4] == "-" and t[13] == ":" for t, _ in log)
    said = [text for _, text in log]
    assert said[0].startswith("molgen 0.1.0, diffusion: steps 0 -> 4, batch 8") and "seed" in said[0]
    assert f"jax {jax.__version__}, XLA_FLAGS {os.environ['XLA_FLAGS'].strip()}" in said[0]  # how it compiled
    assert [t for t in said if t.startswith("step ") and "loss" in t and "left" in t]  # progress lines
    i = said.index("resumed from step 4 in " + str(trained))
    assert "checkpoint at step 4" in said[i - 1] and "steps 4 -> 6" in said[i + 1]
    # each run's first chunk is told as it starts, before it ends (compiling and a chunk can take minutes)
    assert said[1].startswith("steps 1-4 running (compiled and started in ") and said[1].endswith(" s)")
    assert said[i + 2].startswith("steps 5-6 running (compiled and started in ")
    assert said[-1].startswith("checkpoint at step 6") and sum("steps 0 ->" in t for t in said) == 1
    out1, out2 = tmp_path / "a.sdf", tmp_path / "b.sdf"
    for o, flag in ((out1, "--checkpoint"), (out2, "--model")):  # --model: the same option's other name
        res = run("sample", flag, trained, "-n", 7, "--steps", 3, "-o", o, "--seed", 4,
                  "--data-dir", data_dir, "--json", tmp_path / "r.json")
        assert res.exit_code == 0, res.output
    assert out1.read_bytes() == out2.read_bytes()  # same checkpoint, seed, options -> same file
    assert "molecule stability" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["n_molecules"] == 7
    res = run("sample", "--checkpoint", trained, "-n", 3, "--steps", 2, "-o", tmp_path / "c.xyz", "--no-report")
    assert res.exit_code == 0 and "stability" not in res.output
    assert (tmp_path / "c.xyz").read_text().startswith(tuple("0123456789"))
    res = run("evaluate", out1, "--no-novelty")
    assert res.exit_code == 0 and "7" in res.output
    res = run("sample", "--checkpoint", trained, "-n", 5, "--sampler", "ode", "--steps", 3, "-o", tmp_path / "o.sdf",
              "--no-report", "--json", tmp_path / "o.json", "--data-dir", data_dir)
    assert res.exit_code == 0 and "ode sampler, 3 steps" in res.output and "5 network calls" in res.output, res.output
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["n_molecules"] == 5 and rep["molgen_sampler"] == "ode" and rep["molgen_calls"] == 5


@pytest.fixture(scope="module")
def ect(tmp_path_factory, trained, data_dir):
    """A consistency model tuned from ``trained`` (ect); also the student that the distill tests start from."""
    out = tmp_path_factory.mktemp("ect") / "ect"
    res = run("train", "--objective", "ect", "--init", trained, "--steps", 2, "--batch-size", 8, "--data-dir", data_dir,
              "--out", out, *_opt(ckpt_every=2), "--set", "consistency.total_steps=7")
    assert res.exit_code == 0, res.output
    return out


def test_ect_from_diffusion_and_sample(tmp_path, trained, ect, data_dir):
    cfg = json.loads((ect / "config.json").read_text())
    assert cfg["objective"] == "ect" and cfg["optim"]["steps"] == 2 and cfg["consistency"]["total_steps"] == 7
    assert cfg["consistency"]["parametrization"] == "ict-vp" and cfg["init"] == str(trained)
    assert cfg["consistency"]["sigma_data_x"] != 1.0  # measured on the data, not the default 1.0
    assert cfg["diffusion"] == json.loads((trained / "config.json").read_text())["diffusion"]  # its network's schedule
    assert cfg["distill"] is None  # a consistency model's config holds no distillation settings
    res = run("sample", "--checkpoint", ect, "-n", 4, "--steps", 2, "-o", tmp_path / "e.sdf", "--no-report")
    assert res.exit_code == 0, res.output
    one_line_error(run("train", "--objective", "ect", "--data-dir", data_dir, "--out", tmp_path / "z"), "--init")
    one_line_error(run("train", "--objective", "ect", "--init", trained, "--set", "consistency.s9=3", "--data-dir",
                       data_dir, "--out", tmp_path / "z"), "[consistency] has no setting 's9'")
    one_line_error(run("train", "--objective", "ect", "--init", ect, "--data-dir", data_dir, "--out", tmp_path / "z"),
                   "starts from a diffusion model, not a consistency model")
    assert not (tmp_path / "z").exists()


def test_distill_from_a_consistency_model_resume_and_sample(tmp_path, trained, ect, data_dir):
    out = tmp_path / "kd"
    pairs = ("--set", "distill.pairs=20", "--set", "distill.teacher_steps=2")
    res = run("train", "--objective", "distill", "--init", ect, "--teacher", trained, *pairs, "--batch-size", 4,
              "--steps", 2, *_opt(ckpt_every=1, eval_every=1), "--devices", 1, "--out", out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    ccfg = json.loads((ect / "config.json").read_text())
    assert cfg["objective"] == "distill" and cfg["distill"]["teacher"] == str(trained) and cfg["distill"]["pairs"] == 20
    assert cfg["model"] == ccfg["model"] and cfg["consistency"] == ccfg["consistency"]  # the student is --init's
    with np.load(out / "pairs.npz") as z:
        assert z["n_atoms"].shape == (20,) and int(z["n_valid"]) == 1
    stamp = (out / "pairs.npz").stat().st_mtime_ns
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "position_error" in log[-1] and "val_loss" in log[-1]
    # resumed in the grouped layout (an optimiser setting): the pairs' noise rows follow the grouped atoms
    res = run("train", "--resume", "--steps", 3, "--set", "optim.layout=grouped", "--out", out, "--devices", 1)
    assert res.exit_code == 0 and "step 3" in res.output, res.output
    assert json.loads((out / "config.json").read_text())["optim"]["layout"] == "grouped"
    assert (out / "pairs.npz").stat().st_mtime_ns == stamp  # pairs are made once per run
    res = run("sample", "--checkpoint", out, "-n", 4, "--steps", 1, "-o", tmp_path / "d.sdf", "--no-report")
    assert res.exit_code == 0, res.output
    one_line_error(run("sample", "--checkpoint", out, "--sampler", "ode", "-o", tmp_path / "x.sdf"),
                   "applies to diffusion models")
    # the anneal sampler, then one call of the teacher the run recorded (--polish)
    res = run("sample", "--checkpoint", out, "-n", 4, "--steps", 2, "--sampler", "anneal", "--polish", 1,
              "-o", tmp_path / "r.sdf", "--no-report")
    assert res.exit_code == 0 and "+ 1 polishing calls of" in res.output and "3 network calls" in res.output, res.output
    assert "molgen_polish" in (tmp_path / "r.sdf").read_text()
    one_line_error(run("sample", "--checkpoint", trained, "--sampler", "anneal", "-o", tmp_path / "x.sdf"),
                   "applies to consistency models")
    one_line_error(run("sample", "--checkpoint", out, "--polisher", trained, "-o", tmp_path / "x.sdf"),
                   "add --polish N")
    one_line_error(run("sample", "--checkpoint", out, "--polish", 1, "--polisher", out, "-o", tmp_path / "x.sdf"),
                   "must be a diffusion model")
    # polished targets: --init's own one-call molecules polished by 2 teacher calls, from noise at T 0.5
    ref = tmp_path / "kd_polished"
    res = run("train", "--objective", "distill", "--init", ect, "--teacher", trained, "--set", "distill.pairs=20",
              "--set", "distill.targets=polished", "--set", "distill.polish_calls=2",
              "--set", "distill.pair_temperature=0.5", "--batch-size", 4, "--steps", 1, *_opt(ckpt_every=1),
              "--devices", 1, "--out", ref)
    assert res.exit_code == 0, res.output
    dcfg = json.loads((ref / "config.json").read_text())["distill"]
    assert (dcfg["targets"], dcfg["polish_calls"], dcfg["pair_temperature"]) == ("polished", 2, 0.5)
    with np.load(ref / "pairs.npz") as z:
        assert int(z["refine_rounds"]) == 2 and z["n_atoms"].shape == (20,) and float(z["temperature"]) == 0.5
    with np.load(out / "pairs.npz") as z:  # the same seed's noise, drawn at half the temperature
        assert np.allclose(0.5 * z["noise_x"], np.load(ref / "pairs.npz")["noise_x"], atol=1e-6)
    res = run("export", ref, tmp_path / "w", "--temperature", 0.8, "--renoise", 0.3)
    assert res.exit_code == 0, res.output
    wmeta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert wmeta["temperature"] == 0.8 and wmeta["renoise"] == 0.3  # the sampling defaults it recommends
    (tmp_path / "w" / "meta.json").write_text(json.dumps({**wmeta, "type_bias": {"N": 0.2},
                                                          "type_bias_one_call": {"O": 0.1}}))
    assert run("export", tmp_path / "w", tmp_path / "w2").exit_code == 0  # a model folder's card goes with it
    w2 = json.loads((tmp_path / "w2" / "meta.json").read_text())
    assert (w2["type_bias"], w2["type_bias_one_call"]) == ({"N": 0.2}, {"O": 0.1})
    shown = run("models", tmp_path / "w2").output
    assert "O 0.1 (1 call); N 0.2 (2 or more calls)" in " ".join(shown.split()), shown
    res = run("sample", "--checkpoint", tmp_path / "w", "-n", 4, "--steps", 2, "-o", tmp_path / "w.sdf", "--no-report")
    assert res.exit_code == 0 and "temperature 0.8, re-noise 0.3," in res.output, res.output
    assert (tmp_path / "w.sdf").read_text().count("$$$$") == 4
    recipe = tomllib.loads((tmp_path / "w" / "recipe.toml").read_text())  # the settings that trained it
    assert recipe["init"] == str(ect) and recipe["distill"]["teacher"] == str(trained)
    assert recipe["distill"]["targets"] == "polished" and "model" not in recipe  # the network is --init's
    one_line_error(run("export", ref, tmp_path / "w"), "not an empty folder")
    (tmp_path / "w" / "recipe.toml").write_text("# the card's own\n")
    assert run("export", ref, tmp_path / "w", "--force").exit_code == 0
    assert (tmp_path / "w" / "recipe.toml").read_text() == "# the card's own\n"  # kept, not replaced
    (tmp_path / "a-file").write_text("kept")
    one_line_error(run("export", ref, tmp_path / "a-file", "--force"), "a-file is a file; a model is a folder")
    assert (tmp_path / "a-file").read_text() == "kept"
    (tmp_path / "kd2").mkdir()
    (tmp_path / "kd2" / "pairs.npz").write_bytes((out / "pairs.npz").read_bytes())
    one_line_error(run("train", "--objective", "distill", "--init", ect, "--teacher", trained, "--set",
                       "distill.pairs=20", "--set", "distill.pair_temperature=0.5", "--batch-size", 4, "--devices", 1,
                       "--out", tmp_path / "kd2"), "temperature 1, the run wants 0.5")
    # keep = stable: a tiny network's targets are not stable molecules, so none is kept; the pairs stay saved
    one_line_error(run("train", "--objective", "distill", "--init", ect, "--teacher", trained, "--set",
                       "distill.pairs=20", "--set", "distill.keep=stable", "--batch-size", 4, "--devices", 1,
                       "--out", tmp_path / "kd3"), "20 pairs drawn, 0 with a stable target: too few for batch size 4")
    with np.load(tmp_path / "kd3" / "pairs.npz") as z:
        assert (int(z["drawn"]), str(z["kept"]), z["n_atoms"].shape) == (20, "stable", (0,))
    # balance: the run's training pairs resampled toward QM9's numbers of N, O and F atoms; QM9 checked first
    bal = ("train", "--objective", "distill", "--init", ect, "--teacher", trained, "--set", "distill.pairs=20",
           "--set", "distill.balance=0.5", "--batch-size", 4, "--steps", 1, *_opt(ckpt_every=1), "--devices", 1)
    one_line_error(run(*bal, "--data-dir", tmp_path / "none", "--out", tmp_path / "kd4"), "no QM9 cache there")
    assert not (tmp_path / "kd4" / "pairs.npz").exists()  # refused before the teacher's work
    (tmp_path / "kd4").mkdir()
    (tmp_path / "kd4" / "pairs.npz").write_bytes((out / "pairs.npz").read_bytes())
    res = run(*bal, "--data-dir", data_dir, "--out", tmp_path / "kd4")
    assert res.exit_code == 0 and "resampled toward QM9's numbers of N, O and F atoms" in res.output, res.output
    assert json.loads((tmp_path / "kd4" / "config.json").read_text())["distill"]["balance"] == 0.5
    one_line_error(run(*bal[:-2], "--set", "distill.balance=2", "--out", tmp_path / "z"), "distill.balance")
    one_line_error(run("train", "--objective", "distill", "--init", ect, "--out", tmp_path / "z"), "--teacher")
    one_line_error(run("train", "--objective", "distill", "--init", trained, "--teacher", trained, "--out",
                       tmp_path / "z"), "consistency model")
    one_line_error(run("train", "--objective", "distill", "--init", ect, "--teacher", ect, "--set", "distill.pairs=20",
                       "--batch-size", 4, "--out", tmp_path / "z"), "diffusion model")


def test_a_distill_run_with_a_relative_init_resumes_from_any_directory(tmp_path, trained, ect, monkeypatch):
    """A distillation run keeps its anchor's parameters (--init's) in its folder: resuming it from another
    directory, where the relative --init names nothing, continues the run; a damaged copy is one line."""
    from molgen.models import load_model, read_params

    out = tmp_path / "kd_rel"
    monkeypatch.chdir(ect.parent)
    res = run("train", "--objective", "distill", "--init", ect.name, "--teacher", trained, "--set", "distill.pairs=20",
              "--set", "distill.teacher_steps=2", "--batch-size", 4, "--steps", 1, *_opt(ckpt_every=1), "--devices", 1,
              "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["init"] == ect.name  # as given
    kept = read_params(out / "anchor.msgpack", load_model(ect).cfg)
    for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(load_model(ect).params)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.chdir(tmp_path)
    assert not Path(ect.name).exists()
    res = run("train", "--resume", "--steps", 2, "--out", out, "--devices", 1)
    assert res.exit_code == 0 and "step 2" in res.output, res.output
    (out / "anchor.msgpack").write_bytes(b"\x93not msgpack")
    one_line_error(run("train", "--resume", "--steps", 3, "--out", out, "--devices", 1),
                   "anchor.msgpack: damaged", "delete it to read the anchor ect again")


def test_an_exported_model_carries_the_recipe_that_trains_it_again(tmp_path, trained, data_dir):
    """molgen export writes the run's settings as recipe.toml; training from it repeats the run exactly (same
    config, bit-equal parameters); exporting the model folder again copies its recipe."""
    from molgen.models import load_model

    assert run("export", trained, tmp_path / "m").exit_code == 0  # 4 steps, or 6 after the resume test
    text = (tmp_path / "m" / "recipe.toml").read_text()
    steps = json.loads((trained / "config.json").read_text())["optim"]["steps"]
    assert text.startswith(f"# The settings of the training run {trained} ({steps} steps)")
    assert "size_hist" not in text and "[model]" in text and "nf = 32" in text  # settings, not measured values
    res = run("train", "--recipe", tmp_path / "m" / "recipe.toml", "--data-dir", data_dir, "--out", tmp_path / "again")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((trained / "config.json").read_text())
    a, b = load_model(trained).params, load_model(tmp_path / "again").params
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert run("export", tmp_path / "m", tmp_path / "m2").exit_code == 0
    assert (tmp_path / "m2" / "recipe.toml").read_text() == text


def test_export_stack_samples_as_polish_and_trains(tmp_path, trained, ect, data_dir):
    """`molgen export --stack N` appends N denoising stages of the model's diffusion model to its network: one
    call of the result gives `sample --polish N`'s molecules; distillation trains the whole stack."""
    from molgen.chem.io import read_molecules
    from molgen.models import load_model

    st = tmp_path / "stacked"
    res = run("export", ect, st, "--stack", 2, "--temperature", 0.9)
    assert res.exit_code == 0, res.output
    scfg = json.loads((st / "config.json").read_text())
    assert len(scfg["stack"]["levels"]) == 2 and scfg["stack"]["source"] == trained.name
    assert "2 denoising stages" in json.loads((st / "meta.json").read_text())["trained"]
    recipe = (st / "recipe.toml").read_text()  # the consistency run's settings, then the stacking command
    assert f"then: molgen export RUN {st.name} --stack 2\n" in recipe and tomllib.loads(recipe)["objective"] == "ect"
    res = run("sample", "--checkpoint", st, "-n", 5, "--steps", 1, "-o", tmp_path / "s.xyz", "--no-report",
              "--json", tmp_path / "s.json", "--data-dir", data_dir)
    assert res.exit_code == 0 and "network 32x1 + 2 stages of 32x1" in res.output, res.output
    assert "1 network call per molecule" in res.output
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["molgen_calls"] == 1 and rep["molgen_network"] == "32x1 + 2 stages of 32x1"
    res = run("sample", "--checkpoint", ect, "-n", 5, "--steps", 1, "--polish", 2, "--temperature", 0.9,
              "-o", tmp_path / "r.xyz", "--no-report")
    assert res.exit_code == 0, res.output
    for a, b in zip(read_molecules(tmp_path / "s.xyz"), read_molecules(tmp_path / "r.xyz")):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-3)
        np.testing.assert_array_equal(a.types, b.types)
    kd = tmp_path / "kd_stack"  # distillation from the stacked model trains all of it
    res = run("train", "--objective", "distill", "--init", st, "--teacher", trained, "--set", "distill.pairs=20",
              "--set", "distill.teacher_steps=2", "--batch-size", 4, "--steps", 2, *_opt(ckpt_every=2, lr=1e-2,
              warmup=1), "--devices", 1, "--out", kd)
    assert res.exit_code == 0, res.output
    before, after = load_model(st).params, load_model(kd)
    assert after.cfg.stack is not None
    for part in ("base", "stage"):
        moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                 zip(jax.tree_util.tree_leaves(before[part]), jax.tree_util.tree_leaves(after.params[part]))]
        assert max(moved) > 0
    res = run("sample", "--checkpoint", kd, "-n", 3, "--steps", 2, "-o", tmp_path / "k.sdf", "--no-report")
    assert res.exit_code == 0, res.output
    one_line_error(run("export", trained, tmp_path / "x", "--stack", 2), "consistency model")
    # a stacked model's --stack N re-spreads its own stages: 1 stage = `sample --polish 1` of the source
    st1 = tmp_path / "stacked1"
    res = run("export", st, st1, "--stack", 1)
    assert res.exit_code == 0, res.output
    assert json.loads((st1 / "config.json").read_text())["stack"]["levels"] == [0.1]
    meta1 = json.loads((st1 / "meta.json").read_text())
    assert "2 stages re-spread over 1 level (" in meta1["trained"]
    assert meta1["temperature"] == 0.9  # the exported model's sampling default goes with it
    for args, out in (((st1,), "s1.xyz"), ((ect, "--polish", 1), "r1.xyz")):
        res = run("sample", "--checkpoint", *args, "-n", 5, "--steps", 1, "--temperature", 0.9, "-o", tmp_path / out,
                  "--no-report")
        assert res.exit_code == 0, res.output
    for a, b in zip(read_molecules(tmp_path / "s1.xyz"), read_molecules(tmp_path / "r1.xyz")):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-3)
        np.testing.assert_array_equal(a.types, b.types)
    # with --stages-from, a stacked model gets N more stages after its own: one call = its call + `--polish N`
    st2 = tmp_path / "stacked_again"
    res = run("export", st, st2, "--stack", 2, "--stages-from", trained)
    assert res.exit_code == 0, res.output
    assert json.loads((st2 / "meta.json").read_text())["trained"].count("2 denoising stages of diff appended") == 2
    for args, out in (((st2,), "a2.xyz"), ((st, "--polish", 2, "--polisher", trained), "p2.xyz")):
        res = run("sample", "--checkpoint", *args, "-n", 5, "--steps", 1, "--temperature", 0.9, "-o", tmp_path / out,
                  "--no-report")
        assert res.exit_code == 0, res.output
    for a, b in zip(read_molecules(tmp_path / "a2.xyz"), read_molecules(tmp_path / "p2.xyz"), strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-3)
        np.testing.assert_array_equal(a.types, b.types)
    one_line_error(run("export", ect, tmp_path / "x", "--stages-from", trained), "--stack N")
    # --unstack removes the stages appended last: the stacked model again, the same molecules
    st3 = tmp_path / "unstacked"
    res = run("export", st2, st3, "--unstack")
    assert res.exit_code == 0, res.output
    assert json.loads((st3 / "config.json").read_text()) == json.loads((st / "config.json").read_text())
    assert json.loads((st3 / "meta.json").read_text())["trained"].endswith("appended (not trained further), then its last 2 stages removed")
    assert "--unstack" in (st3 / "recipe.toml").read_text().splitlines()[0]
    res = run("sample", "--checkpoint", st3, "-n", 5, "--steps", 1, "-o", tmp_path / "u.xyz", "--no-report")
    assert res.exit_code == 0, res.output
    for a, b in zip(read_molecules(tmp_path / "u.xyz"), read_molecules(tmp_path / "s.xyz"), strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
        np.testing.assert_array_equal(a.types, b.types)
    one_line_error(run("export", ect, tmp_path / "x", "--unstack"), "no denoising stages to remove")
    one_line_error(run("export", st2, tmp_path / "x", "--unstack", "--stack", 2), "give one")


def test_diffusion_warm_start_keeps_weights_and_shape(tmp_path, trained, data_dir):
    """--init starts a diffusion run from the given model's weights and network shape."""
    from molgen.models import load_model

    out = tmp_path / "warm"
    res = run("train", "--init", trained, "--steps", 1, "--lr", 1e-12, "--batch-size", 8, "--data-dir", data_dir,
              "--out", out, *_opt(ckpt_every=1, warmup=1))
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    tcfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"] == tcfg["model"] and cfg["init"] == str(trained)
    for a, b in zip(jax.tree_util.tree_leaves(load_model(trained).params), jax.tree_util.tree_leaves(load_model(out).params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    one_line_error(run("train", "--objective", "ct", "--init", trained, "--data-dir", data_dir, "--out", tmp_path / "z"),
                   "--init")
    one_line_error(run("train", "--init", trained, "--model", "base", "--data-dir", data_dir, "--out", tmp_path / "z"),
                   "takes its network from --init")


def test_sample_bad_inputs(tmp_path, trained):
    from molgen.chem.io import read_molecules

    one_line_error(run("sample", "--checkpoint", tmp_path / "none", "-o", tmp_path / "x.sdf"), "no such model")
    one_line_error(run("sample", "--model", "edm-small-stak", "-o", tmp_path / "x.sdf"),
                   "edm-small-stak: no such model folder, run folder or shipped model (did you mean edm-small-stack? ")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.pdb"), "cannot tell the format")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--steps", 0), "--steps")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "-n", 0), "-n")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "nodir" / "x.sdf"), "does not exist")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--steps", 2,
                       "--sigmas", "1,2"), "--sigmas applies to the consistency samplers")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--sampler", "euler"),
                   "--sampler must be one of ancestral, ode")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--temperature", 0),
                   "--temperature must be a positive number")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--renoise", 0.5),
                   "--renoise applies to the multistep sampler of consistency models")
    one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--novelty", "--no-report"),
                   "--novelty is a figure of the report")  # it would be computed for nothing
    one_line_error(run("export", trained, tmp_path / "w", "--renoise", 0.5), "--renoise applies to consistency")
    one_line_error(run("export", trained, tmp_path / "w", "--temperature", -1), "--temperature must be a positive number")
    assert not (tmp_path / "w").exists()
    assert not (tmp_path / "x.sdf").exists()
    sizes = [i for i, c in enumerate(json.loads((trained / "config.json").read_text())["data"]["size_hist"]) if c]
    for atoms in (sizes[-1] + 1, sizes[0] - 1):  # above and below the sizes it was trained on
        res = run("sample", "--checkpoint", trained, "-n", 1, "--steps", 2, "--atoms", atoms, "-o",
                  tmp_path / "odd.sdf", "--no-report")
        warned = f"trained on molecules of {sizes[0]}-{sizes[-1]} atoms; expect poor molecules with --atoms {atoms}"
        assert res.exit_code == 0 and warned in " ".join(res.output.split()), res.output
    res = run("sample", "--checkpoint", trained, "-n", 1, "--steps", 2, "--atoms", sizes[0], "-o", tmp_path / "odd.sdf",
              "--no-report")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    for atoms in (0, 257, 100000, "250-300"):  # 100000 atoms would ask for ~150 GiB of pair indices
        one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--atoms", atoms),
                       "--atoms must be in 1 .. 256", f"got {atoms}")
    for atoms, msg in (("x", "--atoms: give a count (e.g. 19) or a range (e.g. 15-20), got 'x'"),
                       ("9-4", "a range goes from the smaller count"),
                       (f"{sizes[-1] + 1}-{sizes[-1] + 5}", f"the model was trained on no molecule of {sizes[-1] + 1}")):
        one_line_error(run("sample", "--checkpoint", trained, "-o", tmp_path / "x.sdf", "--atoms", atoms), msg)
    res = run("sample", "--checkpoint", trained, "-n", 6, "--steps", 2, "--atoms", f"{sizes[0]}-{sizes[1]}", "-o",
              tmp_path / "range.xyz", "--no-report")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    assert {len(m.types) for m in read_molecules(tmp_path / "range.xyz")} <= {sizes[0], sizes[1]}
    existing = tmp_path / "keep.sdf"
    existing.write_text("precious")
    one_line_error(run("sample", "--checkpoint", trained, "-o", existing, "--steps", 0), "--steps")
    assert existing.read_text() == "precious"


def test_cpu_devices_choice_and_errors(tmp_path, data_dir):
    from molgen.jax_setup import auto_cpu_devices

    # One device per core while the batch splits evenly with >= 8 molecules per device.
    assert [auto_cpu_devices(64, c) for c in (1, 2, 3, 16)] == [1, 2, 2, 8]
    assert auto_cpu_devices(48, 16) == 6 and auto_cpu_devices(12, 2) == 1 and auto_cpu_devices(7, 4) == 1
    one_line_error(run("train", *TINY, "--steps", 1, "--batch-size", 8, "--devices", 3,
                       "--data-dir", data_dir, "--out", tmp_path / "r"), "not divisible by --devices 3")
    assert not (tmp_path / "r").exists()


def test_resume_with_new_learning_rate_batch_size_and_precision(tmp_path, data_dir):
    out = tmp_path / "run"
    base = ("--data-dir", data_dir, "--out", out, *_opt(ckpt_every=2, eval_every=2))
    one_line_error(run("train", *TINY, "--precision", "fp8", *base),
                   "--precision must be one of auto, float32, tf32, bf16, got 'fp8'")
    one_line_error(run("train", "--model", "huge", *base), "--model must be one of tiny, small, base, edm, got 'huge'")
    assert not out.exists()  # refused before anything is written
    res = run("train", *TINY, "--steps", 2, "--batch-size", 8, "--lr", 1e-3, "--precision", "bf16", *base)
    assert res.exit_code == 0 and json.loads((out / "config.json").read_text())["optim"]["precision"] == "bf16"
    for lr in (-1, "inf"):
        one_line_error(run("train", "--resume", "--steps", 3, "--lr", lr, "--data-dir", data_dir, "--out", out),
                       f"--lr must be a positive number, got {float(lr)}")
    one_line_error(run("train", "--resume", "--model", "base", "--data-dir", data_dir, "--out", out),
                   "its network is 32x1, not base (128x6)")
    one_line_error(run("train", "--resume", "--set", "model.preset=huge", "--data-dir", data_dir, "--out", out),
                   "its network is 32x1, not huge (only")
    one_line_error(run("train", "--resume", "--model", "tiny", "--data-dir", data_dir, "--out", out),
                   "its network is 32x1, not tiny (32x2)")
    one_line_error(run("train", "--resume", *TINY, "--set", "model.nf=16", "--data-dir", data_dir, "--out", out),
                   "its model.nf is 32, not 16")
    res = run("train", "--resume", *TINY, "--steps", 2, "--data-dir", data_dir, "--out", out)  # as it was started
    assert res.exit_code == 0 and "has finished its 2 steps" in res.output, res.output
    res = run("train", "--resume", "--steps", 3, "--lr", 2e-5, "--batch-size", 4, "--precision", "float32",
              "--data-dir", data_dir, "--out", out)
    assert res.exit_code == 0 and "step 3" in res.output, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["optim"]["lr"], cfg["optim"]["batch_size"], cfg["optim"]["steps"]) == (2e-5, 4, 3)
    assert cfg["optim"]["precision"] == "float32"
    assert cfg["model"]["nf"] == 32  # the rest is the run's own
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and 0 < last["lr"] <= 2e-5


def test_recipes_and_overrides(tmp_path, data_dir):
    """A recipe file sets what it names; --set and the direct options override it; mistakes are one line."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('objective = "diffusion"\nseed = 3\n[model]\npreset = "tiny"\nnf = 16\n'
                      '[optim]\nbatch_size = 8\nsteps = 2\nlr = 1e-3\nckpt_every = 2\n')
    out = tmp_path / "run"
    res = run("train", "--recipe", recipe, "--set", "optim.warmup=1", "--lr", 2e-3, "--data-dir", data_dir,
              "--out", out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["seed"], cfg["model"]["nf"], cfg["model"]["n_layers"]) == (3, 16, 2)
    assert (cfg["optim"]["warmup"], cfg["optim"]["lr"], cfg["optim"]["steps"]) == (1, 2e-3, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text("objective = [\n")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('# r\xe9glages\nobjective = "diffusion"\n'.encode("latin-1"))
    for args, msg in ((("--recipe", bad), "not a valid TOML recipe"),
                      (("--recipe", "nope"), "no such recipe file or shipped recipe (shipped"),
                      (("--recipe", "difusion"), "(did you mean diffusion? shipped: ct, diffusion"),
                      (("--recipe", latin1), "latin1.toml: not a valid TOML recipe (not UTF-8 text"),
                      (("--recipe", tmp_path), "a folder; --recipe takes a TOML file"),
                      (("--set", "optim.lr"), "expected section.key=value"),
                      (("--set", "optim.lr=fast"), "optim.lr must be a number"),
                      (("--set", "model.preset=huge"), "model.preset must be one of"),
                      (("--set", "optics.lr=1"), "unknown setting(s) optics"),
                      (("--objective", "gan"), "objective must be one of"),
                      (("--steps", 0), "--steps must be at least 1"), (("--seed", -1), "--seed must be in")):
        one_line_error(run("train", *args, "--data-dir", data_dir, "--out", tmp_path / "z"), msg)
    assert not (tmp_path / "z").exists()


def test_ctrl_c_while_sampling_keeps_the_old_file(tmp_path, monkeypatch):
    """Ctrl-C: one line, exit code 130, no traceback, and the output file as it was (written whole at the end)."""
    import molgen.keep

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(molgen.keep, "sample", interrupted)
    out = tmp_path / "old.sdf"
    out.write_text("earlier samples\n")
    res = run("sample", "-n", 4, "--steps", 1, "-o", out)
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "Traceback" not in res.output
    assert out.read_text() == "earlier samples\n"


def test_sigterm_while_sampling_keeps_the_old_file(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's time limit, `kill`): as Ctrl-C, with exit code 143; the handler before is restored."""
    import os
    import signal
    import time

    import molgen.keep

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal arrives first

    monkeypatch.setattr(molgen.keep, "sample", terminated)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a command starts (pytest may run with it ignored)
    try:
        out = tmp_path / "old.sdf"
        out.write_text("earlier samples\n")
        res = run("sample", "-n", 4, "--steps", 1, "-o", out)
        assert res.exit_code == 143, res.output
        assert "terminated (SIGTERM): molgen sample stopped" in res.output and "Traceback" not in res.output
        assert out.read_text() == "earlier samples\n" and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_train_refuses_settings_that_cannot_train_before_any_work(tmp_path, data_dir):
    out = tmp_path / "z"
    base = (*TINY, "--data-dir", data_dir, "--out", out)
    for setting, says in [("optim.ema=1.5", "optim.ema"), ("optim.warmup=-1", "optim.warmup"),
                          ("optim.clip=0", "optim.clip"), ("optim.keep=0", "optim.keep"),
                          ("optim.ckpt_every=-2", "optim.ckpt_every"), ("optim.eval_every=-1", "optim.eval_every")]:
        res = run("train", *base, "--set", setting)
        one_line_error(res, says)
        assert "training" not in res.output  # refused before the header and before any data is read
    for setting, says in ((("--set", "optim.layout=dense"), "layout"), (("--precision", "fp8"), "precision")):
        res = run("train", *base, *setting)
        one_line_error(res, says)
        assert "training" not in res.output  # the layout and precision are checked before the header too
    one_line_error(run("train", *base, "--max-minutes", 0), "--max-minutes")
    one_line_error(run("train", *base, "--steps", 1, "--batch-size", 10000), "batch size 10000 is larger than the "
                   "training split")
    one_line_error(run("train", *base, "--teacher", tmp_path), "--teacher", "objective diffusion")
    res = run("train", "--objective", "ect", "--init", tmp_path / "nothere", "--data-dir", data_dir, "--out", out)
    one_line_error(res, "nothere")
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


def test_a_diverged_sample_is_written_marked_and_warned_about(tmp_path, trained):
    out = tmp_path / "x.sdf"
    res = run("sample", "--checkpoint", trained, "-n", 3, "--steps", 2, "--temperature", 1e30, "-o", out,
              "--no-report")
    assert res.exit_code == 0, res.output
    assert "3 of 3 molecules have non-finite coordinates" in res.output and "molgen_nonfinite" in res.output
    assert out.read_text().count("<molgen_nonfinite>") == 3


def test_sample_keep_stable_writes_stable_molecules_only(tmp_path, trained, data_dir):
    out, rep = tmp_path / "stable.sdf", tmp_path / "r.json"
    res = run("sample", "-n", 6, "--steps", 1, "--keep", "stable", "-o", out, "--json", rep, "--seed", 2)
    assert res.exit_code == 0, res.output
    assert "kept 6 of" in res.output and "drawn (stable)" in res.output
    r = json.loads(rep.read_text())
    assert r["n_molecules"] == 6 and r["mol_stability"] == 1.0 and r["connected"] == 1.0
    assert r["molgen_keep"] == "stable" and r["molgen_drawn"] > 6
    assert r["novelty"] is None and r["novelty_note"] == "not computed (add --novelty)"  # the cache is no reason
    back = run("evaluate", out, "--no-novelty", "--json", tmp_path / "e.json")  # the file itself, read back
    assert back.exit_code == 0 and json.loads((tmp_path / "e.json").read_text())["mol_stability"] == 1.0
    assert "skipped (--no-novelty)" in back.output
    one_line_error(run("sample", "-n", 3, "--keep", "pretty", "-o", tmp_path / "p.sdf"),
                   "--keep must be one of all, valid, stable")
    one_line_error(run("sample", "-n", 3, "--unique", "-o", tmp_path / "p.sdf"), "add --keep valid or stable")
    # a 4-step tiny model makes no stable molecule in 100 draws: one line, nothing written
    none = tmp_path / "none.sdf"
    one_line_error(run("sample", "--checkpoint", trained, "-n", 1, "--steps", 2, "--keep", "stable", "-o", none),
                   "--keep stable: none of the 100 molecules drawn passed; nothing written")
    assert not none.exists() and not (tmp_path / "p.sdf").exists()


def test_sample_keep_novel_checks_before_sampling_and_reports_novelty(tmp_path, data_dir, monkeypatch):
    """--novel keeps no molecule of the training split's SMILES; it needs --keep and a QM9 cache, both checked
    before the model is loaded (nothing written), and the report then shows novelty."""
    out, rep = tmp_path / "novel.sdf", tmp_path / "r.json"
    res = run("sample", "-n", 4, "--keep", "valid", "--novel", "--no-report", "--json", rep, "-o", out,
              "--data-dir", data_dir, "--seed", 1)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["n_molecules"] == 4 and r["novelty"] == 1.0 and r["molgen_keep"] == "valid, novel"
    assert re.findall(r"<molgen_keep>.*\n(.*)\n", out.read_text()) == ["valid, novel"] * 4
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "home"))  # no cache there
    monkeypatch.setattr("molgen.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.sdf"
    one_line_error(run("sample", "-n", 3, "--novel", "-o", bad, "--data-dir", data_dir), "--novel compares SMILES",
                   "add --keep valid or stable")
    one_line_error(run("sample", "-n", 3, "--keep", "stable", "--novel", "-o", bad),
                   "--novel compares with QM9's training split", "molgen download")
    assert not bad.exists()


def test_sample_without_o_never_replaces_an_earlier_default_file(tmp_path, trained, monkeypatch):
    """No -o: out.sdf, then out-2.sdf beside it (the first kept as it was); -o names a file that is replaced."""
    from molgen.chem.io import read_molecules

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.sdf").write_text("earlier samples\n")
    res = run("sample", "--checkpoint", trained, "-n", 2, "--steps", 1, "--no-report")
    assert res.exit_code == 0 and "to out-2.sdf" in res.output, res.output
    assert (tmp_path / "out.sdf").read_text() == "earlier samples\n" and len(read_molecules("out-2.sdf")) == 2
    res = run("sample", "--checkpoint", trained, "-n", 1, "--steps", 1, "--no-report", "--format", "xyz")
    assert res.exit_code == 0 and "to out.xyz" in res.output and len(read_molecules("out.xyz")) == 1
    res = run("sample", "--checkpoint", trained, "-n", 3, "--steps", 1, "--no-report", "-o", "out.sdf")
    assert res.exit_code == 0 and len(read_molecules("out.sdf")) == 3  # named: replaced
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out-2.sdf", "out.sdf", "out.xyz"]


def test_counts_read_as_english():
    from molgen.display import count

    assert (count(1, "molecule"), count(0, "molecule"), count(10000, "molecule")) == \
        ("1 molecule", "0 molecules", "10,000 molecules")


def test_cpu_training_flags_only_where_known(monkeypatch):
    """molgen train's extra XLA flags: only with the jaxlib release they were measured with and no GPU plugin (XLA
    aborts on a flag it does not know), added before the backends start and never over XLA_FLAGS' own choice;
    and this install's XLA runs with them."""
    from importlib import metadata

    from molgen import jax_setup

    real = metadata.version

    def installed(**versions):
        def version(dist):
            if dist in versions:
                return versions[dist]
            if dist in jax_setup.GPU_PLUGINS:
                raise metadata.PackageNotFoundError(dist)
            return real(dist)
        return version

    for versions, want in (({"jaxlib": "0.10.2"}, jax_setup.YNN_REDUCE_OFF), ({"jaxlib": "0.11.2"}, ""),
                           ({"jaxlib": "0.10.2", "jax-cuda12-plugin": "0.10.2"}, "")):
        monkeypatch.setattr(metadata, "version", installed(**versions))
        assert jax_setup.cpu_training_flags() == want, versions
    monkeypatch.setattr(metadata, "version", installed(jaxlib="0.10.2"))
    script = ("import os; from molgen.jax_setup import add_cpu_training_flags as add, cpu_training_flags as want; "
              "given = os.environ['XLA_FLAGS']; add(); flags = os.environ['XLA_FLAGS']; "
              "assert flags == (given if 'ynn' in given else want()), flags; "
              "import jax.numpy as jnp; print(float(jnp.ones((64, 64)).sum(1).sum()))")
    _flags_only_before_jax_starts(monkeypatch, jax_setup.add_cpu_training_flags, script,
                                  ("", "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_REDUCE"))


def _flags_only_before_jax_starts(monkeypatch, add, script: str, givens) -> None:
    """``add`` changes nothing once this process's backends have started; ``script`` (it adds the flags, checks them
    and prints a sum of 4096) runs in a fresh process under each XLA_FLAGS of ``givens``: XLA takes the flags (it
    aborts on one it does not know)."""
    import subprocess
    import sys

    import jax

    monkeypatch.setenv("XLA_FLAGS", "")
    jax.devices()
    add()
    assert os.environ["XLA_FLAGS"] == ""
    for given in givens:
        r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, XLA_FLAGS=given, JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "4096.0", r.stderr[-2000:]


def test_wide_vectors_only_with_avx512(monkeypatch, tmp_path):
    """molgen sample's and train's 512-bit vectors: only where the CPU has AVX-512 (/proc/cpuinfo's flags), never
    over XLA_FLAGS' own vector width, not once the backends have started; and this install's XLA takes the flag (it
    aborts on one it does not know)."""
    from molgen import jax_setup

    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu sse2 avx2 avx512f avx512bw", True), ("fpu sse2 avx2 avx512_vnni", False), ("", False)):
        info.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert jax_setup.has_avx512(info) is want, flags
    assert jax_setup.has_avx512(tmp_path / "none") is False
    script = ("import os; from molgen import jax_setup as j; j.has_avx512 = lambda: True; "
              "given = os.environ['XLA_FLAGS']; j.add_cpu_vector_flags(); flags = os.environ['XLA_FLAGS']; "
              "assert flags == (given if 'vector_width' in given else f'{given} {j.WIDE_VECTORS}'.strip()), flags; "
              "import jax.numpy as jnp; print(float(jnp.exp(jnp.zeros((64, 64))).sum()))")
    for flags, avx512, said in (("", True, "512-bit vectors (AVX-512)"), ("", False, "256-bit vectors (XLA's default)"),
                                ("--xla_cpu_prefer_vector_width=128", True, "128-bit vectors (XLA_FLAGS)")):
        monkeypatch.setenv("XLA_FLAGS", flags)
        monkeypatch.setattr(jax_setup, "has_avx512", lambda: avx512)
        assert jax_setup.cpu_vectors() == said  # what `molgen info` shows
        assert said in " ".join(run("info").output.split())
    monkeypatch.setattr(jax_setup, "has_avx512", lambda: True)  # here too: only the backends' start stops it
    _flags_only_before_jax_starts(monkeypatch, jax_setup.add_cpu_vector_flags, script,
                                  ("", "--xla_cpu_prefer_vector_width=256"))


def test_progress_off_a_terminal_is_a_line_now_and_then():
    """Off a terminal (a log file) progress is plain lines: none for short work, then at most one every `every`
    seconds with the share done and the time left, and a last line with the total time."""
    from molgen.display import ProgressLines

    now, lines = [0.0], []
    with ProgressLines(show=lines.append, every=10, clock=lambda: now[0]) as bar:
        quick, slow, open_ended = bar.add_task("quick", total=3), bar.add_task("sampling", total=0), bar.add_task("reading")
        bar.advance(quick, 3)  # done before any line was due: nothing
        bar.update(slow, total=100)
        for _ in range(4):  # 4 calls in 8 s: no line yet
            now[0] += 2
            bar.advance(slow, 1)
        now[0] += 2
        bar.advance(slow, 1)  # 10 s: 5 of 100 done
        bar.advance(slow, 1)  # same moment: no second line
        now[0] = 40
        bar.advance(slow, 14)
        bar.advance(open_ended, 7)
        now[0] = 50
        bar.update(slow, total=100, completed=100)
        bar.update(slow, total=150)  # another round of work: the task runs on (a line: 10 s since the last)
        now[0] = 65
        bar.advance(slow, 10)
        bar.advance(open_ended, 1)
    assert lines == ["sampling: 5/100 (5 %), 0:00:10 elapsed, 0:03:10 left",
                     "sampling: 20/100 (20 %), 0:00:40 elapsed, 0:02:40 left",
                     "reading: 7 done, 0:00:40 elapsed",
                     "sampling: 100/100, done in 0:00:50",
                     "sampling: 100/150 (67 %), 0:00:50 elapsed, 0:00:25 left",
                     "sampling: 110/150 (73 %), 0:01:05 elapsed, 0:00:23 left",
                     "reading: 8 done, 0:01:05 elapsed",
                     "sampling: 110/150, done in 0:01:05",
                     "reading: 8, done in 0:01:05"]
    lines.clear()
    try:  # work that fails says no "done"
        with ProgressLines(show=lines.append, every=0, clock=lambda: now[0]) as bar:
            bar.advance(bar.add_task("reading"), 1)
            raise KeyError
    except KeyError:
        pass
    assert lines == ["reading: 1 done, 0:00:00 elapsed"]


def test_sample_and_evaluate_show_progress_lines_off_a_terminal(tmp_path, trained, data_dir, monkeypatch):
    from molgen import display, evaluate

    monkeypatch.setattr(display, "LINE_EVERY_S", 0.0)  # a line at every step
    monkeypatch.setattr(evaluate, "CHUNK", 1)  # evaluation ticks once a chunk of molecules
    out = tmp_path / "s.sdf"
    res = run("sample", "--checkpoint", trained, "-n", 2, "--steps", 3, "-o", out, "--data-dir", data_dir)
    assert res.exit_code == 0, res.output
    assert "sampling (network calls): 1/3 (33 %)" in res.output and "sampling (network calls): 3/3, done in" in res.output
    assert "evaluating: 1/2 (50 %)" in res.output and "evaluating: 2/2, done in" in res.output
    res = run("evaluate", out, "--reference", data_dir)
    assert res.exit_code == 0 and "evaluating: 2/2, done in" in res.output, res.output
