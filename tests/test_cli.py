"""``python -m lora_ablate train`` / ``eval``: the run folder, stock-peft reloads, --merge, and bad input
(exit 2, one ``error:`` line, nothing written)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lora_ablate.cli import main
from lora_ablate.config import load_experiment

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
# the smoke config, smaller still; generation on, so exact match and ROUGE-L are scored
FAST = ["data.train_size=64", "data.max_length=96", "train.steps=6", "train.log_every=2", "eval.size=8",
        "eval.max_new_tokens=4", "eval.every=3"]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.partial-"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One in-process training run with --merge, shared by the checks below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--config", str(SMOKE), "--out", str(out), "--merge", "--quiet", *FAST])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def tiny_tok():
    from lora_ablate.tiny import tiny_tokenizer

    return tiny_tokenizer()


def logits_of(model, tok, texts=("### Instruction:\nReverse the word.\n\n### Response:\nelppa", "the of and 12")):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_run_folder_contents(run):
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "environment.json", "history.jsonl",
                                                    "merged", "metrics.json", "scores.jsonl"]
    assert not list(run.parent.glob(".run.partial-*"))
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_config_yaml_resolves(run):
    saved = load_experiment(run / "config.yaml")
    assert saved == load_experiment(SMOKE, FAST)
    assert saved.train.steps == 6 and saved.lora.targets == ("q", "k", "v", "o")


def test_metrics_json(run):
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "tiny-llama" and m["scaling"] == 1.0 and "q->q_proj" in m["targets"]
    for phase in ("base", "final"):
        assert set(m[phase]) == {"heldout_instances", "heldout_tasks"}
        for s in m[phase].values():
            assert {"nll", "ppl", "n", "exact_match", "rouge_l"} <= set(s)
            assert s["n"] == 8 and 0 <= s["exact_match"] <= 1 and 0 <= s["rouge_l"] <= 1
    for name in m["final"]:
        assert m["final"][name]["nll"] < m["base"][name]["nll"]  # trained
    assert m["trial"]["status"] == "ok" and m["trial"]["trainable_params"] > 0


def test_scores_and_history(run):
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 8
    assert {(r["phase"], r["set"]) for r in rows} == {(p, s) for p in ("base", "final")
                                                     for s in ("heldout_instances", "heldout_tasks")}
    for r in rows:
        assert {"idx", "family", "nll", "tokens", "exact_match", "rouge_l", "prediction"} <= set(r)
    m = json.loads((run / "metrics.json").read_text())
    final = [r for r in rows if r["phase"] == "final" and r["set"] == "heldout_tasks"]
    em = sum(r["exact_match"] for r in final) / len(final)
    assert em == pytest.approx(m["final"]["heldout_tasks"]["exact_match"])
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist if h["kind"] == "train"] == [2, 4, 6]
    assert [h["step"] for h in hist if h["kind"] == "eval"] == [3]


def test_environment_json(run):
    env = json.loads((run / "environment.json").read_text())
    for pkg in ("torch", "transformers", "peft", "datasets", "lora_ablate"):
        assert env["packages"][pkg], pkg
    from importlib.metadata import version

    assert env["packages"]["peft"] == version("peft") and env["packages"]["torch"] == version("torch")
    assert "git_sha" in env and isinstance(env["git_sha"], str)
    assert env["python"] and env["model_source"]


def test_adapter_loads_with_stock_peft(run, fresh_tiny, tiny_tok):
    """Stock PeftModel.from_pretrained gives the model that was evaluated: its held-out NLL, recomputed,
    equals the final NLL the run recorded."""
    from peft import PeftModel

    from lora_ablate.data import load_eval_set
    from lora_ablate.evaluation import Evaluator

    model = PeftModel.from_pretrained(fresh_tiny(), str(run / "adapter"))
    model.eval()
    exp = load_experiment(run / "config.yaml")
    sets = [load_eval_set(n, exp.eval.size, exp.data.seed) for n in exp.eval.sets]
    nll = Evaluator(sets, tiny_tok, exp.data, exp.eval).nll(model, torch.device("cpu"))
    final = json.loads((run / "metrics.json").read_text())["final"]
    for name, (mean, _, _) in nll.items():
        assert mean == pytest.approx(final[name]["nll"], rel=1e-6, abs=1e-6)
    again = PeftModel.from_pretrained(fresh_tiny(), str(run / "adapter")).eval()
    assert torch.equal(logits_of(model, tiny_tok), logits_of(again, tiny_tok))
    assert not torch.allclose(logits_of(model, tiny_tok), logits_of(fresh_tiny(), tiny_tok))


def test_merged_model_equals_adapter(run, fresh_tiny, tiny_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(run / "merged")).eval()
    adapted = PeftModel.from_pretrained(fresh_tiny(), str(run / "adapter")).eval()
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert torch.allclose(logits_of(merged, tiny_tok), logits_of(adapted, tiny_tok), atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(run / "merged"))
    assert tok("apple banana")["input_ids"] == tiny_tok("apple banana")["input_ids"]


@pytest.mark.parametrize("where", ["run", "adapter"])
def test_eval_reproduces_final_metrics(run, tmp_path, capsys, where):
    target = run if where == "run" else run / "adapter"
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(target), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert set(got["metrics"]) == set(final)
    for name, m in final.items():
        for key in ("nll", "ppl", "exact_match", "rouge_l", "n"):
            assert got["metrics"][name][key] == pytest.approx(m[key], rel=1e-6, abs=1e-6), (name, key)
    assert len(got["examples"]) == 16
    printed = capsys.readouterr().out
    assert "heldout_tasks" in printed and "scaling: 1" in printed


def test_eval_with_overrides(run, capsys):
    from lora_ablate.commands.eval_adapter import evaluate_adapter

    metrics = evaluate_adapter(run, overrides=["eval.sets=[heldout_tasks]", "eval.size=4", "eval.generate=false"])
    assert set(metrics) == {"heldout_tasks"} and metrics["heldout_tasks"]["n"] == 4
    assert "exact_match" not in metrics["heldout_tasks"]


def test_eval_does_not_need_the_training_data(run, tmp_path, write_jsonl, alpaca_rows):
    """A saved adapter stays evaluable after its training file is gone."""
    data = write_jsonl(alpaca_rows * 4, "gone.jsonl")
    out = tmp_path / "run2"
    assert main(["train", "--config", str(SMOKE), "--out", str(out), "--quiet", *FAST, f"data.train={data}",
                 "train.steps=1", "eval.generate=false", "eval.base=false"]) == 0
    data.unlink()
    assert main(["eval", "--adapter", str(out)]) == 0


def test_eval_bad_adapter(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "adapter_config.json" in err


def test_config_command(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "lora.r" in out and "alpha_rule" in out
    assert main(["config", "--config", str(SMOKE), "lora.r=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lora"]["r"] == 4


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def malformed(write_jsonl, alpaca_rows):
    return write_jsonl(alpaca_rows[:2] + [{"instruction": "Reverse the word.", "input": "x", "output": ""}],
                       "malformed.jsonl")


BAD = {
    "rank0": (["lora.r=0"], ["lora.r=0"]),
    "unknown_target": (["lora.targets=[q,z]"], ["'z'", "q, k, v, o, mlp"]),
    "missing_data": (["data.train=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl", "does not exist"]),
    "malformed_row": (["data.train={malformed}"], ["malformed.jsonl", "row 2", "'output'", "empty"]),
    "unknown_key": (["lora.rank=4"], ["lora.rank", "alpha_rule"]),
    "unknown_section": (["lorra.r=4"], ["lorra", "lora"]),
    "bad_type": (["train.lr=fast"], ["train.lr", "fast"]),
    "quantization_on_cpu": (["model.quantization=4bit"], ["model.quantization=4bit", "CUDA", "none"]),
    "unknown_model": (["model.name=nowhere-model"], ["nowhere-model", "tiny-llama"]),
    "unknown_eval_set": (["eval.sets=[heldout_nope]"], ["heldout_nope", "heldout_instances"]),
    "nan_training": (["train.lr=1e30", "train.steps=2", "train.log_every=1", "eval.base=false",
                      "eval.generate=false"], ["training failed", "nan"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tmp_path, capsys, malformed):
    overrides, must_name = BAD[case]
    overrides = [o.format(malformed=malformed) for o in overrides]
    out = tmp_path / "out"
    rc = main(["train", "--config", str(SMOKE), "--out", str(out), "--quiet", *FAST, *overrides])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for word in must_name:
        assert word in err, (word, err)
    assert leftovers(tmp_path, "out") == []


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 0\n")
    for cfg, word in ((bad, "lora.r=0"), (tmp_path / "missing.yaml", str(tmp_path / "missing.yaml"))):
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and word in err, err
    assert leftovers(tmp_path, "out") == []


def test_existing_nonempty_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["train", "--config", str(SMOKE), "--out", str(out), "--quiet", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path, "out") == ["out"]


def test_failure_inside_the_run_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A crash after the run folder was started (here: while writing metrics) removes the partial folder."""
    import lora_ablate.rundir as rundir

    def boom(self, name, rows):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.RunDir, "jsonl", boom)
    out = tmp_path / "deep" / "out"
    with pytest.raises(OSError):
        main(["train", "--config", str(SMOKE), "--out", str(out), "--quiet", *FAST, "train.steps=1",
              "eval.generate=false", "eval.base=false"])
    assert not (tmp_path / "deep").exists()  # no partial folder, and no empty parents left behind either


def test_empty_existing_out_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["train", "--config", str(SMOKE), "--out", str(out), "--quiet", *FAST, "train.steps=1",
                 "eval.generate=false", "eval.base=false"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- the real thing, once


def test_smoke_subprocess(tmp_path, fresh_tiny):
    """Acceptance: ``python -m lora_ablate train --config experiments/smoke.yaml --out DIR`` in under a
    minute, leaving an adapter that stock peft loads."""
    from peft import PeftModel

    out = tmp_path / "smoke"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_ablate", "train", "--config", str(SMOKE), "--out", str(out),
                           "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 60, elapsed
    assert f"run written to {out}" in proc.stdout
    model = PeftModel.from_pretrained(fresh_tiny(), str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["final"]) == {"heldout_instances", "heldout_tasks"} and m["trial"]["status"] == "ok"


def test_closed_pipe_gives_no_traceback():
    """`python -m lora_ablate config | head -1`: the reader leaving early is not a crash."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_ablate", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
