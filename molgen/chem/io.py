"""Molecules in files: the :class:`Molecule` record, file formats, and reading (writing: :mod:`molgen.chem.write`).

Readers: SDF (any tool's; the file's own bonds are ignored by the metrics, which re-perceive them from the
geometry), XYZ / extended XYZ with any number of frames, and folders of such files; ``-`` or a pipe is read whole
first (gzipped or not; its format from --format, else from what it holds).  Bad input raises a MolgenError naming
the file and the line or molecule.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import CHARGES, SYMBOLS, symbol_to_type
from molgen.chem.extxyz import xyz_columns
from molgen.io_utils import MOLECULE_SUFFIXES, STDIO, is_gzipped, is_stream, molecule_suffix, unused_path

FORMATS = ("sdf", "xyz")
NONFINITE = "molgen_nonfinite"  # the SDF property of a molecule whose coordinates were not finite
MAX_ATOMS = 256  # the pairwise bond tables are dense; larger inputs are not QM9-like molecules
DECIMALS = 4  # of a coordinate in Angstrom, as an SDF file (V2000) holds it


@dataclass
class Molecule:
    types: np.ndarray  # int [n] into SYMBOLS
    positions: np.ndarray  # float [n, 3], Angstrom
    name: str = ""
    props: dict = field(default_factory=dict)
    drawn: bool = False  # a 2D drawing: an SDF/MOL record not marked 3D with every z = 0 (XYZ is 3D by definition)


def _format_of_suffix(path: Path | str) -> str | None:
    return MOLECULE_SUFFIXES.get(molecule_suffix(path))


def format_of(path: Path | str, fmt: str | None = None, strict: bool = False) -> str:
    """The file format: ``fmt`` when given, else the extension's. ``strict`` (for outputs) refuses a ``fmt``
    that contradicts a known extension (an .xyz file holding SDF)."""
    by_suffix = _format_of_suffix(path)
    if strict and is_gzipped(path):
        raise MolgenError(f"{path}: molgen writes uncompressed .sdf and .xyz files (gzip it afterwards)")
    if fmt:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise MolgenError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if strict and by_suffix is not None and by_suffix != fmt:
            raise MolgenError(f"--format {fmt} contradicts the extension of {path}")
        return fmt
    if by_suffix is None:
        raise MolgenError(f"{path}: cannot tell the format from the extension; use .sdf or .xyz, or --format")
    return by_suffix


def output_file(path: Path | str | None, fmt: str | None = None) -> Path:
    """A molecule file to write: ``path`` as given, or without one out.sdf (out.xyz for ``fmt`` xyz), or out-2.sdf,
    out-3.sdf, ... when that exists: a default name never replaces a file the user did not name."""
    if path is None:
        path = unused_path(f"out.{format_of('out', fmt) if fmt else 'sdf'}")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


class BadMolecule(MolgenError):
    """One molecule of a file could not be read; the message names the file and where."""


def _types(symbols, where: str) -> np.ndarray:
    out = np.empty(len(symbols), np.int8)
    for k, s in enumerate(symbols):
        try:
            out[k] = symbol_to_type(s)
        except KeyError:
            raise BadMolecule(f"{where}: unknown element {s!r} (molgen models {', '.join(SYMBOLS)})") from None
    return _counted(out, where)


# atomic number -> type; -1: an element molgen does not model (every number above F's reads the last entry)
_TYPE_OF_Z = np.full(int(CHARGES.max()) + 2, -1, np.int8)
_TYPE_OF_Z[CHARGES] = np.arange(len(CHARGES))


def _rdkit_types(mol, where: str) -> np.ndarray:
    """An RDKit molecule's atom types, from the atomic numbers (an element molgen does not model: named, as
    :func:`_types` names it)."""
    n = mol.GetNumAtoms()  # by index: twice as fast as RDKit's atom iterator
    z = np.fromiter((mol.GetAtomWithIdx(i).GetAtomicNum() for i in range(n)), np.int64, n)
    out = _TYPE_OF_Z[np.minimum(z, len(_TYPE_OF_Z) - 1)]
    if (out < 0).any():
        return _types([a.GetSymbol() for a in mol.GetAtoms()], where)
    return _counted(out, where)


def _counted(out: np.ndarray, where: str) -> np.ndarray:
    if len(out) > MAX_ATOMS:
        raise BadMolecule(f"{where}: {len(out)} atoms, more than the {MAX_ATOMS} molgen evaluates")
    if len(out) == 0:
        raise BadMolecule(f"{where}: molecule with no atoms")
    return out


_NAME_KEY = re.compile(r'(?:^|\s)name=(?:"([^"]*)"|(\S+))')


def _frame_name(comment: str) -> str:
    """An extended-XYZ frame's ``name=`` value, else the comment line itself (plain XYZ)."""
    m = _NAME_KEY.search(comment)
    return (m.group(1) if m and m.group(1) is not None else m.group(2) if m else comment.strip())[:80]


