"""QM9 as EDM uses it: the in-memory data set, EDM's fixed split, and an atomic on-disk cache.

The cache is one ``.npz`` file plus a JSON manifest holding its size and SHA-256.  Both are written to
temporary names and renamed into place, so an interrupted run never leaves a half-written cache. Getting the
data from its sources: :mod:`molgen.data.sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import SYMBOLS, TYPE_OF_SYMBOL
from molgen.io_utils import NPZ_DAMAGE, atomic_path, atomic_write_text

N_RAW = 133_885
N_EXCLUDED = 3_054
N_KEPT = N_RAW - N_EXCLUDED  # 130,831
N_ATOMS_KEPT = 2_359_210  # their atoms
EDM_SPLIT = (100_000, 17_748, 13_083)
CACHE_VERSION = 1
CACHE_NAME = f"qm9_v{CACHE_VERSION}.npz"
MANIFEST_NAME = f"qm9_v{CACHE_VERSION}.json"

Progress = Callable[[str, int | None], Callable[[int], None]]


def default_data_dir() -> Path:
    """``$MOLGEN_HOME`` if set, else the platform's user cache directory (:func:`user_cache_dir`)."""
    env = os.environ.get("MOLGEN_HOME")
    return Path(env).expanduser() if env else user_cache_dir()


def user_cache_dir() -> Path:
    """The platform's user cache directory for molgen, whatever ``$MOLGEN_HOME`` names."""
    if os.name == "nt":  # pragma: no cover - platform specific
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif os.uname().sysname == "Darwin":  # pragma: no cover - platform specific
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "molgen"


# ----------------------------------------------------------------------------------------------------------
# Records and the in-memory data set
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    index: int  # 1-based GDB-9 index
    types: np.ndarray  # int8 [n]
    positions: np.ndarray  # float64 [n, 3], Angstrom, as in the source
    smiles: str



@dataclass
class QM9:
    """Molecules stored flat: ``positions[offsets[i]:offsets[i]+n_atoms[i]]`` is molecule ``i``."""

    positions: np.ndarray  # float32 [A, 3], each molecule centred on its mean position
    types: np.ndarray  # int8 [A], indices into SYMBOLS
    n_atoms: np.ndarray  # int16 [M]
    index: np.ndarray  # int32 [M], GDB-9 index (1-based)
    smiles: np.ndarray  # str [M]
    splits: dict[str, np.ndarray]  # name -> int32 molecule indices

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.n_atoms.astype(np.int64))[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.n_atoms)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        o, n = int(self.offsets[i]), int(self.n_atoms[i])
        return self.positions[o : o + n], self.types[o : o + n]

    def molecules(self, ids: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)) if ids is None else ids:
            yield self.molecule(int(i))

    def split(self, name: str) -> np.ndarray:
        try:
            return self.splits[name]
        except KeyError:
            raise MolgenError(f"unknown split {name!r}; choose one of {', '.join(self.splits)}") from None

    def size_histogram(self, split: str = "train", max_atoms: int | None = None) -> np.ndarray:
        """Counts of molecules by atom count (index = number of atoms)."""
        n = self.n_atoms[self.split(split)]
        return np.bincount(n, minlength=(max_atoms or int(self.n_atoms.max())) + 1)

    def type_fractions(self, split: str = "train") -> np.ndarray:
        return _type_fractions(self.types, self.n_atoms, self.split(split))

    def training_subset(self, n_valid: int = 0) -> "QM9":
        """The training split, in split order, and the first ``n_valid`` molecules of the validation split, as a
        data set of their own (no SMILES, no test split): the smallest cache that `molgen train` needs, its
        validation loss included; its batches are the full set's, molecule for molecule."""
        train, valid = self.split("train"), self.split("valid")[:n_valid]
        ids = np.concatenate([train, valid])
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i] + self.n_atoms[i]) for i in ids])
        return QM9(self.positions[rows], self.types[rows], self.n_atoms[ids], self.index[ids],
                   np.full(len(ids), "", dtype="<U1"),
                   {"train": np.arange(len(train), dtype=np.int32),
                    "valid": np.arange(len(train), len(ids), dtype=np.int32), "test": np.zeros(0, np.int32)})

    def remove_h(self) -> "QM9":
        """The same molecules without hydrogens, re-centred."""
        keep = self.types != 0
        seg = np.repeat(np.arange(len(self)), self.n_atoms)
        n_new = np.bincount(seg[keep], minlength=len(self)).astype(np.int16)
        pos = self.positions[keep].astype(np.float64)
        seg_k = seg[keep]
        mean = np.zeros((len(self), 3))
        np.add.at(mean, seg_k, pos)
        mean /= np.maximum(n_new, 1)[:, None]
        pos -= mean[seg_k]
        return QM9(pos.astype(np.float32), self.types[keep], n_new, self.index, self.smiles, dict(self.splits))


