"""Atomic file writes (write to a temporary file in the same folder, then rename over the target), and reading
back what molgen wrote: a damaged file is one line (MolgenError). Standard input and output (``-``), pipes and
devices such as /dev/null are read and written in place: a stream cannot be replaced."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from glob import escape as glob_escape
from contextlib import contextmanager
from pathlib import Path

from molgen.stdio import to_stderr

NPZ_DAMAGE = (ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a damaged .npz raises
STDIO = "-"  # as a file name: standard input (read) or standard output (write)
# the process's umask, read once (reading it means setting it): a new file gets 0o666 less it, as open() gives
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_stream(path: Path | str) -> bool:
    """``-``, or a path that exists as neither a regular file nor a folder: a pipe, a terminal, /dev/stdout,
    /dev/null. Such a file is read or written in place, never replaced."""
    if str(path) == STDIO:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there (yet), or a link to nothing
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def writes_stdout(path: Path | str | None) -> bool:
    """Whether writing ``path`` writes this process's standard output (``-``, /dev/stdout, /dev/fd/1, ...)."""
    if path is None:
        return False
    if str(path) == STDIO:
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except (OSError, ValueError):  # no such file, or no standard output
        return False


def where(path: Path | str) -> str:
    """An output's name in what a command says: "standard output" for ``-`` (or /dev/stdout), else the path."""
    return "standard output" if writes_stdout(path) else str(path)


def read_json_object(path: Path | str, what: str = "a JSON object") -> dict:
    """A JSON file holding one object (a damaged one, or another kind of JSON: one line, MolgenError)."""
    from molgen import MolgenError

    try:
        d = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise MolgenError(f"{path}: damaged, not JSON ({e})") from None
    if not isinstance(d, dict):
        raise MolgenError(f"{path}: not {what} (a JSON {type(d).__name__}, not an object)")
    return d


STALE_S = 3600.0  # a temporary file untouched this long was left by a write that never ended (a killed process)
TEMP_EXTRA = 16  # what a temporary name adds to its stem: "." + stem + "." + 8 random characters + ".tmp", 2 spare


def temp_stem(folder: Path, name: str) -> str:
    """The stem of the temporary files that write ``name`` in ``folder``: the name itself, or, where that would make
    a temporary name longer than the file system allows (a name near its limit, ~255 bytes), the name cut short
    and marked with a hash of it, so that each file asked for still has stems of its own."""
    import hashlib

    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such query here (Windows), or the folder is not there yet
        limit = 255
    if len(name.encode()) + TEMP_EXTRA <= limit:
        return name
    mark = "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    cut = name
    while len(cut.encode()) + len(mark) + TEMP_EXTRA > limit:
        cut = cut[:-1]
    return cut + mark


@contextmanager
def atomic_path(dest: Path | str):
    """Yield a temporary path beside ``dest``; on success it is renamed to ``dest``, on error removed. Temporary
    files that an interrupted earlier write to the same place left behind (a killed process: untouched for
    STALE_S) are removed; a younger one may be another process's write in progress (two jobs filling one
    cache) and is left to it. ``-``: the temporary file is copied to standard output on success (whole or not at
    all, as a file); another stream (:func:`is_stream`) is yielded itself, to be written in place. A link to a file
    keeps pointing to it; the file it names is replaced, keeping its permissions (a new file gets the umask's)."""
    if str(dest) == STDIO:
        with tempfile.TemporaryDirectory(prefix="molgen-") as folder:
            yield Path(folder) / "out"
            try:
                with open(Path(folder) / "out", "rb") as f:
                    shutil.copyfileobj(f, sys.stdout.buffer)
                sys.stdout.flush()
            except BrokenPipeError:  # its reader stopped early: the command line ends quietly
                raise
            except OSError as e:  # a full disk behind the redirection: say where
                raise OSError(e.errno, e.strerror, "standard output") from None
        return
    if is_stream(dest):
        with naming_errors(dest):
            yield Path(dest)
        return
    dest = Path(os.path.realpath(dest)) if Path(dest).is_symlink() else Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stem = temp_stem(dest.parent, dest.name)
    for stale in dest.parent.glob("." + glob_escape(stem) + ".*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_S:
                stale.unlink()
        except FileNotFoundError:  # its writer finished (or another cleaned it) meanwhile
            pass
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + stem + ".", suffix=".tmp", dir=dest.parent)
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(dest)) from None
    os.close(fd)
    # mkstemp makes 0600 files: a new file gets the mode open() would give it, a replaced one keeps its own
    try:
        mode = stat.S_IMODE(os.stat(dest).st_mode) if dest.is_file() else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
    except OSError as e:
        os.unlink(tmp)
        raise OSError(e.errno, e.strerror, str(dest)) from None
    try:
        with naming_errors(dest, tmp):
            yield Path(tmp)
            os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def naming_errors(dest, tmp=None):
    """A file system error in writing ``dest`` names ``dest``: a failed write (a full disk; a buffered one fails at
    its flush) names no file, and a failure on the temporary file ``tmp`` names that one."""
    try:
        yield
    except OSError as e:
        if e.filename not in (None, tmp, str(tmp)):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(dest)) from None


# the molecule files molgen reads, by extension (each also gzip-compressed, + ".gz"), and what a folder of
# molecules is read for
MOLECULE_SUFFIXES = {".sdf": "sdf", ".sd": "sdf", ".mol": "sdf", ".xyz": "xyz", ".extxyz": "xyz"}


def is_gzipped(path: Path | str) -> bool:
    return Path(path).suffix.lower() == ".gz"


def molecule_suffix(path: Path | str) -> str:
    """A molecule file's own extension, lower case, under a ".gz" (out.sdf.gz -> ".sdf")."""
    path = Path(path)
    return (Path(path.stem) if is_gzipped(path) else path).suffix.lower()


