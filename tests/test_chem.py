"""Bond perception, EDM metrics with exact values on hand-built molecules, and SDF/XYZ round trips."""

import re

import numpy as np
import pytest
from conftest import cli
from rdkit import Chem
from rdkit.Chem import AllChem

from molgen import MolgenError
from molgen.chem.bonds import THRESHOLDS, bond_orders, pad_molecules, stability
from molgen.chem.elements import SYMBOLS, types_from_symbols
from molgen.chem.io import Molecule, read_molecules
from molgen.chem.write import write_sdf, write_xyz
from molgen.evaluate import evaluate_molecules

TET = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)


def methane(shift=(0, 0, 0)):
    pos = np.vstack([[0, 0, 0], 1.09 * TET]) + np.asarray(shift)
    return pos, types_from_symbols("CHHHH")


def ch3():
    pos, t = methane()
    return pos[:4], t[:4]


def pentavalent():
    pos = np.array([[0, 0, 0], [0, 0, 1.09], [0, 0, -1.09], [1.09, 0, 0],
                    [-0.545, 0.944, 0], [-0.545, -0.944, 0]])
    return pos, types_from_symbols("CHHHHH")


def hcn():
    return np.array([[0, 0, -1.065], [0, 0, 0], [0, 0, 1.156]]), types_from_symbols("HCN")


def kekule_benzene(a=1.34, b=1.50, ch=1.08):
    dirs = [np.array([np.cos(np.radians(60 * k)), np.sin(np.radians(60 * k)), 0.0]) for k in range(6)]
    ring = [np.zeros(3)]
    for k in range(5):
        ring.append(ring[-1] + dirs[k] * (a if k % 2 == 0 else b))
    ring = np.array(ring)
    c = ring.mean(0)
    hs = [r + ch * (r - c) / np.linalg.norm(r - c) for r in ring]
    return np.vstack([ring, hs]) - c, types_from_symbols("CCCCCCHHHHHH")


