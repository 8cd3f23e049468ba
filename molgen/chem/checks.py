"""What to tell about molecules read from files before they are judged: 2D drawings and files
without hydrogen atoms, whose bonds and stability would mislead without a word."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from molgen.chem.elements import SYMBOLS

if TYPE_CHECKING:
    from molgen.chem.io import Molecule


def flat_warning(molecules: list[Molecule]) -> str | None:
    """A warning when some molecules are 2D drawings (``Molecule.drawn``): bonds are read from 3D distances. A
    planar or linear molecule with 3D coordinates that happen to have z = 0 is not one."""
    bad = sum(m.drawn for m in molecules)
    if not bad:
        return None
    return (f"warning: {bad:,} of {len(molecules):,} molecules are 2D drawings (every z = 0, the record not marked "
            "3D); bonds and stability are read from 3D distances, so they describe those molecules as drawn flat")


def hydrogen_warning(molecules: list[Molecule]) -> str | None:
    """A warning when no molecule has a hydrogen atom (a file written with implicit hydrogens): EDM's stability
    counts the bonds to the atoms in the file."""
    if not molecules or any((np.asarray(m.types) == SYMBOLS.index("H")).any() for m in molecules):
        return None
    return ("warning: no molecule has a hydrogen atom; stability counts bonds to the atoms in the file, so an atom "
            "whose hydrogens are implicit counts as unstable: write the hydrogens with their coordinates")


def input_warnings(molecules: list[Molecule], hydrogens: bool = True) -> list[str]:
    """What to tell about molecules read from files before judging them: flat ones; with ``hydrogens`` (QM9 with
    hydrogens, as molgen's models are trained), none with a hydrogen atom."""
    return [w for w in (flat_warning(molecules), hydrogen_warning(molecules) if hydrogens else None) if w]
