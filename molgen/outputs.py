"""What `molgen sample` writes: its output file, report and JSON, checked before any work and written after it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from molgen import MolgenError
from molgen.display import console, count, report_to_stderr, say


def sample_output(out: Optional[str], fmt: Optional[str], json_path: Optional[str], fix: Optional[str],
                  report: bool, novelty: bool, data_dir: Optional[Path], keep=("all", False, False)):
    """`molgen sample`'s output file (a default name when none is given), format and report, checked before any
    work with what it keeps (``keep``: --keep, --unique, --novel); novelty, a figure of the report, needs one and
    the QM9 cache, and so does --novel. Then: the processes to judge it in, whether a report is made (printed, or
    written as JSON), and whether it shows novelty (asked for, or with --novel)."""
    from molgen.chem.io import format_of, output_file
    from molgen.data.qm9 import require_reference
    from molgen.io_utils import check_outputs, file_path, writes_stdout
    from molgen.keep import check_keep
    from molgen.workers import default_workers

    out, json_path = file_path(out, "-o"), file_path(json_path, "--json")  # as given: Path() drops a final /
    check_keep(*keep)
    _, _, novel = keep
    reported = report or json_path is not None
    if novelty and not reported:
        raise MolgenError("--novelty is a figure of the report: drop --no-report, or add --json FILE")
    out = output_file(out, fmt)
    report_to_stderr(check_outputs({"-o": out, "--json": json_path}, inputs=(fix,)))  # when one is standard output
    fmt = format_of(out, fmt or ("sdf" if writes_stdout(out) else None), strict=True)
    why = "--novel compares with" if novel else "--novelty compares with" if novelty else None
    require_reference(data_dir, f"{why} QM9's training split" if why else None)
    return out, fmt, default_workers(), reported, novelty or novel


def check_sample_room(model, n: int, seed: int, atoms, fragment, formula, keep: str, out: Path, fmt: str) -> None:
    """Before sampling: refuse an output file whose file system has no room for the molecules' atoms (a lower
    bound of its bytes, from the atom counts to be drawn; with --keep, which keeps other draws, none is known)."""
    from molgen.chem.write import least_bytes
    from molgen.io_utils import check_room
    from molgen.sample import sample_sizes

    if keep == "all":
        check_room(out, least_bytes(sample_sizes(model, n, seed, atoms, fragment, formula), fmt), "-o",
                   f"{count(n, 'molecule')} take{'s' if n == 1 else ''}")


def write_samples(res, n: int, out: Path, fmt: str, metrics, report: bool, json_path: Optional[str]) -> None:
    """`molgen sample`'s files (molecules, JSON), then what it says: where the molecules went, warnings, the
    report."""
    from molgen.chem.write import write_molecules
    from molgen.display import metrics_table
    from molgen.evaluate import write_json
    from molgen.io_utils import where
    from molgen.keep import kept_warning
    from molgen.sample import nonfinite_warning

    write_molecules(out, res.molecules, fmt)
    if json_path:  # the files first: what is said after them cannot cost them (a reader of the report gone)
        write_json(json_path, metrics, {"file": str(out), **res.settings})
    console.print(f"wrote {count(len(res.molecules), 'molecule')} to {where(out)} ({res.description}, "
                  f"{res.seconds:.1f} s sampling)", soft_wrap=True)
    for warning in filter(None, (kept_warning(res, n), nonfinite_warning(res.molecules, fmt))):
        say(warning)
    if report:
        console.print(metrics_table(metrics, f"samples: {where(out)}"))