def embedded(smiles, seed=7):
    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(m, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(m)
    pos = m.GetConformer().GetPositions()
    return pos, types_from_symbols([a.GetSymbol() for a in m.GetAtoms()])


def heavy(smiles):
    """EDM's SMILES keep hydrogens as explicit atoms; compare on the heavy-atom form."""
    return Chem.MolToSmiles(Chem.RemoveHs(Chem.MolFromSmiles(smiles)))


def metrics(*mols, train=None):
    return evaluate_molecules([p for p, _ in mols], [t for _, t in mols], train_smiles=train)


def test_thresholds_match_edm_tables():
    h, c, n, o, f = range(5)
    assert THRESHOLDS[0, h, h] == 84 and THRESHOLDS[0, h, c] == 119 and THRESHOLDS[0, c, c] == 164
    assert THRESHOLDS[1, c, c] == 139 and THRESHOLDS[2, c, c] == 123 and THRESHOLDS[2, c, n] == 119
    assert THRESHOLDS[1, n, o] == 126 and THRESHOLDS[2, n, o] == 0 and THRESHOLDS[1, c, f] == 0
    assert (THRESHOLDS == THRESHOLDS.transpose(0, 2, 1)).all()


def test_bond_order_boundaries_are_strict():
    c = types_from_symbols("CC")
    for d, want in [(1.6399, 1), (1.641, 0), (1.3899, 2), (1.391, 1), (1.2299, 3), (1.231, 2)]:
        pos, typ, mask = pad_molecules([np.array([[0, 0, 0], [d, 0, 0]])], [c])
        assert bond_orders(pos, typ, mask)[0, 0, 1] == want, d


@pytest.mark.parametrize("name,mol,smiles", [
    ("methane", methane(), "C"),
    ("hcn", hcn(), "C#N"),
    ("benzene", kekule_benzene(), "c1ccccc1"),
    ("ethanol", embedded("CCO"), "CCO"),
    ("acetic acid", embedded("CC(=O)O"), "CC(=O)O"),
])
def test_stable_valid_molecules(name, mol, smiles):
    m = metrics(mol)
    assert m.atom_stability == 1.0 and m.mol_stability == 1.0, name
    assert m.validity == 1.0 and heavy(m.per_molecule[0].smiles) == smiles
    assert m.connected == 1.0


def test_missing_hydrogen():
    m = metrics(ch3())
    assert m.atom_stability == 3 / 4 and m.mol_stability == 0.0
    # EDM builds atoms without explicit-H flags, so RDKit fills the radical with an implicit H: still valid.
    assert m.validity == 1.0 and heavy(m.per_molecule[0].smiles) == "C"


def test_pentavalent_carbon_is_unstable_and_invalid():
    m = metrics(pentavalent())
    assert m.atom_stability == 5 / 6 and m.mol_stability == 0 and m.validity == 0
    assert m.valid_and_unique == 0 and m.uniqueness is None


def test_disconnected_pair_keeps_largest_fragment():
    p1, t1 = methane()
    p2, t2 = hcn()
    m = metrics((np.vstack([p1, p2 + 10.0]), np.concatenate([t1, t2])))
    assert m.mol_stability == 1.0 and m.validity == 1.0
    assert m.connected == 0.0 and m.per_molecule[0].n_fragments == 2
    assert heavy(m.per_molecule[0].smiles) == "C"  # 5 atoms beat HCN's 3


def test_mixture_exact_values_and_novelty():
    train = {metrics(methane()).per_molecule[0].smiles}
    m = metrics(methane(), ch3(), pentavalent(), hcn(), methane((3, 3, 3)), train=train)
    assert m.n_molecules == 5 and m.n_atoms_total == 5 + 4 + 6 + 3 + 5
    assert m.atom_stability == pytest.approx((5 + 3 + 5 + 3 + 5) / 23)
    assert m.mol_stability == pytest.approx(3 / 5)
    assert m.validity == pytest.approx(4 / 5)  # the pentavalent carbon fails
    # Explicit hydrogens are atoms of the SMILES: methane (twice), CH3 with an implicit H (its own string), HCN.
    assert m.uniqueness == pytest.approx(3 / 4)
    assert m.valid_and_unique == pytest.approx(3 / 5)
    assert m.novelty == pytest.approx(2 / 3)  # methane is in the reference set
    assert m.type_fractions["H"] == pytest.approx((4 + 3 + 5 + 1 + 4) / 23)


def test_non_finite_molecules_count_as_failed():
    p, t = methane()
    bad = p.copy()
    bad[2] = np.nan
    m = metrics((p, t), (bad, t))
    assert m.n_nonfinite == 1 and m.n_molecules == 2
    assert m.mol_stability == 0.5 and m.validity == 0.5 and m.atom_stability == 5 / 10


def test_coordinates_beyond_float32_make_no_bond_and_no_warning(tmp_path):
    """A coordinate too large for float32 (EDM's distances) becomes inf: the atom bonds to nothing, quietly, and the
    molecule counts as one whose coordinates are not finite."""
    import warnings

    from molgen.chem.bonds import bond_orders, pad_molecules
    from molgen.chem.depict import grid

    p, t = methane()
    far = p.copy()
    far[1] = [1e300, 0.0, -1e39]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orders = bond_orders(*pad_molecules([p, far], [t, t]))
        grid([Molecule(t, p, "m"), Molecule(t, far, "far")], tmp_path / "g.png", 2)
    assert orders[0, 0].sum() == 4 and orders[1, 0].sum() == 3 and orders[1, 1].sum() == 0
    m = metrics((p, t), (far, t))
    assert m.n_nonfinite == 1 and m.atom_stability == 5 / 10 and m.mol_stability == 0.5


def test_malformed_input_to_evaluate_molecules_names_the_first_bad_molecule():
    p, t = methane()
    for positions, types, message in [
        ([], [], "no molecules to evaluate"),
        ([p, p], [t], "2 molecules' positions but 1 molecules' types"),
        ([p, p[:3]], [t, t], "molecule 1: positions of shape (3, 3) for types of shape (5,)"),
        ([p], [t[:, None]], "molecule 0: positions of shape (5, 3) for types of shape (5, 1)"),
        ([p.astype(str)], [t], "molecule 0: positions of shape (5, 3)"),
        ([p, p], [t, t + 4], "molecule 1: types must be indices 0 .. 4 (H, C, N, O, F), got [5, 4, 4, 4, 4]"),
        ([p], [t - 1], "molecule 0: types must be indices 0 .. 4"),
        ([p], [t.astype(float)], "got [1.0, 0.0, 0.0, 0.0, 0.0]"),
        ([p, p[:0]], [t, t[:0]], "molecule 1 has no atoms"),  # as the file readers refuse one
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate_molecules(positions, types)
    lists = evaluate_molecules([p.tolist()], [t.tolist()])  # nested lists are arrays
    assert (lists.mol_stability, lists.atom_stability) == (1.0, 1.0)


def test_stability_vectorised_equals_single(rng):
    mols = [methane(), hcn(), kekule_benzene(), pentavalent()]
    pos, typ, mask = pad_molecules([p for p, _ in mols], [t for _, t in mols])
    a_all, m_all, _ = stability(pos, typ, mask)
    for k, (p, t) in enumerate(mols):
        a1, m1, _ = stability(*pad_molecules([p], [t]))
        assert (a1[0, : len(t)] == a_all[k, : len(t)]).all() and m1[0] == m_all[k]


def _mols():
    out = []
    for k, mol in enumerate([methane(), hcn(), kekule_benzene(), embedded("CC(=O)O"), pentavalent()]):
        out.append(Molecule(mol[1], mol[0], name=f"m{k}", props={"tag": k}))
    return out


def test_sdf_round_trip_and_rdkit_opens_it(tmp_path):
    mols = _mols()
    path = tmp_path / "x.sdf"
    write_sdf(path, mols)
    back = read_molecules(path)
    assert len(back) == len(mols)
    for a, b in zip(mols, back):
        assert (a.types == b.types).all()
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-4)
        assert b.props["tag"] == str(a.props["tag"])
    sup = Chem.SDMolSupplier(str(path), removeHs=False)
    rd = [m for m in sup]
    assert all(m is not None for m in rd[:4]) and rd[4] is None  # RDKit rejects the pentavalent C
    assert Chem.MolToSmiles(Chem.RemoveHs(rd[1])) == "C#N"


def test_non_finite_coordinates_survive_an_sdf_round_trip_as_non_finite(tmp_path):
    pos, types = hcn()
    bad = np.array(pos, np.float64)
    bad[1, 0] = np.nan
    path = tmp_path / "x.sdf"
    write_sdf(path, [Molecule(types, pos), Molecule(types, bad)])
    rd = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False))
    written = rd[1].GetConformer().GetPositions()
    assert written[1, 0] == 0 and np.allclose(np.delete(written.ravel(), 3), np.delete(bad.ravel(), 3), atol=1e-4)
    assert rd[1].HasProp("molgen_nonfinite")
    assert not rd[0].HasProp("molgen_nonfinite")
    back = read_molecules(path)
    assert np.all(np.isfinite(back[0].positions)) and np.all(np.isnan(back[1].positions))
    assert evaluate_molecules([m.positions for m in back], [m.types for m in back]).n_nonfinite == 1


