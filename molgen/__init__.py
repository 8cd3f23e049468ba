"""molgen: 3D molecule generation with E(3)-equivariant diffusion and consistency models in JAX."""

__version__ = "0.1.0"


class MolgenError(Exception):
    """An error caused by the user's input: the CLI prints it in one line and exits with code 2."""


def did_you_mean(name, names) -> str:
    """"did you mean X? " for the one of ``names`` closest to a mistyped ``name``, or "" when none is close."""
    import difflib

    near = difflib.get_close_matches(str(name), [str(n) for n in names], n=1)
    return f"did you mean {near[0]}? " if near else ""
