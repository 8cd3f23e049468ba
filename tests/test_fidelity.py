"""What the molecules are: distribution distances (exact on hand-built sets, near zero between two samples of QM9),
RDKit's validity and MMFF94 strain, and the pictures (`molgen evaluate --plots`, `molgen view`, `molgen plot`)."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import cli, one_line_error, random_rotation

from molgen.chem.forcefield import kabsch_rmsd, perceive, strain
from molgen.chem.io import Molecule
from molgen.chem.write import write_sdf
from molgen.data import qm9
from molgen.evaluate import evaluate_molecules
from molgen.fidelity import (ANGLE_BIN, LENGTH_BIN, REFERENCE_NAME, Stats, distances, reference_statistics,
                             statistics, total_variation, wasserstein1)

TETRA = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float64) / np.sqrt(3)


def methane(ch, rng):
    """Methane with C-H bonds of length ``ch``, randomly turned and placed."""
    pos = np.vstack([[0, 0, 0], TETRA * ch]) @ random_rotation(rng).T + rng.normal(size=3)
    return pos, np.array([1, 0, 0, 0, 0])


def water(angle_deg, rng):
    a = np.radians(angle_deg)
    pos = np.array([[0, 0, 0], [0.96, 0, 0], [0.96 * np.cos(a), 0.96 * np.sin(a), 0]]) @ random_rotation(rng).T
    return pos, np.array([3, 0, 0])


def _stats(mols):
    return statistics([p for p, _ in mols], [t for _, t in mols])


def test_distances_are_exact_on_hand_built_sets():
    rng = np.random.default_rng(0)
    a = _stats([methane(1.09, rng) for _ in range(20)] + [water(104.5, rng) for _ in range(10)])
    b = _stats([methane(1.11, rng) for _ in range(20)] + [water(109.5, rng) for _ in range(10)])
    assert a.types.tolist() == [100, 20, 0, 10, 0] and a.orders.tolist() == [100, 0, 0]
    assert a.valency[1, 4] == 20 and a.valency[0, 1] == 100 and a.valency[3, 2] == 10
    assert a.angles[1].sum() == 20 * 6 and a.angles[3].sum() == 10
    d = distances(b, a)
    assert d["atom_types_tv"] == 0 and d["sizes_tv"] == 0 and d["bond_types_tv"] == 0 and d["valency_tv"] == 0
    # C-H 0.02 Å longer (80 bonds), O-H unchanged (20 bonds): the weighted mean is 0.8 x 0.02
    assert d["bond_lengths_w1_by_type"]["C-H1"] == pytest.approx(0.02, abs=LENGTH_BIN)
    assert d["bond_lengths_w1_by_type"]["O-H1"] == pytest.approx(0.0, abs=LENGTH_BIN)
    assert d["bond_lengths_w1"] == pytest.approx(0.8 * 0.02, abs=LENGTH_BIN)
    # angles at C unchanged (tetrahedral), at O 5 degrees wider: weighted by 120 and 10 angles
    assert d["bond_angles_w1_by_element"]["O"] == pytest.approx(5.0, abs=ANGLE_BIN)
    assert d["bond_angles_w1_by_element"]["C"] == pytest.approx(0.0, abs=ANGLE_BIN)
    assert d["bond_angles_w1"] == pytest.approx(5.0 * 10 / 130, abs=ANGLE_BIN)
    assert distances(a, a)["bond_lengths_w1"] == 0 and distances(a, a)["bond_angles_w1"] == 0
    only_water = _stats([water(104.5, rng) for _ in range(4)])
    d = distances(only_water, a)
    assert d["atom_types_tv"] == pytest.approx(0.5 * (abs(8 / 12 - 100 / 130) + abs(0 - 20 / 130) + abs(4 / 12 - 10 / 130)))
    assert d["sizes_tv"] == pytest.approx(20 / 30)  # every methane-sized molecule is missing


def test_total_variation_and_w1_basics():
    assert total_variation([1, 0], [0, 3]) == 1.0 and total_variation([2, 2], [1, 1]) == 0.0
    assert total_variation([0, 0], [1, 1]) == 1.0
    p, q = np.zeros(100), np.zeros(100)
    p[10], q[30] = 5, 2
    assert wasserstein1(p, q, 0.5) == pytest.approx(10.0)
    assert wasserstein1(p, np.zeros(100), 0.5) is None


def test_statistics_add_up_and_drop_non_finite_molecules():
    rng = np.random.default_rng(1)
    a, b = [methane(1.09, rng) for _ in range(3)], [water(104.5, rng) for _ in range(2)]
    both = _stats(a + b)
    sa, sb = _stats(a), _stats(b)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(both, k), getattr(sa, k) + getattr(sb, k))
    bad = (np.full((3, 3), np.nan), np.array([3, 0, 0]))
    np.testing.assert_array_equal(_stats(a + [bad]).types, sa.types)


def test_evaluation_counts_as_statistics_does(mini_ds):
    """evaluate_molecules counts the molecules for the distances with the bond orders it finds for stability:
    the same counts as statistics(), non-finite molecules left out, over chunks of molecules."""
    from molgen.evaluate import _per_molecule

    mols = [mini_ds.molecule(i) for i in range(len(mini_ds))] * 20  # several chunks
    mols[3] = (np.where(np.arange(len(mols[3][0]))[:, None] == 1, np.nan, mols[3][0]), mols[3][1])
    pos, typ = [m[0] for m in mols], [m[1] for m in mols]
    want, got = statistics(pos, typ), Stats()
    _per_molecule(pos, typ, with_rdkit=False, stats=got)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    assert got.sizes.sum() == len(mols) - 1
    m = evaluate_molecules(pos[:50], typ[:50], reference_stats=want)
    np.testing.assert_array_equal(m.stats.lengths, statistics(pos[:50], typ[:50]).lengths)


def test_two_halves_of_qm9_are_close_and_noise_is_seen(mini_ds):
    """Calibration on the fixture's 59 QM9 molecules: half against half is close; the same molecules with
    0.1 Å of noise on every coordinate are far in bond lengths and strain."""
    mols = [mini_ds.molecule(i) for i in range(len(mini_ds))]
    pos, typ = [p.astype(np.float64) for p, _ in mols], [t for _, t in mols]
    ref, half = statistics(pos[::2], typ[::2]), statistics(pos[1::2], typ[1::2])
    d = distances(half, ref)
    # 29 small molecules against 30 others: close in geometry (their sizes differ: the fixture is QM9's first 59)
    assert d["bond_lengths_w1"] < 0.01 and d["bond_angles_w1"] < 2.0 and d["atom_types_tv"] < 0.05
    rng = np.random.default_rng(0)
    noisy = [p + rng.normal(scale=0.1, size=p.shape) for p in pos]
    dn = distances(statistics(noisy[1::2], typ[1::2]), ref)
    assert dn["bond_lengths_w1"] > 5 * d["bond_lengths_w1"] and dn["bond_angles_w1"] > 3 * d["bond_angles_w1"]
    assert dn["valency_tv"] > 10 * d["valency_tv"]
    clean = evaluate_molecules(pos, typ, with_strain=True)
    rough = evaluate_molecules(noisy, typ, with_strain=True)
    assert clean.rdkit_validity > 0.9 and clean.strain["median_kcal_mol"] < 15
    assert clean.strain["n_molecules"] == sum(p.rdkit_valid for p in clean.per_molecule)
    assert rough.strain["median_kcal_mol"] > 10 * clean.strain["median_kcal_mol"]


def test_rdkit_perception_and_strain_on_known_molecules():
    rng = np.random.default_rng(2)
    pos, typ = methane(1.09, rng)
    mol = perceive(typ, pos)
    assert mol is not None and mol.GetNumBonds() == 4
    e, rmsd = strain(mol)
    p2, t2 = methane(1.25, rng)
    stretched = perceive(t2, p2)
    e2, _ = strain(stretched)
    assert 0 <= e < 1.0 and rmsd < 1e-6 + 1e-3 and e2 > e + 5  # ideal methane barely relaxes; stretched bonds do
    five = np.vstack([[0, 0, 0], TETRA * 1.09, [[0, 0, 1.09]]])  # a carbon with five hydrogens: refused
    assert perceive(np.array([1, 0, 0, 0, 0, 0]), five) is None
    assert perceive(np.array([1, 0]), np.array([[0, 0, 0], [np.nan, 0, 0]])) is None
    q = random_rotation(rng)
    pts = rng.normal(size=(6, 3))
    assert kabsch_rmsd(pts, pts @ q.T + 3.0) == pytest.approx(0.0, abs=1e-9)


def test_reference_is_cached_beside_the_data(data_dir):
    first = reference_statistics(data_dir)
    assert (data_dir / REFERENCE_NAME).exists()
    again = reference_statistics(data_dir)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(first, k), getattr(again, k))
    assert first.types.sum() == sum(len(qm9.load_qm9(data_dir).molecule(int(i))[1]) for i in
                                    qm9.load_qm9(data_dir).split("test"))
    assert reference_statistics(data_dir / "nothing") is None


def test_a_damaged_reference_is_made_again(data_dir, tmp_path):
    import shutil

    d = tmp_path / "cache"
    shutil.copytree(data_dir, d)
    first = reference_statistics(d)
    (d / REFERENCE_NAME).write_bytes((d / REFERENCE_NAME).read_bytes()[:100])  # cut short
    again = reference_statistics(d)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(first, k), getattr(again, k))
    Stats.load(d / REFERENCE_NAME)  # and replaced by a whole one


def test_training_smiles_cut_short_are_made_again(data_dir, tmp_path):
    """The novelty reference (training SMILES, cached beside the data): a file cut short would make molecules
    look novel; it is made again instead."""
    import shutil

    from molgen.evaluate import TRAIN_SMILES_NAME, training_smiles

    d = tmp_path / "cache"
    shutil.copytree(data_dir, d)
    (d / TRAIN_SMILES_NAME).unlink(missing_ok=True)
    first = training_smiles(d)
    text = (d / TRAIN_SMILES_NAME).read_text()
    assert len(first) > 10 and text.endswith("\n")
    (d / TRAIN_SMILES_NAME).write_text(text[: len(text) // 2].rstrip("\n"))
    assert training_smiles(d) == first and (d / TRAIN_SMILES_NAME).read_text() == text


def test_a_cache_that_cannot_be_written_keeps_its_references_in_the_users_own(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """A QM9 cache shared read-only: the training SMILES and the test-split statistics are made once, as if it
    could take them, and kept in the user's own cache folder under the cache's SHA-256. Where that cannot take
    them either (a full disk), each says on stderr, in one line, that it is not kept, and is made each time."""
    import errno
    import json
    import os
    import shutil
    from pathlib import Path

    import molgen.io_utils
    from molgen.data.qm9 import MANIFEST_NAME
    from molgen.evaluate import TRAIN_SMILES_NAME, training_smiles

    d, ro = tmp_path / "cache", tmp_path / "ro"
    for folder in (d, ro):
        shutil.copytree(data_dir, folder)
        for name in (TRAIN_SMILES_NAME, REFERENCE_NAME):
            (folder / name).unlink(missing_ok=True)
    labels = []

    def progress(label, total):
        labels.append(label)
        return lambda n: None

    smiles, stats = training_smiles(d, progress=progress), reference_statistics(d)  # the cache can take them
    capsys.readouterr()
    refused = {ro}
    access, atomic_path = os.access, molgen.io_utils.atomic_path  # a read-only mount refuses even root

    def refusing(dest):
        if Path(dest).parent in refused or tmp_path in refused:
            raise OSError(errno.EROFS, "Read-only file system", str(dest))
        return atomic_path(dest)

    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in refused and access(p, mode))
    monkeypatch.setattr(molgen.io_utils, "atomic_path", refusing)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    key = json.loads((ro / MANIFEST_NAME).read_text())["sha256"][:16]
    own = tmp_path / "user" / "molgen" / "derived" / key
    for _ in range(2):  # made once, then read
        assert training_smiles(ro, progress=progress) == smiles
        again = reference_statistics(ro)
        for k in Stats().__dict__:
            np.testing.assert_array_equal(getattr(stats, k), getattr(again, k))
    assert labels == ["training SMILES (once)"] * 2 and capsys.readouterr().err == ""
    assert sorted(p.name for p in own.iterdir()) == sorted([TRAIN_SMILES_NAME, REFERENCE_NAME])

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "full"))  # the user's own folder cannot take them either
    refused.add(tmp_path)
    assert training_smiles(ro, progress=progress) == smiles
    assert labels[-1] == "training SMILES"  # made each time where it cannot be kept
    again = reference_statistics(ro)
    for k in Stats().__dict__:
        np.testing.assert_array_equal(getattr(stats, k), getattr(again, k))
    full = tmp_path / "full" / "molgen" / "derived" / key
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {full / TRAIN_SMILES_NAME}: Read-only file system: the training SMILES are not kept, so "
        "computed again each time",
        f"warning: {full / REFERENCE_NAME}: Read-only file system: QM9's test-split statistics are not kept, so "
        "computed again each time"]
    assert sorted(p.name for p in ro.iterdir()) == sorted(p.name for p in data_dir.iterdir()
                                                          if p.name not in (TRAIN_SMILES_NAME, REFERENCE_NAME))


def test_a_read_only_molgen_home_keeps_compiled_programs_in_the_users_own_cache(data_dir, tmp_path, monkeypatch):
    """$MOLGEN_HOME shared read-only: compiled programs go to the user's own cache folder (else every run compiles
    its programs again), and `molgen info` says where what evaluation derives is kept."""
    import os
    import shutil
    from pathlib import Path

    from molgen.display import setting_table
    from molgen.jax_setup import compilation_cache_dir

    from molgen.evaluate import TRAIN_SMILES_NAME

    home, user = tmp_path / "shared", tmp_path / "user"
    shutil.copytree(data_dir, home)
    for name in (TRAIN_SMILES_NAME, REFERENCE_NAME):  # another test may have made them there
        (home / name).unlink(missing_ok=True)
    monkeypatch.delenv("MOLGEN_JAX_CACHE", raising=False)
    monkeypatch.setenv("MOLGEN_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    assert compilation_cache_dir() == home / "jax"
    assert "read-only" not in _cells(setting_table(home))
    access = os.access  # a read-only mount refuses even root
    monkeypatch.setattr(os, "access", lambda p, mode: not Path(p).is_relative_to(home) and access(p, mode))
    assert compilation_cache_dir() == user / "molgen" / "jax"
    assert "read-only: what evaluation derives from it is kept in " + str(user / "molgen" / "derived") in \
        _cells(setting_table(home))
    monkeypatch.setenv("MOLGEN_JAX_CACHE", "off")
    assert compilation_cache_dir() is None


def _cells(table) -> str:
    return " ".join(str(c) for col in table.columns for c in col._cells)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def sdf(tmp_path_factory, mini_ds):
    path = tmp_path_factory.mktemp("fid") / "m.sdf"
    write_sdf(path, [Molecule(t.astype(np.int8), p.astype(np.float64), f"m{i}") for i, (p, t) in
                     enumerate(mini_ds.molecule(i) for i in range(20))])
    return path


def test_evaluate_reports_fidelity_strain_and_plots(tmp_path, sdf, data_dir):
    res = cli("evaluate", sdf, "--reference", data_dir, "--strain", "--plots", tmp_path / "plots", "--json",
              tmp_path / "r.json", "--per-molecule", tmp_path / "r.csv")
    assert res.exit_code == 0, res.output
    assert "RDKit" in res.output and "bond lengths W1" in res.output and "MMFF94 strain" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["fidelity"]) >= {"atom_types_tv", "sizes_tv", "bond_types_tv", "valency_tv", "bond_lengths_w1",
                                     "bond_angles_w1"}
    assert data["rdkit_validity"] > 0.8 and data["strain"]["n_molecules"] > 10
    header = (tmp_path / "r.csv").read_text().splitlines()[0]
    assert header.endswith("rdkit_valid,strain_kcal_mol,relax_rmsd")
    for name in ("atom_types", "bond_lengths", "bond_angles"):
        w, h = _png_size(tmp_path / "plots" / f"{name}.png")
        assert 300 < w < 2000 and 200 < h < 1500
    res = cli("evaluate", sdf, "--reference", data_dir, "--no-fidelity", "--json", tmp_path / "n.json")
    assert res.exit_code == 0 and json.loads((tmp_path / "n.json").read_text())["fidelity"] is None
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("evaluate", sdf, "--plots", tmp_path / "afile"), "is a file")
    one_line_error(cli("evaluate", sdf, "--plots", tmp_path / "p2", "--reference", tmp_path / "none"),
                   "molgen download")


def test_the_evaluation_benchmark_reports_its_parts(sdf, data_dir, capsys, monkeypatch):
    """benchmarks/evaluate.py: one EVAL line with the read, judge and distance times of the file's molecules."""
    import re
    import sys

    from conftest import load_script

    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(sdf), "--repeat", "2", "--data-dir", str(data_dir)])
    load_script("benchmarks/evaluate.py").main()
    out = capsys.readouterr().out
    assert len(re.findall(r"^# run: read ", out, re.M)) == 2
    assert re.search(r"^EVAL read_s=\d+\.\d\d judge_s=\d+\.\d\d distances_s=-?\d+\.\d\d molecules=20$", out, re.M), out


