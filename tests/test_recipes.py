"""Recipes: every shipped model's recipe.toml reproduces the training settings in its config.json; recipes
parse, merge and refuse mistakes."""

import dataclasses
import re

import hypothesis
import hypothesis.strategies
import pytest

from molgen import MolgenError
from molgen.config import RunConfig
from molgen.models import shipped_models
from molgen.recipes import check_settings, merge, parse_set, read_recipe, shipped_recipes, to_config

MODELS = shipped_models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_models_recipe_reproduces_its_configuration(name):
    folder = MODELS[name]
    shipped = RunConfig.load(folder / "config.json")
    cfg = to_config(read_recipe(folder / "recipe.toml"))
    assert cfg.objective == shipped.objective and cfg.seed == shipped.seed
    assert cfg.optim == shipped.optim
    if shipped.init is None:  # trained from scratch: the recipe names the network
        assert cfg.model == shipped.model and cfg.diffusion == shipped.diffusion
    if shipped.distill is not None:  # the teacher is named on the command line
        assert cfg.distill == dataclasses.replace(shipped.distill, teacher="")
    if shipped.polish is not None:  # the teacher is named on the command line, the model it polished in the recipe
        assert cfg.polish == dataclasses.replace(shipped.polish, teacher="") and cfg.polish.start
    if shipped.consistency is not None and shipped.distill is None:  # ct / ect: the curriculum; the rest measured
        keep = ("parametrization", "sigma_data_x", "sigma_data_h")
        want = {f.name: getattr(shipped.consistency, f.name) for f in dataclasses.fields(shipped.consistency)
                if f.name not in keep}
        assert {k: getattr(cfg.consistency, k) for k in want} == want
    for extra in folder.glob("recipe-*.toml"):  # earlier stages' recipes parse too
        assert to_config(read_recipe(extra)).objective == shipped.objective
    assert "recipe.toml" in (folder / "README.md").read_text()  # the card names it


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_configuration_written_as_a_recipe_reads_back_as_itself(name):
    """recipe_of + to_toml (what molgen export writes): every section the run took from its recipe reads back
    equal, measured values and the sections --init gave left out."""
    import tomllib

    from molgen.objectives import get_objective
    from molgen.recipes import MEASURED, recipe_of, to_toml

    cfg = RunConfig.load(MODELS[name] / "config.json")
    text = to_toml(recipe_of(cfg), f"{name}\nsecond line")
    assert text.startswith(f"# {name}\n# second line\n")
    back = to_config(tomllib.loads(text))
    assert (back.objective, back.seed, back.init) == (cfg.objective, cfg.seed, cfg.init)
    from_init = set(get_objective(cfg.objective).from_init) if cfg.init else set()
    written = [s for s in ("model", "diffusion", "consistency", "distill", "polish", "optim", "data")
               if getattr(cfg, s) is not None and s not in from_init]
    assert "optim" in written and f"[{written[0]}]" in text
    for section in written:
        got, want = (dataclasses.asdict(getattr(c, section)) for c in (back, cfg))
        for key in MEASURED.get(section, ()):
            got.pop(key), want.pop(key)
            assert f"{key} =" not in text
        assert got == want, section
    for section in from_init:
        assert f"[{section}]" not in text


def test_shipped_objective_recipes_and_their_defaults():
    assert set(shipped_recipes()) == {"diffusion", "inpaint", "ct", "ect", "distill", "polish"}
    for name in shipped_recipes():
        cfg = to_config(read_recipe(name))
        assert cfg.objective == name
    assert to_config(read_recipe("distill")).optim.lr == 2e-4  # distillation's smaller default step


def test_a_recipe_saved_with_a_byte_order_mark_or_windows_line_ends_reads_as_itself(tmp_path):
    text = shipped_recipes()["diffusion"].read_text()
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "crlf.toml").write_bytes(text.replace("\n", "\r\n").encode())
    want = read_recipe("diffusion")
    assert read_recipe(tmp_path / "bom.toml") == want and read_recipe(tmp_path / "crlf.toml") == want


def test_a_section_given_as_a_value_is_refused_before_a_merge_could_drop_it(tmp_path):
    # merged with the options' own [optim] table, `optim = 3` would have replaced the recipe's whole table
    for item, message in [("optim=3", "--set 'optim=3': [optim] is a table; set one of its settings"),
                          ("model=edm", "--set model.SETTING=VALUE (a preset: --model NAME)"),
                          ("data=[1, 2]", "[data] is a table")]:
        with pytest.raises(MolgenError, match=re.escape(message)):
            parse_set([item])
    with pytest.raises(MolgenError, match=re.escape("--set 'optim.lr.x=2': optim.lr is a value, not a table")):
        parse_set(["optim.lr=1", "optim.lr.x=2"])
    assert parse_set(["optim={lr=1e-3}"]) == {"optim": {"lr": 1e-3}}  # an inline table is one
    (tmp_path / "r.toml").write_text('objective = "diffusion"\nmodel = "edm"\n')
    with pytest.raises(MolgenError, match=re.escape("r.toml: model must be a table of settings ([model]), got 'edm'")):
        read_recipe(tmp_path / "r.toml")


