"""Generating around a fragment (inpainting): the fragment's atoms keep their types and relative positions while
a sampler completes the molecule. A model trained to complete fragments (objective ``inpaint``) is given them
clean by its own sampler (:mod:`molgen.diffusion.inpaint`), from the rows :func:`known_rows` lays out; every
other sampler uses replacement: after each network call the known atoms are replaced by the fragment, noised to
the state's noise level (variance-exploding level s, scaled by the state's factor: alpha_t for EDM's
variance-preserving states, 1 otherwise), placed at the known atoms' current centre, and the molecule is
re-centred (RePaint for diffusion; "replace, then re-noise" for consistency models).
Every replacement moves the fragment as a whole, so its internal geometry is exact at the end.

Frame: molgen's models work on the zero-centre-of-mass subspace of the whole molecule, whose centre is unknown
while the rest is being made; the fragment therefore floats with the molecule during sampling. Sampling runs in
the fragment's own frame (its principal axes, :attr:`Fragment.frame`), so a rotated or translated fragment gives
the same molecules rotated and translated; at the end each molecule is moved so that the fragment's atoms lie on
the input coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from molgen import MolgenError
from molgen.data.features import type_features
from molgen.nn.egnn import remove_mean
from molgen.nn.pairs import segment_sum


@dataclass
class Fragment:
    types: np.ndarray  # int [k]
    positions: np.ndarray  # float [k, 3], in the input's frame

    @property
    def size(self) -> int:
        return len(self.types)

    @property
    def frame(self) -> np.ndarray:
        """The rotation R (rows: axes) to the fragment's own frame: principal axes of its centred positions,
        each pointing where its atoms' third moment is positive, right-handed. Sampling happens in that frame,
        so a rotated input gives the same molecules, rotated."""
        c = self.positions - self.positions.mean(0)
        _, vecs = np.linalg.eigh(c.T @ c)
        axes = vecs.T[::-1].copy()  # largest spread first
        for a in axes[:2]:
            proj = c @ a
            skew = np.sum(proj**3)
            if abs(skew) < 1e-9:  # symmetric along this axis: the farthest atom decides
                skew = proj[np.argmax(np.abs(proj))]
            if skew < 0:
                a *= -1
        axes[2] = np.cross(axes[0], axes[1])
        return axes

    def canonical(self) -> np.ndarray:
        """The centred positions in the fragment's own frame."""
        return (self.positions - self.positions.mean(0)) @ self.frame.T


MIN_APART = 0.5  # Å: a fragment's atoms closer than this are an error (the closest pair in QM9: 0.96 Å, O-H)


def read_fragment(path: Path | str) -> Fragment:
    """The first molecule of an SDF / MOL / XYZ file (or of standard input, ``-``) with 3D coordinates, as a
    fragment (H, C, N, O, F only)."""
    from molgen.chem.io import read_molecules
    from molgen.io_utils import MOLECULE_SUFFIXES, is_stream, molecule_suffix

    if not is_stream(path) and molecule_suffix(path) not in MOLECULE_SUFFIXES:  # "-": from what it holds
        raise MolgenError(f"--fix {path}: give a {', '.join(MOLECULE_SUFFIXES)} file, or one gzipped (.gz) "
                          "(the format is read from the extension)")
    mols = read_molecules(Path(path), limit=1)  # its first molecule: the rest is not read
    if not mols:
        raise MolgenError(f"--fix {path}: no molecule in the file")
    m = mols[0]
    pos = np.asarray(m.positions, np.float64)
    if not np.all(np.isfinite(pos)):
        raise MolgenError(f"--fix {path}: the fragment has non-finite coordinates")
    if m.drawn:  # a planar fragment with 3D coordinates (an XYZ file, a record marked 3D) may well have z = 0
        raise MolgenError(f"--fix {path}: the fragment is a 2D drawing (every z = 0, the record not marked 3D); "
                          "give 3D coordinates")
    if len(pos) > 1:  # atoms on top of each other: a line repeated, or coordinates in nm
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.diag(np.full(len(pos), np.inf))
        i, j = sorted(np.unravel_index(np.argmin(d), d.shape))
        if d[i, j] < MIN_APART:
            raise MolgenError(f"--fix {path}: atoms {i + 1} and {j + 1} are {d[i, j]:.2f} Å apart; a fragment's atoms "
                              f"are at least {MIN_APART} Å apart (are the coordinates in Å?)")
    return Fragment(np.asarray(m.types, np.int32), pos)


class Known(NamedTuple):
    """A batch's known atoms, in the packed graph's rows."""

    mask: jax.Array  # float [N]: 1 on a fragment atom
    x: jax.Array  # [N, 3]: the fragment's positions, each molecule's fragment centred at 0
    h: jax.Array  # [N, F]: the fragment's clean features
    noise_x: jax.Array  # [N, 3]: fixed noise for the known atoms (the same at every level)
    noise_h: jax.Array  # [N, F]


