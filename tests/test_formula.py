"""Molecules of a given formula: parsed as chemists write it, every output has it exactly, the types go where
the network puts them, and the requests that cannot be done are one-line errors."""

import numpy as np
import pytest
from conftest import one_line_error, tiny_models
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from molgen import MolgenError
from molgen.chem.elements import formula as hill
from molgen.formula import assign_types, parse_formula
from molgen.sample import plan, preflight, sample

D, C, S = tiny_models((0,) * 6 + (2, 3, 5, 1))  # molecules of 6-9 atoms


@pytest.mark.parametrize("text,counts,shown", [
    ("C7H10O2", (10, 7, 0, 2, 0), "C7H10O2"),
    ("CH3CH2OH", (6, 2, 0, 1, 0), "C2H6O"),  # an element may recur
    ("H2O", (2, 0, 0, 1, 0), "H2O"),
    ("FC(F)F", None, None),
])
def test_formulas_parse_as_chemists_write_them(text, counts, shown):
    if counts is None:
        with pytest.raises(MolgenError, match="write elements and counts"):
            parse_formula(text)
        return
    f = parse_formula(text)
    assert f.counts == counts and str(f) == shown and f.size == sum(counts)
    assert hill(f.types) == shown and np.bincount(f.types, minlength=5).tolist() == list(counts)


@pytest.mark.parametrize("text,message", [
    ("", "write elements and counts"), ("c7h10", "write elements and counts"), ("C7 H10", "write elements"),
    ("C6H5Cl", "Cl is not an element molgen's models know (H, C, N, O, F)"), ("C7X2", "X is not an element"),
    ("C0H4", "a count of 0 (C0)"), ("C100H202", "--formula C100H202: 302 atoms, more than the 256 molgen reads back"),
    ("C99999999999999999999", "99999999999999999999 atoms, more than"),
])
def test_bad_formulas_say_what_is_wrong(text, message):
    with pytest.raises(MolgenError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_formula(text)


def test_the_types_go_to_the_atoms_that_fit_them_best():
    types = parse_formula("CH2O").types  # H, H, C, O
    scores = np.array([[0.0, 0.9, 0.0, 0.1, 0.0],  # a carbon
                       [0.8, 0.0, 0.0, 0.0, 0.0],  # hydrogens
                       [0.7, 0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.6, 0.0, 0.5, 0.0]])  # C or O: O, the carbon is taken by a better atom
    np.testing.assert_array_equal(assign_types(scores, types), [1, 0, 0, 3])
    # four atoms that all look like carbon: one gets C, the others what the formula has left, all counted
    carbon_like = np.tile([0.0, 1.0, 0.0, 0.0, 0.0], (4, 1))
    carbon_like[:, 1] += np.arange(4) * 0.01  # the last the most carbon-like
    got = assign_types(carbon_like, types)
    assert sorted(got) == sorted(types) and got[3] == 1  # the most carbon-like one


@pytest.mark.parametrize("model,sampler,steps,polish", [(C, "multistep", 1, 0), (C, "multistep", 3, 0),
                                                        (C, "anneal", 2, 0), (S, "multistep", 2, 0),
                                                        (C, "multistep", 1, 2)])
def test_every_molecule_has_the_formula(model, sampler, steps, polish):
    f = parse_formula("C2H4O")
    res = sample(model, 10, steps, seed=3, batch_size=4, sampler=sampler, formula=f, polish_calls=polish,
                 polisher=D if polish else None)
    assert res.settings["molgen_formula"] == "C2H4O" and "formula C2H4O" in res.description
    for m in res.molecules:
        assert hill(m.types) == "C2H4O" and np.isfinite(m.positions).all() and m.props["molgen_formula"] == "C2H4O"


def test_one_call_places_the_molecule_as_without_a_formula_and_relabels_it():
    """With one call the formula only relabels the call's output: the same positions as sampling with
    --atoms at the formula's size, and each atom's type the best fit of what the network predicted."""
    f = parse_formula("C2H4O")
    free = sample(C, 8, 1, seed=5, atoms=f.size)
    fixed = sample(C, 8, 1, seed=5, formula=f)
    for a, b in zip(free.molecules, fixed.molecules):
        np.testing.assert_array_equal(a.positions, b.positions)
        if hill(a.types) == "C2H4O":  # the network's own types already make the formula: kept as they are
            np.testing.assert_array_equal(a.types, b.types)
    assert any(hill(a.types) != "C2H4O" for a in free.molecules)  # the formula changed some


def test_a_stacked_model_gives_the_formula_to_each_of_its_stages():
    """One call of a stacked model with a formula is its base model's call, then its stages as polishing calls,
    the formula's types imposed before each stage: the stages shape the molecule around the formula's types."""
    f = parse_formula("C2H4O")
    stacked = sample(S, 8, 1, seed=4, formula=f, batch_size=8)
    levels = len(S.cfg.stack.levels)
    parts = sample(C, 8, 1, seed=4, formula=f, batch_size=8, polish_calls=levels, polisher=D)
    after = sample(S, 8, 1, seed=4, atoms=f.size, batch_size=8)  # no formula: the stages see the network's types
    for a, b, c in zip(stacked.molecules, parts.molecules, after.molecules):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)
        np.testing.assert_array_equal(a.types, b.types)
        assert hill(a.types) == "C2H4O"
    assert any(np.abs(a.positions - c.positions).max() > 1e-3 for a, c in zip(stacked.molecules, after.molecules))
    assert preflight(S, 8, 8, None, None, 1, f) == []  # no warning: one stacked call is enough


