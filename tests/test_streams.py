"""How molecules come in and go out besides plain files: standard input and output (``-``), pipes, links, and
text written elsewhere (Windows line ends, a byte-order mark). molgen never replaces a stream or a link with a file
of its own."""

import gzip
import json
import os
import stat
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from molgen import MolgenError
from molgen.chem.io import Molecule, read_molecules
from molgen.chem.write import write_molecules
from molgen.cli import app
from molgen.io_utils import atomic_write_text, check_outputs, check_writable, is_stream, writes_stdout

from conftest import one_line_error, random_molecules


def invoke(*args, stdin=None):
    """Run the command line in-process with ``stdin`` (bytes) as standard input; stdout and stderr apart."""
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=False)


@pytest.fixture
def molecules(rng):
    pos, types = random_molecules(rng, [5, 9, 12])
    return [Molecule(np.asarray(t), np.asarray(p, float), name=f"m{k}") for k, (p, t) in enumerate(zip(pos, types))]


def test_sample_writes_sdf_to_standard_output_and_its_report_to_stderr(tmp_path):
    from rdkit import Chem

    res = invoke("sample", "-n", 4, "--steps", 1, "-o", "-", "--seed", 3)
    assert res.exit_code == 0, res.output
    supplier = Chem.SDMolSupplier()
    supplier.SetData(res.stdout, sanitize=False, removeHs=False)
    assert len(supplier) == 4 and all(m is not None and m.GetNumConformers() == 1 for m in supplier)
    assert "wrote 4 molecules to standard output" in res.stderr and "atom stability" in res.stderr
    assert "atom stability" not in res.stdout
    # the same text as a file of the same seed holds
    same = invoke("sample", "-n", 4, "--steps", 1, "-o", tmp_path / "same.sdf", "--seed", 3)
    assert same.exit_code == 0 and (tmp_path / "same.sdf").read_text() == res.stdout


def test_evaluate_reads_standard_input_plain_or_gzipped_sdf_or_xyz(tmp_path, molecules, monkeypatch):
    write_molecules(tmp_path / "a.sdf", molecules)
    write_molecules(tmp_path / "a.xyz", molecules)
    want = invoke("evaluate", tmp_path / "a.sdf", "--no-novelty", "--no-fidelity", "--json", tmp_path / "w.json")
    assert want.exit_code == 0, want.output
    want = json.loads((tmp_path / "w.json").read_text())
    for key in ("files", "written_utc"):  # which file, and when: the rest must be the same
        want.pop(key)
    variants = [(tmp_path / "a.sdf").read_bytes(), gzip.compress((tmp_path / "a.sdf").read_bytes()),
                (tmp_path / "a.xyz").read_bytes()]
    for data in variants:  # the format is read off what comes in
        res = invoke("evaluate", "-", "--no-novelty", "--no-fidelity", "--json", "-", stdin=data)
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)  # the JSON alone: the report went to stderr
        assert got.pop("files") == ["-"] and got.pop("written_utc") and got == want
        assert "atom stability" in res.stderr
    (tmp_path / "-").mkdir()  # a folder named "-" where molgen runs: "-" is still standard input and output
    monkeypatch.chdir(tmp_path)
    res = invoke("evaluate", "-", "--no-novelty", "--no-fidelity", "--json", "-", stdin=variants[0])
    assert res.exit_code == 0 and json.loads(res.stdout)["n_molecules"] == 3, res.output


def test_bad_standard_input_is_one_line(tmp_path):
    one_line_error(invoke("evaluate", "-", stdin=b""), "-: nothing to read")
    one_line_error(invoke("evaluate", "-", stdin=b"hello\nworld\n"), "neither SDF nor XYZ", "--format")
    one_line_error(invoke("evaluate", "-", "--format", "xyz", stdin=b"hello\n"), "expected an atom count")
    one_line_error(invoke("sample", "-n", 2, "-o", "-", "--json", "-"),
                   "-o and --json both write to standard output; send one of them to a file")


