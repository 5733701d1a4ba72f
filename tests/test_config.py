"""Config: defaults, YAML + dotted overrides, type coercion, one-line validation errors, the alpha rule."""

import math
from pathlib import Path

import pytest

from lora_ablate.config import (
    ALPHA_RULES,
    QUANTIZATIONS,
    ROLES,
    SECTIONS,
    Experiment,
    LoraConfig,
    build_experiment,
    describe,
    load_experiment,
    parse_override,
    replace,
)
from lora_ablate.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_valid():
    exp = build_experiment()
    assert exp == Experiment()
    assert exp.lora.r == 8 and exp.lora.alpha_rule == "rank" and exp.lora.targets == ("q", "v")
    assert exp.model.dtype == "auto" and exp.model.device == "auto" and exp.model.quantization == "none"
    assert exp.data.template == "alpaca"
    # flat() is what trackers get: every field, lists joined
    flat = exp.flat()
    assert flat["lora.targets"] == "q,v" and flat["train.lr"] == 1e-3
    assert len(flat) == len(describe())


def test_yaml_and_overrides(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model:\n  name: tiny-llama\nlora:\n  r: 4\n  targets: [k]\ntrain:\n  lr: 3e-4\n  steps: 7\n"
                   "eval:\n  generate: false\n")
    exp = load_experiment(cfg)
    assert exp.model.name == "tiny-llama" and exp.lora.r == 4 and exp.lora.targets == ("k",)
    assert exp.train.lr == 3e-4 and isinstance(exp.train.lr, float)  # YAML reads 3e-4 as a string
    assert exp.train.steps == 7 and exp.eval.generate is False
    exp = load_experiment(cfg, ["lora.r=16", "train.lr=3e-4", "lora.targets=[q,v]", "train.steps=5",
                                "eval.generate=true", "data.fields={output: answer}"])
    assert exp.lora.r == 16 and isinstance(exp.lora.r, int)
    assert exp.train.lr == pytest.approx(3e-4) and isinstance(exp.train.lr, float)
    assert exp.lora.targets == ("q", "v") and exp.train.steps == 5 and exp.eval.generate is True
    assert exp.data.fields == {"output": "answer"}
    assert exp.model.name == "tiny-llama"  # untouched by the overrides
    # the last override of a key wins; a bare word and a comma list are lists too
    assert load_experiment(None, ["lora.r=2", "lora.r=32"]).lora.r == 32
    assert load_experiment(None, ["lora.targets=o"]).lora.targets == ("o",)
    assert load_experiment(None, ["lora.targets=q,k"]).lora.targets == ("q", "k")


@pytest.mark.parametrize("text,expected", [
    ("train.lr=3e-4", 3e-4), ("train.lr=1E-3", 1e-3), ("train.lr=0.01", 0.01), ("train.lr=2", 2.0),
    ("lora.alpha=32", 32.0), ("train.steps=10.0", 10), ("lora.r=1e1", 10),
])
def test_numbers_coerced(text, expected):
    section, key, _ = parse_override(text)
    value = getattr(getattr(load_experiment(None, [text]), section), key)
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("1", True), ("0", False),
                                           ("yes", True), ("off", False), ("True", True)])
def test_bools_coerced(text, expected):
    assert load_experiment(None, [f"eval.generate={text}"]).eval.generate is expected


def test_smoke_config_resolves():
    exp = load_experiment(REPO / "experiments" / "smoke.yaml")
    assert exp.model.name == "tiny-llama" and exp.train.lr == 3e-3


def test_targets_canonicalised():
    assert LoraConfig(targets=("v", "q")).targets == ("q", "v")
    assert load_experiment(None, ["lora.targets=[o,mlp,q]"]).lora.targets == ("q", "o", "mlp")
    assert load_experiment(None, ["lora.targets=[v,q]"]) == load_experiment(None, ["lora.targets=[q,v]"])


