"""RDKit molecules from 3D coordinates and perceived bonds (EDM's route for validity, uniqueness, novelty)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Geometry import Point3D

from molgen.chem.elements import SYMBOLS


@contextmanager
def quiet():
    """RDKit's own messages held back while molgen works with RDKit (a molecule RDKit rejects is a result here, not
    something to print), and RDKit's logging as it was afterwards: importing or calling molgen leaves the logging
    of the rest of the program (a notebook's own RDKit work) as it was."""
    block = rdBase.BlockLogs()
    try:
        yield
    finally:
        del block

# RDKit copies the atom it is given (AddAtom), so one prototype per element serves every molecule: with an atom
# made from its symbol each time and the bond orders read one NumPy scalar at a time, construction took 1.7x as long.
ATOMS = tuple(Chem.Atom(s) for s in SYMBOLS)
BOND_TYPES = (None, Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE)  # by bond order


def build_molecule(types: np.ndarray, orders: np.ndarray, positions: np.ndarray | None = None) -> Chem.RWMol:
    """An unsanitised RWMol with one atom per type and a bond for every pair with order > 0 (no charges)."""
    mol = Chem.RWMol()
    for t in np.asarray(types).tolist():
        mol.AddAtom(ATOMS[t])
    n = len(types)
    upper = np.triu(orders[:n, :n], 1)
    ii, jj = np.nonzero(upper)
    for i, j, o in zip(ii.tolist(), jj.tolist(), upper[ii, jj].tolist()):
        mol.AddBond(i, j, BOND_TYPES[o])
    if positions is not None:
        conf = Chem.Conformer(n)
        for k, (x, y, z) in enumerate(np.asarray(positions, np.float64)[:n].tolist()):
            conf.SetAtomPosition(k, Point3D(x, y, z))
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=True)
    return mol


def mol_to_smiles(mol) -> str | None:
    """Sanitise and return canonical SMILES, or None when RDKit rejects the molecule."""
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # RDKit raises several sanitisation exception types
        return None
    return Chem.MolToSmiles(mol)


def validity_smiles(mol) -> tuple[str | None, int]:
    """EDM's validity: SMILES of the largest fragment if the whole molecule sanitises, and the fragment count."""
    n_frags = len(Chem.GetMolFrags(mol)) if mol.GetNumAtoms() else 0
    smiles = mol_to_smiles(mol)
    if smiles is None or n_frags == 1:  # one piece: its own SMILES, already made
        return smiles, n_frags
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(frags, default=mol, key=lambda m: m.GetNumAtoms())
    return mol_to_smiles(Chem.Mol(largest)), n_frags