def test_xyz_round_trip_and_ase_opens_it(tmp_path):
    import ase.io

    mols = _mols()
    path = tmp_path / "x.xyz"
    write_xyz(path, mols)
    back = read_molecules(path)
    frames = ase.io.read(str(path), index=":")
    assert len(back) == len(frames) == len(mols)
    for a, b, f in zip(mols, back, frames):
        assert (a.types == b.types).all()
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
        np.testing.assert_allclose(f.get_positions(), a.positions, atol=1e-6)


def test_extended_xyz_columns_are_read_where_its_properties_line_puts_them(tmp_path):
    import ase.io

    ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

    pos, t = methane()
    atoms = [(SYMBOLS[k], " ".join(f"{v:.6f}" for v in x)) for k, x in zip(t, pos)]
    path = tmp_path / "forces-first.xyz"  # extended XYZ allows the columns in any order
    path.write_text('5\nProperties=forces:R:3:species:S:1:pos:R:3:tag:I:1 pbc="F F F"\n'
                    + "".join(f"9.5 -9.5 9.5 {s} {x} 7\n" for s, x in atoms))
    (back,) = read_molecules(path)
    np.testing.assert_allclose(back.positions, pos, atol=1e-6)
    np.testing.assert_allclose(ase.io.read(str(path)).get_positions(), pos, atol=1e-6)  # as ASE reads it
    assert (back.types == t).all()
    numbers = tmp_path / "numbers.xyz"  # atomic numbers (Z) instead of symbols, as ASE reads them too
    numbers.write_text('5\nProperties=pos:R:3:Z:I:1 pbc="F F F"\n'
                       + "".join(f"{x} {ATOMIC_NUMBER[s]}\n" for s, x in atoms))
    (z,) = read_molecules(numbers)
    assert (z.types == t).all() and (ase.io.read(str(numbers)).get_chemical_symbols() == [s for s, _ in atoms])
    np.testing.assert_allclose(z.positions, pos, atol=1e-6)
    plain = "".join(f"{s} {x}\n" for s, x in atoms)
    for props, message in [("species:S:1:pos:R:2", "names no species:S:1 (or Z:I:1) and pos:R:3 columns"),
                           ("pos:R:3", "names no species:S:1"), ("species:S:1:pos:R", "cannot read its comment"),
                           ("species:S:1:forces:R:3:pos:R:3", "x.xyz:3: expected 7 columns (its Properties line)")]:
        (tmp_path / "x.xyz").write_text(f"5\nProperties={props}\n{plain}")
        with pytest.raises(MolgenError, match=re.escape(message)):
            read_molecules(tmp_path / "x.xyz")


