"""Process-wide JAX settings: a persistent compilation cache so repeated runs skip XLA compilation."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from molgen.stdio import to_stderr
from molgen.workers import usable_cores


def compilation_cache_dir() -> Path | None:
    """Where compiled XLA programs are kept: ``$MOLGEN_JAX_CACHE``, else <cache dir>/jax, or the user's own cache
    folder's where that cannot be written (a ``$MOLGEN_HOME`` shared read-only); None when MOLGEN_JAX_CACHE=off."""
    env = os.environ.get("MOLGEN_JAX_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    from molgen.data.qm9 import default_data_dir, user_cache_dir
    from molgen.io_utils import can_make

    path = default_data_dir() / "jax"
    return path if path.is_dir() and os.access(path, os.W_OK) or can_make(path) else user_cache_dir() / "jax"


def enable_compilation_cache(path: Path | str | None = None) -> None:
    """Cache compiled XLA programs on disk (:func:`compilation_cache_dir`); MOLGEN_JAX_CACHE=off disables."""
    import warnings

    import jax

    path = path or compilation_cache_dir()
    if path is None:
        return
    # a cache that cannot take an entry (a full disk) costs only the time it would have saved, as one that
    # cannot be made does: without a warning per compiled program
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    _remove_damaged_entries(Path(path))
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # all: small ones too (~0.5 s a run)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError):  # read-only home or an older JAX: run without the cache
        pass


_DAMAGED = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")


def _remove_damaged_entries(cache: Path) -> None:
    """An entry of the cache cut short (its write refused by a full disk, or killed) is never written again, so
    JAX would warn at every run that it cannot read it: its program's entries are removed instead, with one line,
    and written anew when it is compiled."""
    import warnings

    previous = warnings.showwarning
    if getattr(previous, "molgen_cache", None) == cache:
        return

    def show(message, category, filename, lineno, file=None, line=None):
        name = _DAMAGED.search(str(message))
        if name is None:
            return previous(message, category, filename, lineno, file, line)
        try:
            for entry in cache.glob(f"{glob.escape(name.group(1))}-*"):
                entry.unlink(missing_ok=True)
        except OSError:  # not ours to remove (a read-only cache): JAX's warning, as it is
            return previous(message, category, filename, lineno, file, line)
        to_stderr(f"warning: the compiled-program cache {cache} held a damaged entry for {name.group(1)} (written "
                  "when the disk was full, or killed): removed, and written again once compiled")

    show.molgen_cache = cache
    warnings.showwarning = show


def auto_cpu_devices(batch_size: int, cores: int | None = None, max_devices: int = 8, min_per_device: int = 8) -> int:
    """How many XLA CPU devices to train on: one per usable core (at most ``max_devices``), reduced until the
    batch splits evenly with at least ``min_per_device`` molecules per device."""
    n = max(1, min(cores if cores is not None else usable_cores(), max_devices))
    while n > 1 and (batch_size % n or batch_size // n < min_per_device):
        n -= 1
    return n


def configure_cpu_devices(n: int) -> bool:
    """Expose the CPU as ``n`` XLA devices, so that a data-parallel step runs one shard per core.

    XLA runs a single device's operations one after another, each spread over the cores, and most of a
    training step (gathers, segment sums, element-wise work on the per-pair arrays) parallelises poorly that way;
    one device per core keeps every core busy.  Only affects the CPU backend (a GPU stays the default device)
    and only before JAX starts its backends: returns False, changing nothing, when that is too late.
    """
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except (RuntimeError, AttributeError, ValueError):
        return False
    return True


# jaxlib 0.10's CPU backend hands reductions to YNNPACK, which runs some of the training step's reductions over
# the feature axis (the attention gate's gradient, one per block) far slower than XLA's own loops; without it
# training steps are 1.08-1.12x faster on 2 cores (docs/performance.md). Only for the release it was measured
# with: XLA aborts the process on a flag it does not know.
YNN_REDUCE_OFF = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"
GPU_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm6-plugin", "jax-rocm7-plugin")


def cpu_training_flags() -> str:
    """XLA flags that make training faster on this install's CPU backend ('' where none is known): jaxlib 0.10
    without a GPU plugin."""
    from importlib import metadata

    def installed(dist: str) -> bool:
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            return False

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""
    if not version.startswith("0.10.") or any(installed(p) for p in GPU_PLUGINS):
        return ""
    return YNN_REDUCE_OFF


# XLA's CPU loops use 256-bit vectors unless told otherwise. On a CPU with AVX-512, 512-bit ones make the default
# model's sampling call 0.85x the time, the main command 0.90x and the 256 x 9 network's call 0.84x (the teacher's
# calls that make a distillation's pairs); training steps as fast or a little faster (an Intel Xeon,
# docs/performance.md). The same function, rounded otherwise.
WIDE_VECTORS = "--xla_cpu_prefer_vector_width=512"


def has_avx512(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU has AVX-512 (its first processor's flags in Linux's /proc/cpuinfo; False
    where that cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def add_cpu_training_flags() -> None:
    """Add :func:`cpu_training_flags` to XLA_FLAGS, before JAX starts its backends, unless XLA_FLAGS already
    chooses YNNPACK's fusions."""
    _add_xla_flag(cpu_training_flags(), "ynn_fusion_type")


def add_cpu_vector_flags() -> None:
    """512-bit vectors (:data:`WIDE_VECTORS`) where the CPU has AVX-512, before JAX starts its backends, unless
    XLA_FLAGS already sets a vector width (`molgen sample` and `molgen train`)."""
    _add_xla_flag(WIDE_VECTORS if has_avx512() else "", "prefer_vector_width")


def cpu_vectors() -> str:
    """The vector width of XLA's CPU loops in `molgen sample` and `train`, and why: XLA_FLAGS' own, else 512-bit
    where the CPU has AVX-512 (:func:`add_cpu_vector_flags`), else XLA's default."""
    given = re.search(r"prefer_vector_width=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if given:
        return f"{given.group(1)}-bit vectors (XLA_FLAGS)"
    return "512-bit vectors (AVX-512)" if has_avx512() else "256-bit vectors (XLA's default)"


def _add_xla_flag(extra: str, key: str) -> None:
    """Append ``extra`` to XLA_FLAGS unless it is empty, XLA_FLAGS already mentions ``key`` or JAX has started
    its backends (too late for flags)."""
    flags = os.environ.get("XLA_FLAGS", "")
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # another JAX: leave the flags alone
        started = True
    if extra and not started and key not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


def setup_training_devices(batch_size: int, devices: int | None = None) -> None:
    """Before JAX starts its backends: the CPU split into ``devices`` (default: one per core, as the batch
    allows) unless XLA_FLAGS sets a device count, and XLA's CPU flags for training; then the compilation cache."""
    from molgen import MolgenError

    if devices is not None and batch_size % devices:
        raise MolgenError(f"batch size {batch_size} is not divisible by --devices {devices}")
    if devices is not None or "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        configure_cpu_devices(devices or auto_cpu_devices(batch_size))
    add_cpu_training_flags()
    add_cpu_vector_flags()
    enable_compilation_cache()


def start_devices() -> list:
    """JAX's devices, started now: a platform that cannot start (``JAX_PLATFORMS`` naming one that this install
    or this machine lacks, e.g. ``cuda`` without molgen's cuda extra or without a GPU) is one error line before any
    work, not JAX's traceback from deep inside the first array."""
    import jax

    from molgen import MolgenError

    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:  # AssertionError: no backend of that name (JAX 0.10)
        asked = os.environ.get("JAX_PLATFORMS", "").strip()
        why = (str(e).strip().splitlines() or ["no such platform in this install"])[0]
        raise MolgenError(f"JAX could not start its devices{f' for JAX_PLATFORMS={asked}' if asked else ''} "
                          f"({why}); a GPU needs molgen's cuda extra and an NVIDIA driver, and without "
                          f"JAX_PLATFORMS molgen runs on the CPU") from None


def init_distributed() -> None:
    """Join a multi-process run: ``jax.distributed.initialize()`` with the coordinator from
    JAX_COORDINATOR_ADDRESS and the process count and id from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set (else
    JAX detects a cluster such as SLURM). On CPUs the processes' collectives go through gloo."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older JAX without the option
        pass
    from molgen import MolgenError

    kw = {}
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(var):
            if not os.environ[var].strip().isdigit():
                raise MolgenError(f"--distributed: {var} must be a whole number, got {os.environ[var]!r}")
            kw[key] = int(os.environ[var])
    try:
        jax.distributed.initialize(**kw)
    except ValueError as e:  # JAX found no cluster and was told no coordinator
        raise MolgenError(f"--distributed: {str(e).rstrip('.')} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, "
                          "or run under a cluster manager such as SLURM)") from None
    refuse_hanging_collectives(jax.__version__, start_devices()[0].platform)


# JAX releases whose processes, on CPUs, hang in the first all-reduce of molgen's chunk of training steps (gloo).
HANGING_CPU_COLLECTIVES = ("0.12.1",)


def refuse_hanging_collectives(version: str, platform: str) -> None:
    """A multi-process run on CPUs with a JAX release in :data:`HANGING_CPU_COLLECTIVES` is one error, not a run
    that hangs in its first chunk (molgen's requirements leave those releases out; another install can bring one)."""
    from molgen import MolgenError

    if platform == "cpu" and version in HANGING_CPU_COLLECTIVES:
        raise MolgenError(f"--distributed on CPUs hangs with JAX {version} (its processes wait in their first "
                          f"all-reduce); install another release: pip install 'jax!={version}' 'jaxlib!={version}'")