def test_the_formula_imposed_inside_a_call_is_the_one_imposed_after_it():
    """formula_types (traced, inside the network call) gives each molecule the same types as the fix after
    each call, the best assignment for each molecule, and leaves the padding rows alone; neither waits for the
    network's output on the host."""
    import jax

    from molgen.data.batching import sampling_graph
    from molgen.formula import formula_fixer, formula_types

    f = parse_formula("CH2O")
    g = sampling_graph(np.array([4, 4, 4]))
    assert len(g.node_mask) > 12  # padding rows
    h = np.random.default_rng(0).normal(size=(len(g.node_mask), 6)).astype(np.float32)
    x = np.zeros((len(g.node_mask), 3), np.float32)
    _, inside = jax.jit(formula_types(f))(x, h, g)
    fix = formula_fixer(f, g)
    _, after = fix(x, h, 0.0, 1.0)
    inside = np.asarray(inside)
    np.testing.assert_array_equal(inside, np.asarray(after))
    np.testing.assert_array_equal(inside[12:], h[12:])
    for k in (0, 4, 8):
        np.testing.assert_array_equal(inside[k : k + 4, :5].argmax(1), assign_types(h[k : k + 4, :5], f.types))
    # the fix is queued after the call that makes its input, not waited for (Ctrl-C and progress stay prompt)
    jnp = jax.numpy
    slow = jax.jit(lambda a: a + 0 * jnp.sum(jax.lax.fori_loop(0, 2000, lambda i, m: jnp.tanh(m @ m),
                                                                jnp.full((512, 512), 1 / 512))))
    slow(h).block_until_ready()  # compiled
    made = slow(h)
    fix(x, made, 0.0, 1.0)
    assert not made.is_ready()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_the_assignment_is_optimal(k, seed, ties):
    """min_cost_assignment finds an assignment of the least summed cost (scipy's, which molgen does not use,
    is the reference), also where costs tie; every row gets its own column."""
    from scipy.optimize import linear_sum_assignment

    from molgen.formula import min_cost_assignment

    r = np.random.default_rng(seed)
    cost = (r.integers(0, 3, (k, k)) if ties else r.normal(size=(k, k))).astype(np.float32)
    cols = np.asarray(min_cost_assignment(cost))
    assert sorted(cols.tolist()) == list(range(k))
    rows, best = linear_sum_assignment(cost)
    assert abs(cost[np.arange(k), cols].sum() - cost[rows, best].sum()) < 1e-4
    if not ties:
        np.testing.assert_array_equal(cols[rows], best)


def test_requests_that_cannot_be_done_are_refused():
    f = parse_formula("C2H4O")
    with pytest.raises(MolgenError, match="--formula needs a consistency model .* is a diffusion model"):
        plan(D, 10, formula=True)
    with pytest.raises(MolgenError, match="--atoms 9 contradicts --formula C2H4O \\(7 atoms\\); drop --atoms"):
        sample(C, 2, 2, atoms=9, formula=f)
    assert hill(sample(C, 2, 2, atoms=7, formula=f).molecules[0].types) == "C2H4O"  # --atoms that agrees
    assert hill(sample(C, 2, 2, atoms=(5, 9), formula=f).molecules[0].types) == "C2H4O"  # a range that holds it
    with pytest.raises(MolgenError, match="--atoms 8-9 contradicts --formula C2H4O \\(7 atoms\\); drop --atoms"):
        sample(C, 2, 2, atoms=(8, 9), formula=f)
    warnings = preflight(C, 2, 2, None, None, 1, f)
    assert len(warnings) == 1 and "with one call the formula's types are given after the only call" in warnings[0]
    big = preflight(C, 2, 2, None, None, 4, parse_formula("C5H12"))  # 17 atoms: larger than the model's 6-9
    assert big == ["warning: this model was trained on molecules of 6-9 atoms; expect poor molecules with "
                   "--formula C5H12"]


def test_the_command_line_refuses_before_any_work(tmp_path):
    from molgen.cli import app

    run = CliRunner().invoke
    one_line_error(run(app, ["sample", "--formula", "C6H5Cl", "-o", str(tmp_path / "x.sdf")]), "Cl is not an element")
    one_line_error(run(app, ["sample", "--formula", "C2H6O", "--fix", str(tmp_path / "f.xyz"), "-o",
                             str(tmp_path / "x.sdf")]), "no such file")
    (tmp_path / "f.xyz").write_text("2\n\nC 0 0 0\nO 1.4 0 0\n")
    one_line_error(run(app, ["sample", "--formula", "C2H6O", "--fix", str(tmp_path / "f.xyz"), "-o",
                             str(tmp_path / "x.sdf")]), "--formula and --fix: give one of them")
    one_line_error(run(app, ["sample", "--formula", "C2H6O", "--checkpoint", "edm-small-diffusion", "-o",
                             str(tmp_path / "x.sdf")]), "--formula needs a consistency model")
    assert not list(tmp_path.glob("x*"))