def _read_text(path: Path) -> str:
    """A file's text, gunzipped when its name ends in .gz."""
    if is_gzipped(path):
        import gzip

        try:
            with gzip.open(path, "rt", encoding="utf-8-sig", errors="replace") as f:
                return f.read()
        except (OSError, EOFError) as e:  # not gzip data, or cut short
            raise MolgenError(f"{path}: not a readable gzip file ({e})") from None
    return Path(path).read_text(encoding="utf-8-sig", errors="replace")


def _read_stream(path: Path) -> str:
    """All text of standard input (``-``) or a pipe, gunzipped when it is gzip data."""
    import gzip

    data = sys.stdin.buffer.read() if str(path) == STDIO else Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise MolgenError(f"{path}: not readable gzip data ({e})") from None
    return data.decode("utf-8-sig", errors="replace")


def _sniffed_format(text: str, path: Path) -> str:
    """The format of molecules read from a stream (no extension to go by): SDF when a molfile ends in it, XYZ
    when its first line is an atom count."""
    if "M  END" in text or "$$$$" in text:
        return "sdf"
    first = next((ln.split()[0] for ln in text.splitlines() if ln.strip()), "")
    if first.isdigit():
        return "xyz"
    raise MolgenError(f"{path}: neither SDF nor XYZ by what it holds; give --format")


def read_xyz(path: Path, skip_invalid: bool = False, errors: list | None = None,
             limit: int | None = None, text: str | None = None) -> list[Molecule]:
    """Frames of an XYZ / extended XYZ file (or of ``text``, read from it): count line, comment line, then
    ``symbol x y z [...]`` lines (the first ``limit`` molecules only, when given)."""
    lines = (_read_text(path) if text is None else text).splitlines()
    mols: list[Molecule] = []
    i, frame = 0, 0
    while i < len(lines) and (limit is None or len(mols) < limit):
        if not lines[i].strip():
            i += 1
            continue
        start = i
        try:
            n = int(lines[i].split()[0])
            if n < 0:
                raise ValueError
        except ValueError:
            raise MolgenError(f"{path}:{i + 1}: expected an atom count, got {lines[i].strip()[:40]!r}") from None
        if i + 2 + n > len(lines):
            raise MolgenError(f"{path}:{i + 1}: frame {frame} announces {n} atoms but the file ends early")
        comment = lines[i + 1]
        syms, coords = [], []
        try:
            try:
                sym_col, x_col = xyz_columns(comment)
            except ValueError as e:
                raise BadMolecule(f"{path}:{i + 2}: {e}") from None
            need = max(sym_col + 1, x_col + 3)
            for k in range(n):
                ln = i + 2 + k
                tok = lines[ln].split()
                if len(tok) < need:
                    what = "'element x y z'" if need == 4 else f"{need} columns (its Properties line)"
                    raise BadMolecule(f"{path}:{ln + 1}: expected {what}, got {lines[ln].strip()[:40]!r}")
                try:
                    coords.append([float(t) for t in tok[x_col:x_col + 3]])
                except ValueError:
                    raise BadMolecule(f"{path}:{ln + 1}: bad coordinates {' '.join(tok[x_col:x_col + 3])!r}") from None
                syms.append(tok[sym_col])
            types = _types(syms, f"{path}:{start + 1} (molecule {frame})")
            mols.append(Molecule(types, np.array(coords, np.float64), name=_frame_name(comment)))
        except BadMolecule as e:
            if not skip_invalid:
                raise
            if errors is not None:
                errors.append(str(e))
        i += 2 + n
        frame += 1
    return mols


