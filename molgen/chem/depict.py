"""A grid of 2D depictions of 3D molecules (RDKit), bonds as EDM perceives them, one legend per molecule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rdkit import Chem
from rdkit.Chem import Draw, rdDepictor
from rdkit.Chem.rdMolDescriptors import CalcMolFormula

from molgen.chem.bonds import bond_orders, pad_molecules, stability
from molgen.chem.rdkit_utils import build_molecule, mol_to_smiles, quiet

MAX_GRID = 100


def _drawable(types, orders):
    """(molecule to draw, its largest fragment's atom indices when there are several, sanitises)."""
    mol = build_molecule(types, orders)
    frags = Chem.GetMolFrags(mol)
    ok = mol_to_smiles(Chem.Mol(mol)) is not None
    mol = mol.GetMol()
    mol.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(mol)
    rdDepictor.Compute2DCoords(mol)
    return mol, (list(max(frags, key=len)) if len(frags) > 1 else []), ok


def grid(molecules, out: Path, per_row: int = 6, size: int = 220) -> int:
    """Draw ``molecules`` (objects with ``types`` and ``positions``) into ``out`` (.png or .svg): a legend per
    molecule with its formula and marks (S: every atom stable, V: valid, n frags: disconnected, its largest
    fragment highlighted). Returns the number drawn."""
    from molgen.io_utils import atomic_path

    mols = list(molecules)[:MAX_GRID]
    pos, typ, mask = pad_molecules([m.positions for m in mols], [np.asarray(m.types) for m in mols])
    orders = bond_orders(pos, typ, mask)
    _, mol_ok, _ = stability(pos, typ, mask, orders=orders)
    drawn, legends, highlights = [], [], []
    svg = Path(out).suffix.lower() == ".svg"
    with quiet():
        for k, m in enumerate(mols):
            n = len(m.types)
            d, largest, valid = _drawable(np.asarray(m.types), orders[k, :n, :n])
            marks = " ".join(filter(None, ["S" if mol_ok[k] else "", "V" if valid else "",
                                           f"{len(Chem.GetMolFrags(d))} frags" if largest else ""]))
            legends.append(f"{CalcMolFormula(d)}  {marks}".strip())
            drawn.append(d)
            highlights.append(largest)
        img = Draw.MolsToGridImage(drawn, molsPerRow=min(per_row, max(len(drawn), 1)), subImgSize=(size, size),
                                   legends=legends, highlightAtomLists=highlights, useSVG=svg)
    with atomic_path(Path(out)) as tmp:
        if svg:
            Path(tmp).write_text(img if isinstance(img, str) else img.data)
        else:
            img.save(tmp, format="PNG")
    return len(drawn)
