"""Per-molecule work in worker processes (molgen.workers): the same results in the same order as one process,
errors raised in the caller, the worker count bounded by the work and by MOLGEN_WORKERS."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from conftest import cli, one_line_error


def test_chunks_come_back_in_order_from_two_processes():
    from molgen.workers import map_chunks

    chunks = [(k, 3) for k in range(7)]
    assert list(map_chunks(pow, chunks, 2)) == list(map_chunks(pow, chunks, 1)) == [k**3 for k in range(7)]


def test_an_error_in_a_worker_is_raised_in_the_caller():
    from molgen.workers import map_chunks

    for workers in (1, 2):
        with pytest.raises(ValueError, match="invalid literal"):
            list(map_chunks(int, [("1",), ("x",)], workers))


def test_a_worker_that_dies_is_one_error():
    import os

    from molgen import MolgenError
    from molgen.workers import map_chunks

    with pytest.raises(MolgenError, match="worker process ended"):
        list(map_chunks(os._exit, [(3,), (4,)], 2))


def test_where_no_process_can_start_the_work_stays_in_this_process(monkeypatch):
    """No shared memory or temporary folder for a pool (some containers): the pool cannot be made, or its processes
    cannot be started; the chunks are worked through here instead."""
    import concurrent.futures

    from molgen.workers import map_chunks

    class NoPool:
        def __init__(self, *a, **kw):
            raise OSError(38, "Function not implemented")

    class NoStart(concurrent.futures.ProcessPoolExecutor):
        def submit(self, *a, **kw):
            raise OSError(13, "Permission denied")

    for pool in (NoPool, NoStart):
        monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", pool)
        assert list(map_chunks(pow, [(2, 3), (3, 2)], 2)) == [8, 9]


def test_worker_count_follows_the_work_the_cap_and_the_environment(monkeypatch):
    from molgen import MolgenError
    from molgen.workers import MIN_PER_WORKER, default_workers, workers_for

    assert workers_for(MIN_PER_WORKER - 1, 8) == 1  # too little work for a second process
    assert workers_for(3 * MIN_PER_WORKER, 8) == 3
    assert workers_for(100 * MIN_PER_WORKER, 2) == 2
    assert workers_for(0, 4) == 1
    monkeypatch.setenv("MOLGEN_WORKERS", "3")
    assert default_workers() == 3 and workers_for(100 * MIN_PER_WORKER, None) == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("MOLGEN_WORKERS", bad)
        with pytest.raises(MolgenError, match="MOLGEN_WORKERS"):
            default_workers()


@pytest.fixture
def pool_sizes(monkeypatch):
    """The worker counts molgen.workers.map_chunks is called with (the work is still done)."""
    import molgen.workers

    sizes, real = [], molgen.workers.map_chunks

    def recording(fn, chunks, workers=1):
        sizes.append(workers)
        return real(fn, chunks, workers)

    monkeypatch.setattr(molgen.workers, "map_chunks", recording)
    return sizes


def _without_time(metrics):
    d = asdict(metrics)
    d.pop("stats")
    return d


def test_evaluation_in_two_processes_equals_one(mini_ds, monkeypatch, pool_sizes):
    """Every figure, each molecule's results, the distribution counts and the progress ticks are the same when the
    molecules are judged in two processes (a non-finite molecule and strain included)."""
    import molgen.workers
    from molgen.evaluate import evaluate_molecules
    from molgen.fidelity import Stats

    monkeypatch.setattr(molgen.workers, "MIN_PER_WORKER", 100)
    mols = [mini_ds.molecule(i) for i in range(len(mini_ds))] * 6  # 354: two workers, two chunks
    mols[5] = (np.full_like(mols[5][0], np.nan), mols[5][1])
    pos, typ = [m[0] for m in mols], [m[1] for m in mols]
    runs = []
    for workers in (1, 2):
        ticks = []
        m = evaluate_molecules(pos, typ, {"C"}, None, ticks.append, Stats(), with_strain=True, workers=workers)
        runs.append((m, ticks))
    (one, ticks1), (two, ticks2) = runs
    assert _without_time(one) == _without_time(two) and sum(ticks1) == sum(ticks2) == len(mols)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(one.stats, k), getattr(two.stats, k))
    assert one.n_nonfinite == 1 and one.strain["n_molecules"] > 0 and pool_sizes == [1, 2]


def test_training_smiles_in_two_processes_equal_one(data_dir, tmp_path, monkeypatch, pool_sizes):
    import shutil

    import molgen.evaluate
    import molgen.workers
    from molgen.evaluate import TRAIN_SMILES_NAME, training_smiles

    monkeypatch.setattr(molgen.workers, "MIN_PER_WORKER", 10)
    monkeypatch.setattr(molgen.evaluate, "CHUNK", 8)  # several chunks, in order
    texts = []
    for workers in (1, 2):
        d = tmp_path / f"cache{workers}"
        shutil.copytree(data_dir, d)
        (d / TRAIN_SMILES_NAME).unlink(missing_ok=True)
        assert len(training_smiles(d, workers=workers)) > 10
        texts.append((d / TRAIN_SMILES_NAME).read_text())
    assert texts[0] == texts[1] and pool_sizes == [1, 2]


def test_a_bad_worker_count_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLGEN_WORKERS", "many")
    one_line_error(cli("evaluate", tmp_path / "missing.sdf"), "MOLGEN_WORKERS")


def test_python_m_molgen_starts_its_workers(tmp_path, mini_ds):
    """`python -m molgen` with worker processes: each starts from molgen's entry module without running the
    command again, and the report is the one a single process makes."""
    import os

    from molgen.chem.io import Molecule, write_molecules
    from molgen.workers import MIN_PER_WORKER

    mols = [Molecule(*mini_ds.molecule(i)[::-1]) for i in range(len(mini_ds))]
    path = tmp_path / "many.sdf"
    write_molecules(path, (mols * (2 * MIN_PER_WORKER // len(mols) + 1))[: 2 * MIN_PER_WORKER], "sdf")
    outs = []
    for workers in ("1", "2"):
        env = {**os.environ, "MOLGEN_WORKERS": workers, "MOLGEN_HOME": str(tmp_path / "home")}
        out = tmp_path / f"w{workers}.json"
        res = subprocess.run([sys.executable, "-m", "molgen", "evaluate", path, "--json", out], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        outs.append({k: v for k, v in json.loads(out.read_text()).items() if k != "written_utc"})
    assert outs[0] == outs[1] and outs[0]["n_molecules"] == 2 * MIN_PER_WORKER
