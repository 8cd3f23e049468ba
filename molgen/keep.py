"""``molgen sample --keep``: rounds of sampling until N molecules pass (valid, stable; with ``--unique`` each of
another SMILES, with ``--novel`` none of the training split's), judged by :mod:`molgen.evaluate`'s per-molecule
results."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from molgen import MolgenError
from molgen.chem.io import Molecule
from molgen.models import Model
from molgen.sample import Samples, sample
from molgen.sizes import check_whole

# Which molecules `--keep` keeps (their per-molecule results from molgen.evaluate): `valid` is EDM's validity
# (RDKit sanitizes the molecule built from its bonds) in one piece; `stable` adds that every atom is stable.
KEEP = {"all": None, "valid": lambda p: p.valid and p.n_fragments == 1,
        "stable": lambda p: p.valid and p.n_fragments == 1 and p.stable}
MAX_DRAWS, GROWTH = 100, 8  # --keep draws at most 100 per molecule asked for, a round at most 8x the draws before it


def check_keep(keep: str, unique: bool = False, novel: bool = False) -> None:
    """--keep names one of :data:`KEEP`; --unique and --novel need molecules with SMILES (valid ones)."""
    if keep not in KEEP:
        raise MolgenError(f"--keep must be one of {', '.join(KEEP)}, got {keep!r}")
    for name, given in (("--unique", unique), ("--novel", novel)):
        if given and KEEP[keep] is None:
            raise MolgenError(f"{name} compares SMILES, which only valid molecules have: add --keep valid or stable")


def kept_warning(res: Samples, n: int) -> str | None:
    """A warning when --keep kept fewer molecules than asked for (the draw limit was reached)."""
    if not res.drawn or len(res.molecules) >= n:
        return None
    return (f"warning: --keep {res.settings['molgen_keep']}: {len(res.molecules):,} of the {n:,} molecules asked for "
            f"passed in {res.drawn:,} drawn (at most {MAX_DRAWS} per molecule asked for)")


def round_seed(seed: int, r: int) -> int:
    """The seed of --keep's r-th round of drawing: ``seed`` itself first (so the first round draws what plain
    sampling draws), then seeds derived from (seed, r)."""
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0] % 2**31)


def sample_kept(model: Model, n: int, keep: str = "all", seed: int = 0, batch_size: int | None = None,
                on_round: Callable[[int], None] | None = None, max_draws: int | None = None, unique: bool = False,
                known: set[str] | None = None, **kw) -> Samples:
    """``n`` molecules that pass ``keep`` (:data:`KEEP`), with ``unique`` each of another SMILES (EDM's uniqueness)
    and with ``known`` (SMILES, e.g. the training split's for ``--novel``) none of those: rounds of :func:`sample`
    (the first with ``seed``, the next with :func:`round_seed`), each sized by the share kept so far (at most
    GROWTH x the molecules drawn before), until ``n`` are kept or ``max_draws`` (default MAX_DRAWS x n) are drawn;
    then fewer are returned (``drawn`` says how many were drawn; ``seconds`` counts the judging too), none is a
    MolgenError. ``on_round(m)`` is told of each round's m molecules first; ``kw`` goes to :func:`sample`."""
    novel = known is not None
    check_keep(keep, unique, novel)
    if KEEP[keep] is None:
        if on_round:
            on_round(n)
        return sample(model, n, seed=seed, batch_size=batch_size, **kw)
    check_whole("-n", n)
    if n < 1:
        raise MolgenError("-n must be at least 1")
    from molgen.evaluate import judge

    test, limit = KEEP[keep], max(1, max_draws or MAX_DRAWS * n)
    kept: list[Molecule] = []
    seen: set[str] = set()
    known = known or set()
    drawn, r, res, t0, shapes = 0, 0, None, time.time(), []  # rounds share the compiled batch shapes
    while len(kept) < n and drawn < limit:
        need = n - len(kept)
        share = len(kept) / drawn if drawn else 1.0
        m = min(limit - drawn, max(need, int(np.ceil(1.2 * need / max(share, 0.01)))), GROWTH * drawn or limit)
        if on_round:
            on_round(m)
        res = sample(model, m, seed=round_seed(seed, r), batch_size=batch_size, shapes=shapes, **kw)
        for mol, p in zip(res.molecules, judge(res.molecules)):
            if test(p) and not (unique and p.smiles in seen) and p.smiles not in known:
                kept.append(mol)
                seen.add(p.smiles)
        drawn, r = drawn + m, r + 1
    kept = kept[:n]
    what = keep + (", unique" if unique else "") + (", novel" if novel else "")
    if not kept:
        raise MolgenError(f"--keep {what}: none of the {drawn:,} molecules drawn passed; nothing written")
    settings = {**res.settings, "molgen_seed": seed, "molgen_keep": what, "molgen_drawn": drawn}
    for i, mol in enumerate(kept):  # each records the command's seed, not its round's
        mol.name = f"molgen_{i}"
        mol.props.update(molgen_seed=seed, molgen_keep=what)
    how = f"kept {len(kept):,} of {drawn:,} drawn ({what})"
    return Samples(kept, settings, res.calls, time.time() - t0, f"{res.description}; {how}", drawn)