def build_dataset(records: list[Record], excluded: set[int] | None = None) -> QM9:
    """Drop excluded indices, sort by index, centre each molecule and attach EDM's split."""
    excluded = excluded or set()
    recs = sorted((r for r in records if r.index not in excluded), key=lambda r: r.index)
    if not recs:
        raise MolgenError("no molecules left after parsing the source")
    n_atoms = np.array([len(r.types) for r in recs], dtype=np.int16)
    positions = np.concatenate([r.positions - r.positions.mean(axis=0, keepdims=True) for r in recs])
    types = np.concatenate([r.types for r in recs]).astype(np.int8)
    index = np.array([r.index for r in recs], dtype=np.int32)
    smiles = np.array([r.smiles for r in recs])
    return QM9(positions.astype(np.float32), types, n_atoms, index, smiles, edm_split(len(recs)))


def split_sizes(n: int) -> tuple[int, int, int]:
    """EDM's sizes for the full data (100,000 / 17,748 / 13,083); the same proportions for smaller sets."""
    n_test = int(0.1 * n)
    if n >= EDM_SPLIT[0] + n_test:
        n_train = EDM_SPLIT[0]
    else:
        n_train = n - n_test - int(round(n * EDM_SPLIT[1] / N_KEPT))
    return n_train, n - n_train - n_test, n_test


def edm_split(n: int) -> dict[str, np.ndarray]:
    """EDM's split: ``np.random.seed(0); np.random.permutation(n)``, then train / valid / test in that order."""
    n_train, n_valid, n_test = split_sizes(n)
    perm = np.random.RandomState(0).permutation(n).astype(np.int32)
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid : n_train + n_valid + n_test]),
    }