class _ParserErrors:
    """RDKit's parser errors while in scope, kept (RDKit >= 2025.09; they are kept even while RDKit's messages are
    held back, :func:`molgen.chem.rdkit_utils.quiet`): ``reason()`` is the first one, for a one-line message."""

    def __init__(self):
        from rdkit import rdBase

        capture = getattr(rdBase, "CaptureErrorLog", None)
        self._capture = capture() if capture else None

    def __enter__(self):
        if self._capture is not None:
            self._capture.__enter__()
        return self

    def __exit__(self, *exc):
        if self._capture is not None:
            self._capture.__exit__(*exc)

    def reason(self, lines_before: int = 0) -> str:
        """``lines_before``: lines of the file before the text RDKit parsed, added to the line it names."""
        try:
            text = self._capture.messages if self._capture is not None else ""
        except UnicodeDecodeError:  # RDKit quotes the bad bytes of a binary file
            return ""
        for line in text.splitlines():
            if "ERROR:" in line:
                why = re.sub(r"\bline (\d+)", lambda m: f"line {int(m.group(1)) + lines_before}",
                             line.split("ERROR:", 1)[1].strip())
                return " (RDKit: " + why[:120] + ")"
        return ""


SDF_CHUNK = 256  # records a worker process reads at a time
SDF_MIN_BYTES = 1 << 20  # smaller files are read in the calling process without looking further


def read_sdf(path: Path, skip_invalid: bool = False, errors: list | None = None,
             limit: int | None = None, workers: int | None = 1, text: str | None = None) -> list[Molecule]:
    """Molecules of an SDF file (or of ``text``, read from it) with their 3D coordinates and element symbols
    (explicit H kept; the first ``limit`` molecules only, when given). ``workers``: processes at most
    (:func:`molgen.workers.workers_for`; a file then is read whole into memory and its records are parsed a chunk
    at a time, in order)."""
    from molgen.workers import map_chunks, workers_for

    chunks: list[tuple] = [(str(path), text, 0, skip_invalid, limit)]
    w = 1
    size = path.stat().st_size if text is None else len(text)
    if workers != 1 and limit is None and size >= SDF_MIN_BYTES:
        text = _read_text(path) if text is None else text
        ends = _record_ends(text)
        cuts = [0, *ends[SDF_CHUNK - 1 :: SDF_CHUNK]]
        cuts += [len(text)] if cuts[-1] < len(text) else []
        spans = list(zip(cuts, cuts[1:]))
        lines_before = itertools.accumulate((text.count("\n", a, b) for a, b in spans[:-1]), initial=0)
        chunks = [(str(path), text[a:b], k * SDF_CHUNK, skip_invalid, None, n)
                  for k, ((a, b), n) in enumerate(zip(spans, lines_before))]
        w = workers_for(len(ends), workers)
    mols = []
    for part, bad in map_chunks(_read_sdf_records, chunks, w):
        mols += part
        if errors is not None:
            errors += bad
    return mols


def _record_ends(text: str) -> list[int]:
    """Where each record of SDF text ends: after each line that starts with ``$$$$``."""
    ends, i = [], 0
    while (i := text.find("$$$$", i)) >= 0:
        if i and text[i - 1] != "\n":  # inside a line
            i += 4
            continue
        i = text.find("\n", i) + 1 or len(text)
        ends.append(i)
    return ends


def _read_sdf_records(path: str, text: str | None, first: int, skip_invalid: bool, limit: int | None,
                      lines_before: int = 0):
    """(molecules, errors) of an SDF file's records, or of ``text``: the part of it that starts with record
    ``first``, after ``lines_before`` lines."""
    from rdkit import Chem

    from molgen.chem.rdkit_utils import quiet

    if text is None and is_gzipped(Path(path)):
        text = _read_text(Path(path))
    if text is not None:
        supplier = Chem.SDMolSupplier()
        supplier.SetData(text, sanitize=False, removeHs=False, strictParsing=True)
    else:
        supplier = Chem.SDMolSupplier(path, sanitize=False, removeHs=False, strictParsing=True)
    mols, errors = [], []
    with quiet():  # RDKit's warnings (a record marked 2D with z != 0, read as 3D) and errors not printed
        for k in range(len(supplier)):
            if limit is not None and len(mols) >= limit:
                break
            with _ParserErrors() as parser:
                mol = supplier[k]
            try:
                mols.append(_sdf_molecule(mol, f"{path}: molecule {first + k}", parser, lines_before))
            except BadMolecule as e:
                if not skip_invalid:
                    raise
                errors.append(str(e))
    return mols, errors


