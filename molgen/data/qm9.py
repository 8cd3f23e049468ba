"""QM9 as EDM uses it: sources, parsing, the fixed split, and an atomic on-disk cache.

Sources (tried in this order unless one is named):
  * ``archive``: the original ``dsgdb9nsd.xyz.tar.bz2`` and ``uncharacterized.txt`` from the publisher;
  * ``qm9pack``: the CSV files shipped inside the installed ``qm9pack`` package (``pip install "molgen[qm9]"``);
  * ``file``: a local path (``--from``): the original archive, a folder of ``.xyz`` files, or qm9pack's CSVs.

The cache is one ``.npz`` file plus a JSON manifest holding its size and SHA-256.  Both are written to
temporary names and renamed into place, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import os
import re
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import SYMBOLS, symbol_to_type
from molgen.io_utils import atomic_path, atomic_write_text

ARCHIVE_URL = "https://springernature.figshare.com/ndownloader/files/3195389"
EXCLUDED_URL = "https://springernature.figshare.com/ndownloader/files/3195404"
N_RAW = 133_885
N_EXCLUDED = 3_054
N_KEPT = N_RAW - N_EXCLUDED  # 130,831
EDM_SPLIT = (100_000, 17_748, 13_083)
CACHE_VERSION = 1
CACHE_NAME = f"qm9_v{CACHE_VERSION}.npz"
MANIFEST_NAME = f"qm9_v{CACHE_VERSION}.json"
SOURCES = ("archive", "qm9pack", "file")

Progress = Callable[[str, int | None], Callable[[int], None]]


def default_data_dir() -> Path:
    """``$MOLGEN_HOME`` if set, else the platform's user cache directory."""
    env = os.environ.get("MOLGEN_HOME")
    if env:
        return Path(env).expanduser()
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
        ids = self.split(split)
        mask = np.zeros(len(self.types), bool)
        for i in ids:
            mask[self.offsets[i] : self.offsets[i] + self.n_atoms[i]] = True
        counts = np.bincount(self.types[mask], minlength=len(SYMBOLS))
        return counts / max(counts.sum(), 1)

    def training_subset(self) -> "QM9":
        """The training split alone, in split order, as its own data set (split "train" = all of it, no SMILES):
        the smallest cache that `molgen train` needs; its batches are the full set's, molecule for molecule."""
        ids = self.split("train")
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i] + self.n_atoms[i]) for i in ids])
        empty = np.zeros(0, np.int32)
        return QM9(self.positions[rows], self.types[rows], self.n_atoms[ids], self.index[ids],
                   np.full(len(ids), "", dtype="<U1"),
                   {"train": np.arange(len(ids), dtype=np.int32), "valid": empty, "test": empty})

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

_INDEX_RE = re.compile(r"(\d+)")


def _float(tok: str) -> float:
    return float(tok.replace("*^", "e"))


def parse_qm9_xyz(text: str, name: str = "<xyz>", index: int | None = None) -> Record:
    """Parse one QM9 ``.xyz`` file (count, property line, atoms with Mulliken charges, freqs, SMILES, InChI)."""
    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
        if index is None:
            props = lines[1].split()
            index = int(props[1]) if len(props) > 1 and props[0] == "gdb" else int(_INDEX_RE.findall(name)[-1])
        symbols, coords = [], []
        for k in range(n):
            tok = lines[2 + k].split()
            symbols.append(tok[0])
            coords.append([_float(t) for t in tok[1:4]])
        smiles_line = lines[2 + n + 1].split() if len(lines) > 3 + n else []
        smiles = smiles_line[0] if smiles_line else ""
    except (IndexError, ValueError) as e:
        raise MolgenError(f"{name}: malformed QM9 xyz file ({e})") from None
    try:
        types = np.array([symbol_to_type(s) for s in symbols], dtype=np.int8)
    except KeyError as e:
        raise MolgenError(f"{name}: unknown element {e.args[0]!r} (QM9 has {', '.join(SYMBOLS)})") from None
    return Record(index, types, np.array(coords, dtype=np.float64), smiles)


def parse_excluded(text: str) -> set[int]:
    """Indices listed in QM9's ``uncharacterized.txt`` (the first integer token of each line)."""
    out = set()
    for line in text.splitlines():
        tok = line.split()
        if tok and tok[0].isdigit():
            out.add(int(tok[0]))
    return out


