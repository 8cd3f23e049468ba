"""Reading each atom's type from a network's last output: the element whose score is the highest, after a bias
per element is added (`molgen sample --type-bias N=0.2,O=0.2`; a model card's ``type_bias``, docs/models.md).

A network gives an atom it is sure of ONEHOT_SCALE (0.25) for that element and about 0 for the others, so a bias
from 0 to below ONEHOT_SCALE changes only the types the network was unsure of: where another element's score is
within the bias of the best one. A formula's or a fragment's atoms, given with certainty, keep their types.
"""

from __future__ import annotations

import numpy as np

from molgen import MolgenError
from molgen.chem.elements import N_TYPES, SYMBOLS, TYPE_OF_SYMBOL
from molgen.data.features import ONEHOT_SCALE


def parse_type_bias(text: str | None) -> dict[str, float] | None:
    """``--type-bias N=0.2,O=0.2`` as {element: bias}; ``0`` or ``none``: no bias ({}); None: the card's. Each bias
    is at least 0 and below ONEHOT_SCALE."""
    if text is None:
        return None
    if text.strip().lower() in ("0", "none"):
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        element, eq, value = part.strip().partition("=")
        try:
            b = float(value)
        except ValueError:
            b = float("nan")
        if not eq or element not in TYPE_OF_SYMBOL or not 0 <= b < ONEHOT_SCALE:
            raise MolgenError(f"--type-bias {text!r}: give ELEMENT=BIAS pairs, e.g. N=0.2,O=0.2 (elements "
                              f"{', '.join(SYMBOLS)}; each bias at least 0 and below {ONEHOT_SCALE:g}), or 0 for none")
        out[element] = b
    return out


def bias_text(bias: dict[str, float]) -> str:
    return ",".join(f"{e}={b:g}" for e, b in bias.items())


def read_types(h, bias: dict[str, float] | None = None) -> np.ndarray:
    """Each row's type: the highest of its first N_TYPES features (its type scores), ``bias`` added by element."""
    add = np.zeros(N_TYPES, np.float32)
    for element, b in (bias or {}).items():
        add[TYPE_OF_SYMBOL[element]] = b
    return np.argmax(np.asarray(h)[:, :N_TYPES] + add, axis=-1)