def _sdf_molecule(mol, where: str, parser: _ParserErrors, lines_before: int = 0) -> Molecule:
    """A molecule from one record RDKit parsed (None: it could not)."""
    if mol is None:
        raise BadMolecule(f"{where}: malformed record{parser.reason(lines_before)}")
    if mol.GetNumConformers() == 0:
        raise BadMolecule(f"{where}: no coordinates")
    types = _rdkit_types(mol, where)
    pos = np.array(mol.GetConformer().GetPositions(), np.float64)
    props = {p: mol.GetProp(p) for p in mol.GetPropNames()}
    if NONFINITE in props:  # written by molgen: the coordinates were not finite
        pos[:] = np.nan
    name = mol.GetProp("_Name").lstrip("\ufeff") if mol.HasProp("_Name") else ""  # a file's byte-order mark
    return Molecule(types, pos, name=name, props=props, drawn=not mol.GetConformer().Is3D())


def _natural_key(path: Path) -> list:
    """Sort key of a file name with its numbers compared as numbers (molecule_99 before molecule_100)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def folder_files(path: Path, fmt: str | None = None) -> list[Path]:
    """The molecule files of a folder in natural name order: the .sdf / .sd / .mol / .xyz / .extxyz ones (also
    gzipped), and with ``fmt`` "xyz" also the .txt ones (EDM writes each sample as an XYZ file, molecule_NNN.txt)."""
    suffixes = set(MOLECULE_SUFFIXES) | ({".txt"} if fmt and format_of(path, fmt) == "xyz" else set())
    files = sorted((p for p in path.iterdir() if molecule_suffix(p) in suffixes and p.is_file()), key=_natural_key)
    if not files:
        n_txt = sum(p.suffix.lower() == ".txt" for p in path.iterdir())
        hint = f" (--format xyz reads its {n_txt:,} .txt files as XYZ, as EDM writes its samples)" if n_txt else ""
        raise MolgenError(f"{path}: folder holds no .sdf or .xyz files{hint}")
    return files


def read_molecules(path: Path | str, fmt: str | None = None, skip_invalid: bool = False,
                   errors: list | None = None, limit: int | None = None, workers: int | None = 1) -> list[Molecule]:
    """Read a file (SDF or XYZ; ``fmt`` overrides the extension) or the molecule files of a folder
    (:func:`folder_files`; each read by its extension, the .txt ones as ``fmt``); with ``limit``, only the first
    molecules, as many (what comes after them is not read). ``workers``: SDF files in this many processes at most
    (:func:`read_sdf`)."""
    path = Path(path)
    if str(path) != STDIO and not path.exists():
        raise MolgenError(f"{path}: no such file or folder")
    if str(path) != STDIO and path.is_dir():  # "-" is standard input, even beside a folder of that name
        mols = []
        for f in folder_files(path, fmt):
            if limit is not None and len(mols) >= limit:
                break
            left = None if limit is None else limit - len(mols)
            for m in read_molecules(f, fmt if molecule_suffix(f) == ".txt" else None, skip_invalid, errors, left,
                                    workers):
                m.name = m.name or f.name  # a nameless molecule is named after its file, the link back to it
                mols.append(m)
        return mols
    text = None
    if is_stream(path):  # standard input or a pipe: read once, whole
        text = _read_stream(path)
        if not text.strip():
            raise MolgenError(f"{path}: nothing to read")
        f = format_of(path, fmt) if fmt or _format_of_suffix(path) else _sniffed_format(text, path)
    elif path.stat().st_size == 0:
        raise MolgenError(f"{path}: file is empty")
    else:
        f = format_of(path, fmt)
    mols = (read_sdf(path, skip_invalid, errors, limit, workers, text) if f == "sdf"
            else read_xyz(path, skip_invalid, errors, limit, text))
    if not mols and not (errors and skip_invalid):
        raise MolgenError(f"{path}: no molecules found")
    return mols