def read_archive(path: Path, progress: Progress | None = None) -> tuple[list[Record], set[int] | None]:
    """Records from a tar archive of QM9 ``.xyz`` files (``.tar.bz2``, ``.tar.gz`` or ``.tar``).

    The excluded list is taken from an ``uncharacterized.txt`` member or a file of that name beside the archive.
    """
    records: list[Record] = []
    excluded = None
    tick = progress("parsing " + path.name, None) if progress else None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                f = tar.extractfile(member)
                if f is None:
                    continue
                if base.endswith(".xyz"):
                    records.append(parse_qm9_xyz(f.read().decode("utf-8", "replace"), f"{path.name}:{member.name}"))
                    if tick:
                        tick(1)
                elif base == "uncharacterized.txt":
                    excluded = parse_excluded(f.read().decode())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise MolgenError(f"{path}: not a readable tar archive ({e})") from None
    side = path.parent / "uncharacterized.txt"
    if excluded is None and side.exists():
        excluded = parse_excluded(side.read_text())
    return records, excluded


def read_xyz_folder(path: Path, progress: Progress | None = None) -> tuple[list[Record], set[int] | None]:
    files = sorted(path.glob("*.xyz"))
    tick = progress("parsing " + str(path), len(files)) if progress else None
    records = []
    for f in files:
        records.append(parse_qm9_xyz(f.read_text(), str(f)))
        if tick:
            tick(1)
    side = path / "uncharacterized.txt"
    return records, (parse_excluded(side.read_text()) if side.exists() else None)


def read_qm9pack_csv(paths: list[Path], progress: Progress | None = None) -> list[Record]:
    """Records from qm9pack's CSVs (columns ``Index``, ``SMILES``, ``N_atoms``, ``Elements``, ``XYZ_Ang``)."""
    csv.field_size_limit(1 << 30)
    records = []
    tick = progress("parsing qm9pack CSV", None) if progress else None
    for p in paths:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"} - set(reader.fieldnames or [])
            if missing:
                raise MolgenError(f"{p}: not a qm9pack CSV (missing columns {', '.join(sorted(missing))})")
            for line_no, row in enumerate(reader, start=2):
                try:
                    symbols = ast.literal_eval(row["Elements"])
                    coords = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
                    n = int(row["N_atoms"])
                    index = int(row["Index"])
                except (ValueError, SyntaxError) as e:
                    raise MolgenError(f"{p}:{line_no}: malformed row ({e})") from None
                if len(symbols) != n or coords.shape != (n, 3):
                    raise MolgenError(f"{p}:{line_no}: N_atoms={n} but {len(symbols)} elements, {coords.shape} coords")
                try:
                    types = np.array([symbol_to_type(s) for s in symbols], dtype=np.int8)
                except KeyError as e:
                    raise MolgenError(f"{p}:{line_no}: unknown element {e.args[0]!r}") from None
                records.append(Record(index, types, coords, row["SMILES"]))
                if tick:
                    tick(1)
    return records


