"""Issue 16's guards on the real path. Retention (forgetting) sets: ``eval.retention`` sets are scored by NLL
with the base model and every adapter, cost no generation on either engine, go through the same checks
as held-out sets, and export shows them next to what was learned. Power and Holm: export's power table
and compare's Holm-adjusted p-values on a tiny real study."""

import json

import pytest
import torch

from lora_ablate.config import DataConfig, EvalConfig, LoraConfig, TrainConfig, build_experiment
from lora_ablate.data import load_eval_set, load_eval_sets, load_examples
from lora_ablate.errors import UserError
from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel
from lora_ablate.tiny import tiny_llama
from lora_ablate.trial import TrialSpec


@pytest.fixture(scope="module")
def base():
    model, tok = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-llama", "in-process", torch.device("cpu"), torch.float32)


def evaluator(base):
    cfg = EvalConfig(sets=("heldout_instances",), size=4, max_new_tokens=3, batch_size=4)
    sets = [load_eval_set("heldout_instances", 4, 0), load_eval_set("heldout_tasks", 4, 0, role="retention")]
    return Evaluator(sets, base.tokenizer, DataConfig(max_length=96), cfg)


def generated(monkeypatch, owner, name):
    """Record the set names ``owner.name`` generates for, calling through."""
    seen, real = [], getattr(owner, name)

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(owner, name, spy)
    return seen


def test_retention_sets_are_scored_without_generation_on_both_engines(base, monkeypatch):
    from lora_ablate.packed import heldout, train_packed

    ev = evaluator(base)
    seen = generated(monkeypatch, Evaluator, "generate")
    report = ev.run(base.model, base.device)
    assert seen == ["heldout_instances"]
    assert set(report.metrics["heldout_tasks"]) == {"nll", "ppl", "n"} and "exact_match" in report.metrics[
        "heldout_instances"]
    assert not any("prediction" in r for r in report.examples if r["set"] == "heldout_tasks")

    seen = generated(monkeypatch, heldout, "packed_generate")
    data = ev.encoded["heldout_instances"]  # any encoded records train the pack
    specs = [TrialSpec(LoraConfig(r=2), TrainConfig(steps=1, batch_size=2, seed=s), name=f"s{s}") for s in (1, 2)]
    results = train_packed(base, specs, data, ev, progress=False)
    assert seen == ["heldout_instances"] and all(r.status == "ok" for r in results)
    for r in results:
        assert set(r.final.metrics["heldout_tasks"]) == {"nll", "ppl", "n"}


def test_train_records_retention_for_base_and_adapter(tmp_path):
    from lora_ablate.cli import main

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"instruction": f"Tell me a fact about the number {i}.",
                                           "output": f"{i} is a number with {len(str(i))} digits."}) + "\n"
                               for i in range(6)))
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--quiet", "model.name=tiny-llama", "data.train_size=16",
               "data.max_length=64", "train.steps=1", "train.batch_size=4", "eval.size=4", "eval.max_new_tokens=2",
               "eval.sets=[heldout_tasks]", f"eval.retention=[{general}]", "lora.r=2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for phase in ("base", "final"):  # the base model and the adapter
        assert set(m[phase]["general"]) == {"nll", "ppl", "n"} and "exact_match" in m[phase]["heldout_tasks"]
    assert m["leakage"]["general"]["fraction"] == 0  # a retention set must not be trained on either
    assert m["headline"]["general"] == "nll"  # scored without generations: NLL is all it has