def test_a_pipe_is_written_in_place_and_read_back(tmp_path, molecules):
    fifo = tmp_path / "pipe.sdf"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()), daemon=True)
    reader.start()
    check_writable(fifo, "-o")
    write_molecules(fifo, molecules)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the pipe, not a file put in its place
    (tmp_path / "b.sdf").write_text(got["text"])
    assert [len(m.types) for m in read_molecules(tmp_path / "b.sdf")] == [5, 9, 12]
    # and read from one: whole, once, with the format from its extension
    writer = threading.Thread(target=lambda: fifo.write_text(got["text"]), daemon=True)
    writer.start()
    assert [m.name for m in read_molecules(fifo)] == ["m0", "m1", "m2"]
    writer.join(timeout=30)


def test_a_link_keeps_pointing_to_the_file_it_names(tmp_path):
    (tmp_path / "real.json").write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    check_writable(link, "--json")
    atomic_write_text(link, "new")
    assert link.is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_gets_the_umasks(tmp_path):
    """A file given as the output is replaced by a new one (written beside it, then renamed): it keeps the
    permissions its owner gave it, and a new file gets what open() would give it under the process's umask."""
    shared = tmp_path / "shared.json"
    shared.write_text("old")
    shared.chmod(0o664)
    atomic_write_text(shared, "new")
    assert shared.read_text() == "new" and stat.S_IMODE(shared.stat().st_mode) == 0o664
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    atomic_write_text(private, "new")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = tmp_path / "fresh.json"
    atomic_write_text(fresh, "new")
    with open(tmp_path / "plain.json", "w") as f:
        f.write("new")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "plain.json", "private.json", "shared.json"]


def test_dev_null_may_take_every_output(tmp_path):
    """Two outputs into one file: refused (the second would replace the first), but for /dev/null."""
    assert check_outputs({"-o": "/dev/null", "--json": "/dev/null", "--per-molecule": None}) is False
    with pytest.raises(MolgenError, match="-o and --json name the same file"):
        check_outputs({"-o": tmp_path / "x.sdf", "--json": tmp_path / "x.sdf"})


def test_what_counts_as_a_stream(tmp_path):
    (tmp_path / "f").write_text("x")
    assert is_stream("-") and is_stream("/dev/null")
    assert not is_stream(tmp_path / "f") and not is_stream(tmp_path) and not is_stream(tmp_path / "none")
    assert writes_stdout("-") and not writes_stdout(tmp_path / "f") and not writes_stdout(None)
    with open(tmp_path / "out", "w") as f:  # a file this process's standard output is sent to
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            assert writes_stdout(tmp_path / "out") and not writes_stdout(tmp_path / "f")
        finally:
            os.dup2(saved, 1)
            os.close(saved)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (a device whose writes fail)")
@pytest.mark.parametrize("fmt", ["sdf", "xyz"])
def test_a_failed_write_is_an_error_not_a_success(fmt, molecules, tmp_path):
    with pytest.raises(OSError, match="No space left"):  # RDKit's own file writer said nothing of it
        write_molecules("/dev/full", molecules, fmt)
    one_line_error(invoke("evaluate", "-", "--json", "/dev/full", "--no-novelty", "--no-fidelity",
                          stdin=b"1\n\nC 0 0 0\n"), "No space left on device")


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`molgen sample -o - | head`: the command ends as a writer killed by SIGPIPE does (exit 141), no error."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "molgen", "sample", "--model", "edm-small-stack2", "-n", "200", "-o", "-",
           "--no-report"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = p.stdout.readline()
    p.stdout.close()  # 200 molecules are ~400 KB: more than a pipe holds, so the writer meets the closed end
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and first.strip() == b"molgen_0", err
    # nothing of molgen's or Python's about the closed pipe (JAX may warn of a cache entry another test writes)
    assert not any(line.startswith("error:") for line in err.splitlines()), err
    assert "Traceback" not in err and "Broken pipe" not in err and "BrokenPipeError" not in err, err