def qm9pack_csvs() -> list[Path] | None:
    """The CSV files inside the installed qm9pack package (found without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(data.glob("qm9_part*.csv"))
    return files or None


def read_local(path: Path, progress: Progress | None = None) -> tuple[list[Record], set[int] | None]:
    if not path.exists():
        raise MolgenError(f"{path}: no such file or folder")
    if path.is_dir():
        csvs = sorted(path.glob("qm9_part*.csv")) or sorted(path.glob("*.csv"))
        if csvs:
            return read_qm9pack_csv(csvs, progress), None
        if any(path.glob("*.xyz")):
            return read_xyz_folder(path, progress)
        raise MolgenError(f"{path}: folder holds neither qm9pack CSVs nor QM9 .xyz files")
    if path.suffix == ".csv":
        return read_qm9pack_csv([path], progress), None
    if path.suffix == ".xyz":
        return [parse_qm9_xyz(path.read_text(), str(path))], None
    return read_archive(path, progress)


def _download(url: str, dest: Path, progress: Progress | None, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "molgen"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        tick = progress("downloading " + dest.name, total) if progress else None
        with open(dest, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                if tick:
                    tick(len(chunk))


def read_archive_from_publisher(workdir: Path, progress: Progress | None, timeout: float = 10.0):
    tar = workdir / "dsgdb9nsd.xyz.tar.bz2"
    exc = workdir / "uncharacterized.txt"
    _download(EXCLUDED_URL, exc, progress, timeout)
    _download(ARCHIVE_URL, tar, progress, timeout)
    return read_archive(tar, progress)


# ----------------------------------------------------------------------------------------------------------
# Cache
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
    except json.JSONDecodeError:
        return None


def cache_is_valid(data_dir: Path, verify_hash: bool = True) -> bool:
    m = read_manifest(data_dir)
    npz = Path(data_dir) / CACHE_NAME
    if m is None or not npz.exists() or npz.stat().st_size != m.get("bytes"):
        return False
    return not verify_hash or _sha256(npz) == m.get("sha256")


def load_qm9(data_dir: Path | str | None = None, remove_h: bool = False, verify: bool = True) -> QM9:
    """Load the processed cache (run ``molgen download`` first)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not cache_is_valid(data_dir, verify_hash=verify):
        raise MolgenError(f"no valid QM9 cache in {data_dir}: run `molgen download` first")
    with np.load(data_dir / CACHE_NAME) as z:
        ds = QM9(
            z["positions"], z["types"], z["n_atoms"], z["index"], z["smiles"],
            {k[6:]: z[k] for k in z.files if k.startswith("split_")},
        )
    return ds.remove_h() if remove_h else ds


def check_full(records: list[Record], excluded: set[int] | None, source: str) -> set[int]:
    """Count checks for a source that claims to be the whole of QM9; returns the excluded set to apply."""
    n = len(records)
    if excluded is not None and len(excluded) != N_EXCLUDED:
        raise MolgenError(f"{source}: excluded list has {len(excluded)} entries, expected {N_EXCLUDED} (corrupt?)")
    if n == N_RAW:
        if excluded is None:
            raise MolgenError(f"{source}: all {N_RAW} molecules but no uncharacterized.txt to drop the {N_EXCLUDED}")
        return excluded
    if n == N_KEPT:
        return set()
    raise MolgenError(f"{source}: {n} molecules, expected {N_RAW} or {N_KEPT} (corrupt or truncated input?)")


def download(
    data_dir: Path | str | None = None,
    source: str | None = None,
    from_path: Path | str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    timeout: float = 10.0,
) -> tuple[Path, bool]:
    """Make the processed QM9 cache.  Returns (cache path, whether anything was done)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if from_path is not None:
        source = "file"
    if source is not None and source not in SOURCES:
        raise MolgenError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if not force and cache_is_valid(data_dir):
        return data_dir / CACHE_NAME, False
    data_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    order = [source] if source else ["archive", "qm9pack"]
    for src in order:
        if src == "file":
            if from_path is None:
                raise MolgenError("--source file needs --from PATH")
            records, excluded = read_local(Path(from_path), progress)
            # A local file may be a small excerpt (tests, quick looks); count checks apply to whole data sets.
            if len(records) in (N_RAW, N_KEPT):
                excluded = check_full(records, excluded, str(from_path))
            ds = build_dataset(records, excluded)
            return save_cache(ds, data_dir, f"file:{Path(from_path).resolve()}"), True
        if src == "archive":
            try:
                with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                    log("trying the original QM9 archive from its publisher ...")
                    records, excluded = read_archive_from_publisher(Path(tmp), progress, timeout)
            except (OSError, MolgenError) as e:
                errors.append(f"publisher archive: {e}")
                log(f"publisher archive not reachable ({e})")
                continue
            excluded = check_full(records, excluded, "publisher archive")
            return save_cache(build_dataset(records, excluded), data_dir, "archive"), True
        if src == "qm9pack":
            files = qm9pack_csvs()
            if files is None:
                errors.append("qm9pack: not installed")
                continue
            log(f"reading QM9 from the installed qm9pack package ({files[0].parent})")
            records = read_qm9pack_csv(files, progress)
            excluded = check_full(records, None, "qm9pack")
            return save_cache(build_dataset(records, excluded), data_dir, "qm9pack"), True
    raise MolgenError(
        "could not get QM9 (" + "; ".join(errors) + "). Install the data package with "
        "`pip install \"molgen[qm9]\"` or pass the original archive with `molgen download --from PATH`"
    )