def test_a_type_bias_reads_each_atom_s_type_with_the_bias_added():
    """--type-bias adds to the network's last type outputs before the argmax: an atom whose output for N is within
    the bias of its best type becomes N; an atom typed with certainty (a formula's, a fragment's: ONEHOT_SCALE on
    its type, 0 elsewhere) never changes, as every bias is below that."""
    from molgen.readout import parse_type_bias
    from molgen.sample import _molecules

    h = np.array([[0.25, 0, 0, 0, 0, 0],  # sure: H
                  [0.02, 0.12, 0.0, 0.01, 0, 0],  # a C, N 0.12 behind it: N with a bias above 0.12
                  [0.0, 0.2, 0.05, 0.0, 0, 0],  # a C, N 0.15 behind
                  [0.0, 0.0, 0.0, 0.2, 0.0, 0]], np.float32)  # an O
    x = np.zeros((4, 3), np.float32)
    for text, types in (("0", [0, 1, 1, 3]), ("N=0.13", [0, 2, 1, 3]), ("N=0.16,O=0.1", [0, 2, 2, 3]),
                        ("N=0.24,O=0.24,H=0.24,C=0.24,F=0.24", [0, 1, 1, 3])):
        settings = {"molgen_type_bias": text} if parse_type_bias(text) else {}
        got = _molecules(x, h, [4], 0, settings)[0].types
        assert got.tolist() == types, text
    for bad in ("N=0.25", "N=-0.1", "Cl=0.1", "N=0.1,", "N", "N=x"):
        with pytest.raises(MolgenError, match="--type-bias .*: give ELEMENT=BIAS pairs"):
            parse_type_bias(bad)
    assert parse_type_bias("none") == {} and parse_type_bias(None) is None


def test_the_card_s_type_bias_applies_from_two_calls_its_one_call_bias_at_one_and_never_to_a_formula():
    from dataclasses import replace

    card = replace(C, meta={**C.meta, "type_bias": {"N": 0.2, "O": 0.2}})
    both = replace(C, meta={**card.meta, "type_bias_one_call": {"N": 0.1, "O": 0.1}})
    given = {"N": 0.1}
    cases = [(card, dict(steps=1), None), (card, dict(steps=2), "N=0.2,O=0.2"),
             (card, dict(steps=1, polish_calls=2), "N=0.2,O=0.2"), (card, dict(steps=1, type_bias=given), "N=0.1"),
             (card, dict(steps=4, type_bias={}), None), (card, dict(steps=4, formula=True), None),
             (both, dict(steps=1), "N=0.1,O=0.1"), (both, dict(steps=2), "N=0.2,O=0.2"),
             (both, dict(steps=1, type_bias={"O": 0.05}), "O=0.05"), (both, dict(steps=1, type_bias={}), None),
             (both, dict(steps=1, formula=True), None)]
    for model, kw, recorded in cases:
        settings = plan(model, **kw)[2]
        assert settings.get("molgen_type_bias") == recorded, (model.meta, kw)
    with pytest.raises(MolgenError, match="--type-bias with --formula"):
        plan(card, 4, formula=True, type_bias=given)
    for key, calls in (("type_bias", 4), ("type_bias_one_call", 1)):
        for bad in ({"N": 0.3}, "N=0.2", {"Cl": 0.1}):  # a card edited by hand: one line, not a traceback
            with pytest.raises(MolgenError, match=f"meta.json's {key} must map elements to biases"):
                plan(replace(C, meta={**C.meta, key: bad}), calls)
    res = sample(card, 6, 3, seed=2, formula=parse_formula("C2H4O"))  # the card's bias leaves the formula alone
    assert all(hill(m.types) == "C2H4O" for m in res.molecules) and "molgen_type_bias" not in res.settings
    biased = sample(card, 6, 3, seed=2, atoms=7)
    plain = sample(card, 6, 3, seed=2, atoms=7, type_bias={})
    assert "type bias N=0.2,O=0.2" in biased.description and biased.molecules[0].props["molgen_type_bias"] == "N=0.2,O=0.2"
    for a, b in zip(biased.molecules, plain.molecules):  # the same molecules, some atoms read as N or O
        np.testing.assert_array_equal(a.positions, b.positions)
        changed = a.types != b.types
        assert set(a.types[changed].tolist()) <= {2, 3}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="CHNOFSclx0123456789 ()", max_size=12))
def test_any_text_is_a_formula_or_one_error(text):
    try:
        f = parse_formula(text)
    except MolgenError as e:
        assert str(e).startswith(f"--formula {text.strip()}") or str(e).startswith(f"--formula {text!r}")
        return
    assert f.size >= 1 and str(parse_formula(str(f))) == str(f)  # its Hill form reads back as itself
