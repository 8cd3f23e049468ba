"""molgen: 3D molecule generation with E(3)-equivariant diffusion and consistency models in JAX."""

__version__ = "0.1.0"


class MolgenError(Exception):
    """An error caused by the user's input: the CLI prints it in one line and exits with code 2."""
