"""Getting QM9: the sources, their parsers and ``download``, which writes the processed cache (molgen.data.qm9).

Sources (tried in this order unless one is named):
  * ``archive``: the original ``dsgdb9nsd.xyz.tar.bz2`` and ``uncharacterized.txt`` from the publisher;
  * ``qm9pack``: the CSV files shipped inside the installed ``qm9pack`` package (``pip install "molgen[qm9]"``);
  * ``file``: a local path (``--from``): the original archive, a folder of ``.xyz`` files, or qm9pack's CSVs.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import SYMBOLS, symbol_to_type
from molgen.data.qm9 import (CACHE_NAME, N_ATOMS_KEPT, N_EXCLUDED, N_KEPT, N_RAW, Progress, Record, build_dataset,
                             cache_is_valid, default_data_dir, read_manifest, save_cache)
from molgen.io_utils import check_folder, check_room

ARCHIVE_URL = "https://springernature.figshare.com/ndownloader/files/3195389"
EXCLUDED_URL = "https://springernature.figshare.com/ndownloader/files/3195404"
SOURCES = ("archive", "qm9pack", "file")


_INDEX_RE = re.compile(r"(\d+)")


def _float(tok: str) -> float:
    return float(tok.replace("*^", "e"))


def parse_qm9_xyz(text: str, name: str = "<xyz>", index: int | None = None) -> Record:
    """Parse one QM9 ``.xyz`` file (count, property line, atoms with Mulliken charges, freqs, SMILES, InChI)."""
    lines = text.splitlines()
    at, n = 0, 0  # the line read (0-based), the atoms it announces
    try:
        n = int(lines[0].split()[0])
        if index is None:
            at = 1
            props = lines[1].split()
            index = int(props[1]) if len(props) > 1 and props[0] == "gdb" else int(_INDEX_RE.findall(name)[-1])
        symbols, coords = [], []
        for k in range(n):
            at = 2 + k
            tok = lines[at].split()
            symbols.append(tok[0])
            coords.append([_float(t) for t in tok[1:4]])
            if len(coords[-1]) < 3:
                raise ValueError("an atom line needs an element and three coordinates")
        smiles_line = lines[2 + n + 1].split() if len(lines) > 3 + n else []
        smiles = smiles_line[0] if smiles_line else ""
    except (IndexError, ValueError) as e:
        where = f" at line {at + 1}" if lines else ""
        raise MolgenError(f"{name}: malformed QM9 xyz file{where}: {_what_is_wrong(lines, at, n, e)}") from None
    try:
        types = np.array([symbol_to_type(s) for s in symbols], dtype=np.int8)
    except KeyError as e:
        raise MolgenError(f"{name}: unknown element {e.args[0]!r} (QM9 has {', '.join(SYMBOLS)})") from None
    return Record(index, types, np.array(coords, dtype=np.float64), smiles)


def _what_is_wrong(lines: list[str], at: int, n: int, error: Exception) -> str:
    """Why line ``at`` of a QM9 .xyz file announcing ``n`` atoms could not be read."""
    if not lines:
        return "the file is empty"
    if at >= len(lines):
        return f"it ends before its {n} atoms"
    if not lines[at].split():
        return "an empty line"
    if at == 0:
        return f"the first line should be the atom count, not {lines[0].strip()!r}"
    if at == 1:
        return f"the second line should begin 'gdb N' (N: the QM9 index), not {lines[1].strip()[:40]!r}"
    return str(error)


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
        if "could not be opened successfully" in str(e):  # not compressed tar data at all
            raise MolgenError(f"{path}: not a tar archive; --from takes QM9's archive (.tar.bz2, .tar.gz, .tar), "
                              "qm9pack CSV files, QM9 .xyz files or a folder of them") from None
        raise MolgenError(f"{path}: not a readable tar archive ({e})") from None
    side = path.parent / "uncharacterized.txt"
    if excluded is None and side.exists():
        excluded = parse_excluded(side.read_text(errors="replace"))
    return records, excluded


def read_xyz_folder(path: Path, progress: Progress | None = None) -> tuple[list[Record], set[int] | None]:
    files = sorted(path.glob("*.xyz"))
    tick = progress("parsing " + str(path), len(files)) if progress else None
    records = []
    for f in files:
        records.append(parse_qm9_xyz(f.read_text(errors="replace"), str(f)))
        if tick:
            tick(1)
    side = path / "uncharacterized.txt"
    return records, (parse_excluded(side.read_text(errors="replace")) if side.exists() else None)


def read_qm9pack_csv(paths: list[Path], progress: Progress | None = None) -> list[Record]:
    """Records from qm9pack's CSVs (columns ``Index``, ``SMILES``, ``N_atoms``, ``Elements``, ``XYZ_Ang``)."""
    csv.field_size_limit(1 << 30)
    records = []
    tick = progress("parsing qm9pack CSV", None) if progress else None
    for p in paths:
        with open(p, newline="", errors="replace") as fh:  # bytes not UTF-8: a malformed row
            reader = csv.DictReader(fh)
            missing = {"Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"} - set(reader.fieldnames or [])
            if missing:
                raise MolgenError(f"{p}: not a qm9pack CSV (missing columns {', '.join(sorted(missing))})")
            for line_no, row in enumerate(reader, start=2):
                try:
                    symbols = _symbol_list(row["Elements"])
                    coords = _coordinate_rows(row["XYZ_Ang"])
                    n = int(row["N_atoms"])
                    index = int(row["Index"])
                except ValueError as e:
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