@pytest.mark.parametrize("overrides,must_name", [
    (["lora.r=0"], ["lora.r", "0", "positive"]),
    (["lora.r=-1"], ["lora.r", "-1", "positive"]),
    (["lora.r=2.5"], ["lora.r", "2.5", "integer"]),
    (["lora.alpha_rule=sqrt"], ["lora.alpha_rule", "sqrt", *ALPHA_RULES]),
    (["lora.targets=[q,z]"], ["'z'", *ROLES]),
    (["lora.targets=[]"], ["lora.targets", "empty", *ROLES]),
    (["lora.targets=[q,q]"], ["lora.targets", "q"]),
    (["lora.init=zeros"], ["lora.init", "zeros", "default", "gaussian"]),
    (["lora.dropout=1.5"], ["lora.dropout", "1.5"]),
    (["lora.alpha=0"], ["lora.alpha", "0"]),
    (["lorra.r=8"], ["lorra", *SECTIONS]),
    (["lora.rank=8"], ["lora.rank", "r", "alpha_rule", "targets"]),
    (["lora.r"], ["lora.r", "section.key=value"]),
    (["lora.r=eight"], ["lora.r", "eight", "integer"]),
    (["train.lr=fast"], ["train.lr", "fast", "number"]),
    (["train.lr=nan"], ["train.lr", "nan"]),
    (["train.lr=0"], ["train.lr", "0"]),
    (["train.steps=0"], ["train.steps", "0"]),
    (["train.warmup=1.5"], ["train.warmup", "1.5"]),
    (["train.schedule=step"], ["train.schedule", "step", "cosine", "linear", "constant"]),
    (["train.gradient_checkpointing=maybe"], ["train.gradient_checkpointing", "maybe", "true or false"]),
    (["model.quantization=2bit"], ["model.quantization", "2bit", *QUANTIZATIONS]),
    (["model.dtype=float8"], ["model.dtype", "float8", "float32", "bfloat16"]),
    (["model.device=tpu"], ["model.device", "tpu", "cpu", "cuda"]),
    (["model.name="], ["model.name"]),
    (["data.template=chatml"], ["data.template", "chatml", "alpaca", "chat"]),
    (["data.max_length=0"], ["data.max_length", "0"]),
    (["data.fields={answer: out}"], ["answer", "instruction", "output", "completion"]),
    (["data.fields=[a]"], ["data.fields"]),
    (["eval.sets=[]"], ["eval.sets", "empty"]),
    (["eval.size=-1"], ["eval.size", "-1"]),
    (["lora.targets={q: 1}"], ["lora.targets"]),
    (["model.name=[a,b]"], ["model.name"]),
    (["study.direction=up"], ["study.direction", "up", "minimize", "maximize"]),
])
def test_validation_errors_one_line(overrides, must_name):
    with pytest.raises(UserError) as e:
        load_experiment(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for word in must_name:
        assert word in msg, f"{word!r} not in {msg!r}"


@pytest.mark.parametrize("text,must_name", [
    ("lora:\n  r: 0\n", ["lora.r=0"]),
    ("lorra:\n  r: 8\n", ["lorra", "lora", "train"]),
    ("lora:\n  rank: 8\n", ["lora.rank", "alpha_rule"]),
    ("lora: 8\n", ["lora", "mapping"]),
    ("- a\n- b\n", ["mapping"]),
    ("lora: {r: [1\n", ["not valid YAML"]),
    ("train:\n  lr: [1, 2]\n", ["train.lr", "number"]),
])
def test_yaml_errors_one_line(tmp_path, text, must_name):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError) as e:
        load_experiment(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for word in must_name:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_empty_yaml_sections_are_defaults(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model:\nlora:\n")
    assert load_experiment(cfg) == Experiment()
    cfg.write_text("")
    assert load_experiment(cfg) == Experiment()


def test_empty_yaml_string_value_is_empty(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("study:\n  name:\ntracking:\n  uri:\n")
    exp = load_experiment(cfg)
    assert exp.study.name == "" and exp.tracking.uri == ""


@pytest.mark.parametrize("rule,alpha,r,expected", [
    ("rank", 16.0, 8, 1.0), ("rank", 3.0, 64, 1.0),
    ("free", 16.0, 8, 2.0), ("free", 8.0, 32, 0.25),
    ("rslora", 16.0, 4, 8.0), ("rslora", 16.0, 64, 2.0),
])
def test_scaling_rules(rule, alpha, r, expected):
    lora = LoraConfig(r=r, alpha_rule=rule, alpha=alpha)
    assert lora.scaling == pytest.approx(expected)
    # what peft computes from the alpha we hand it
    peft_scale = lora.lora_alpha / (math.sqrt(r) if rule == "rslora" else r)
    assert peft_scale == pytest.approx(expected)


def test_replace_validates_again():
    exp = build_experiment()
    assert replace(exp, lora={"r": 4}).lora.r == 4 and exp.lora.r == 8
    with pytest.raises(UserError, match="lora.r=0"):
        replace(exp, lora={"r": 0})


def test_config_is_frozen():
    exp = build_experiment()
    with pytest.raises(Exception):
        exp.lora.r = 4  # type: ignore[misc]


def test_roundtrip_through_yaml(tmp_path):
    import yaml

    exp = load_experiment(None, ["lora.targets=[v,q,o]", "train.lr=3e-4", "data.fields={output: answer}"])
    cfg = tmp_path / "resolved.yaml"
    cfg.write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    assert load_experiment(cfg) == exp


def test_describe_documents_every_field():
    import dataclasses

    rows = describe()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    expected = {f"{sec}.{f.name}" for sec, cls in
                ((s, type(getattr(Experiment(), s))) for s in SECTIONS) for f in dataclasses.fields(cls)}
    assert set(keys) == expected
    for key, _default, doc in rows:
        assert doc and len(doc) > 10 and "\n" not in doc, key
    defaults = dict((k, d) for k, d, _ in rows)
    assert defaults["lora.r"] == 8 and defaults["lora.targets"] == ["q", "v"]
