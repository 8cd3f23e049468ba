"""The package's structure, checked: modules import only downward (no cycle, lazy imports inside functions
included), the command line is a layer over the library that nothing in the library imports, `molgen --help`
starts without JAX or RDKit, and the choices the command line lists are the library's registries."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import typer

PACKAGE = Path(__file__).resolve().parents[1] / "molgen"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the molgen modules it imports anywhere in its file (``from a import b`` counts a.b when b is a
    module); the package itself (``from molgen import MolgenError``) is the bottom and not counted."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in mods and m not in (name, "molgen")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_import_only_downward():
    graph = import_graph()
    assert len(graph) > 30 and "molgen.nn.egnn" in graph["molgen.diffusion.edm"]  # the graph was read
    assert cycles(graph) == []


def test_the_command_line_is_a_layer_over_the_library():
    graph = import_graph()
    assert {m for m, deps in graph.items() if "molgen.cli" in deps} == {"molgen.__main__"}
    for name, path in _modules().items():
        if name not in ("molgen.cli", "molgen.__main__"):
            assert not re.search(r"^\s*(import typer|from typer)", path.read_text(), re.M), name


def test_help_starts_without_jax_or_rdkit():
    code = ("import sys, molgen.cli; heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', 'rdkit', 'ase') "
            "if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_evaluate_runs_without_jax(tmp_path):
    """`molgen evaluate` judges molecules with NumPy and RDKit alone: JAX is never imported (nor its start-up
    paid)."""
    f = tmp_path / "methane.xyz"
    f.write_text("5\n\nC 0 0 0\nH 0.63 0.63 0.63\nH -0.63 -0.63 0.63\nH -0.63 0.63 -0.63\nH 0.63 -0.63 -0.63\n")
    code = ("import sys; from molgen.cli import main; sys.argv = ['molgen', 'evaluate', sys.argv[1], '--no-novelty']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('loaded', [m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "100.00 %" in res.stdout, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "loaded []", res.stdout


def _choices(command: str, option: str) -> list[str]:
    from molgen.cli import app

    cmd = typer.main.get_command(app).commands[command]
    opt = next(p for p in cmd.params if option in getattr(p, "opts", ()))
    return opt.metavar.strip("<>").split("|")


def test_the_command_lines_choices_are_the_librarys():
    """The command line names its choices without importing the library (fast --help); each list is the
    registry's, so a new objective, sampler, preset, precision, source or --keep rule cannot be left out."""
    from molgen.data.sources import SOURCES
    from molgen.networks import PRECISIONS
    from molgen.nn.egnn import PRESETS
    from molgen.objectives import OBJECTIVES
    from molgen.recipes import shipped_recipes
    from molgen.keep import KEEP
    from molgen.samplers import SAMPLERS

    assert _choices("train", "--objective") == list(OBJECTIVES) == sorted(shipped_recipes(), key=list(OBJECTIVES).index)
    assert _choices("train", "--model") == list(PRESETS)
    assert _choices("train", "--precision") == ["auto", *PRECISIONS]
    assert _choices("sample", "--sampler") == list(SAMPLERS)
    assert _choices("sample", "--keep") == list(KEEP)
    assert _choices("download", "--source") == list(SOURCES)


def test_chemistry_and_qm9_files_need_no_jax():
    """Reading, writing and judging molecules and getting QM9 (layers 1-3 but the device batches) import no JAX,
    lazily or not: `molgen evaluate` and `molgen download` never start it."""
    mods = _modules()
    light = [m for m in mods if m.startswith(("molgen.chem", "molgen.io_utils")) or m in ("molgen.data.qm9",
                                                                                         "molgen.data.sources")]
    assert "molgen.chem.bonds" in light and len(light) >= 9
    for name in light:
        for node in ast.walk(ast.parse(mods[name].read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("jax", "flax", "optax", "orbax") for n in names), (name, names)