def test_retention_entries_and_names_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"eval.retention entry \{'path': 'x.jsonl'\} is not valid"):
        EvalConfig(retention=({"path": "x.jsonl"},))
    exp = build_experiment({}, ["eval.sets=[heldout_tasks]", "eval.retention=[builtin:heldout_tasks]"])
    with pytest.raises(UserError, match=r"\['heldout_tasks'\] appear twice in eval.sets and eval.retention"):
        load_eval_sets(exp.eval, exp.data)
    spec = tmp_path / "general.yaml"
    spec.write_text("source: builtin:heldout_tasks\ngenerate: maybe\n")
    with pytest.raises(UserError, match=r"generate='maybe' is not valid; write true or false"):
        load_eval_set(str(spec), 4, 0, role="retention")
    spec.write_text("source: builtin:heldout_tasks\ngenerate: true\n")
    assert load_eval_set(str(spec), 4, 0, role="retention").generate  # a set file may ask for generation
    assert load_examples("builtin:heldout_tasks", size=2)  # the source the set files above read


def test_shipped_retention_set_is_nll_only():
    # the set file itself: its source lives outside the clone (../shared/data), which CI does not have
    from lora_ablate.config import read_mapping
    from lora_ablate.suite import evals_dir

    spec = read_mapping(evals_dir() / "sets" / "retention_user.yaml", "held-out set file", "a mapping")
    assert spec["generate"] is False and spec["headline"] == "nll" and spec["source"].endswith(
        "user_oriented_instructions.jsonl")


