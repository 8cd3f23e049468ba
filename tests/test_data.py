"""QM9 sources, parsing, split, cache and batching."""

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from molgen import MolgenError
from molgen.chem.elements import SYMBOLS
from molgen.data import qm9, sources
from molgen.data.batching import BatchSampler, bucket, pack

DATA = Path(__file__).parent / "data" / "qm9pack_mini.csv"


def _xyz_text(rec):
    n = len(rec.types)
    lines = [str(n), f"gdb {rec.index}\t157.7\t0.0"]
    for t, (x, y, z) in zip(rec.types, rec.positions):
        # QM9 writes some small numbers in Mathematica's *^ notation; exercise that path too.
        lines.append(f"{'HCNOF'[t]}\t{x:.10f}\t{y:.10f}\t{z:.6E}\t0.1".replace("E", "*^"))
    lines += ["1 2 3", f"{rec.smiles}\t{rec.smiles}", "InChI=1S/x\tInChI=1S/x"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def records():
    return sources.read_qm9pack_csv([DATA])


@pytest.fixture
def archive(tmp_path, records):
    path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(path, "w:bz2") as tar:
        for r in records:
            data = _xyz_text(r).encode()
            info = tarfile.TarInfo(f"dsgdb9nsd_{r.index:06d}.xyz")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        exc = b"header line\n  Index  something\n    3  x\n    5  y\n"
        info = tarfile.TarInfo("uncharacterized.txt")
        info.size = len(exc)
        tar.addfile(info, io.BytesIO(exc))
    return path


def test_csv_and_archive_parse_to_the_same_molecules(records, archive):
    arc, excluded = sources.read_archive(archive)
    assert excluded == {3, 5}
    assert len(arc) == len(records) == 59
    by_index = {r.index: r for r in arc}
    for r in records:
        a = by_index[r.index]
        np.testing.assert_array_equal(a.types, r.types)
        np.testing.assert_allclose(a.positions, r.positions, atol=1e-6)
        assert a.smiles == r.smiles


def test_folder_of_xyz_files_reads_as_the_archive(tmp_path, records, archive):
    """The unpacked archive (one .xyz per molecule, uncharacterized.txt beside them) gives the archive's molecules;
    a directory member in the archive is passed over, and a truncated xyz file is one clear error."""
    folder = tmp_path / "unpacked"
    folder.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    got, excluded = sources.read_local(folder)
    arc, arc_excluded = sources.read_archive(archive)
    assert excluded == arc_excluded == {3, 5}
    assert [r.index for r in got] == sorted(r.index for r in arc)
    by_index = {r.index: r for r in arc}
    for r in got:
        np.testing.assert_array_equal(r.types, by_index[r.index].types)
        np.testing.assert_array_equal(r.positions, by_index[r.index].positions)
        assert r.smiles == by_index[r.index].smiles

    with_dir = tmp_path / "with_dir.tar"
    with tarfile.open(with_dir, "w") as tar:
        tar.add(folder, arcname="dsgdb9nsd")  # a directory member, then its files
    assert len(sources.read_archive(with_dir)[0]) == len(records)

    text = (folder / f"dsgdb9nsd_{records[0].index:06d}.xyz").read_text()
    lines = text.splitlines()
    atom = [*lines[:3]]  # the count, the properties, the first atom: then the second atom is replaced
    for bad, why in (("\n".join(lines[:4]), f" at line 5: it ends before its {lines[0]} atoms"),  # cut after two
                     ("\n".join([*atom, "C 0.1 x 0.2", *lines[4:]]), " at line 4: could not convert"),
                     ("\n".join([*atom, "C 0.1 0.2", *lines[4:]]), " at line 4: an atom line needs an element and"),
                     ("\n".join([*atom, "", *lines[4:]]), " at line 4: an empty line"),
                     ("\n".join(["five", *lines[1:]]),
                      " at line 1: the first line should be the atom count, not 'five'"),
                     ("", ": the file is empty")):
        (folder / "dsgdb9nsd_999999.xyz").write_text(bad)
        with pytest.raises(MolgenError, match=re.escape(f"dsgdb9nsd_999999.xyz: malformed QM9 xyz file{why}")):
            sources.read_local(folder)
    (folder / "dsgdb9nsd_999999.xyz").write_bytes(b"\xff\xfe" + text.encode())  # bytes that are not UTF-8
    with pytest.raises(MolgenError, match=r"dsgdb9nsd_999999.xyz: malformed QM9 xyz file"):
        sources.read_local(folder)
    (folder / "dsgdb9nsd_999999.xyz").unlink()
    with pytest.raises(MolgenError, match=re.escape("x.xyz: malformed QM9 xyz file at line 2: the second line should "
                                                    "begin 'gdb N' (N: the QM9 index), not 'benzene'")):
        sources.parse_qm9_xyz("\n".join([lines[0], "benzene", *lines[2:]]), "x.xyz")
    bad_csv = tmp_path / "latin1.csv"
    bad_csv.write_bytes("Index,SMILES,N_atoms,Elements,XYZ_Ang\n1,C,1\xe9,['C'],[[0,0,0]]\n".encode("latin-1"))
    with pytest.raises(MolgenError, match=r"latin1.csv:2: "):
        sources.read_local(bad_csv)


def test_methane_record(records):
    r = records[0]
    assert r.index == 1 and r.smiles == "C" and list(r.types) == [1, 0, 0, 0, 0]
    np.testing.assert_allclose(r.positions[0], [-0.0126981359, 1.0858041578, 0.0080009958])


def test_build_dataset_centres_sorts_and_splits(records):
    ds = qm9.build_dataset(records[::-1], excluded={3, 5})
    assert len(ds) == 57 and list(ds.index[:3]) == [1, 2, 4]
    for i in range(len(ds)):
        p, _ = ds.molecule(i)
        np.testing.assert_allclose(p.mean(0), 0, atol=1e-5)
    all_ids = np.concatenate(list(ds.splits.values()))
    assert sorted(all_ids.tolist()) == list(range(57))
    no_h = ds.remove_h()
    assert (no_h.types != 0).all() and no_h.n_atoms[0] == 1
    np.testing.assert_allclose(no_h.molecule(5)[0].mean(0), 0, atol=1e-5)


def test_training_type_fractions_read_from_the_cache_equal_the_loaded_ones(tmp_path, archive):
    """The report's type mix is read from the cache's types, sizes and split alone: the same numbers as the
    whole data set's, with and without hydrogens."""
    d = tmp_path / "cache"
    sources.download(d, from_path=archive)
    ds = qm9.load_qm9(d)
    ids = ds.split("train")
    counts = np.bincount(np.concatenate([ds.molecule(int(i))[1] for i in ids]), minlength=5)
    np.testing.assert_array_equal(qm9.training_type_fractions(d), counts / counts.sum())
    np.testing.assert_array_equal(ds.type_fractions("train"), counts / counts.sum())
    heavy = counts * (np.arange(5) != 0)
    np.testing.assert_array_equal(qm9.training_type_fractions(d, remove_h=True), heavy / heavy.sum())
    np.testing.assert_array_equal(qm9.load_qm9(d, remove_h=True).type_fractions("train"), heavy / heavy.sum())


def test_edm_split_sizes_and_reproducibility():
    assert qm9.split_sizes(qm9.N_KEPT) == qm9.EDM_SPLIT
    s1, s2 = qm9.edm_split(qm9.N_KEPT), qm9.edm_split(qm9.N_KEPT)
    assert [len(s1[k]) for k in ("train", "valid", "test")] == [100_000, 17_748, 13_083]
    # EDM: np.random.seed(0); np.random.permutation(n); train is the first 100,000 of that permutation.
    np.random.seed(0)
    perm = np.random.permutation(qm9.N_KEPT)
    np.testing.assert_array_equal(s1["train"], np.sort(perm[:100_000]))
    np.testing.assert_array_equal(s1["test"], s2["test"])


def test_download_from_file_is_atomic_and_idempotent(tmp_path, archive):
    d = tmp_path / "cache"
    path, did = sources.download(d, from_path=archive)
    assert did and path.exists()
    assert not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp"))
    ds = qm9.load_qm9(d)
    assert len(ds) == 57
    _, did2 = sources.download(d)  # a valid cache: nothing to do, no source needed
    assert not did2


def test_download_from_csv_folder(tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "qm9_part1.csv").write_text(DATA.read_text())
    sources.download(tmp_path / "c", from_path=folder)
    assert len(qm9.load_qm9(tmp_path / "c")) == 59


def test_corrupt_cache_is_rejected(tmp_path, archive):
    d = tmp_path / "cache"
    sources.download(d, from_path=archive)
    npz = d / qm9.CACHE_NAME
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    assert not qm9.cache_is_valid(d)
    with pytest.raises(MolgenError, match="molgen download"):
        qm9.load_qm9(d)
    # read without the hash check (evaluation, novelty): the damage is found where it is read, one line too
    assert qm9.cache_is_valid(d, verify_hash=False)
    with pytest.raises(MolgenError, match=rf"the QM9 cache in {d} is damaged \(.*\): run `molgen download --data-dir"):
        qm9.load_qm9(d, verify=False)
    # its manifest damaged, as JSON or as text: no valid cache, and loading it says to download it again
    for damaged in (b"{", b"\xff\xfe{}"):
        (d / qm9.MANIFEST_NAME).write_bytes(damaged)
        assert not qm9.cache_is_valid(d, verify_hash=False)
        with pytest.raises(MolgenError, match="molgen download"):
            qm9.load_qm9(d, verify=False)


def test_qm9pack_columns_parse_as_python_reads_the_literals(tmp_path, records):
    """The Elements and XYZ_Ang columns are read as numbers directly, giving exactly the floats and symbols Python's
    own reading of the list literals gives; a row whose literal is not a list of [x, y, z] lists is refused."""
    import ast
    import csv

    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, rec in zip(rows, records, strict=True):
        want = np.array(ast.literal_eval(row["XYZ_Ang"]), np.float64)
        np.testing.assert_array_equal(rec.positions, want)  # bit for bit
        assert [SYMBOLS[t] for t in rec.types] == ast.literal_eval(row["Elements"])
    row = rows[0]  # methane: 5 atoms
    xyz = row["XYZ_Ang"]
    regrouped = xyz.replace("],[", ",", 1)  # the same 15 numbers, the first two atoms in one list of six
    for column, bad in (("XYZ_Ang", xyz[:-1]), ("XYZ_Ang", xyz.replace("]", "],", 1)), ("XYZ_Ang", regrouped),
                        ("XYZ_Ang", "[[1,2,3],[4,5,6],[7,8,9],[1,2,3],[4,5,6,7]]"), ("XYZ_Ang", xyz.replace("1", "x", 1)),
                        ("Elements", "'C','H','H','H','H'")):
        path = tmp_path / "bad.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            w.writeheader()
            w.writerow({**row, column: bad})
        with pytest.raises(MolgenError, match="bad.csv:2: malformed row"):
            sources.read_qm9pack_csv([path])


def test_bad_inputs_give_clear_errors(tmp_path, records):
    bad = tmp_path / "bad.csv"
    bad.write_text("Index,SMILES\n1,C\n")
    with pytest.raises(MolgenError, match="missing columns"):
        sources.read_qm9pack_csv([bad])
    with pytest.raises(MolgenError, match="unknown element 'Cl'"):
        sources.parse_qm9_xyz("1\ngdb 7 1\nCl 0 0 0 0\n1\nCl Cl\nI I\n", "x.xyz")
    with pytest.raises(MolgenError, match="no such file"):
        sources.read_local(tmp_path / "missing.tar.bz2")
    # A source claiming to be all of QM9 must have the right counts.
    with pytest.raises(MolgenError, match="expected"):
        sources.check_full(records, None, "test")


def test_no_source_reachable(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "qm9pack_csvs", lambda: None)

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(sources, "_download", offline)
    with pytest.raises(MolgenError, match=r'pip install "molgen\[qm9\]"'):
        sources.download(tmp_path / "c")
    assert not list((tmp_path / "c").glob("qm9*"))


def test_bucket_bounds():
    for x in [1, 7, 100, 1000, 1153, 20001, 123457]:
        b = bucket(x)
        assert b >= x and b <= max(x * 1.13, 8)
        c = bucket(x, granule=1024)
        assert c % 1024 == 0 and x <= c <= max(x * 1.13, x + 1023)


def test_pack_masks_and_segments():
    g = pack([np.zeros((3, 3), np.float32), np.ones((2, 3), np.float32)], [np.zeros(3, int), np.ones(2, int)])
    assert g.node_mask.sum() == 5 and g.edge_mask.sum() == 3 * 2 + 2 * 1
    assert list(g.segment[:5]) == [0, 0, 0, 1, 1] and (g.segment[5:] == 2).all()
    assert np.all(np.diff(g.receivers) >= 0)  # sorted: segment sums may assume it
    real = g.edge_mask > 0
    assert np.all(g.segment[g.senders[real]] == g.segment[g.receivers[real]])


def test_batch_sampler_is_a_function_of_step(records):
    ds = qm9.build_dataset(records)
    ids = ds.split("train")
    a, b = BatchSampler(ids, 8, seed=3), BatchSampler(ids, 8, seed=3)
    seq = [a.indices(s).tolist() for s in range(12)]
    assert [b.indices(s).tolist() for s in reversed(range(12))] == seq[::-1]
    epoch = sum(seq[: a.steps_per_epoch], [])
    assert len(set(epoch)) == len(epoch)  # no repeats inside an epoch
