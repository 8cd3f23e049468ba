"""Writing molecules: SDF through RDKit (3D conformer, perceived bonds, per-molecule properties) and
multi-molecule extended XYZ through ASE. Both write to a temporary file and rename it into place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molgen.chem.elements import SYMBOLS
from molgen.chem.io import NONFINITE, Molecule, format_of
from molgen.io_utils import atomic_path


def write_sdf(path: Path | str, molecules: list[Molecule], orders: list[np.ndarray] | None = None) -> None:
    """SDF with perceived bonds (EDM's distance rule unless ``orders`` are given) and each molecule's props."""
    from rdkit import Chem

    from molgen.chem.bonds import bond_orders, pad_molecules
    from molgen.chem.rdkit_utils import build_molecule, quiet

    if orders is None:
        orders = []
        for s in range(0, len(molecules), 2048):
            chunk = molecules[s : s + 2048]
            pos, typ, mask = pad_molecules([m.positions for m in chunk], [m.types for m in chunk])
            o = bond_orders(pos, typ, mask)
            orders += [o[k, : len(m.types), : len(m.types)] for k, m in enumerate(chunk)]
    with atomic_path(path) as tmp, open(tmp, "w") as f, quiet():  # through Python's file: a failed write is an error
        writer = Chem.SDWriter(f)
        writer.SetKekulize(False)
        for k, (m, o) in enumerate(zip(molecules, orders)):
            finite = np.isfinite(m.positions)
            mol = build_molecule(m.types, o, np.where(finite, m.positions, 0.0))
            mol.UpdatePropertyCache(strict=False)
            mol.SetProp("_Name", m.name or f"molgen_{k}")
            for key, val in m.props.items():
                mol.SetProp(str(key), str(val))
            if not finite.all():  # SDF has no way to write NaN or infinity
                mol.SetProp(NONFINITE, "coordinates not finite, written as 0")
            writer.write(mol)
        writer.close()


def write_xyz(path: Path | str, molecules: list[Molecule]) -> None:
    """Multi-molecule extended XYZ through ASE (per-molecule props in each frame's comment line)."""
    import ase
    import ase.io

    frames = []
    for m in molecules:
        a = ase.Atoms(symbols=[SYMBOLS[int(t)] for t in m.types], positions=np.asarray(m.positions, float))
        # an empty value would be written bare (key=) and swallow the next key when read back: leave it out
        a.info.update({k: v for k, v in m.props.items() if not (isinstance(v, str) and not v.strip())})
        if m.name:
            a.info["name"] = m.name
        frames.append(a)
    with atomic_path(path) as tmp:
        ase.io.write(str(tmp), frames, format="extxyz")


def write_molecules(path: Path | str, molecules: list[Molecule], fmt: str | None = None) -> str:
    fmt = format_of(path, fmt, strict=True)
    (write_sdf if fmt == "sdf" else write_xyz)(path, molecules)
    return fmt


# What molgen's writers take at least (tests/test_failures.py checks them against the writers): per molecule, its
# lines besides the atoms' (the name molgen_0's; SDF: RDKit's header, V2000 counts line, "M  END", "$$$$"; XYZ: the
# comment line, plus the atom count's digits), and per atom its line; bonds and properties come on top.
LEAST_BYTES = {"sdf": (85, 70), "xyz": (58, 54)}


def least_bytes(sizes, fmt: str) -> int:
    """A lower bound of the bytes of ``fmt``'s file of molecules of ``sizes`` atoms (computed, not written: the
    writers' libraries are not loaded for it)."""
    sizes = np.asarray(sizes, np.int64)
    head, atom = LEAST_BYTES[fmt]
    # XYZ: each count's digits, summed as the molecules with at least 1, 2, 3, ... digits
    digits = sum(int((sizes >= 10**k).sum()) for k in range(len(str(sizes.max(initial=0))))) if fmt == "xyz" else 0
    return int(len(sizes) * head + atom * sizes.sum() + digits)
