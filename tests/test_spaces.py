"""Search spaces as data: shipped spaces, validation (one-line errors), layering of settings, and the
fixed-budget rank per targets subset."""

import pytest
import yaml

from lora_ablate.cli import main
from lora_ablate.errors import UserError
from lora_ablate.spaces import Budget, budget_rank, load_space, params_per_rank, space_names, study_experiment, subsets


def space_from(tmp_path, body: dict, name="custom"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_space(str(path))


# ----------------------------------------------------------------------------- shipped spaces


def test_shipped_spaces():
    assert {"rank", "alpha", "lr", "targets", "full"} <= set(space_names())
    rank = load_space("rank")
    assert rank.kind == "grid"
    assert [c["r"] for c in rank.cells()] == [1, 2, 4, 8, 16, 32, 64]
    assert rank.fixed["lora.targets"] == ["q", "k", "v", "o"]

    alpha = load_space("alpha")
    assert alpha.kind == "grid"
    assert {c["alpha_rule"] for c in alpha.cells()} == {"rank", "free", "rslora"}
    assert len(alpha.cells()) == 3 * len({c["r"] for c in alpha.cells()})

    lr = load_space("lr")
    assert lr.kind == "sampled" and [a.kind for a in lr.axes] == ["log_uniform"]
    assert lr.axes[0].low < lr.axes[0].high and lr.samples > 1

    targets = load_space("targets")
    assert [c["targets"] for c in targets.cells()] == subsets(["q", "k", "v", "o"])
    assert len(targets.cells()) == 15

    full = load_space("full")
    assert full.kind == "sampled"
    assert {a.name for a in full.axes} == {"r", "alpha_rule", "lr", "targets"}

    budget = load_space("targets_budget")
    assert budget.budget == Budget("q", 8) and "lora.r" not in {a.key for a in budget.axes}


def test_every_shipped_space_builds_its_trials():
    for name in space_names():
        sp = load_space(name)
        exp = study_experiment(sp, overrides=["model.name=tiny-llama"])
        params = {**sp.cells()[0], "seed": 3}
        for a in sp.sampled_axes:
            params[a.name] = a.values[0] if a.values else a.low
        trial = sp.trial_experiment(exp, params, lambda roles: 100)
        assert trial.train.seed == 3
        for a in sp.axes:
            got = getattr(getattr(trial, a.key.split(".")[0]), a.key.split(".")[1])
            want = a.config_value(params[a.name])
            assert (list(got) if a.key == "lora.targets" else got) == want, name


def test_spaces_command_lists_names(capsys):
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    for name in ("rank", "alpha", "lr", "targets", "full"):
        assert f"\n{name} " in "\n" + out


# ----------------------------------------------------------------------------- errors


def test_unknown_space_is_one_line_listing_names():
    with pytest.raises(UserError) as e:
        load_space("nope")
    assert str(e.value) == f"unknown space 'nope'; choose one of: {', '.join(space_names())}"


def test_unknown_space_cli_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--space", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown space 'x'; choose one of: alpha, ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("axes, message", [
    ({"lora.r": {"grid": []}}, "axis lora.r has an empty grid"),
    ({"train.lr": {"log_uniform": [1e-2, 1e-4]}}, "is not a valid range; need 0 < low < high"),
    ({"train.lr": {"log_uniform": [0, 1e-2]}}, "is not a valid range; need 0 < low < high"),
    ({"train.warmup": {"uniform": [0.5, 0.5]}}, "is not a valid range; need low < high"),
    ({"train.steps": {"int": [1.5, 4]}}, "needs integer bounds"),
    ({"lora.r": {"gird": [1]}}, "unknown kind 'gird'; choose one of: grid, choice, uniform"),
    ({"lora.rank": {"grid": [1]}}, "'lora.rank' cannot be an axis; axes may vary: lora.r, "),
    ({"train.seed": {"grid": [1, 2]}}, "train.seed is set by --seeds"),
    ({"model.name": {"grid": ["a"]}}, "'model.name' cannot be an axis"),
    ({"lora.r": {"grid": [0, 4]}}, "lora.r=0 is not valid"),
    ({"lora.targets": {"grid": [["q"], ["x"]]}}, "targets ['x'] is not valid; choose a non-empty subset of: q, k"),
    ({"lora.alpha_rule": {"choice": ["rank", "sqrt"]}}, "lora.alpha_rule='sqrt' is not valid; choose one of"),
    ({"lora.targets": {"grid": [["q", "v"], ["v", "q"]]}}, "repeats a value"),
    ({"train.lr": {"log_uniform": [1e-4, 10.0], "grid": [1]}}, "must be one of grid, choice"),
    ({}, "has no axes"),
])
def test_invalid_spaces_are_one_line_errors(tmp_path, axes, message):
    with pytest.raises(UserError) as e:
        space_from(tmp_path, {"axes": axes})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("space custom")