# ----------------------------------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_cache(ds: QM9, data_dir: Path, source: str) -> Path:
    npz = data_dir / CACHE_NAME

    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f, positions=ds.positions, types=ds.types, n_atoms=ds.n_atoms, index=ds.index, smiles=ds.smiles,
                **{f"split_{k}": v for k, v in ds.splits.items()},
            )
            f.flush()
            os.fsync(f.fileno())
    manifest = {
        "version": CACHE_VERSION,
        "source": source,
        "n_molecules": int(len(ds)),
        "n_atoms_total": int(len(ds.types)),
        "splits": {k: int(len(v)) for k, v in ds.splits.items()},
        "bytes": npz.stat().st_size,
        "sha256": _sha256(npz),
    }
    atomic_write_text(data_dir / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return npz


def read_manifest(data_dir: Path) -> dict | None:
    p = Path(data_dir) / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:  # not JSON, or not UTF-8 text: damaged, so no valid cache
        return None


def derived_path(data_dir: Path | str, name: str) -> Path:
    """Where a file derived from the cache in ``data_dir`` (the training SMILES, the test-split statistics) is
    kept: beside the cache when it is there or the folder can be written, else (a cache shared read-only) in the
    user's own cache folder under the cache's SHA-256, so that each user makes it once."""
    here = Path(data_dir) / name
    if here.exists() or os.access(data_dir, os.W_OK):
        return here
    key = str((read_manifest(Path(data_dir)) or {}).get("sha256", "unknown"))[:16]
    return user_cache_dir() / "derived" / key / name


def cache_is_valid(data_dir: Path, verify_hash: bool = True) -> bool:
    m = read_manifest(data_dir)
    npz = Path(data_dir) / CACHE_NAME
    if m is None or not npz.exists() or npz.stat().st_size != m.get("bytes"):
        return False
    return not verify_hash or _sha256(npz) == m.get("sha256")


def require_cache(data_dir: Path | str | None, option: str) -> None:
    """A cache folder the user named on the command line must hold a cache (a default one may be missing)."""
    if data_dir is not None and not cache_is_valid(Path(data_dir), verify_hash=False):
        raise MolgenError(f"{option} {data_dir}: no QM9 cache there (run `molgen download --data-dir {data_dir}`)")


def require_reference(data_dir: Path | str | None, why: str | None) -> None:
    """A --data-dir the user named must hold a cache (:func:`require_cache`); when something the user asked for
    needs one (``why``: what and why), the default cache must too."""
    require_cache(data_dir, "--data-dir")
    d = Path(data_dir) if data_dir else default_data_dir()
    if why and not cache_is_valid(d, verify_hash=False):
        raise MolgenError(f"{why}, and {d} holds no QM9 cache: run `molgen download` (or name a cache with --data-dir)")


def load_qm9(data_dir: Path | str | None = None, remove_h: bool = False, verify: bool = True) -> QM9:
    """Load the processed cache (run ``molgen download`` first)."""
    ds = _read_cache(data_dir, verify, lambda z: QM9(
        z["positions"], z["types"], z["n_atoms"], z["index"], z["smiles"],
        {k[6:]: z[k] for k in z.files if k.startswith("split_")},
    ))
    return ds.remove_h() if remove_h else ds


def training_type_fractions(data_dir: Path | str | None = None, remove_h: bool = False) -> np.ndarray:
    """The training split's atom-type fractions, as :meth:`QM9.type_fractions` gives them for the loaded cache,
    read from the cache's types, sizes and split alone (~10x faster than loading it all)."""
    return _read_cache(data_dir, False, lambda z: _type_fractions(z["types"], z["n_atoms"], z["split_train"],
                                                                  drop_h=remove_h))


def training_heteroatom_shares(data_dir: Path | str | None = None, top: int = 5) -> np.ndarray:
    """The share of the training split's molecules with 0, 1, ..., ``top`` or more N, O and F atoms."""
    from molgen.chem.elements import heteroatom_counts

    def read(z):
        counts = heteroatom_counts(z["types"], z["n_atoms"])[z["split_train"]]
        return np.bincount(np.minimum(counts, top), minlength=top + 1) / max(len(counts), 1)

    return _read_cache(data_dir, False, read)


def _read_cache(data_dir: Path | str | None, verify: bool, read: Callable):
    """``read`` of the opened cache file (an :class:`numpy.lib.npyio.NpzFile`); a missing or damaged cache is a
    :class:`MolgenError` that says how to make it."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not cache_is_valid(data_dir, verify_hash=verify):
        raise MolgenError(f"no valid QM9 cache in {data_dir}: run `molgen download` first")
    try:
        with np.load(data_dir / CACHE_NAME) as z:
            return read(z)
    except NPZ_DAMAGE as e:  # damaged after it was written whole
        raise MolgenError(f"the QM9 cache in {data_dir} is damaged ({e}): run `molgen download"
                          f"{'' if data_dir == default_data_dir() else f' --data-dir {data_dir}'}`") from None


def _type_fractions(types: np.ndarray, n_atoms: np.ndarray, ids: np.ndarray, drop_h: bool = False) -> np.ndarray:
    """The fractions of each atom type among the atoms of molecules ``ids`` (of packed ``types``, molecule after
    molecule, ``n_atoms`` each), hydrogens left out with ``drop_h``."""
    member = np.zeros(len(n_atoms), bool)
    member[ids] = True
    t = types[np.repeat(member, n_atoms)]
    counts = np.bincount(t[t != TYPE_OF_SYMBOL["H"]] if drop_h else t, minlength=len(SYMBOLS))
    return counts / max(counts.sum(), 1)

