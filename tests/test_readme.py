"""README.md's Python example runs as written and does what its comments say."""

import re
from pathlib import Path

from molgen.chem.elements import formula
from molgen.chem.io import read_molecules

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    from rdkit import RDLogger, rdBase

    status = [line.split(":") for line in rdBase.LogStatus().splitlines()]
    scope: dict = {}
    try:
        exec(compile(blocks[0], "README.md", "exec"), scope)
    finally:  # the example switches RDKit's messages off: as they were for the other tests
        for log, state in status:
            (RDLogger.EnableLog if state == "enabled" else RDLogger.DisableLog)(log)
    assert rdBase.LogStatus().splitlines() == [":".join(x) for x in status]
    printed = capsys.readouterr().out
    assert re.fullmatch(r"atom stability 0\.\d{3}, stable molecules 0\.\d{3}, valid 0\.\d{3}\n", printed), printed
    written = read_molecules(tmp_path / "out.sdf")
    assert len(written) == len(scope["res"].molecules) == 100
    assert scope["res"].calls == 4
    for a, b in zip(written, scope["res"].molecules):  # the file holds the sampled molecules
        assert (a.types == b.types).all() and abs(a.positions - b.positions).max() < 1e-3
    m = scope["m"]
    assert 0 < len(scope["mols"]) <= 100
    assert len(scope["mols"]) >= round(m.validity * 100) * 0.9  # RDKit reads back about the valid share
    assert len(scope["isomers"]) == 10 and {formula(x.types) for x in scope["isomers"]} == {"C7H10O2"}
    from molgen.evaluate import judge

    assert len(scope["stable"]) == 10 and all(p.stable and p.valid for p in judge(scope["stable"]))