def test_invalid_space_keys(tmp_path):
    with pytest.raises(UserError, match="unknown key\\(s\\) axis; valid keys: name, description"):
        space_from(tmp_path, {"axis": {"lora.r": {"grid": [1]}}})
    with pytest.raises(UserError, match="fixed: lora.r=-1 is not valid"):
        space_from(tmp_path, {"fixed": {"lora.r": -1}, "axes": {"train.lr": {"grid": [1e-3]}}})
    with pytest.raises(UserError, match="samples=3 needs a sampled axis"):
        space_from(tmp_path, {"axes": {"lora.r": {"grid": [1]}}, "samples": 3})
    with pytest.raises(UserError, match="needs a lora.targets axis and no lora.r axis"):
        space_from(tmp_path, {"axes": {"lora.r": {"grid": [1]}, "lora.targets": {"grid": [["q"]]}},
                              "match_budget": {"reference": {"targets": ["q"], "r": 8}}})
    with pytest.raises(UserError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))


# ----------------------------------------------------------------------------- structure


def test_mixed_space_cells_and_targets_presets(tmp_path):
    sp = space_from(tmp_path, {
        "axes": {"lora.r": {"grid": [2, 4]}, "lora.targets": {"grid": [["v", "q"], "q,k,v,o"]},
                 "train.lr": {"log_uniform": [1e-4, 1e-2]}},
        "samples": 3})
    assert sp.kind == "mixed"
    assert sp.cells() == [{"r": 2, "targets": "q,v"}, {"r": 2, "targets": "q,k,v,o"},
                          {"r": 4, "targets": "q,v"}, {"r": 4, "targets": "q,k,v,o"}]
    assert sp.configurations() == 4 * 3
    assert sp.target_sets() == [("q", "v"), ("q", "k", "v", "o")]


def test_subsets_are_all_non_empty_combinations():
    all_ = subsets(["v", "q", "k", "o"])
    assert len(all_) == 15 == len(set(all_))
    assert all_[0] == "q" and all_[-1] == "q,k,v,o" and "k,v" in all_ and "v,k" not in all_


def test_layering_fixed_config_flags_overrides(tmp_path):
    sp = space_from(tmp_path, {"fixed": {"train.steps": 7, "train.lr": 0.01, "eval.size": 5},
                               "axes": {"lora.r": {"grid": [1, 2]}}})
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": 0.02, "batch_size": 3}, "lora": {"r": 16}}))
    exp = study_experiment(sp, cfg, ["eval.size=6"], {"train": {"batch_size": 4}, "study": {"seeds": 2}})
    assert exp.train.steps == 7  # the space's fixed setting
    assert exp.train.lr == 0.02  # the config file wins over fixed
    assert exp.train.batch_size == 4  # flags win over the file
    assert exp.eval.size == 6 and exp.study.seeds == 2
    # the axis wins over the file's lora.r in every trial
    assert sp.trial_experiment(exp, {"r": 2, "seed": 0}).lora.r == 2
    with pytest.raises(UserError, match="lora.r is an axis of space custom"):
        study_experiment(sp, None, ["lora.r=4"])
    with pytest.raises(UserError, match="train.seed is the --seeds axis"):
        study_experiment(sp, None, ["train.seed=4"])


# ----------------------------------------------------------------------------- matched budget


def test_params_per_rank_is_the_lora_parameter_count(fresh_tiny):
    import peft

    from lora_ablate.config import LoraConfig
    from lora_ablate.targets import resolve_targets
    from lora_ablate.trial import peft_config

    model = fresh_tiny()
    for roles in (("q",), ("k",), ("q", "k", "v", "o")):
        lora = LoraConfig(r=3, targets=roles)
        want = params_per_rank(model, roles) * 3
        wrapped = peft.get_peft_model(model, peft_config(lora, resolve_targets(model, roles).target_modules))
        assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == want
        model = wrapped.unload()


def test_budget_gives_narrow_gqa_projections_a_larger_rank(fresh_tiny):
    model = fresh_tiny()  # 4 query heads, 2 key/value heads: k and v are half as wide as q
    per_rank = lambda roles: params_per_rank(model, roles)  # noqa: E731
    budget = Budget("q", 8)
    assert per_rank(("k",)) < per_rank(("q",)) == per_rank(("o",))
    presets = ["q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"]
    ranks = {t: budget_rank(per_rank, tuple(t.split(",")), budget) for t in presets}
    assert ranks["q"] == ranks["o"] == 8
    assert ranks["k"] == ranks["v"] > 8
    assert ranks["q,k,v,o"] < ranks["q,v"] < ranks["q"]
    target = 8 * per_rank(("q",))
    for t, r in ranks.items():  # every subset within half a rank step of the budget
        assert abs(r * per_rank(tuple(t.split(","))) - target) <= per_rank(tuple(t.split(","))) / 2, t


def test_budget_space_sets_r_per_trial(tmp_path, fresh_tiny):
    model = fresh_tiny()
    sp = load_space("targets_budget")
    exp = study_experiment(sp, overrides=["model.name=tiny-llama"])
    per_rank = lambda roles: params_per_rank(model, roles)  # noqa: E731
    assert sp.trial_experiment(exp, {"targets": "q", "seed": 0}, per_rank).lora.r == 8
    assert sp.trial_experiment(exp, {"targets": "k", "seed": 0}, per_rank).lora.r > 8
    with pytest.raises(UserError, match="chosen per targets subset"):
        study_experiment(sp, None, ["lora.r=4"])