def test_rdkit_written_sdf_evaluates_as_expected(tmp_path):
    path = tmp_path / "rd.sdf"
    w = Chem.SDWriter(str(path))
    for smi in ["CCO", "CC(=O)O", "C#N", "CCO"]:
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(m, randomSeed=1)
        AllChem.MMFFOptimizeMolecule(m)
        w.write(m)
    w.close()
    mols = read_molecules(path)
    m = evaluate_molecules([x.positions for x in mols], [x.types for x in mols])
    assert m.mol_stability == 1.0 and m.validity == 1.0
    assert m.uniqueness == pytest.approx(3 / 4)


def test_sdf_atoms_are_read_by_atomic_number_and_others_named(tmp_path):
    """SDF atom types come from RDKit's atomic numbers (deuterium is hydrogen); an element molgen does not model,
    below, inside or above H..F's numbers, is named in one line."""
    path = tmp_path / "d.sdf"
    with Chem.SDWriter(str(path)) as w:
        m = Chem.AddHs(Chem.MolFromSmiles("[2H]C(F)=O"))
        AllChem.EmbedMolecule(m, randomSeed=1)
        w.write(m)
    (mol,) = read_molecules(path)
    assert [SYMBOLS[t] for t in mol.types] == [a.GetSymbol() for a in m.GetAtoms()] == ["H", "C", "F", "O"]
    for smi, name in (("C*", "R"), ("CCl", "Cl"), ("C[U]", "U"), ("[Li]C", "Li")):
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.Compute2DCoords(m)
        with Chem.SDWriter(str(tmp_path / "x.sdf")) as w:
            w.write(m)
        with pytest.raises(MolgenError, match=f"x.sdf: molecule 0: unknown element '{name}'"):
            read_molecules(tmp_path / "x.sdf")


@pytest.mark.parametrize("symbols,hill", [
    ("CCOHHHHHH", "C2H6O"), ("OHH", "H2O"), ("CHHHH", "CH4"), ("FH", "FH"), ("NCH", "CHN"), ("OCONFH", "CHFNO2"),
])
def test_formulas_are_in_hill_order(symbols, hill):
    from molgen.chem.elements import formula

    assert formula(types_from_symbols(symbols)) == hill


