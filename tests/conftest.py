import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The tests run tiny programs, so XLA's compilation is most of their time; without LLVM's optimisation passes
# it takes half as long (the same programs, rounded slightly differently), and the classic fusion code generator
# in one thread (not the MLIR fusion emitters, split over threads) saves another ~30 % of CPU time, which matters
# with one test process per core (jaxlib 0.10; later releases have no classic generator, and XLA aborts on a
# flag it does not know). Subprocesses add FAST_COMPILE too.
from importlib import metadata  # noqa: E402

_CLASSIC_EMITTERS = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2]) < (0, 11)
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                + ("--xla_cpu_use_fusion_emitters=false " if _CLASSIC_EMITTERS else "")
                + "--xla_cpu_parallel_codegen_split_count=1")
# molgen train's CPU flags are added here too: in-process, only a first training call could still add them.
from molgen.jax_setup import cpu_training_flags  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} {cpu_training_flags()}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Identical programs compiled by several tests (or train() calls) are compiled once per session."""
    from molgen.jax_setup import enable_compilation_cache

    # under pytest-xdist the workers share one cache (a partly written entry read by another worker is a
    # warning and a recompilation, never a wrong program: entries are compressed and checked)
    base = tmp_path_factory.getbasetemp()
    path = base.parent / "jax_cache" if os.environ.get("PYTEST_XDIST_WORKER") else base / "jax_cache"
    path.mkdir(exist_ok=True)
    os.environ["MOLGEN_JAX_CACHE"] = str(path)  # the CLI commands called by tests use the same cache
    enable_compilation_cache(path)


@pytest.fixture
def rng(request):
    """Random draws seeded from the test's id: the same every run, so a failure can be repeated."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def random_rotation(rng, reflect=False):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q.astype(np.float64)


def random_molecules(rng, sizes, scale=1.5):
    pos, typ = [], []
    for n in sizes:
        x = rng.normal(size=(n, 3)) * scale
        pos.append((x - x.mean(0)).astype(np.float32))
        typ.append(rng.integers(0, 5, size=n).astype(np.int32))
    return pos, typ


DATA_CSV = __import__("pathlib").Path(__file__).parent / "data" / "qm9pack_mini.csv"


def load_script(relpath: str):
    """A script of the repository that is not part of the package (benchmarks/, scripts/), as a module."""
    import importlib.util

    path = DATA_CSV.parents[2] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mini_ds():
    from molgen.data import qm9, sources

    return qm9.build_dataset(sources.read_qm9pack_csv([DATA_CSV]))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A QM9 cache made from the 59-molecule fixture (through the same code as `molgen download --from`)."""
    from molgen.data import sources

    d = tmp_path_factory.mktemp("qm9cache")
    sources.download(d, from_path=DATA_CSV)
    return d


# The tests' network: the `tiny` preset's 32 features in one equivariant block, not two. The tests of the loop,
# the files, the samplers and the command line need a network, not a deep one, and one block nearly halves what every
# program they compile holds (the suite took 6:55 against 8:45-9:09 on the same 2 cores, 2026-12-05); the
# network's own tests (test_egnn.py, test_pairgrad.py) build deeper ones. TINY: the same, as `molgen train` options.
TINY_LAYERS = 1
TINY = ("--model", "tiny", "--set", f"model.n_layers={TINY_LAYERS}")


def tiny_net():
    from molgen.nn.egnn import PRESETS

    return PRESETS["tiny"].replace(n_layers=TINY_LAYERS)


def tiny_config(ds, objective="diffusion", **optim):
    """A tiny network's run config for an objective, completed on the data set ``ds`` (consistency settings,
    histogram), with the given optimiser settings."""
    from molgen.config import OptimConfig, RunConfig
    from molgen.consistency.ict import ConsistencyConfig
    from molgen.objectives import get_objective

    cons = ConsistencyConfig() if objective == "ct" else None
    cfg = RunConfig(objective=objective, model=tiny_net(), consistency=cons, optim=OptimConfig(**optim))
    return get_objective(objective).configure(cfg, ds, None)


def tiny_models(size_hist=(0, 0, 0, 0, 0, 0, 2, 3, 5, 1)):
    """Untrained tiny models for sampling tests (their parameters perturbed, so that no output is trivially
    zero): a diffusion model, a consistency model, and the consistency model stacked with two of the diffusion
    model's stages; molecules of the sizes ``size_hist`` holds (default 6-9 atoms)."""
    import jax
    import jax.numpy as jnp

    from molgen.config import DataConfig, RunConfig
    from molgen.consistency.ict import ConsistencyConfig
    from molgen.consistency.stack import stack_model
    from molgen.models import Model
    from molgen.networks import init_params

    def noisy(cfg, seed):
        r = np.random.default_rng(seed)
        p = init_params(cfg, seed)
        return jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(r.normal(size=a.shape), a.dtype), p)

    hist = DataConfig(size_hist=tuple(size_hist))
    diff = RunConfig(model=tiny_net(), data=hist)
    cons = RunConfig(objective="ct", model=tiny_net(), consistency=ConsistencyConfig(sigma_data_x=1.4,
                     sigma_data_h=0.2), diffusion=None, data=hist)
    d, c = Model(diff, noisy(diff, 0)), Model(cons, noisy(cons, 1))
    scfg, sparams = stack_model(cons, c.params, diff, d.params, 2)
    return d, c, Model(scfg, sparams)


def cli(*args):
    """Run the command line in-process: the result (exit code, output)."""
    from typer.testing import CliRunner

    from molgen.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, *fragments):
    """A refused command: exit code 2, no traceback, one error line (the last; progress may precede it)
    naming what is wrong."""
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert "Traceback" not in res.output, res.output
    assert sum("error" in line.lower() for line in lines) == 1, res.output
    assert "error" in lines[-1].lower(), res.output
    for f in fragments:
        assert f in lines[-1], res.output