def test_set_values_are_toml_or_strings_and_merge_table_by_table():
    got = parse_set(["optim.lr=1e-3", "model.preset=tiny", "distill.targets=polished", "seed=4", "data.remove_h=true"])
    assert got == {"optim": {"lr": 1e-3}, "model": {"preset": "tiny"}, "distill": {"targets": "polished"}, "seed": 4,
                   "data": {"remove_h": True}}
    assert merge({"optim": {"lr": 1, "steps": 2}}, {"optim": {"lr": 3}}) == {"optim": {"lr": 3, "steps": 2}}
    cfg = to_config(merge(read_recipe("diffusion"), got))
    assert (cfg.optim.lr, cfg.model.nf, cfg.seed, cfg.data.remove_h) == (1e-3, 32, 4, True)
    assert to_config({"optim": {"lr": 1}}).optim.lr == 1.0  # an integer where a float is meant


@pytest.mark.parametrize("recipe,message", [
    ({"optim": {"speed": 1}}, "[optim] has no setting 'speed'"),
    ({"optim": {"steps": "many"}}, "optim.steps must be an integer"),
    ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
    ({"data": {"remove_h": 1}}, "data.remove_h must be true or false"),
    ({"model": {"preset": "huge"}}, "model.preset must be one of"),
    ({"stack": {"levels": [0.1]}}, "[stack] is made by `molgen export --stack N`"),
    ({"trainer": {}}, "unknown setting(s) trainer"),
    ({"init": 1}, "init must be a string, got 1"),
    ({"seed": True}, "seed must be an integer"),
    ({"model": {"preset": [1, 2]}}, "model.preset must be one of"),
    ({"model": "edm"}, "recipe: model must be a table of settings ([model]), got 'edm'"),
    ({"optim": 3}, "recipe: optim must be a table of settings ([optim]), got 3"),
])
def test_recipe_mistakes_are_named(recipe, message):
    with pytest.raises(MolgenError, match=re.escape(message)):
        to_config(recipe)


@pytest.mark.parametrize("recipe,message", [
    ({"model": {"nf": -3}}, "model.nf must be at least 1, got -3"),
    ({"model": {"n_layers": 0}}, "model.n_layers must be at least 1"),
    ({"diffusion": {"precision": 0.7}}, "diffusion.precision must be in (0, 0.5)"),
    ({"optim": {"lr": float("nan")}}, "optim.lr must be positive, got nan"),
    ({"optim": {"ema": 1.0}}, "optim.ema must be in [0, 1)"),
    ({"consistency": {"s0": 10, "s1": 5}}, "s1 must be at least s0"),
    ({"consistency": {"sigma_min": 1.0, "sigma_max": 0.5}}, "sigma_max must exceed sigma_min"),
    ({"distill": {"anchor_fraction": 1.5}}, "distill.anchor_fraction must be in [0, 1]"),
    ({"seed": -1}, "seed must be in 0 .. 2^32 - 1"),
    ({"optim": {"precision": "fp16"}}, "optim.precision must be one of auto, float32, tf32, bf16, got 'fp16'"),
    ({"optim": {"layout": "dense"}}, "optim.layout must be one of auto, packed, grouped, packed-kernel, got 'dense'"),
    ({"distill": {"targets": "odes"}}, "distill.targets must be one of ode, polished, got 'odes'"),
    ({"distill": {"keep": "valid"}}, "distill.keep must be one of all, stable, got 'valid'"),
    ({"polish": {"calls": 0}}, "polish.calls must be at least 1, got 0"),
    ({"polish": {"type_weight": -1.0}}, "polish.type_weight must be at least 0, got -1.0"),
])
def test_settings_that_cannot_train_are_named(recipe, message):
    with pytest.raises(MolgenError, match=re.escape(message)):
        check_settings(to_config(recipe))


def test_every_shipped_recipe_and_model_passes_the_checks():
    checked = []
    for name in shipped_recipes():
        cfg = to_config(read_recipe(name))
        check_settings(cfg)  # raises on a setting that cannot train
        checked.append(cfg.objective)
    for folder in MODELS.values():
        check_settings(RunConfig.load(folder / "config.json"))
        checked.append(folder.name)
    assert sorted(checked[:6]) == ["ct", "diffusion", "distill", "ect", "inpaint", "polish"]
    assert len(checked) == 6 + len(MODELS)


def _setting_names():
    cfg = to_config({"diffusion": {}, "consistency": {}, "distill": {}})  # every table built
    names = ["seed", "objective", "init", "model.preset", "model", "optim", "data"]
    for section in ("model", "diffusion", "consistency", "distill", "optim", "data"):
        table = getattr(cfg, section)
        names += [f"{section}.{f.name}" for f in dataclasses.fields(table)]
    return names


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(sets=hypothesis.strategies.lists(hypothesis.strategies.tuples(
    hypothesis.strategies.sampled_from(_setting_names()),
    hypothesis.strategies.sampled_from(["0", "-1", "1", "2", "1e9", "-1e-9", "nan", "inf", "true", "x", "[1, 2]", "{}",
                                        "0.5", "1e400", "99999999999999999999", "''"])), min_size=1, max_size=3),
    objective=hypothesis.strategies.sampled_from(["diffusion", "ct", "ect", "distill"]))
def test_any_set_either_resolves_or_is_a_one_line_error(tmp_path_factory, sets, objective):
    from molgen.launch import Request, resolve_config

    out = tmp_path_factory.getbasetemp() / "never-written"
    req = Request(out, None, objective, tuple(f"{k}={v}" for k, v in sets), False, None, None, None, None, None, None,
                  None)
    try:
        cfg = resolve_config(req)
    except MolgenError as e:
        assert "\n" not in str(e) and str(e)
    else:
        check_settings(cfg)  # what resolves is within its limits
    assert not out.exists()
