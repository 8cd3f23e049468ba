"""Extended XYZ's comment line: which columns of a frame's atom lines hold the element symbols and the positions."""

from __future__ import annotations

import re

_PROPERTIES = re.compile(r"(?:^|\s)properties=(\"?)([^\s\"]+)\1", re.IGNORECASE)


def xyz_columns(comment: str) -> tuple[int, int]:
    """The columns of an XYZ frame's elements and of its x (y, z follow): 0 and 1, or where an extended XYZ comment
    line's ``Properties=name:type:columns:...`` puts ``species`` (else ``Z``, atomic numbers, as ASE reads them)
    and ``pos`` (the format allows any order: forces, charges or tags may come first). A ValueError says what that
    line lacks."""
    m = _PROPERTIES.search(comment)
    if m is None:
        return 0, 1
    parts = m.group(2).split(":")
    if len(parts) % 3 or not all(c.isdigit() for c in parts[2::3]):
        raise ValueError(f"cannot read its comment line's Properties={m.group(2)[:60]}")
    at, col = {}, 0
    for name, kind, width in zip(parts[::3], parts[1::3], parts[2::3]):
        at[name.lower()] = (col, kind.upper(), int(width))
        col += int(width)
    kinds = {"species": ("S", 1), "z": ("I", 1), "pos": ("R", 3)}
    found = {name: at[name][0] for name, kind in kinds.items() if name in at and at[name][1:] == kind}
    element = found.get("species", found.get("z"))
    if element is None or "pos" not in found:
        raise ValueError(f"its Properties={m.group(2)[:60]} names no species:S:1 (or Z:I:1) and pos:R:3 columns")
    return element, found["pos"]