def test_view_draws_a_grid_of_n_molecules(tmp_path, sdf):
    res = cli("view", sdf, "-n", "7", "--per-row", "3", "-o", tmp_path / "g.png")
    assert res.exit_code == 0 and "wrote 7 molecules" in res.output, res.output
    assert _png_size(tmp_path / "g.png") == (3 * 220, 3 * 220)  # 7 molecules: 3 per row, 3 rows
    res = cli("view", sdf, "-n", "4", "-o", tmp_path / "g.svg")
    assert res.exit_code == 0, res.output
    root = ET.parse(tmp_path / "g.svg").getroot()
    assert root.tag.endswith("svg") and int(float(root.get("width").rstrip("px"))) == 4 * 220
    one_line_error(cli("view", sdf, "-o", tmp_path / "g.jpg"), ".png or .svg")
    one_line_error(cli("view", sdf, "-n", "0", "-o", tmp_path / "g.png"), "-n must be")
    one_line_error(cli("view", tmp_path / "missing.sdf", "-o", tmp_path / "g.png"), "missing.sdf")


def test_view_without_o_never_replaces_a_file(tmp_path, sdf, monkeypatch):
    """The default name is grid.png, or grid-2.png, ... when taken (as `molgen sample`'s out.sdf); a name given
    with -o is replaced."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.png").write_bytes(b"mine")
    res = cli("view", sdf, "-n", "2")
    assert res.exit_code == 0 and "to grid-2.png" in res.output, res.output
    assert (tmp_path / "grid.png").read_bytes() == b"mine" and _png_size(tmp_path / "grid-2.png") == (2 * 220, 220)
    res = cli("view", sdf, "-n", "2", "-o", "grid.png")
    assert res.exit_code == 0 and _png_size(tmp_path / "grid.png") == (2 * 220, 220)


def test_plot_draws_the_training_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 1.0 / s, "loss_x": 0.5 / s, "lr": 1e-4, "grad_norm": 2.0} for s in range(25, 501, 25)]
    lines += [{"step": 500, "val_loss": 0.003}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = cli("plot", run)
    assert res.exit_code == 0 and "loss, loss_x, val_loss" in res.output, res.output
    w, h = _png_size(run / "curves.png")
    assert 600 < w < 1500 and 400 < h < 1200
    one_line_error(cli("plot", tmp_path), "no metrics.jsonl")
    (run / "metrics.jsonl").write_text("not json\n")
    one_line_error(cli("plot", run, "-o", tmp_path / "c.png"), "line 1 is not JSON")
    (run / "metrics.jsonl").write_bytes(b'{"step": 25, "loss": 1.0}\n\xff\xfe\n{"step": 50, "loss": 0.5}\n')
    one_line_error(cli("plot", run, "-o", tmp_path / "c.png"), "metrics.jsonl: line 2 is not JSON")
    assert not (tmp_path / "c.png").exists()
    # a run still writing (or killed while writing) its last line: the whole lines are drawn
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 525, "lo')
    res = cli("plot", run, "-o", tmp_path / "c.png")
    assert res.exit_code == 0 and (tmp_path / "c.png").exists(), res.output


def test_plot_compares_runs(tmp_path, monkeypatch):
    """Several runs: their training and validation losses in one plot; the default name is curves.png in the
    current folder, never replacing a file; every run is checked before anything is drawn."""
    monkeypatch.chdir(tmp_path)
    for folder, scale in (("a", 1.0), ("b", 2.0), ("c/a", 3.0)):
        run = tmp_path / folder
        run.mkdir(parents=True)
        rows = [{"step": s, "loss": scale / s, "lr": 1e-4} for s in (50, 100, 150)] + [{"step": 150, "val_loss": 0.01}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "curves.png").write_bytes(b"mine")
    res = cli("plot", "a", "b")
    assert res.exit_code == 0, res.output
    assert "drew a: loss, a: val_loss, b: loss, b: val_loss to curves-2.png" in " ".join(res.output.split())
    assert (tmp_path / "curves.png").read_bytes() == b"mine" and _png_size(tmp_path / "curves-2.png")[0] > 600
    res = cli("plot", "a", "c/a", "-o", "ac.svg")  # two runs named a: told apart by their paths
    assert res.exit_code == 0 and "a: loss, a: val_loss, c/a: loss" in " ".join(res.output.split()), res.output
    assert (tmp_path / "ac.svg").read_text().lstrip().startswith("<?xml")
    one_line_error(cli("plot", "a", "nope", "-o", "x.png"), "nope: no such folder (give a training run folder)")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("plot", "a", "empty", "-o", "x.png"), "empty: no metrics.jsonl")
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 5, "grad_norm": 1.0}\n')  # no loss logged yet
    one_line_error(cli("plot", "a", "b/", "./a", "-o", "x.png"), "a: the same run given twice; name each run once")
    (tmp_path / "c/a" / "metrics.jsonl").write_text('{"step": 5, "grad_norm": 1.0}\n')
    one_line_error(cli("plot", "b", "c/a", "-o", "x.png"), "no run logs a loss")
    assert not (tmp_path / "x.png").exists()


def test_plots_leave_the_programs_matplotlib_as_it_was(tmp_path, sdf):
    """A notebook's backend and figures are its own: molgen draws on figures outside pyplot."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
