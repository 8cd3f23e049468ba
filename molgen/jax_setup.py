"""Process-wide JAX settings: a persistent compilation cache so repeated runs skip XLA compilation."""

from __future__ import annotations

import os
from pathlib import Path


def enable_compilation_cache(path: Path | str | None = None) -> None:
    """Cache compiled XLA programs on disk (``$MOLGEN_JAX_CACHE`` or <cache dir>/jax); MOLGEN_JAX_CACHE=off disables."""
    import jax

    env = os.environ.get("MOLGEN_JAX_CACHE")
    if env == "off":
        return
    if path is None:
        if env:
            path = Path(env)
        else:
            from molgen.data.qm9 import default_data_dir

            path = default_data_dir() / "jax"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError):  # read-only home or an older JAX: run without the cache
        pass