def first_rows(k: int, sizes, n_rows: int) -> np.ndarray:
    """float [n_rows]: 1 on the first ``k`` rows of each molecule of a packed batch of ``sizes`` (a fragment's)."""
    out = np.zeros(n_rows, np.float32)
    for start in np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64):
        out[start : start + k] = 1.0
    return out


def known_rows(fragment: Fragment, sizes: np.ndarray, n_rows: int, nf: int, key) -> Known:
    """The fragment placed in the first k rows of every molecule of a packed batch of ``sizes``."""
    k = fragment.size
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rows = (starts[:, None] + np.arange(k)[None, :]).reshape(-1)
    mask = first_rows(k, sizes, n_rows)
    centred = fragment.canonical().astype(np.float32)
    x = np.zeros((n_rows, 3), np.float32)
    x[rows] = np.tile(centred, (len(sizes), 1))
    types = np.zeros(n_rows, np.int32)
    types[rows] = np.tile(fragment.types, len(sizes))
    h = type_features(types, mask, np)
    kx, kh = jax.random.split(key)
    # the known atoms' noise has no mean per molecule: a placement moves the fragment nowhere by itself (with a
    # mean, the same shift would add up over the steps and carry the fragment away from the rest)
    noise = np.asarray(jax.random.normal(kx, (n_rows, 3))) * mask[:, None]
    for s0 in starts:
        noise[s0 : s0 + k] -= noise[s0 : s0 + k].mean(0)
    return Known(jnp.asarray(mask), jnp.asarray(x), jnp.asarray(h), jnp.asarray(noise),
                 jax.random.normal(kh, (n_rows, nf)) * mask[:, None])


def constrain(known: Known, x, h, graph, level, scale):
    """The state with its known atoms replaced: scale * (fragment at the known atoms' centre + level * noise),
    then re-centred. ``level`` is the state's variance-exploding noise level (0: a clean molecule)."""
    m = known.mask[:, None]
    n_seg = graph.n_atoms.shape[0]
    count = jnp.maximum(segment_sum(known.mask, graph.segment, n_seg), 1.0)
    centre = segment_sum(x * m, graph.segment, n_seg) / count[:, None] / scale
    placed = known.x + centre[graph.segment] + level * known.noise_x
    x = jnp.where(m > 0, scale * placed, x)
    h = jnp.where(m > 0, scale * (known.h + level * known.noise_h), h)
    return remove_mean(x, graph.node_mask, graph.segment, n_seg), h * graph.node_mask[:, None]


def to_input_frame(fragment: Fragment, positions: np.ndarray) -> np.ndarray:
    """A completed molecule (its first k atoms the fragment's, in the fragment's own frame) moved onto the
    fragment's input coordinates: translated, and rotated back from the fragment's frame. Its first k atoms are
    then the input's coordinates exactly (they differed by the network's float32 rounding, < 1e-4 Angstrom)."""
    k = fragment.size
    out = (positions - positions[:k].mean(0)) @ fragment.frame + fragment.positions.mean(0)
    out[:k] = fragment.positions
    return out


def contains_fragment(fragment: Fragment, molecules) -> np.ndarray:
    """Per molecule: whether the fragment's bond graph (elements and connectivity, bonds as EDM perceives them)
    is a substructure of the molecule's."""
    from rdkit import Chem

    from molgen.chem.bonds import bond_orders, pad_molecules
    from molgen.chem.rdkit_utils import quiet

    def graph_mol(types, pos):
        p, t, mask = pad_molecules([pos], [types])
        orders = bond_orders(p, t, mask)[0]
        mol = Chem.RWMol()
        for z in np.asarray(types):
            mol.AddAtom(Chem.Atom(int((1, 6, 7, 8, 9)[int(z)])))
        for i, j in zip(*np.nonzero(np.triu(orders[: len(types), : len(types)]))):
            mol.AddBond(int(i), int(j), Chem.BondType.SINGLE)  # connectivity only
        out = mol.GetMol()
        out.UpdatePropertyCache(strict=False)
        Chem.FastFindRings(out)
        return out

    with quiet():
        query = graph_mol(fragment.types, fragment.positions)
        return np.array([graph_mol(m.types, m.positions).HasSubstructMatch(query) for m in molecules])


def fragment_kept(fragment: Fragment | None, molecules) -> float | None:
    """The share of molecules that contain the fragment's bond graph (None without a fragment)."""
    return None if fragment is None else float(np.mean(contains_fragment(fragment, molecules)))
