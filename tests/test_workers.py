"""Per-molecule work in worker processes (molgen.workers): the same results in the same order as one process,
errors raised in the caller, the worker count bounded by the work and by MOLGEN_WORKERS."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, one_line_error


@pytest.fixture
def short_temp():
    """A temporary folder of its own for the processes a test starts (``TMPDIR``), removed after the test: a process
    stopped on purpose leaves its fork server's socket folder there. Short: that socket's path must fit in 108
    bytes."""
    temp = Path(tempfile.mkdtemp(prefix="t"))
    yield temp
    shutil.rmtree(temp)


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


def test_a_temporary_folder_too_long_for_the_fork_servers_socket_still_gets_workers(tmp_path):
    """The fork server's socket lives in the temporary folder, and a socket's path must fit in 108 bytes: under a
    longer ``TMPDIR`` the workers are spawned instead of staying away, and nothing is left in that folder."""
    temp = tmp_path / ("t" * 100)
    temp.mkdir()
    code = ("import os; from molgen.workers import map_chunks; "
            "print(os.getpid() not in set(map_chunks(os.getpid, [()] * 4, 2)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(temp)})
    assert run.returncode == 0 and run.stdout.strip() == "True", (run.stdout, run.stderr)
    assert not list(temp.iterdir())


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

    from molgen.chem.io import Molecule
    from molgen.chem.write import write_molecules
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


def test_record_ends_are_the_lines_that_start_with_four_dollars():
    import re

    from molgen.chem.io import _record_ends

    for text in ("", "a\n$$$$\n", "$$$$\nx\n$$$$", "a\n$$$$ x\n$$$$\n", "a$$$$\nb\n$$$$\r\nc\n$$$$", "$$$$$$$$\n"):
        want = [m.end() for m in re.finditer(r"^\$\$\$\$[^\n]*(?:\n|$)", text, re.M)]
        assert _record_ends(text) == want, text


def test_an_sdf_file_read_in_two_processes_reads_as_in_one(tmp_path, mini_ds, monkeypatch, pool_sizes):
    """Every molecule (types, coordinates, name, properties) in order, and a bad record named by its place in the
    file: skipped with --skip-invalid, else the one error, as one process says it."""
    import molgen.chem.io
    import molgen.workers
    from molgen import MolgenError
    from molgen.chem.io import Molecule, _record_ends, read_molecules
    from molgen.chem.write import write_molecules

    monkeypatch.setattr(molgen.chem.io, "SDF_MIN_BYTES", 0)
    monkeypatch.setattr(molgen.chem.io, "SDF_CHUNK", 16)
    monkeypatch.setattr(molgen.workers, "MIN_PER_WORKER", 20)
    mols = [Molecule(*mini_ds.molecule(i)[::-1], name=f"m{i}", props={"k": str(i)}) for i in range(len(mini_ds))]
    path = tmp_path / "many.sdf"
    write_molecules(path, mols, "sdf")
    text = path.read_text()
    cut = _record_ends(text)[39]  # molecule 40: an atom line cut short
    bad = text[:cut] + "broken\n  x\n\n  1  0  0  0  0  0  0  0  0  0999 V2000\n    0.0 0.0 0.0 O   0  0\nM  END\n$$$$\n" + text[cut:]
    for content in (text, bad):
        path.write_text(content)
        runs = []
        for workers in (1, 2):
            errors = []
            got = read_molecules(path, skip_invalid=True, errors=errors, workers=workers)
            runs.append(([(m.types.tolist(), m.positions.tolist(), m.name, m.props) for m in got], errors))
        assert runs[0] == runs[1] and len(runs[0][0]) == len(mols)
    assert len(runs[0][1]) == 1 and "many.sdf: molecule 40: malformed record" in runs[0][1][0]
    messages = []
    for workers in (1, 2):
        with pytest.raises(MolgenError) as e:
            read_molecules(path, workers=workers)
        messages.append(str(e.value))
    line = bad[:cut].count("\n") + 5  # the atom line: RDKit names it, counted in the whole file by both
    assert messages[0] == messages[1] and "molecule 40" in messages[0], messages
    assert f"on line {line}" in messages[0] or "RDKit" not in messages[0]
    assert pool_sizes == [1, 2] * 3


def test_a_script_read_from_standard_input_can_use_workers(tmp_path, mini_ds):
    """Workers never import the calling program's main module (multiprocessing would, and a script read from
    standard input has no file to import)."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import molgen.workers\n"
        "molgen.workers.MIN_PER_WORKER = 1\n"
        "from molgen.evaluate import evaluate_molecules\n"
        "import numpy as np\n"
        "pos = [np.array([[0, 0, 0], [0, 0, 1.09], [1.03, 0, -0.36], [-0.51, 0.89, -0.36], [-0.51, -0.89, -0.36]])]\n"
        "m = evaluate_molecules(pos * 600, [np.array([1, 0, 0, 0, 0])] * 600, workers=2)\n"
        "print('stable', m.mol_stability)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-", root], input=script, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "stable 1.0", res.stderr


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cpu_s(pid: int) -> float:
    """The CPU time a process has used (user and system), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(kids)
        todo += kids
    return found


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killing_the_caller_ends_its_worker_processes(sig, short_temp):
    """A killed caller cannot shut its pool down: its workers (and the fork server they keep alive) must still end,
    not wait on their task queue for ever. (The process tree is read from /proc: Linux.)"""
    code = "from molgen.workers import map_chunks; import time; list(map_chunks(time.sleep, [(60,), (60,)], 2))"
    caller = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(short_temp)})
    helpers = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(helpers) < 3:  # the fork server (or none) and its two workers
            time.sleep(0.2)
            helpers = _descendants(caller.pid)
        assert len(helpers) >= 2, helpers
        caller.send_signal(getattr(signal, sig))
        caller.wait(30)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(p) for p in helpers):
            time.sleep(0.2)
        assert not [p for p in helpers if _alive(p)]
    finally:
        caller.kill()
        for p in helpers:  # what a failure left running
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
@pytest.mark.parametrize("hook", [True, False])
def test_a_worker_that_starts_after_its_pool_was_released_ends_quietly(hook, method, short_temp):
    """A command stopped while its workers start releases its pool's semaphores as it exits; a worker started after
    that (by the fork server, or spawned where it cannot start) cannot open them. It ends without a traceback on the
    terminal (the excepthook of `molgen.worker_hook`, which every worker runs first); without it, Python prints one."""
    code = "\n".join([
        "import os",
        "from multiprocessing import util",
        "from molgen import workers",
        "" if hook else "workers.STARTS_FIRST = None",
        f"pool = workers._pool(1, {method!r})",
        "util._run_finalizers(0)  # what a stopped command does as it exits (failures._release_worker_resources)",
        "with workers._main_module_hidden():  # as map_chunks starts its workers",
        "    future = pool.submit(pow, 2, 2)",
        "print(type(future.exception(60)).__name__, flush=True)  # once the worker has ended",
        "os._exit(0)"])
    stderr = _run_script(code, short_temp, "BrokenProcessPool")
    if hook:
        assert stderr == ""
    else:
        assert "SemLock._rebuild" in stderr and stderr.strip().endswith("No such file or directory")


@pytest.mark.parametrize("hook", [True, False])
def test_the_fork_server_of_a_command_stopped_while_it_asks_for_a_worker_ends_quietly(hook, short_temp):
    """A command stopped while it asks the fork server for a worker leaves the server reading a request cut short:
    it ends without a traceback on the command's terminal (it imports `molgen.server_hook` first); without the
    hook, Python prints its EOFError."""
    code = "\n".join([
        "import os, socket",
        "from multiprocessing import forkserver",
        "from molgen import workers",
        "" if hook else "workers.PRELOAD = [m for m in workers.PRELOAD if m != workers.SERVER_FIRST]",
        "pool = workers._pool(1, 'forkserver')",
        "forkserver._forkserver.ensure_running()",
        "s = socket.socket(socket.AF_UNIX)",
        "s.connect(forkserver._forkserver._forkserver_address)",
        "s.close()  # a request for a worker, cut short",
        "os.waitpid(forkserver._forkserver._forkserver_pid, 0)",
        "print('ended', flush=True)"])
    stderr = _run_script(code, short_temp, "ended")
    if hook:
        assert stderr == ""
    else:
        assert "recvfds" in stderr and stderr.strip().endswith("EOFError")


def test_the_workers_hook_keeps_other_tracebacks(monkeypatch):
    from molgen import worker_hook

    shown = []
    monkeypatch.setattr(worker_hook, "_before", lambda *e: shown.append(e[0]))
    for error in (FileNotFoundError(2, "No such file or directory"), EOFError()):
        try:
            raise error
        except Exception as e:
            worker_hook.quiet_if_pool_released(type(e), e, e.__traceback__)
    assert shown == [FileNotFoundError, EOFError]


def test_pools_stopped_early_are_let_go_once_they_have_ended():
    """A pool stopped early (Ctrl-C in a notebook) is held until its own thread has ended, then let go: its file
    descriptors do not pile up over many stops in one long-running Python process."""
    code = "\n".join([
        "import os, time",
        "from molgen.workers import map_chunks",
        "counts = []",
        "for i in range(6):",
        "    it = map_chunks(time.sleep, [(0.2,)] * 6, 2)",
        "    next(it)",
        "    try:",
        "        it.throw(KeyboardInterrupt)",
        "    except KeyboardInterrupt:",
        "        pass",
        "    time.sleep(1.0)  # the running chunks end, then the pool's thread",
        "    counts.append(len(os.listdir('/proc/self/fd')))",
        "print(counts)"])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)
    assert max(counts[1:]) <= counts[0], counts  # before: two more with every stop


def test_a_stopped_pool_is_held_while_its_own_thread_runs():
    """Let go while its thread still runs, a stopped pool's queues could be collected by that thread as a stopped
    command exits (its semaphores released half-way): it is held until then."""
    from molgen import workers

    it = workers.map_chunks(time.sleep, [(1.5,)] * 4, 2)
    next(it)
    with pytest.raises(KeyboardInterrupt):
        it.throw(KeyboardInterrupt)
    pool = workers._HELD[-1].pool
    workers._let_go_of_ended()
    assert [h for h in workers._HELD if h.pool is pool]  # its workers still sleep: its thread waits for them
    deadline = time.time() + 30
    while time.time() < deadline and [h for h in workers._HELD if h.pool is pool]:
        time.sleep(0.2)
        workers._let_go_of_ended()
    assert not [h for h in workers._HELD if h.pool is pool]


def test_sigterm_stops_a_command_at_once_with_its_workers(tmp_path, short_temp):
    """SIGTERM (a scheduler's time limit; `timeout` sends it to the whole process group, workers included, `kill`
    to the command alone) stops `molgen evaluate` at once with one line and exit code 143: it neither waits on the
    chunks its workers were judging nor hangs on workers that are gone, leaves nothing running, writes nothing and
    leaves nothing in the temporary folder (the fork server's socket lives in a folder there)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles("CCOC(=O)C1CC1N"))
    AllChem.EmbedMolecule(m, randomSeed=1)
    (tmp_path / "many.sdf").write_text((Chem.MolToMolBlock(m) + "$$$$\n") * 4000)  # ~15 s of work for 2 workers
    for whole_group, busy in ((True, True), (False, True), (False, False)):  # not busy: the workers just started
        _stop_evaluate(tmp_path, short_temp, whole_group, busy)
        assert not list(short_temp.iterdir()), (whole_group, busy)


def _stop_evaluate(tmp_path, temp, whole_group: bool, busy: bool) -> None:
    """`molgen evaluate` (temporary folder ``temp``) stopped by SIGTERM, sent to its process group or to it alone,
    once its workers are busy or as the first appears; its stop is checked."""
    caller = subprocess.Popen([sys.executable, "-m", "molgen", "evaluate", str(tmp_path / "many.sdf"), "--strain",
                               "--json", str(tmp_path / "r.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True,
                              env={**os.environ, "MOLGEN_WORKERS": "2", "TMPDIR": str(temp)})
    helpers = set()
    try:
        deadline = time.time() + 60
        # the tracker, the fork server and two workers judging their chunks; or the first worker as it appears
        # (one still starting would look for the pool's semaphores once the command has removed them)
        while time.time() < deadline and (len(helpers) < 3 + busy or
                                          sum(_cpu_s(p) > 0.5 for p in helpers) < 2 * busy):
            time.sleep(0.2 if busy else 0.005)
            helpers = _descendants(caller.pid)
        assert len(helpers) >= 3 + busy and sum(_cpu_s(p) > 0.5 for p in helpers) >= 2 * busy, helpers
        os.killpg(caller.pid, signal.SIGTERM) if whole_group else caller.send_signal(signal.SIGTERM)
        t0 = time.time()
        helpers |= {kid for p in helpers for kid in _descendants(p)}  # a worker started since
        _, err = caller.communicate(timeout=30)
        assert time.time() - t0 < 5
        told = "terminated (SIGTERM): molgen evaluate stopped (a file molgen writes is written whole or not at all)"
        assert caller.returncode == 143 and err.strip() == told, (whole_group, busy, err)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in helpers):
            time.sleep(0.2)
        assert not [p for p in helpers if _alive(p)]
        assert not (tmp_path / "r.json").exists()
    finally:
        caller.kill()
        for p in helpers:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def _run_script(code: str, temp, prints: str) -> str:
    """Run ``code`` in a fresh Python with TMPDIR at ``temp``; it must exit 0 having printed ``prints``. Its stderr."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(temp)})
    assert run.returncode == 0 and run.stdout.strip() == prints, (run.stdout, run.stderr)
    return run.stderr
