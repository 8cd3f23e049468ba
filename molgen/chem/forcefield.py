"""RDKit's own view of a 3D molecule: bonds perceived by RDKit (not EDM's table), and the MMFF94 strain of the
geometry.

* RDKit validity: ``rdDetermineBonds.DetermineBonds`` on the coordinates with total charge 0, then sanitisation;
  a molecule with an atom bonded to more neighbours than its neutral valence (H 1, C 4, N 3, O 2, F 1) is
  rejected before bond orders are assigned (that search grows quickly on such inputs);
* strain: MMFF94 energy of the geometry as given minus the energy after at most ``MAX_ITERS`` steps of MMFF94
  minimisation (kcal/mol), and the heavy-atom RMSD between the two geometries after superposition (Å).
"""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds, rdForceFieldHelpers

from molgen.chem.elements import SYMBOLS, VALENCE

MAX_ITERS = 500


def perceive(types: np.ndarray, positions: np.ndarray) -> Chem.Mol | None:
    """The sanitised molecule with bonds as RDKit perceives them from the coordinates (neutral), or None."""
    n = len(types)
    if n == 0 or not np.all(np.isfinite(positions)):
        return None
    # one XYZ block parsed by RDKit builds the atoms and their conformer (repr: the coordinates exactly)
    xyz = np.asarray(positions, np.float64).tolist()
    block = "".join(f"{SYMBOLS[int(t)]} {x!r} {y!r} {z!r}\n" for t, (x, y, z) in zip(types, xyz))
    mol = Chem.MolFromXYZBlock(f"{n}\n\n{block}")
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineConnectivity(mol)
        if (Chem.GetAdjacencyMatrix(mol).sum(axis=1) > VALENCE[np.asarray(types, np.int64)]).any():
            return None
        rdDetermineBonds.DetermineBondOrders(mol, charge=0)
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError, Chem.rdchem.MolSanitizeException):
        return None
    return mol


def strain(mol: Chem.Mol, max_iters: int = MAX_ITERS) -> tuple[float, float] | None:
    """(MMFF94 energy drop on relaxation in kcal/mol, heavy-atom RMSD of the relaxation in Å), or None when MMFF94
    has no parameters for the molecule."""
    mol = Chem.Mol(mol)
    if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
        return None
    props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
    ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, props)
    if ff is None:
        return None
    before = np.array(ff.Positions(), np.float64).reshape(-1, 3)
    e0 = ff.CalcEnergy()
    ff.Minimize(maxIts=max_iters)
    e1 = ff.CalcEnergy()
    after = np.array(ff.Positions(), np.float64).reshape(-1, 3)
    heavy = np.array([a.GetAtomicNum() > 1 for a in mol.GetAtoms()])
    if heavy.sum() == 0:
        heavy[:] = True
    return float(e0 - e1), kabsch_rmsd(before[heavy], after[heavy])


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD between two point sets after the best rotation and translation (Kabsch)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(np.mean(np.sum((a @ r - b) ** 2, axis=1))))
