"""EDM's metrics on any set of 3D molecules: stability, validity, uniqueness, novelty, and diagnostics.

Definitions (as EDM's evaluation code):
* atom stability: fraction of all atoms whose summed bond order equals the element's valence;
* molecule stability: fraction of molecules whose atoms are all stable;
* validity: fraction of molecules that RDKit sanitises when built from the perceived bonds (no formal
  charges); a disconnected molecule still counts, and its largest fragment's SMILES is kept;
* uniqueness: distinct SMILES among the valid ones; "valid & unique" = distinct valid / all molecules;
* novelty: distinct valid SMILES absent from the training split's SMILES (built by the same route).
Also: connected fraction (one fragment), atom-type mix, mean size, and molecules with non-finite coordinates
(failed: unstable and invalid, never dropped); validity by RDKit's own bond perception and, on request, the
MMFF94 strain of the RDKit-valid molecules (:mod:`molgen.chem.forcefield`); distribution distances to QM9's
test split when a reference is given (:mod:`molgen.fidelity`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from molgen.chem.bonds import pad_molecules, stability
from molgen.chem.elements import N_TYPES, SYMBOLS, formula

TRAIN_SMILES_NAME = "train_smiles_edm_v1.txt"
CHUNK = 256  # molecules judged together: bond orders of a padded batch, one task of a worker process


@dataclass
class PerMolecule:
    n_atoms: int
    stable_atoms: int
    stable: bool
    valid: bool
    smiles: str
    n_fragments: int
    finite: bool
    rdkit_valid: bool = False
    strain: float | None = None  # kcal/mol
    relax_rmsd: float | None = None  # Å, heavy atoms
    formula: str = ""  # Hill order, e.g. C2H6O


@dataclass
class Metrics:
    n_molecules: int
    n_atoms_total: int
    mean_atoms: float
    atom_stability: float
    mol_stability: float
    validity: float
    uniqueness: float | None
    valid_and_unique: float
    novelty: float | None
    connected: float
    n_nonfinite: int
    type_fractions: dict[str, float]
    reference_type_fractions: dict[str, float] | None = None
    novelty_note: str = ""
    rdkit_validity: float | None = None
    strain: dict | None = None
    fidelity: dict | None = None
    fragment_kept: float | None = None  # molgen sample --fix: the share that contains the fragment's bond graph
    per_molecule: list[PerMolecule] = field(default_factory=list, repr=False)
    stats: object = field(default=None, repr=False)  # molgen.fidelity.Stats behind ``fidelity`` (for plots)

    def to_dict(self, per_molecule: bool = False) -> dict:
        d = asdict(self)
        d.pop("stats")
        if d["fragment_kept"] is None:
            d.pop("fragment_kept")
        if not per_molecule:
            d.pop("per_molecule")
        return d


def _per_molecule(positions, types, progress=None, with_strain: bool = False, with_rdkit: bool = True,
                  stats=None, workers: int | None = 1) -> tuple[list[PerMolecule], np.ndarray]:
    """Each molecule's stability, validity and SMILES (EDM's route), RDKit's validity (unless ``with_rdkit`` is
    False: then rdkit_valid is False) and strain, and the counts of each atom type; with ``stats``
    (:class:`molgen.fidelity.Stats`) the molecules' counts are added to it, as :func:`molgen.fidelity.statistics`
    counts them (the bond orders found here, not again). ``workers``: processes at most
    (:func:`molgen.workers.workers_for`); ``progress`` ticks once a chunk of molecules."""
    from molgen.workers import map_chunks, workers_for

    chunks = ((positions[s : s + CHUNK], types[s : s + CHUNK], with_strain, with_rdkit, stats is not None)
              for s in range(0, len(types), CHUNK))
    per: list[PerMolecule] = []
    type_counts = np.zeros(N_TYPES, np.int64)
    for part, counts, part_stats in map_chunks(_judge_chunk, chunks, workers_for(len(types), workers)):
        per += part
        type_counts += counts
        if stats is not None:
            stats.add(part_stats)
        if progress:
            progress(len(part))
    return per, type_counts


def _judge_chunk(positions, types, with_strain: bool, with_rdkit: bool, count_stats: bool):
    """:func:`_per_molecule` of a few molecules: (their results, their atom type counts, their
    :class:`molgen.fidelity.Stats` or None)."""
    from molgen.chem.bonds import bond_orders
    from molgen.chem.forcefield import perceive, strain
    from molgen.chem.rdkit_utils import build_molecule, quiet, validity_smiles
    from molgen.fidelity import Stats, add_counts

    per: list[PerMolecule] = []
    type_counts = np.zeros(N_TYPES, np.int64)
    stats = Stats() if count_stats else None
    pos, typ, mask = pad_molecules(positions, types)
    orders = bond_orders(pos, typ, mask)
    atom_ok, mol_ok, _ = stability(pos, typ, mask, orders=orders)
    if stats is not None:  # the molecules statistics() counts: finite, with atoms
        rows = np.isfinite(pos).all(axis=(1, 2)) & mask.any(axis=1)
        add_counts(stats, pos[rows], typ[rows], mask[rows], orders[rows])
    with quiet():  # a molecule RDKit rejects is a result, not a message
        for k in range(len(typ)):
            n = int(mask[k].sum())
            t = typ[k, :n]
            type_counts += np.bincount(t, minlength=N_TYPES)
            finite = bool(np.all(np.isfinite(pos[k, :n])))
            smi, nfrag = validity_smiles(build_molecule(t, orders[k, :n, :n])) if finite else (None, 0)
            rd = perceive(t, positions[k]) if finite and with_rdkit else None
            relaxed = strain(rd) if with_strain and rd is not None else None
            per.append(PerMolecule(n, int(atom_ok[k, :n].sum()), bool(mol_ok[k]), smi is not None, smi or "", nfrag,
                                   finite, rd is not None, *(relaxed or (None, None)), formula=formula(t)))
    return per, type_counts, stats


def judge(molecules) -> list[PerMolecule]:
    """Each molecule's stability, EDM validity, SMILES and fragments, as :func:`evaluate_molecules` finds them
    (without RDKit's own bond perception: rdkit_valid is not judged)."""
    if not molecules:
        return []
    return _per_molecule([m.positions for m in molecules], [m.types for m in molecules], with_rdkit=False)[0]


def _arrays(positions, types) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each molecule's positions [n, 3] (numbers, in Å) and types [n] (indices into H, C, N, O, F) as arrays, or a
    ValueError that names the first molecule that is not so."""
    if len(positions) != len(types):
        raise ValueError(f"{len(positions)} molecules' positions but {len(types)} molecules' types")
    if len(types) == 0:
        raise ValueError("no molecules to evaluate")
    xs, ts = [], []
    for i, (x, t) in enumerate(zip(positions, types)):
        x, t = np.asarray(x), np.asarray(t)
        if t.ndim != 1 or x.shape != (len(t), 3) or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"molecule {i}: positions of shape {x.shape} for types of shape {t.shape}; "
                             "give positions [atoms, 3] and types [atoms]")
        if not len(t):
            raise ValueError(f"molecule {i} has no atoms")
        if not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= N_TYPES:
            raise ValueError(f"molecule {i}: types must be indices 0 .. {N_TYPES - 1} ({', '.join(SYMBOLS)}), "
                             f"got {t.tolist()}")
        xs.append(x)
        ts.append(t)
    return xs, ts


def evaluate_molecules(
    positions: list[np.ndarray],
    types: list[np.ndarray],
    train_smiles: set[str] | None = None,
    reference_type_fractions: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    reference_stats=None,
    with_strain: bool = False,
    workers: int | None = 1,
) -> Metrics:
    """The metrics of a set of molecules; ``reference_stats`` (:class:`molgen.fidelity.Stats`): add the distances
    to it; ``with_strain``: add the MMFF94 strain of the RDKit-valid molecules; ``workers``: judge them in this many
    processes at most (None: :func:`molgen.workers.default_workers`; :func:`molgen.workers.workers_for`)."""
    from molgen.fidelity import Stats, distances

    positions, types = _arrays(positions, types)
    m = len(types)
    stats = Stats() if reference_stats is not None else None
    per, type_counts = _per_molecule(positions, types, progress, with_strain, stats=stats, workers=workers)
    total_atoms = sum(len(t) for t in types)
    valid = [p.smiles for p in per if p.valid]
    unique = set(valid)
    novelty = len(unique - train_smiles) / len(unique) if train_smiles is not None and unique else None
    note = ("not computed: no training SMILES (run `molgen download`)" if train_smiles is None
            else "" if unique else "n/a")  # novelty is a share of the unique valid molecules
    fr = type_counts / max(type_counts.sum(), 1)
    ref = reference_type_fractions
    return Metrics(
        n_molecules=m,
        n_atoms_total=int(total_atoms),
        mean_atoms=float(total_atoms / m),
        atom_stability=sum(p.stable_atoms for p in per) / max(total_atoms, 1),
        mol_stability=float(np.mean([p.stable for p in per])),
        validity=len(valid) / m,
        uniqueness=(len(unique) / len(valid)) if valid else None,
        valid_and_unique=len(unique) / m,
        novelty=novelty,
        connected=float(np.mean([p.n_fragments == 1 for p in per])),
        n_nonfinite=int(sum(not p.finite for p in per)),
        type_fractions={SYMBOLS[i]: float(fr[i]) for i in range(N_TYPES)},
        reference_type_fractions={SYMBOLS[i]: float(ref[i]) for i in range(N_TYPES)} if ref is not None else None,
        novelty_note=note,
        rdkit_validity=float(np.mean([p.rdkit_valid for p in per])),
        strain=_strain_summary(per) if with_strain else None,
        fidelity=distances(stats, reference_stats) if stats is not None else None,
        per_molecule=per,
        stats=stats,
    )


def _strain_summary(per: list[PerMolecule]) -> dict:
    e = np.array([p.strain for p in per if p.strain is not None])
    r = np.array([p.relax_rmsd for p in per if p.relax_rmsd is not None])
    return {"n_molecules": len(e), "median_kcal_mol": float(np.median(e)) if len(e) else None,
            "p90_kcal_mol": float(np.percentile(e, 90)) if len(e) else None,
            "median_heavy_rmsd": float(np.median(r)) if len(r) else None}



def training_smiles(data_dir: Path | str | None = None, remove_h: bool = False,
                    progress: Callable[[str, int], Callable[[int], None]] | None = None,
                    workers: int | None = 1) -> set[str] | None:
    """SMILES of the training split built from its 3D structures by EDM's route; kept beside the data, or in the
    user's cache folder where the data's cannot be written (:func:`molgen.data.qm9.derived_path`). Made in
    ``workers`` processes at most (as :func:`evaluate_molecules`).

    Returns None when there is no QM9 cache.
    """
    from molgen.data.qm9 import cache_is_valid, default_data_dir, derived_path, load_qm9
    from molgen.io_utils import atomic_write_text, can_make, keep_if_possible
    from molgen.workers import map_chunks, workers_for

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not cache_is_valid(data_dir, verify_hash=False):
        return None
    name = TRAIN_SMILES_NAME.replace(".txt", "_noH.txt") if remove_h else TRAIN_SMILES_NAME
    cache = derived_path(data_dir, name)
    text = cache.read_text(errors="replace") if cache.exists() else ""
    if text.endswith("\n"):  # written whole (one line a molecule); cut short, it is made again below
        return set(text.split())
    ds = load_qm9(data_dir, remove_h=remove_h, verify=False)
    ids = ds.split("train")
    kept = can_make(cache)  # where neither folder can take them, they are made each time
    tick = progress("training SMILES" + (" (once)" if kept else ""), len(ids)) if progress else None
    chunks = (tuple(zip(*ds.molecules(ids[s : s + CHUNK]))) for s in range(0, len(ids), CHUNK))
    out = []
    for smiles, n in map_chunks(_smiles_chunk, chunks, workers_for(len(ids), workers)):
        out += smiles
        if tick:
            tick(n)
    keep_if_possible(lambda: atomic_write_text(cache, "\n".join(out) + "\n"), cache, "the training SMILES are")
    return set(out)


def _smiles_chunk(positions, types) -> tuple[list[str], int]:
    """The SMILES of a few molecules (those RDKit sanitises), and how many molecules there were."""
    from molgen.chem.bonds import bond_orders
    from molgen.chem.rdkit_utils import build_molecule, mol_to_smiles, quiet

    pos, typ, mask = pad_molecules(positions, types)
    orders = bond_orders(pos, typ, mask)
    with quiet():
        smiles = [mol_to_smiles(build_molecule(t, orders[k, : len(t), : len(t)])) for k, t in enumerate(types)]
    return [s for s in smiles if s is not None], len(types)


def write_per_molecule_csv(path: Path | str, metrics: Metrics, names: list[str] | None = None) -> None:
    import csv
    import io

    from molgen.io_utils import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "name", "formula", "n_atoms", "stable_atoms", "mol_stable", "valid", "n_fragments",
                "finite", "smiles", "rdkit_valid", "strain_kcal_mol", "relax_rmsd"])

    def num(v):
        return "" if v is None else f"{v:.4f}"

    for k, p in enumerate(metrics.per_molecule):
        w.writerow([k, (names[k] if names else ""), p.formula, p.n_atoms, p.stable_atoms, int(p.stable),
                    int(p.valid), p.n_fragments, int(p.finite), p.smiles, int(p.rdkit_valid), num(p.strain),
                    num(p.relax_rmsd)])
    atomic_write_text(path, buf.getvalue())


def write_json(path: Path | str, metrics: Metrics | dict[str, Metrics], extra: dict | None = None) -> None:
    """The metrics as JSON (several reports: {name: metrics} under "reports"), with ``extra`` (what was evaluated,
    how it was made), molgen's version and the time."""
    import datetime

    from molgen import __version__
    from molgen.io_utils import atomic_write_text

    body = metrics.to_dict() if isinstance(metrics, Metrics) else {"reports": {k: m.to_dict() for k, m in metrics.items()}}
    stamp = {"molgen_version": __version__,
             "written_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write_text(path, json.dumps({**body, **(extra or {}), **stamp}, indent=2))


def reference_for(data_dir, remove_h: bool, novelty: bool, progress=None, workers: int | None = 1):
    """(training SMILES or None, training type fractions or None) from the QM9 cache, when there is one.
    ``progress``: the library's progress protocol, (description, total) -> tick(n); ``workers``: processes at most
    (:func:`training_smiles`)."""
    from molgen.data.qm9 import cache_is_valid, default_data_dir, training_type_fractions

    d = data_dir or default_data_dir()
    if not cache_is_valid(d, verify_hash=False):
        return None, None
    fr = training_type_fractions(d, remove_h)
    return (training_smiles(d, remove_h, progress, workers) if novelty else None), fr


def annotate(molecules, reference=(None, None), novelty: bool = False, fragment=None, progress=None,
             workers: int | None = 1) -> Metrics:
    """EDM's metrics of generated molecules, each molecule's own results added to its properties. ``reference``:
    (training SMILES, training type fractions), as :func:`reference_for` reads them (None: not compared);
    ``novelty``: whether it was asked for. With the ``fragment`` they complete (:mod:`molgen.fragment`), the share
    that contains its bond graph. ``progress``: (description, total) -> tick(n); ``workers``: processes at most
    (:func:`evaluate_molecules`)."""
    smiles, fr = reference
    metrics = evaluate_molecules([m.positions for m in molecules], [m.types for m in molecules], smiles, fr,
                                 progress("evaluating", len(molecules)) if progress else None, workers=workers)
    if not novelty:
        metrics.novelty_note = "not computed (add --novelty)"
    if fragment is not None:
        from molgen.fragment import fragment_kept

        metrics.fragment_kept = fragment_kept(fragment, molecules)
    for mol, p in zip(molecules, metrics.per_molecule):
        mol.props.update({"molgen_stable_atoms": f"{p.stable_atoms}/{p.n_atoms}", "molgen_mol_stable": int(p.stable),
                          "molgen_valid": int(p.valid), "molgen_smiles": p.smiles})
    return metrics


def evaluate_files(files, fmt=None, skip_invalid: bool = False, reference=None, remove_h: bool = False,
                   novelty: bool = True, progress=None, fidelity: bool = True, with_strain: bool = False,
                   workers: int | None = 1):
    """(metrics, molecules, errors) of the molecules in SDF / XYZ files or folders: ``errors`` names what could
    not be read (with ``skip_invalid``; else the first unreadable molecule is an error). ``fidelity``: distances to
    QM9's test split when the QM9 cache exists (with hydrogens only); ``with_strain``: MMFF94 strain.
    ``progress``: the library's progress protocol, (description, total) -> tick(n); ``workers``: processes at most
    (:func:`evaluate_molecules`)."""
    from molgen import MolgenError
    from molgen.chem.io import read_molecules

    mols, errors = [], []
    for f in files:
        mols += read_molecules(f, fmt, skip_invalid, errors, workers=workers)
    if not mols:
        raise MolgenError(f"no readable molecules in {', '.join(str(f) for f in files)}")
    from molgen.fidelity import reference_statistics

    smiles, fr = reference_for(reference, remove_h, novelty, progress, workers)
    stats = reference_statistics(reference) if fidelity and not remove_h else None
    tick = progress("evaluating", len(mols)) if progress else None
    metrics = evaluate_molecules([m.positions for m in mols], [m.types for m in mols], smiles, fr, tick, stats,
                                 with_strain, workers)
    if not novelty:
        metrics.novelty_note = "skipped (--no-novelty)"
    return metrics, mols, errors
