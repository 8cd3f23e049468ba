"""RDKit molecules from 3D coordinates and perceived bonds (EDM's route for validity, uniqueness, novelty)."""

from __future__ import annotations

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Geometry import Point3D

from molgen.chem.elements import SYMBOLS

RDLogger.DisableLog("rdApp.*")

BOND_TYPES = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def build_molecule(types: np.ndarray, orders: np.ndarray, positions: np.ndarray | None = None) -> Chem.RWMol:
    """An unsanitised RWMol with one atom per type and a bond for every pair with order > 0 (no charges)."""
    mol = Chem.RWMol()
    for t in types:
        mol.AddAtom(Chem.Atom(SYMBOLS[int(t)]))
    n = len(types)
    ii, jj = np.nonzero(np.triu(orders[:n, :n], 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        mol.AddBond(i, j, BOND_TYPES[int(orders[i, j])])
    if positions is not None:
        conf = Chem.Conformer(n)
        for k in range(n):
            x, y, z = (float(v) for v in positions[k])
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
