"""The shipped models: present, small, carded, and usable with no training and no data."""

import json
from pathlib import Path

import jax
import numpy as np
from typer.testing import CliRunner

from molgen.cli import app
from molgen.models import default_model, load_model, shipped_models

runner = CliRunner()


def test_default_model_is_shipped_with_a_card():
    models = shipped_models()
    name = default_model()
    assert name in models
    for n, path in models.items():
        size = sum(f.stat().st_size for f in path.iterdir())
        assert size < 25 * 2**20, (n, size)
        card = (path / "README.md").read_text()
        assert "atom stability" in card.lower() and "molgen sample" in card
        cfg = json.loads((path / "config.json").read_text())
        assert sum(cfg["data"]["size_hist"]) > 0  # sampling needs no data set
    assert load_model(None).cfg.kind == "consistency"


def test_main_command_with_shipped_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "empty_home"))  # no QM9 cache: still works
    out = tmp_path / "out.sdf"
    res = runner.invoke(app, ["sample", "-n", "25", "--novelty", "-o", str(out)])  # ... but novelty cannot be had
    assert res.exit_code == 2 and "--novelty compares with QM9's training split" in res.output and not out.exists()
    import molgen.keep

    judged, sample_kept = [], molgen.keep.sample_kept
    monkeypatch.setattr(molgen.keep, "sample_kept", lambda *a, **k: judged.append(sample_kept(*a, **k)) or judged[-1])
    res = runner.invoke(app, ["sample", "-n", "25", "--steps", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().count("$$$$") == 25
    from molgen.chem.io import read_molecules

    for a, b in zip(judged[0].molecules, read_molecules(out), strict=True):  # the report judged the file's molecules
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.types, b.types)
    assert "atom stability" in res.output
    # the default samples at the temperature its card recommends (meta.json), and the file says so
    temp = load_model(None).meta["temperature"]
    assert 0 < temp < 1 and f"temperature {temp:g}" in res.output
    from rdkit import Chem

    mol = next(iter(Chem.SDMolSupplier(str(out), removeHs=False, sanitize=False)))
    assert float(mol.GetProp("molgen_temperature")) == temp
    # more calls: the re-noising scale of its card too (meta.json "renoise"), recorded per molecule
    renoise = load_model(None).meta["renoise"]
    res = runner.invoke(app, ["sample", "-n", "3", "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0 and f"re-noise {renoise:g}" in res.output, res.output
    mol = next(iter(Chem.SDMolSupplier(str(out), removeHs=False, sanitize=False)))
    assert float(mol.GetProp("molgen_renoise")) == renoise
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "(default)" in res.output and "(with --fix)" in res.output
    for name in shipped_models():  # full names, even in an 80-column terminal
        assert name in res.output, res.output
    # one model in full: its parameter count (the loaded arrays'), its diffusion model, recipes and card
    model = load_model(None)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(model.params))
    res = runner.invoke(app, ["models", model.name])
    assert res.exit_code == 0 and f"{model.name} (the default)" in res.output, res.output
    assert f"{n_params:,} parameters" in res.output and "diffusion model" in res.output
    recipes = sorted(p.name for p in Path(model.meta["source"]).glob("recipe*.toml"))
    assert recipes and all(r in res.output for r in recipes) and "README.md" in res.output


def test_a_fragment_without_a_model_named_is_completed_by_the_shipped_completer(tmp_path):
    """`molgen sample --fix` without --checkpoint samples with weights/DEFAULT-FIX's model, a diffusion model
    trained to complete fragments, with its own sampler; few calls are warned of, and the fragment is kept."""
    from molgen.chem.io import read_molecules

    name = default_model(fix=True)
    assert name in shipped_models() and name != default_model()
    assert load_model(name).cfg.inpaint is not None and load_model(name).cfg.kind == "diffusion"
    frag = tmp_path / "frag.xyz"
    frag.write_text("4\n\nC 0 0 0\nO 1.43 0 0\nH -0.36 1.03 0\nH -0.36 -0.5 0.9\n")
    out = tmp_path / "out.sdf"
    res = runner.invoke(app, ["sample", "--fix", str(frag), "-n", "3", "--steps", "10", "--seed", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "completes fragments poorly in 10 sampler steps" in res.output and "inpaint sampler" in res.output
    mols = read_molecules(out)
    assert len(mols) == 3 and all(list(m.types[:4]) == [1, 3, 0, 0] for m in mols)
    for m in mols:
        np.testing.assert_allclose(m.positions[:2], [[0, 0, 0], [1.43, 0, 0]], atol=1e-4)


def test_a_regular_wheel_install_carries_and_finds_the_weights(tmp_path):
    """Build the wheel (from a copy of the sources), unpack it as site-packages would hold it, and sample with the
    shipped default from there: the weights travel inside the package, not only in a source checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for name in ("molgen", "weights"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("molgen-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    default = (repo / "weights" / "DEFAULT").read_text().strip()
    assert (site / "molgen" / "weights" / default / "params.msgpack").exists()
    fix = (repo / "weights" / "DEFAULT-FIX").read_text().strip()  # the fragment completer travels too
    assert (site / "molgen" / "weights" / "DEFAULT-FIX").exists() and (site / "molgen" / "weights" / fix).is_dir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), MOLGEN_HOME=str(tmp_path / "home"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import molgen.models as s, sys; from molgen.cli import app; from molgen.recipes import shipped_recipes; "
            "print(s.__file__); print(s.weights_root()); print(sorted(shipped_recipes())); "
            "sys.argv = ['molgen', 'sample', '-n', '5', '-o', 'x.sdf']; app()")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    module, root, recipes = r.stdout.splitlines()[:3]
    assert Path(module).is_relative_to(site) and Path(root) == site / "molgen" / "weights", r.stdout
    assert recipes == "['ct', 'diffusion', 'distill', 'ect', 'inpaint', 'polish']", r.stdout  # the recipes travel in the wheel too
    assert (work / "x.sdf").read_text().count("$$$$") == 5


def test_model_folders_in_the_flat_config_format_still_load_as_they_were(tmp_path):
    """Every shipped model's config.json as molgen wrote it before configs had sections (a flat dict with `mode`,
    tests/data/old_configs/) reads back as the model's current config, and such a folder samples the same
    molecules as the shipped one."""
    import shutil
    from pathlib import Path

    import numpy as np

    from molgen.config import RunConfig
    from molgen.sample import sample

    old = sorted((Path(__file__).parent / "data" / "old_configs").glob("*.json"))
    assert len(old) == 5
    for path in old:
        assert "mode" in json.loads(path.read_text())  # the flat format
        # a model trained again since: its config as it was then, in today's format
        then = path.parent / "retrained" / path.name
        want = then if then.exists() else shipped_models()[path.stem] / "config.json"
        assert RunConfig.load(path) == RunConfig.load(want), path.stem
    folder = tmp_path / "edm-small-distill"
    shutil.copytree(shipped_models()["edm-small-distill"], folder)
    shutil.copy(Path(__file__).parent / "data" / "old_configs" / "edm-small-distill.json", folder / "config.json")
    a = sample(load_model("edm-small-distill"), 6, 1, 0).molecules
    b = sample(load_model(folder), 6, 1, 0).molecules
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.types, y.types)
        np.testing.assert_array_equal(x.positions, y.positions)


def test_an_exported_copy_of_a_shipped_model_keeps_its_sampling_defaults(tmp_path):
    """`molgen export MODEL DEST` of a model folder carries its card's temperature and re-noising, so the copy
    samples the same molecules as the original; given ones replace them."""
    runner = CliRunner()
    for dest, extra in ((tmp_path / "copy", []), (tmp_path / "hot", ["--temperature", "1.0"])):
        res = runner.invoke(app, ["export", "edm-small-stack2", str(dest), *extra])
        assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "copy" / "meta.json").read_text())
    assert (meta["temperature"], meta["renoise"]) == (0.7, 0.2)
    assert json.loads((tmp_path / "hot" / "meta.json").read_text())["temperature"] == 1.0
    for name in ("edm-small-stack2", tmp_path / "copy"):
        out = tmp_path / f"{Path(name).name}.sdf"
        res = runner.invoke(app, ["sample", "--checkpoint", str(name), "-n", "4", "--steps", "2", "--no-report",
                                  "-o", str(out)])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "copy.sdf").read_text().replace("copy", "x") == \
        (tmp_path / "edm-small-stack2.sdf").read_text().replace("edm-small-stack2", "x")
