"""EDM's variance-preserving diffusion on the zero-centre-of-mass subspace."""