# ----------------------------------------------------------------------------- a tiny real study, exported


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Three ranks x two seeds on tiny-llama, with a retention set; its workspace."""
    from lora_ablate.cli import main

    root = tmp_path_factory.mktemp("retention_study")
    general = root / "general.jsonl"
    general.write_text("".join(json.dumps({"instruction": f"Write one sentence about the colour number {i}.",
                                           "output": f"Colour {i} is a calm shade that many people like."}) + "\n"
                               for i in range(6)))
    space = root / "space.yaml"
    space.write_text("description: three ranks\nfixed:\n  lora.targets: [q, v]\naxes:\n  lora.r: {grid: [1, 2, 4]}\n")
    ws = root / "ws"
    argv = ["study", "--workspace", str(ws), "--space", str(space), "--study-name", "forget", "--seeds", "2",
            "--quiet", "model.name=tiny-llama", "data.train_size=16", "data.max_length=64", "train.steps=3",
            "train.batch_size=4", "train.lr=5e-2", "eval.size=4", "eval.generate=false",
            "eval.sets=[heldout_instances]", f"eval.retention=[{general}]"]
    assert main(argv) == 0
    return {"ws": ws, "root": root}


def test_export_shows_learned_next_to_forgotten(tiny_study, tmp_path):
    import pandas as pd

    from lora_ablate.commands.results import export
    from lora_ablate.export.stats import summarize
    from lora_ablate.export.tracked import open_study

    study = open_study("forget", tiny_study["ws"])
    out = export("forget", tmp_path / "out", "md,csv", tiny_study["ws"])
    table = pd.read_csv(out / "csv" / "learned_forgotten.csv")
    assert list(table["r"]) == [1, 2, 4] and list(table["n"]) == [2, 2, 2]
    base_h, base_g = study.base["heldout_instances/nll"], study.base["general/nll"]
    for _, row in table.iterrows():
        trials = study.complete[study.complete["r"] == row["r"]]
        gain = summarize(base_h - trials["final/heldout_instances/nll"])
        rise = summarize(trials["final/general/nll"] - base_g)
        assert row["heldout_instances/nll gain mean"] == pytest.approx(gain.mean)
        assert row["heldout_instances/nll gain ci_low"] == pytest.approx(gain.ci_low)
        assert row["general/nll forgetting mean"] == pytest.approx(rise.mean)
        assert row["general/nll forgetting ci_high"] == pytest.approx(rise.ci_high)
    assert table["heldout_instances/nll gain mean"].abs().max() > 0  # three steps at lr 5e-2 move the NLL
    assert (out / "plots" / "learned_forgotten.png").is_file()
    assert "learned vs forgotten" in (out / "report.md").read_text()


def test_export_power_table_is_the_paired_analysis_of_best_and_runner_up(tiny_study, tmp_path):
    import pandas as pd

    from lora_ablate.commands.results import compare, export
    from lora_ablate.export.stats import components
    from lora_ablate.export.tracked import open_study

    out = export("forget", tmp_path / "out", "csv", tiny_study["ws"], metrics="heldout_instances/nll")
    (row,) = pd.read_csv(out / "csv" / "power.csv").to_dict("records")
    c = compare("forget", row["best"], row["runner_up"], workspace=tiny_study["ws"], n_boot=2000)
    assert row["delta"] == pytest.approx(c.delta) and (row["seeds"], row["examples"]) == (2, 4)
    assert row["within_noise"] == (row["ci_low"] <= 0 <= row["ci_high"])
    # detectable = (z_0.975 + z_0.8) SE, SE^2 from the components of the paired differences
    assert row["mde"] == pytest.approx(2.8016 * row["se"], rel=1e-4) and row["mde"] == pytest.approx(c.detectable)
    # the same SE by hand from scores.jsonl: token-weighted differences, two-way ANOVA, floored components
    study = open_study("forget", tiny_study["ws"])
    scores = study.example_scores
    scores = scores[scores["set"] == "heldout_instances"]
    side = lambda sel: scores[scores["run_id"].isin(  # noqa: E731
        study.complete.loc[study.complete["r"] == int(sel.split("=")[1]), "run_id"])].pivot_table(
        index="seed", columns="idx", values="nll")
    w = scores.groupby("idx")["tokens"].mean().to_numpy()
    d = (side(row["runner_up"]) - side(row["best"])).to_numpy() * w / w.mean()
    (n_s, n_e), g = d.shape, d.mean()
    ms_r = n_e * ((d.mean(1) - g) ** 2).sum() / (n_s - 1)
    ms_c = n_s * ((d.mean(0) - g) ** 2).sum() / (n_e - 1)
    ms_e = ((d - d.mean(1)[:, None] - d.mean(0)[None, :] + g) ** 2).sum() / ((n_s - 1) * (n_e - 1))
    var = max(0, ms_r - ms_e) / n_e / n_s + max(0, ms_c - ms_e) / n_s / n_e + ms_e / (n_s * n_e)
    assert row["se"] == pytest.approx(var ** 0.5) and components(d).variance() == pytest.approx(var)
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert any(n.startswith("Power, heldout_instances/nll: best ") for n in notes)


def test_compare_many_prints_raw_and_holm_adjusted_p_values(tiny_study, capsys):
    import re

    from lora_ablate.cli import main
    from lora_ablate.commands.results import compare
    from lora_ablate.export.stats import holm

    ws = str(tiny_study["ws"])
    base = ["compare", "--workspace", ws, "--study", "forget", "--a", "r=1", "--n-boot", "500"]
    assert main([*base, "--b", "r=2", "--b", "r=4"]) == 0
    text = capsys.readouterr().out
    assert "Holm correction over 2 comparisons" in text and text.count("power: ") == 2
    got = [(float(raw), float(adj)) for raw, adj in re.findall(r"p = ([\d.]+) raw, ([\d.]+) Holm-adjusted", text)]
    alone = [compare("forget", "r=1", b, workspace=tiny_study["ws"], n_boot=500).p_value for b in ("r=2", "r=4")]
    assert [raw for raw, _ in got] == pytest.approx(alone, abs=1e-4)
    assert [adj for _, adj in got] == pytest.approx(holm(alone), abs=1e-4)
    assert main([*base, "--all"]) == 0  # every other configuration: the same two comparisons
    assert re.findall(r"p = [\d.]+ raw, [\d.]+ Holm", capsys.readouterr().out) == re.findall(
        r"p = [\d.]+ raw, [\d.]+ Holm", text)
    assert main([*base, "--b", "r=4", "--json"]) == 0
    one = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert one["p_holm"] is None and one["detectable"] > 0  # one comparison: nothing to adjust
