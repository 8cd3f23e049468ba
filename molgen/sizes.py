"""How many atoms each molecule has: ``--atoms`` read and checked, and the sizes drawn from a model's training
histogram of atom counts (EDM's), whole or within a range."""

from __future__ import annotations

import numpy as np

from molgen import MolgenError
from molgen.chem.io import MAX_ATOMS


BATCH, PAIR_BUDGET = 1000, 1_000_000  # --batch-size's default, and the most atom pairs a default batch holds


def default_batch_size(cfg, atoms: int | tuple[int, int] | None = None) -> int:
    """--batch-size's default: :data:`BATCH` molecules, fewer when the largest molecule asked for (``atoms``, else
    the largest the model was trained on) has more than 32 atoms, so that a batch holds at most
    :data:`PAIR_BUDGET` ordered atom pairs: the network's memory grows with them (``--atoms 100`` in batches of
    1000, ~10 million pairs, took 9 GB). It depends on the request alone, so a command draws the same molecules on
    every machine."""
    hi = atoms[1] if isinstance(atoms, tuple) else atoms
    if hi is None:
        trained = np.flatnonzero(np.asarray(cfg.data.size_hist) > 0)
        hi = int(trained[-1]) if len(trained) else 1
    return max(1, min(BATCH, PAIR_BUDGET // max(hi * (hi - 1), 1)))


def parse_atoms(text: str | None) -> int | tuple[int, int] | None:
    """``--atoms``: a count (``19``) or an inclusive range (``15-20``)."""
    if text is None:
        return None
    parts = text.replace(" ", "").split("-")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise MolgenError(f"--atoms: give a count (e.g. 19) or a range (e.g. 15-20), got {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo > hi:
        raise MolgenError(f"--atoms {text}: a range goes from the smaller count to the larger ({hi}-{lo})")
    return lo if lo == hi else (lo, hi)


def atoms_text(lo: int, hi: int) -> str:
    """How ``--atoms`` reads for a count (lo == hi) or a range."""
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def check_whole(name: str, v) -> None:
    """Refuse a count that is not a whole number (``None``: not given)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
        raise MolgenError(f"{name} must be a whole number, got {v!r}")


def check_request(cfg, n: int, batch_size: int | None = None, atoms: int | tuple[int, int] | None = None,
                  above: int = 0) -> np.ndarray | None:
    """Check a request's counts before any work; return the atom-count histogram to draw from (None with a count
    ``atoms``), restricted to sizes above ``above`` (a fragment's size) and to a range ``atoms`` = (lo, hi)."""
    check_whole("-n", n)
    check_whole("--batch-size", batch_size)
    if n < 1:
        raise MolgenError("-n must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise MolgenError("--batch-size must be at least 1")
    lo, hi = atoms if isinstance(atoms, tuple) else (atoms, atoms) if atoms is not None else (0, MAX_ATOMS)
    what = f"--atoms {atoms_text(lo, hi)}"
    if atoms is not None and not 1 <= lo <= hi <= MAX_ATOMS:
        raise MolgenError(f"--atoms must be in 1 .. {MAX_ATOMS} (the largest molecule molgen reads back), got "
                          f"{atoms_text(lo, hi)}")
    if hi < above:
        raise MolgenError(f"the fragment has {above} atoms, more than {what}")
    if isinstance(atoms, int):
        return None
    hist = np.asarray(cfg.data.size_hist, np.float64).copy()
    hist[: max(lo, above + 1 if above else 0)] = 0.0
    hist[hi + 1 :] = 0.0
    if hist.sum() > 0:
        return hist
    if atoms is not None:
        trained = np.flatnonzero(np.asarray(cfg.data.size_hist) > 0)
        sizes = f" (its sizes: {trained[0]}-{trained[-1]})" if len(trained) else ""
        raise MolgenError(f"{what}: the model was trained on no molecule of {lo} to {hi} atoms"
                          + (f" larger than the fragment's {above}" if above else "") + f"{sizes}; give a count or "
                          "another range")
    raise MolgenError("the model has no atom-count histogram; pass --atoms" if not above else
                      f"the model was trained on no molecule larger than the fragment's {above} atoms; pass --atoms")


def draw_sizes(cfg, n: int, seed: int, atoms: int | tuple[int, int] | None = None, stream: int = 7,
               above: int = 0) -> np.ndarray:
    """Atom counts: ``atoms`` each, or drawn from the training histogram with the random stream (seed, stream),
    restricted to sizes above ``above`` (a fragment's size) and to a range ``atoms`` = (lo, hi)."""
    hist = check_request(cfg, n, atoms=atoms, above=above)
    if hist is None:
        return np.full(n, atoms, np.int32)
    rng = np.random.default_rng([seed, stream])
    return rng.choice(len(hist), size=n, p=hist / hist.sum()).astype(np.int32)
