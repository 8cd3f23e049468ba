"""The shipped models: present, small, carded, and usable with no training and no data."""

import json

from typer.testing import CliRunner

from molgen.cli import app
from molgen.sample import default_model, load_model, shipped_models

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
        assert sum(cfg["size_hist"]) > 0  # sampling needs no data set
    cfg, params, info = load_model(None)
    assert cfg.mode in ("ct", "ect", "distill")


def test_main_command_with_shipped_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLGEN_HOME", str(tmp_path / "empty_home"))  # no QM9 cache: still works
    out = tmp_path / "out.sdf"
    res = runner.invoke(app, ["sample", "-n", "25", "--steps", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().count("$$$$") == 25
    assert "atom stability" in res.output
    # the default samples at the temperature its card recommends (meta.json), and the file says so
    temp = load_model(None)[2]["temperature"]
    assert 0 < temp < 1 and f"temperature {temp:g}" in res.output
    from rdkit import Chem

    mol = next(iter(Chem.SDMolSupplier(str(out), removeHs=False)))
    assert float(mol.GetProp("molgen_temperature")) == temp
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "(default)" in res.output
    for name in shipped_models():  # full names, even in an 80-column terminal
        assert name in res.output, res.output