def test_a_report_whose_reader_has_gone_ends_the_command_quietly(tmp_path, molecules):
    """`molgen evaluate a.sdf | true`: a report printed to a reader that has gone ends the command as a writer
    killed by SIGPIPE (exit 141, nothing said), as the molecules written to one do (rich itself exits with 1); the
    files asked for are written before the report, whole."""
    import subprocess
    import sys

    write_molecules(tmp_path / "a.sdf", molecules)
    runs = {("evaluate", "a.sdf", "--no-novelty", "--no-fidelity", "--json", "e.json", "--per-molecule", "e.csv"):
            ("e.json", "e.csv"), ("sample", "-n", "3", "-o", "s.sdf", "--json", "s.json"): ("s.sdf", "s.json"),
            ("models",): ()}
    for args, files in runs.items():
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the command prints
        p = subprocess.run([sys.executable, "-m", "molgen", *args], stdout=write, stderr=subprocess.PIPE,
                           cwd=tmp_path, timeout=120)
        os.close(write)
        assert p.returncode == 141 and p.stderr == b"", (args, p.returncode, p.stderr.decode())
        for name in files:
            assert (tmp_path / name).stat().st_size > 0, (args, name)
    assert json.loads((tmp_path / "s.json").read_text())["n_molecules"] == 3
    assert len(read_molecules(tmp_path / "s.sdf")) == 3


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("sample", "--help")])
def test_help_or_version_whose_reader_has_gone_ends_the_command_quietly(args, tmp_path):
    """`molgen --help | true`: Click handles the broken pipe itself (exit 1, as for a failure); molgen ends as a
    writer killed by SIGPIPE, as its reports do (exit 141, nothing said)."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    p = subprocess.run([sys.executable, "-m", "molgen", *args], stdout=write, stderr=subprocess.PIPE,
                       cwd=tmp_path, timeout=120)
    os.close(write)
    assert p.returncode == 141 and p.stderr == b"", (p.returncode, p.stderr.decode())


@pytest.mark.parametrize("fmt", ["sdf", "xyz"])
def test_windows_line_ends_and_a_byte_order_mark_read_as_the_plain_file(fmt, molecules, tmp_path):
    plain = tmp_path / f"plain.{fmt}"
    write_molecules(plain, molecules)
    text = plain.read_text()
    variants = {"crlf": text.replace("\n", "\r\n").encode(), "bom": b"\xef\xbb\xbf" + text.encode()}
    want = read_molecules(plain)
    for name, data in variants.items():
        (tmp_path / f"{name}.{fmt}").write_bytes(data)
        (tmp_path / f"{name}.{fmt}.gz").write_bytes(gzip.compress(data))
        for path in (tmp_path / f"{name}.{fmt}", tmp_path / f"{name}.{fmt}.gz"):
            got = read_molecules(path)
            assert [m.name for m in got] == [m.name for m in want], path
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g.types, w.types)
                np.testing.assert_array_equal(g.positions, w.positions)


def test_xyz_with_atomic_numbers_reads_as_with_symbols(tmp_path):
    symbols = "4\n\nC 0 0 0\nh 1.09 0 0\nO -0.7 1.1 0\nF 0 0 1.3\n"
    numbers = "4\n\n6 0 0 0\n1 1.09 0 0\n8 -0.7 1.1 0\n9 0 0 1.3\n"
    (tmp_path / "s.xyz").write_text(symbols)
    (tmp_path / "n.xyz").write_text(numbers)
    (a,), (b,) = read_molecules(tmp_path / "s.xyz"), read_molecules(tmp_path / "n.xyz")
    assert a.types.tolist() == b.types.tolist() == [1, 0, 3, 4]
    np.testing.assert_array_equal(a.positions, b.positions)
    (tmp_path / "cl.xyz").write_text("1\n\n17 0 0 0\n")
    with pytest.raises(MolgenError, match="unknown element '17'"):
        read_molecules(tmp_path / "cl.xyz")


def test_file_names_that_look_like_markup_are_printed_as_they_are(tmp_path, molecules):
    folder = tmp_path / "runs[" / "x]"
    folder.mkdir(parents=True)
    path = folder / "[bold]:smile:[/].sdf"  # rich's markup and emoji codes, as a user may name files
    write_molecules(path, molecules)
    res = invoke("evaluate", path, "--no-novelty", "--no-fidelity")
    assert res.exit_code == 0, res.output
    assert "[bold]:smile:[/].sdf" in res.stdout.replace("\n", "").replace(" ", "")
    res = invoke("sample", "-n", 2, "-o", folder / "out.sdf")  # the path holds "[/x]", a closing tag to rich
    assert res.exit_code == 0, res.output
    assert f"wrote 2 molecules to {folder / 'out.sdf'}" in res.stdout
    one_line_error(invoke("evaluate", folder / "[red]none.sdf"), "[/x]/[red]none.sdf: no such file")


def test_a_fragment_from_standard_input(tmp_path):
    frag = "4\nammonia\nN 0 0 0\nH 1.01 0 0\nH -0.34 0.95 0\nH -0.34 -0.47 0.83\n"
    res = invoke("sample", "--fix", "-", "-n", 2, "--steps", 2, "-o", tmp_path / "w.xyz", "--no-report",
                 stdin=frag.encode())
    assert res.exit_code == 0, res.output
    for m in read_molecules(tmp_path / "w.xyz"):
        assert m.types[:4].tolist() == [2, 0, 0, 0]  # N, H, H, H first, where the fragment put them
        np.testing.assert_allclose(m.positions[:4], [[0, 0, 0], [1.01, 0, 0], [-0.34, 0.95, 0], [-0.34, -0.47, 0.83]],
                                   atol=1e-5)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (a device whose writes fail)")
def test_a_full_or_closed_stdout_or_stderr(tmp_path, molecules):
    """A report that standard output cannot take is an error naming it; standard error carries only messages, so
    where it cannot take them (full, closed) the work is done all the same, and a refusal keeps its exit code."""
    import subprocess
    import sys

    write_molecules(tmp_path / "a.sdf", molecules)

    def run(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
        cmd = [sys.executable, "-m", "molgen", "evaluate", *map(str, args), "--no-novelty", "--no-fidelity"]
        p = subprocess.run(cmd, stdout=stdout, stderr=stderr, cwd=tmp_path, timeout=120)
        return p.returncode, (p.stderr or b"").decode()

    with open("/dev/full", "wb") as full:
        code, err = run("a.sdf", stdout=full)  # the report to a full disk
        assert code == 2 and err.strip() == "error: standard output: No space left on device", err
        p = subprocess.run([sys.executable, "-m", "molgen", "evaluate", "a.sdf", "--json", "-", "--no-novelty",
                            "--no-fidelity"], stdout=subprocess.PIPE, stderr=full, cwd=tmp_path, timeout=120)
        assert p.returncode == 0 and json.loads(p.stdout)["n_molecules"] == 3  # the report went to a full stderr
        assert run("none.sdf", stderr=full)[0] == 2  # not a crash in saying so
    for closed in ("stdout", "stderr"):  # `>&-`, `2>&-`: Python leaves the stream as None
        (tmp_path / "m.json").unlink(missing_ok=True)
        code = subprocess.run(["bash", "-c", f'"$0" -m molgen evaluate a.sdf --json m.json --no-novelty '
                               f'--no-fidelity {">&-" if closed == "stdout" else "2>&-"}', sys.executable],
                              cwd=tmp_path, capture_output=closed == "stdout", timeout=120).returncode
        assert code == 0 and json.loads((tmp_path / "m.json").read_text())["n_molecules"] == 3, closed