def _symbol_list(text: str) -> list[str]:
    """qm9pack's Elements column, a list literal of quoted symbols: "['C','H']" -> ["C", "H"]."""
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        raise ValueError(f"Elements is not a list: {text[:40]!r}")
    inner = t[1:-1].strip()
    return [x.strip().strip("'\"") for x in inner.split(",")] if inner else []


def _coordinate_rows(text: str) -> np.ndarray:
    """qm9pack's XYZ_Ang column, a list literal of [x, y, z] lists, as an [n, 3] array (parsed as numbers directly:
    ~20x faster than evaluating the literal, the same floats)."""
    t = text.strip()
    if not (t.startswith("[[") and t.endswith("]]")) and t.replace(" ", "") != "[]":
        raise ValueError(f"XYZ_Ang is not a list of [x, y, z] lists: {text[:40]!r}")
    flat = t.replace("[", " ").replace("]", " ")
    xyz = np.array(flat.split(","), np.float64).reshape(-1, 3) if flat.strip() else np.zeros((0, 3))
    if t.count("[") != len(xyz) + 1 or t.count("]") != len(xyz) + 1:  # the numbers in threes, as listed
        raise ValueError(f"XYZ_Ang is not a list of [x, y, z] lists: {text[:40]!r}")
    return xyz


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
        return [parse_qm9_xyz(path.read_text(errors="replace"), str(path))], None
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
    named = "--data-dir" if data_dir else ("$MOLGEN_HOME" if os.environ.get("MOLGEN_HOME") else "the cache folder")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if from_path is not None:
        source = "file"
        if not Path(from_path).exists():
            raise MolgenError(f"--from {from_path}: no such file or folder")
    if source is not None and source not in SOURCES:
        raise MolgenError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "file" and from_path is None:
        raise MolgenError("--source file needs --from PATH")
    if data_dir.exists() and not data_dir.is_dir():
        raise MolgenError(f"{named} {data_dir} is a file, not a folder")
    made_from = read_manifest(data_dir) or {}
    same_file = from_path is None or made_from.get("source") == f"file:{Path(from_path).resolve()}"
    if not force and same_file and cache_is_valid(data_dir):  # --from another file rebuilds from it
        return data_dir / CACHE_NAME, False
    check_folder(data_dir, named)  # one that could not be made or written: before any download
    if source != "file":  # the whole of QM9, whose cache holds at least its atoms' positions (float32) and types
        check_room(data_dir, N_ATOMS_KEPT * (3 * 4 + 1), named, "QM9's cache takes", is_folder=True)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _build(data_dir, source, from_path, progress, log, timeout)
    except BaseException:  # a refused or interrupted download leaves no empty folder of its own behind
        if created and data_dir.is_dir() and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise


def _build(data_dir: Path, source, from_path, progress, log, timeout) -> tuple[Path, bool]:
    """Read the first source that answers (``source``, else the archive, then qm9pack) and save the cache."""
    errors: list[str] = []
    for src in [source] if source else ["archive", "qm9pack"]:
        got = _read_source(src, data_dir, from_path, progress, log, timeout, errors)
        if got is not None:
            records, excluded, label = got
            return save_cache(build_dataset(records, excluded), data_dir, label), True
    raise MolgenError(
        "could not get QM9 (" + "; ".join(errors) + "). Install the data package with "
        "`pip install \"molgen[qm9]\"` or pass the original archive with `molgen download --from PATH`"
    )


def _read_source(src, data_dir, from_path, progress, log, timeout, errors):
    """(records, excluded ids, cache label) from one source, or None (why, appended to ``errors``)."""
    if src == "file":
        records, excluded = read_local(Path(from_path), progress)
        # A local file may be a small excerpt (tests, quick looks); count checks apply to whole data sets.
        if len(records) in (N_RAW, N_KEPT):
            excluded = check_full(records, excluded, str(from_path))
        return records, excluded, f"file:{Path(from_path).resolve()}"
    if src == "archive":
        try:
            with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                log("trying the original QM9 archive from its publisher ...")
                records, excluded = read_archive_from_publisher(Path(tmp), progress, timeout)
        except (OSError, MolgenError) as e:
            errors.append(f"publisher archive: {e}")
            log(f"publisher archive not reachable ({e})")
            return None
        return records, check_full(records, excluded, "publisher archive"), "archive"
    files = qm9pack_csvs()
    if files is None:
        errors.append("qm9pack: not installed")
        return None
    log(f"reading QM9 from the installed qm9pack package ({files[0].parent})")
    records = read_qm9pack_csv(files, progress)
    return records, check_full(records, None, "qm9pack"), "qm9pack"