def test_reader_errors_name_the_place(tmp_path):
    p = tmp_path / "cl.xyz"
    p.write_text("2\nfirst\nC 0 0 0\nH 0 0 1.09\n2\nsecond\nC 0 0 0\nCl 0 0 1.7\n")
    with pytest.raises(MolgenError, match=r"cl.xyz:5 \(molecule 1\): unknown element 'Cl'"):
        read_molecules(p)
    errors = []
    assert len(read_molecules(p, skip_invalid=True, errors=errors)) == 1 and len(errors) == 1
    q = tmp_path / "bad.xyz"
    q.write_text("2\nx\nC 0 0 zero\nH 0 0 1\n")
    with pytest.raises(MolgenError, match="bad.xyz:3: bad coordinates"):
        read_molecules(q)
    short = tmp_path / "short.sdf"  # a third-party SDF whose atom line lacks its columns
    short.write_text("mol\n  x\n\n  1  0  0  0  0  0  0  0  0  0999 V2000\n    0.0 0.0 0.0 O   0  0\nM  END\n$$$$\n")
    from rdkit import rdBase

    with pytest.raises(MolgenError) as bad_sdf:
        read_molecules(short)
    why = "malformed record (RDKit: Atom line too short" if hasattr(rdBase, "CaptureErrorLog") else "malformed record"
    assert f"short.sdf: molecule 0: {why}" in str(bad_sdf.value) and "\n" not in str(bad_sdf.value)
    e = tmp_path / "empty.sdf"
    e.write_text("")
    with pytest.raises(MolgenError, match="empty"):
        read_molecules(e)
    big = tmp_path / "big.xyz"
    big.write_text("300\nbig\n" + "C 0 0 0\n" * 300)
    with pytest.raises(MolgenError, match="300 atoms"):
        read_molecules(big)
    with pytest.raises(MolgenError, match="cannot tell the format"):
        read_molecules(tmp_path.joinpath("a.pdb").resolve()) if (tmp_path / "a.pdb").write_text("x") else None


def test_reading_the_first_molecules_stops_before_the_rest(tmp_path):
    """limit: the first molecules of an SDF or XYZ file, or of a folder's files in order, as a full read gives
    them; what follows (here a broken record) is not read. `molgen view` draws a large file's first N that way."""
    mols = [Molecule(np.array([1, 0, 0, 0, 0], np.int8), np.random.default_rng(k).normal(size=(5, 3)), f"m{k}")
            for k in range(5)]
    folder = tmp_path / "f"
    folder.mkdir()
    for fmt, writer in (("sdf", write_sdf), ("xyz", write_xyz)):
        path = folder / f"a.{fmt}"
        writer(path, mols)
        whole = read_molecules(path)
        with open(path, "a") as f:
            f.write("garbage\n" if fmt == "sdf" else "3\nbroken\nC 0 0\n")
        with pytest.raises(MolgenError):
            read_molecules(path)
        first = read_molecules(path, limit=3)
        assert [m.name for m in first] == ["m0", "m1", "m2"]
        for a, b in zip(first, whole):
            np.testing.assert_array_equal(a.positions, b.positions)
    clean = tmp_path / "clean"
    clean.mkdir()
    write_sdf(clean / "a.sdf", mols)
    write_xyz(clean / "b.xyz", mols)
    with open(clean / "b.xyz", "a") as f:
        f.write("3\nbroken\nC 0 0\n")
    got = read_molecules(clean, limit=7)  # a.sdf's five, then b.xyz's first two
    assert [m.name for m in got] == [f"m{k}" for k in range(5)] + ["m0", "m1"]
    res = cli("view", folder / "a.sdf", "-n", 2, "-o", tmp_path / "g.png")
    assert res.exit_code == 0 and "wrote 2 molecules" in res.output, res.output


