"""Extended XYZ's comment line: which columns of a frame's atom lines hold the element symbols and the positions."""

from __future__ import annotations

import re

_PROPERTIES = re.compile(r"(?:^|\s)properties=(\"?)([^\s\"]+)\1", re.IGNORECASE)


def xyz_columns(comment: str) -> tuple[int, int]:
    """The columns of an XYZ frame's element symbols and of its x (y, z follow): 0 and 1, or where an extended XYZ
    comment line's ``Properties=name:type:columns:...`` puts ``species`` and ``pos`` (the format allows any order:
    forces, charges or tags may come first). A ValueError says what that line lacks."""
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
    species, pos = at.get("species"), at.get("pos")
    if species is None or pos is None or species[1:] != ("S", 1) or pos[1:] != ("R", 3):
        raise ValueError(f"its Properties={m.group(2)[:60]} names no species:S:1 and pos:R:3 columns")
    return species[0], pos[0]
