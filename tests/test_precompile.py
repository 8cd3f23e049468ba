"""benchmarks/precompile.py: the training measurements' programs compiled before they run, in parallel processes,
into the compilation cache from which each measurement (benchmarks/train_step.py --cache) then loads its program; a
run it cannot compile is one FAILED line, and its budget stops what is still compiling."""

import os
import subprocess
import sys

from conftest import DATA_CSV, FAST_COMPILE, load_script


def _script(name: str) -> str:
    return str(DATA_CSV.parents[2] / "benchmarks" / name)


def test_a_precompiled_measurement_loads_its_program_instead_of_compiling_it(tmp_path, data_dir):
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    cache, common = tmp_path / "cache", ["--chunk", "2", "--data-dir", str(data_dir)]
    out = subprocess.run([sys.executable, _script("precompile.py"), "--runs", "tiny:8:float32:packed", "--cache",
                          str(cache), *common], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert lines[0].startswith("COMPILED molgen tiny batch=8 precision=float32 layout=packed compile_s="), lines
    assert lines[1].startswith("PRECOMPILED 1 of 1 in "), lines

    # the measurement, a process of its own, finds its chunk's program in the cache, which held nothing before
    # (JAX says so when it logs compilations)
    out = subprocess.run([sys.executable, _script("train_step.py"), "--runs", "tiny:8:float32:packed", "--cache",
                          str(cache), "--repeats", "1", "--peak-tflops", "1", *common],
                         capture_output=True, text=True, env=dict(env, JAX_LOG_COMPILES="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(result) == 1 and result[0].endswith(" cache=on"), out.stdout
    assert "Persistent compilation cache hit for 'jit_chunk'" in out.stderr, out.stderr[-3000:]


def _child(pc, monkeypatch, code: str):
    """precompile.py's compiling processes replaced by ``python -c code``; the list of those started."""
    started = []

    def start(run, cache, extra, log):
        started.append(subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
        return started[-1]

    monkeypatch.setattr(pc, "start", start)
    return started


def test_a_run_that_cannot_compile_is_one_failed_line_with_its_last_words(tmp_path, monkeypatch, capsys):
    pc = load_script("benchmarks/precompile.py")
    _child(pc, monkeypatch, "import sys; print('warming up'); sys.exit('molgen.MolgenError: precision must be ...')")
    assert pc.precompile(["tiny:8:float16"], str(tmp_path), 2, 60, []) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        "FAILED molgen tiny:8:float16 (exit 1: molgen.MolgenError: precision must be ...)"


def test_the_budget_stops_what_is_still_compiling_and_starts_nothing_more(tmp_path, monkeypatch, capsys):
    pc = load_script("benchmarks/precompile.py")
    started = _child(pc, monkeypatch, "import time; time.sleep(60)")  # a compilation that would take a minute
    assert pc.precompile(["edm:2048:bf16:fused", "edm:256:tf32:packed", "edm:64:tf32"], str(tmp_path), 2, 0.5, []) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["STOPPED molgen edm:2048:bf16:fused (budget of 0.5 s spent)",
                         "STOPPED molgen edm:256:tf32:packed (budget of 0.5 s spent)"]
    assert lines[2] == "SKIPPED molgen edm:64:tf32 (budget of 0.5 s spent)"
    assert lines[3].startswith("PRECOMPILED 0 of 3 in ")
    assert len(started) == 2 and all(p.returncode == -9 for p in started)  # killed, and waited for