def test_a_folder_of_edm_sample_files_reads_with_format_xyz(tmp_path):
    """EDM writes each sample as molecule_NNN.txt (XYZ): read with --format xyz, in number order, named by file;
    without it the error says how; files of known extensions beside them are read by their own format."""
    water = "3\n\nO 0.0 0.0 0.119262\nH 0.0 0.763239 -0.477047\nH 0.0 -0.763239 -0.477047\n"
    folder = tmp_path / "molecules"
    folder.mkdir()
    ks = (0, 2, 100, 101, 1000)
    for k in ks:  # each its own second coordinate, to tell them apart
        (folder / f"molecule_{k:03d}.txt").write_text(water.replace("0.763239", f"{0.76 + k * 1e-5:.6f}"))
    (folder / "molecule_000.png").write_bytes(b"\x89PNG")  # EDM's drawings lie beside its samples
    with pytest.raises(MolgenError, match=r"holds no .sdf or .xyz files \(--format xyz reads its 5 .txt files"):
        read_molecules(folder)
    mols = read_molecules(folder, fmt="xyz")
    assert [m.name for m in mols] == [f"molecule_{k:03d}.txt" for k in ks]  # 1000 last, not after 100
    assert [m.positions[1, 1] for m in mols] == pytest.approx([0.76 + k * 1e-5 for k in ks])
    assert [m.types.tolist() for m in mols] == [[3, 0, 0]] * len(ks)
    write_sdf(folder / "other.sdf", [Molecule(mols[0].types, mols[0].positions, "from_sdf")])
    assert [m.name for m in read_molecules(folder)] == ["from_sdf"]
    assert [m.name for m in read_molecules(folder, fmt="xyz")][-1] == "from_sdf"  # read as SDF, by its extension
    from typer.testing import CliRunner

    from molgen.cli import app

    res = CliRunner().invoke(app, ["view", str(folder), "--format", "xyz", "-o", str(tmp_path / "g.png")])
    assert res.exit_code == 0 and "wrote 6 molecules" in res.output and (tmp_path / "g.png").stat().st_size > 0


def test_gzipped_files_read_as_their_contents_and_outputs_refuse_them(tmp_path):
    import gzip

    from molgen.chem.io import format_of
    from molgen.chem.write import write_molecules

    pos, typ = methane()
    mols = [Molecule(np.asarray(typ, np.int8), pos, f"m{k}") for k in range(3)]
    for ext, write in (("sdf", write_sdf), ("xyz", write_xyz)):
        plain = tmp_path / f"m.{ext}"
        write(plain, mols)
        packed = tmp_path / "gz" / f"m.{ext}.gz"
        packed.parent.mkdir(exist_ok=True)
        packed.write_bytes(gzip.compress(plain.read_bytes()))
        back = read_molecules(packed)
        assert [m.name for m in back] == ["m0", "m1", "m2"]
        np.testing.assert_allclose(back[1].positions, pos, atol=1e-4)
    assert len(read_molecules(tmp_path / "gz")) == 6  # a folder's gzipped files too
    (tmp_path / "bad.sdf.gz").write_text("not gzip")
    with pytest.raises(MolgenError, match="bad.sdf.gz: not a readable gzip file"):
        read_molecules(tmp_path / "bad.sdf.gz")
    with pytest.raises(MolgenError, match="writes uncompressed"):
        format_of(tmp_path / "o.sdf.gz", strict=True)
    with pytest.raises(MolgenError, match="writes uncompressed"):
        write_molecules(tmp_path / "o.xyz.gz", mols)
    assert not (tmp_path / "o.xyz.gz").exists()


def test_xyz_frames_keep_their_names_when_a_value_is_empty(tmp_path):
    """An invalid molecule has no SMILES: the XYZ frame must still read back whole (name included) in ASE."""
    import ase.io

    from molgen.chem.io import Molecule, read_molecules
    from molgen.chem.write import write_xyz

    pos = np.array([[0.0, 0, 0], [1.09, 0, 0]])
    mols = [Molecule(np.array([1, 0], np.int8), pos, "molgen_0", {"molgen_smiles": "", "molgen_valid": 0}),
            Molecule(np.array([1, 0], np.int8), pos, "molgen_1", {"molgen_smiles": "C", "molgen_valid": 1})]
    write_xyz(tmp_path / "m.xyz", mols)
    frames = ase.io.read(tmp_path / "m.xyz", index=":")
    assert [f.info["name"] for f in frames] == ["molgen_0", "molgen_1"]
    assert "molgen_smiles" not in frames[0].info and frames[1].info["molgen_smiles"] == "C"
    assert [m.name for m in read_molecules(tmp_path / "m.xyz")] == ["molgen_0", "molgen_1"]


