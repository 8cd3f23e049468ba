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
    out = subprocess.run([sys.executable, _script("precompile.py"), "--runs", "tiny:8:float32:packed,tiny:8:float16",
                          "--cache", str(cache), "--jobs", "2", *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = sorted(out.stdout.splitlines())
    assert len(lines) == 3, out.stdout
    assert lines[0].startswith("COMPILED molgen tiny batch=8 precision=float32 layout=packed compile_s="), lines
    assert lines[1].startswith("FAILED molgen tiny:8:float16 (exit 1: ") and "float16" in lines[1][30:], lines
    assert lines[2].startswith("PRECOMPILED 1 of 2 in "), lines

    # the measurement, a process of its own, finds its chunk's program in the cache, which held nothing before
    # (JAX says so when it logs compilations)
    out = subprocess.run([sys.executable, _script("train_step.py"), "--runs", "tiny:8:float32:packed", "--cache",
                          str(cache), "--repeats", "1", "--peak-tflops", "1", *common],
                         capture_output=True, text=True, env=dict(env, JAX_LOG_COMPILES="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(result) == 1 and result[0].endswith(" cache=on"), out.stdout
    assert "Persistent compilation cache hit for 'jit_chunk'" in out.stderr, out.stderr[-3000:]


def test_the_budget_stops_what_is_still_compiling_and_starts_nothing_more(tmp_path, monkeypatch, capsys):
    pc = load_script("benchmarks/precompile.py")
    started = []

    def sleeper(run, cache, extra, log):  # a compilation that would take a minute
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log,
                             start_new_session=True)
        started.append(p)
        return p

    monkeypatch.setattr(pc, "start", sleeper)
    assert pc.precompile(["edm:2048:bf16:fused", "edm:256:tf32:packed", "edm:64:tf32"], str(tmp_path), 2, 0.5, []) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["STOPPED molgen edm:2048:bf16:fused (budget of 0.5 s spent)",
                         "STOPPED molgen edm:256:tf32:packed (budget of 0.5 s spent)"]
    assert lines[2] == "SKIPPED molgen edm:64:tf32 (budget of 0.5 s spent)"
    assert lines[3].startswith("PRECOMPILED 0 of 3 in ")
    assert len(started) == 2 and all(p.returncode == -9 for p in started)  # killed, and waited for