from pathlib import Path
from molgen.chem.io import read_molecules
from molgen.fidelity import statistics
from molgen.plots import fidelity_plots, training_curves
mine = plt.figure()
training_curves(Path({str(run)!r}), Path({str(tmp_path / "c.png")!r}))
mols = read_molecules({str(sdf)!r})
st = statistics([m.positions for m in mols], [m.types for m in mols])
fidelity_plots(st, st, Path({str(tmp_path / "plots")!r}))
print(matplotlib.get_backend(), plt.get_fignums(), plt.gcf() is mine)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["svg", "[1]", "True"], res.stdout + res.stderr
    assert _png_size(tmp_path / "c.png")[0] > 200 and len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_view_and_plot_write_png_to_standard_output(tmp_path, sdf):
    """`-o -`: the image's bytes on standard output, what the command says on stderr."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    for args, said in ((["view", str(sdf), "-n", "3", "-o", "-"], "wrote 3 molecules to standard output"),
                       (["plot", str(run), "-o", "-"], "drew loss to standard output")):
        res = subprocess.run([sys.executable, "-m", "molgen", *args], capture_output=True, timeout=300)
        assert res.returncode == 0 and said in res.stderr.decode(), res.stderr.decode()
        (tmp_path / "out.png").write_bytes(res.stdout)
        assert _png_size(tmp_path / "out.png")[0] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "run"]  # no grid.png, no curves.png