def test_a_write_removes_what_an_interrupted_write_left(tmp_path):
    import os
    import time

    from molgen.io_utils import STALE_S, atomic_write_text

    stale = tmp_path / ".out.sdf.abc123.tmp"  # as a killed writer leaves it
    stale.write_text("half")
    old = time.time() - STALE_S - 60
    os.utime(stale, (old, old))
    (tmp_path / ".other.sdf.x.tmp").write_text("not ours")
    os.utime(tmp_path / ".other.sdf.x.tmp", (old, old))
    atomic_write_text(tmp_path / "out.sdf", "whole")
    assert (tmp_path / "out.sdf").read_text() == "whole" and not stale.exists()
    assert (tmp_path / ".other.sdf.x.tmp").exists()


def test_a_name_near_the_file_systems_limit_is_written_and_its_leftovers_removed(tmp_path):
    import os
    import time

    from molgen.io_utils import STALE_S, atomic_write_text, temp_stem

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for name in ("n" * (limit - 4) + ".sdf", "é" * ((limit - 4) // 2) + ".sdf"):  # bytes, not characters, count
        stem = temp_stem(tmp_path, name)
        assert stem != name and len(stem.encode()) + 16 <= limit
        assert temp_stem(tmp_path, name[1:]) != stem  # another name, other temporary files
        stale = tmp_path / f".{stem}.abc12345.tmp"  # as a killed writer leaves it
        stale.write_text("half")
        old = time.time() - STALE_S - 60
        os.utime(stale, (old, old))
        atomic_write_text(tmp_path / name, "whole")  # the temporary name alone was too long for the file system
        assert (tmp_path / name).read_text() == "whole" and not stale.exists()
    assert temp_stem(tmp_path, "out.sdf") == "out.sdf"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["n" * (limit - 4) + ".sdf",
                                                                 "é" * ((limit - 4) // 2) + ".sdf"])


def test_two_writes_to_one_file_at_once_both_finish_whole(tmp_path):
    """Two processes filling one cache file at the same time (two jobs sharing $MOLGEN_HOME): the second does not
    take the first's temporary file for a leftover; each rename is whole, the last one stays."""
    from molgen.io_utils import atomic_path

    dest = tmp_path / "cache.txt"
    with atomic_path(dest) as first:
        first.write_text("first, ")
        with atomic_path(dest) as second:
            second.write_text("second")
        assert first.exists() and dest.read_text() == "second"
        with open(first, "a") as f:
            f.write("whole")
    assert dest.read_text() == "first, whole"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.txt"]


def test_a_file_that_cannot_be_made_is_named_as_asked_not_by_its_temporary_name(tmp_path, monkeypatch):
    """Writes go through a temporary file beside the destination; when even that cannot be made (a full disk, a
    folder that takes no files), the error names the file the user asked for."""
    import errno
    import tempfile
    from pathlib import Path

    from molgen.io_utils import atomic_write_text

    def full(*a, dir=None, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(dir) / ".out.sdf.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "out.sdf", "x")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out.sdf")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_names_the_file_asked_for_and_leaves_nothing(tmp_path):
    """A disk that fills while a file is written: the error names the destination (the failed write names no file,
    or the temporary one), nothing half-written is left, and an earlier file of that name is kept; a device written
    in place (/dev/full) is named too, and so is standard output."""
    import errno
    import os

    from molgen.io_utils import atomic_path

    (tmp_path / "out.sdf").write_text("earlier")
    for failure in (OSError(errno.ENOSPC, "No space left on device"),
                    OSError(errno.ENOSPC, "No space left on device", "TMP")):
        with pytest.raises(OSError) as e:
            with atomic_path(tmp_path / "out.sdf") as tmp:
                tmp.write_text("half")
                if failure.filename == "TMP":
                    failure.filename = str(tmp)
                raise failure
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "out.sdf"))
        assert [p.name for p in tmp_path.iterdir()] == ["out.sdf"] and (tmp_path / "out.sdf").read_text() == "earlier"
    with pytest.raises(OSError, match="another file") as e:  # an error about another file keeps its name
        with atomic_path(tmp_path / "out.sdf"):
            raise OSError(errno.ENOENT, "No such file or directory", "another file")
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError) as e:
            with atomic_path("/dev/full") as dev:
                with open(dev, "w") as f:
                    f.write("x")
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, "/dev/full")
    # standard output redirected to a full disk ("-"): named so; a reader that stopped early keeps its own error
    import io
    import sys

    for failure, named in ((OSError(errno.ENOSPC, "No space left on device"), "standard output"),
                           (BrokenPipeError(errno.EPIPE, "Broken pipe"), None)):
        class Full(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                raise failure

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(Full(), 4)))
            with pytest.raises(OSError) as e:
                with atomic_path("-") as tmp:
                    tmp.write_text("molecules")
        assert type(e.value) is type(failure) and e.value.filename == named


