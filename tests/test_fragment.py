"""Generating around a fragment: kept exactly by every sampler, in the input's frame, equivariant, refused when
it cannot be done."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_rotation, tiny_models
from typer.testing import CliRunner

from molgen import MolgenError
from molgen.chem.io import DECIMALS
from molgen.fragment import Fragment, contains_fragment, read_fragment
from molgen.sample import sample

# a methanol-like fragment (C, O and two H), off the origin and turned
FRAG = Fragment(np.array([1, 3, 0, 0], np.int32),
                np.array([[0.0, 0.0, 0.0], [1.43, 0.0, 0.0], [-0.36, 1.03, 0.0], [-0.36, -0.5, 0.9]]) @
                random_rotation(np.random.default_rng(1)).T + np.array([4.0, -1.0, 2.5]))


D, C, S = tiny_models()  # molecules of 6-9 atoms
CASES = [(D, "ancestral", 6), (D, "ode", 3), (C, "multistep", 1), (C, "multistep", 3), (C, "anneal", 3),
         (S, "multistep", 2)]


@pytest.mark.parametrize("model,sampler,steps", CASES, ids=[f"{m.cfg.objective}-{s}-{k}" + ("-stacked" if m.cfg.stack
                                                            else "") for m, s, k in CASES])
def test_every_sampler_keeps_the_fragment_exactly(model, sampler, steps):
    res = sample(model, 6, steps, seed=2, batch_size=6, sampler=sampler, fragment=FRAG)
    assert res.settings["molgen_fixed_atoms"] == 4
    for m in res.molecules:
        assert len(m.types) > 4 and np.isfinite(m.positions).all()
        np.testing.assert_array_equal(m.types[:4], FRAG.types)
        np.testing.assert_array_equal(m.positions[:4], FRAG.positions)  # the input's coordinates
    assert contains_fragment(FRAG, res.molecules).all()


def test_a_moved_fragment_moves_the_molecules_the_same_way():
    rng = np.random.default_rng(5)
    q, t = random_rotation(rng), rng.normal(size=3) * 3
    moved = Fragment(FRAG.types, FRAG.positions @ q.T + t)
    for model, sampler, steps in ((C, "multistep", 2), (D, "ancestral", 4)):
        a = sample(model, 5, steps, seed=7, sampler=sampler, fragment=FRAG).molecules
        b = sample(model, 5, steps, seed=7, sampler=sampler, fragment=moved).molecules
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.types, y.types)
            np.testing.assert_allclose(y.positions, x.positions @ q.T + t, atol=1e-3)


def test_sizes_and_refusals(tmp_path):
    res = sample(C, 20, 1, seed=0, fragment=FRAG)
    assert all(len(m.types) > 4 for m in res.molecules)  # sizes drawn above the fragment's
    assert all(len(m.types) == 7 for m in sample(C, 3, 1, atoms=7, fragment=FRAG).molecules)
    with pytest.raises(MolgenError, match="the fragment has 4 atoms, more than --atoms 3"):
        sample(C, 2, 1, atoms=3, fragment=FRAG)
    big = Fragment(np.zeros(10, np.int32), np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(MolgenError, match="trained on no molecule larger than the fragment's 10 atoms"):
        sample(C, 2, 1, fragment=big)
    files = {"flat": "C 0 0 0\nO 1.4 0 0\nH -0.4 1.0 0", "solid": "C 0 0 0\nO 1.4 0 0.1\nH -0.4 1.0 0",
             "nm": "C 0 0 0\nO 0.14 0 0.01\nH -0.04 0.1 0", "twice": "C 0 0 0\nO 1.4 0 0.1\nO 1.4 0 0.1"}
    for name, body in files.items():
        (tmp_path / f"{name}.xyz").write_text(f"3\n{name}\n{body}\n")
    assert read_fragment(tmp_path / "flat.xyz").size == 3  # any three atoms lie in a plane; XYZ is 3D
    from rdkit import Chem
    from rdkit.Chem import AllChem

    drawn = Chem.AddHs(Chem.MolFromSmiles("CO"))
    AllChem.Compute2DCoords(drawn)  # a depiction: z = 0, the record marked 2D
    with Chem.SDWriter(str(tmp_path / "drawn.sdf")) as w:
        w.write(drawn)
    with pytest.raises(MolgenError, match="the fragment is a 2D drawing"):
        read_fragment(tmp_path / "drawn.sdf")
    with pytest.raises(MolgenError, match=r"atoms 1 and 3 are 0.11 Å apart; a fragment's atoms are at least 0.5 Å"):
        read_fragment(tmp_path / "nm.xyz")  # in nm, not Å
    with pytest.raises(MolgenError, match="atoms 2 and 3 are 0.00 Å apart"):
        read_fragment(tmp_path / "twice.xyz")
    assert read_fragment(tmp_path / "solid.xyz").size == 3


def test_cli_writes_the_completions_and_reports_the_fragment(tmp_path):
    from molgen.chem.io import read_molecules
    from molgen.chem.write import write_xyz
    from molgen.chem.io import Molecule
    from molgen.cli import app

    write_xyz(tmp_path / "frag.xyz", [Molecule(FRAG.types.astype(np.int8), FRAG.positions, "frag")])
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "-n", "4", "--steps", "1", "--fix", str(tmp_path / "frag.xyz"), "-o",
                              str(tmp_path / "out.sdf"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "fragment kept" in res.output
    import json

    assert json.loads((tmp_path / "r.json").read_text())["fragment_kept"] >= 0
    for m in read_molecules(tmp_path / "out.sdf"):
        np.testing.assert_array_equal(m.positions[:4], np.round(FRAG.positions, DECIMALS))  # as SDF holds them
    bad = tmp_path / "cl.xyz"
    bad.write_text("2\nx\nC 0 0 0\nCl 0 0 1.7\n")
    res = runner.invoke(app, ["sample", "-n", "2", "--fix", str(bad), "-o", str(tmp_path / "x.sdf")])
    assert res.exit_code == 2 and "unknown element 'Cl'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sample", "-n", "2", "--atoms", "3", "--fix", str(tmp_path / "frag.xyz"), "-o",
                              str(tmp_path / "x.sdf")])
    assert res.exit_code == 2 and "more than --atoms 3" in res.output


def test_resampling_keeps_the_fragment_and_costs_r_calls_per_step():
    calls = []
    res = sample(D, 4, 5, seed=3, batch_size=4, fragment=FRAG, resample=2, progress=calls.append)
    assert res.settings["molgen_resample"] == 2
    assert res.settings["molgen_calls"] == sum(calls) == (5 - 1) * 3 + 1  # the last (clean) step is not repeated
    for m in res.molecules:
        np.testing.assert_array_equal(m.positions[:4], FRAG.positions)
    plain = sample(D, 4, 5, seed=3, batch_size=4, fragment=FRAG).molecules
    assert any(not np.allclose(a.positions, b.positions) for a, b in zip(res.molecules, plain))
    with pytest.raises(MolgenError, match="add --fix"):
        sample(D, 2, 5, resample=1)
    with pytest.raises(MolgenError, match="ancestral sampler"):
        sample(C, 2, 2, fragment=FRAG, resample=1)
    with pytest.raises(MolgenError, match=">= 0"):
        sample(D, 2, 5, fragment=FRAG, resample=-1)


def test_the_forward_step_goes_back_up_to_the_marginal_of_its_level():
    """z_s ~ q(z_s | x) taken up by the forward step is distributed as q(z_t | x): mean alpha_t x, std sigma_t."""
    from molgen.data.batching import pack
    from molgen.diffusion.edm import alpha_sigma, make_forward_step

    cfg = D.cfg.diffusion
    g = pack(None, [np.zeros(50, np.int32)] * 400)
    gam = cfg.gammas()
    t, s = 0.6, 0.3
    (a_t, s_t), (a_s, s_s) = (alpha_sigma(gam[round(v * cfg.timesteps)]) for v in (t, s))
    h = jnp.full((len(g.node_mask), 2), 1.5) * g.node_mask[:, None]
    zh = a_s * h + s_s * jax.random.normal(jax.random.PRNGKey(0), h.shape) * g.node_mask[:, None]
    _, up = jax.jit(make_forward_step(cfg))(jnp.zeros((len(g.node_mask), 3)), zh, t, s, g, jax.random.PRNGKey(1))
    vals = np.asarray(up)[np.asarray(g.node_mask) > 0]
    assert abs(vals.mean() - 1.5 * float(a_t)) < 0.01
    assert abs(vals.std() - float(s_t)) < 0.01