def file_path(value: str | None, what: str) -> Path | None:
    """A file option's value as a Path (None stays None), refusing one that ends with a separator: that names a
    folder, and Path() would drop the separator silently (``-o out.sdf/`` would write the file out.sdf)."""
    from molgen import MolgenError

    if value is not None and value.endswith(("/", os.sep)) and value != os.sep:
        raise MolgenError(f"{what} {value} names a folder (it ends with {value[-1]}); give a file name")
    return None if value is None else Path(value)


def check_writable(path: Path | str | None, what: str = "output", inputs=(), suffixes=()) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, a missing folder, read-only,
    one of the command's ``inputs`` (it would be overwritten), or a file without one of ``suffixes`` when they are
    given (a stream, such as standard output, takes the first one's format). None: no output, nothing to check."""
    from molgen import MolgenError

    if path is None:
        return
    if suffixes and Path(path).suffix.lower() not in suffixes and not is_stream(path):
        raise MolgenError(f"{what} {path}: give a {' or '.join(suffixes)} file")
    if is_stream(path):  # written in place
        if str(path) != STDIO and not os.access(path, os.W_OK):
            raise MolgenError(f"{what} {path}: not writable")
        return
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    for src in inputs:
        if src is None or not Path(src).exists() or not path.exists():
            continue
        src = Path(src)
        read = path.samefile(src) or (src.is_dir() and path.parent.samefile(src) and molecule_suffix(path) in MOLECULE_SUFFIXES)
        if read:
            raise MolgenError(f"{what} {path} is also an input of this command; writing it would overwrite it")
    if path.is_dir():
        raise MolgenError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise MolgenError(f"{what} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MolgenError(f"{what} {path}: not writable")
    if (why := _cannot_write_into(path.parent)) is not None:
        raise MolgenError(f"{what} {path}: cannot write into {path.parent} ({why})")


def check_room(path: Path | str, need: int, what: str, content: str, is_folder: bool = False) -> None:
    """Refuse, before any work, to write at least ``need`` bytes to the file ``path`` (``is_folder``: into the
    folder ``path``) where its file system has less room (what a user may take of it), e.g. "-o
    out.sdf: 1,000 molecules take at least 1.29 MiB; /tmp has 0.11 MiB free" for ``content`` "1,000 molecules
    take". A stream, or a file system that tells no size, is not checked."""
    from molgen import MolgenError

    if is_stream(path):
        return
    folder = Path(os.path.realpath(path)) if is_folder else Path(os.path.realpath(path)).parent
    while not folder.is_dir() and folder != folder.parent:  # a new run's folder: where it will be made
        folder = folder.parent
    try:
        total, _, free = shutil.disk_usage(folder)
    except OSError:  # not knowable: the write itself will tell
        return
    if total and need > free:
        raise MolgenError(f"{what} {path}: {content} at least {mebibytes(need)}; {folder} has {mebibytes(free)} free")


def mebibytes(n: int) -> str:
    """A byte count for people: '0.27 MiB', '1.9 GiB'."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _cannot_write_into(folder: Path) -> str | None:
    """Why nothing can be made in ``folder``, None when something can: tried with a temporary folder, which also
    tells what access() cannot (a superuser in a folder such as /proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".molgen-", dir=folder))
    except OSError as e:
        return e.strerror
    return None


def check_folder(path: Path | str, what: str) -> None:
    """Refuse, before any work, an output folder that could not be made or written into: a file, under a file, or
    in a folder molgen cannot write (:func:`_cannot_write_into`)."""
    from molgen import MolgenError

    path = base = Path(path)
    if path.exists() and not path.is_dir():
        raise MolgenError(f"{what} {path}: is a file; give a folder")
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise MolgenError(f"{what} {path}: {base} is a file, not a folder")
    if (why := _cannot_write_into(base)) is not None:
        raise MolgenError(f"{what} {path}: cannot write into {base} ({why})")


def unused_path(path: Path | str) -> Path:
    """``path`` if nothing is there yet, else the first free of stem-2.ext, stem-3.ext, ... beside it: a default
    output name never replaces a file the user did not name."""
    path = Path(path)
    candidate, k = path, 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def atomic_write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text)


def keep_if_possible(save, path: Path | str, what: str) -> None:
    """Run ``save()``, which keeps something derived (computed again when it is missing) at ``path``; where it
    cannot be written (a read-only shared cache, a full disk) the work goes on without it, saying so on stderr.
    The folders up to ``path`` are made first."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save()
    except OSError as e:
        to_stderr(f"warning: {path}: {e.strerror or e}: {what} not kept, so computed again each time")


def can_make(path: Path | str) -> bool:
    """Whether ``path`` can be written: its nearest existing parent is a folder that can be written into (not a
    file, under which nothing can be made)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def atomic_write_bytes(dest: Path | str, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(data)


def check_outputs(outputs: dict, inputs=()) -> bool:
    """:func:`check_writable` for each output, named by its option: {"-o": path, "--json": None, ...}; two options
    naming the same file are refused (the second written would replace the first), but for /dev/null, which keeps
    nothing. True when one of them is standard output (a command's report then goes elsewhere)."""
    from molgen import MolgenError

    seen: dict = {}
    for what, path in outputs.items():
        check_writable(path, what, inputs)
        if path is None or str(path) == os.devnull:
            continue
        key = "standard output" if writes_stdout(path) else Path(path).resolve()
        if key in seen and key == "standard output":
            raise MolgenError(f"{seen[key]} and {what} both write to standard output; send one of them to a file")
        if key in seen:
            raise MolgenError(f"{seen[key]} and {what} name the same file {path}; give each its own")
        seen[key] = what
    return "standard output" in seen