def test_rdkit_warnings_while_reading_are_not_shown(tmp_path):
    """A record marked 2D with a z != 0 is read as 3D, as RDKit does, without RDKit's own warning line on stderr
    (a fresh process: nothing else has silenced RDKit yet)."""
    import subprocess
    import sys

    m = Chem.AddHs(Chem.MolFromSmiles("CO"))
    AllChem.EmbedMolecule(m, randomSeed=1)
    block = Chem.MolToMolBlock(m).splitlines()
    block[1] = block[1].replace("3D", "2D")
    (tmp_path / "tagged.sdf").write_text("\n".join(block) + "\n$$$$\n")
    code = "import sys; from molgen.chem.io import read_molecules; print(read_molecules(sys.argv[1])[0].drawn)"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tagged.sdf")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False" and res.stderr == "", res.stderr


def test_molgen_holds_rdkits_messages_back_only_while_it_works(tmp_path):
    """Importing molgen and judging, writing, reading and drawing molecules RDKit rejects prints none of RDKit's
    messages and leaves RDKit's logging as the program set it: a notebook's own RDKit errors still show."""
    import subprocess
    import sys

    pos, t = methane()
    five = (np.vstack([pos, [[0.0, 0.0, 1.5]]]), np.append(t, 1))  # a carbon bonded to five atoms: rejected
    np.savez(tmp_path / "m.npz", pos=five[0], types=five[1])
    code = f"""
import numpy as np
from rdkit import Chem, rdBase
before = rdBase.LogStatus()
from molgen.chem.depict import grid
from molgen.chem.io import Molecule, read_molecules
from molgen.chem.write import write_molecules
from molgen.evaluate import evaluate_molecules
import molgen.chem.forcefield, molgen.fragment, molgen.keep
assert rdBase.LogStatus() == before, "an import changed RDKit's logging"
d = np.load({str(tmp_path / "m.npz")!r})
m = evaluate_molecules([d["pos"]] * 3, [d["types"]] * 3, with_strain=True)
assert m.validity == 0 and m.rdkit_validity == 0
write_molecules({str(tmp_path / "m.sdf")!r}, [Molecule(d["types"], d["pos"])])
grid(read_molecules({str(tmp_path / "m.sdf")!r}), {str(tmp_path / "m.png")!r})
assert rdBase.LogStatus() == before, "a call changed RDKit's logging"
Chem.MolFromSmiles("C(C)(C)(C)(C)C")  # the program's own error, printed by RDKit
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [ln.split("] ", 1)[1] for ln in res.stderr.splitlines()] == [
        "Explicit valence for atom # 0 C, 5, is greater than permitted"], res.stderr
