"""PiSSA and OLoRA inits on the packed path (CPU, fp32, tiny-llama) against the reference path: per-step
losses, the exported adapters' logits with stock peft on the original base, and the shared base untouched."""

import json

import pytest
import torch
from peft import PeftModel

from lora_ablate.config import LoraConfig, TrainConfig
from lora_ablate.errors import UserError
from lora_ablate.packed import Pack, PackedTrainer
from lora_ablate.reference import ReferenceTrainer
from lora_ablate.trial import TrialSpec
from tests.probes import logits_of

REL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread


def spec(name, tmp, r=4, init="pissa", steps=4, targets=("q", "v", "o", "mlp"), **lora):
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-2, log_every=1, seed=len(name), weight_decay=0.1)
    return TrialSpec(LoraConfig(r=r, init=init, targets=targets, **lora), train, name=name, adapter_dir=tmp / name)


def close(a, b):
    return abs(a - b) <= REL * abs(a)


def assert_same(ref, got, fresh_tiny, tok):
    assert got.status == ref.status == "ok", (got.error, ref.error)
    assert (got.trainable_params, got.tokens) == (ref.trainable_params, ref.tokens)
    assert [h["step"] for h in got.history] == [h["step"] for h in ref.history]
    for a, b in zip(ref.history, got.history):
        assert close(a["loss"], b["loss"]), (ref.spec.name, a, b)
    if ref.final is not None:  # held-out NLL of the trial alone, evaluated next to others in the pack
        assert all(close(m["nll"], got.final.metrics[k]["nll"]) for k, m in ref.final.metrics.items())
    cfg_ref, cfg_got = (json.loads((r.adapter_dir / "adapter_config.json").read_text()) for r in (ref, got))
    keys = ("r", "lora_alpha", "init_lora_weights", "use_rslora", "target_modules")
    assert {k: cfg_got[k] for k in keys} == {k: cfg_ref[k] for k in keys}
    want = logits_of(PeftModel.from_pretrained(fresh_tiny(), str(ref.adapter_dir)).eval(), tok)
    have = logits_of(PeftModel.from_pretrained(fresh_tiny(), str(got.adapter_dir)).eval(), tok)
    torch.testing.assert_close(have, want, rtol=REL, atol=REL)
    assert not torch.allclose(have, logits_of(fresh_tiny(), tok), atol=1e-3)  # it trained


def _both(tiny_base, data, specs, refill=(), evaluator=None):
    """The reference path's and the packed path's results for ``specs`` (then ``refill`` joining the pack)."""
    ref_specs = [TrialSpec(s.lora, s.train, name=s.name, adapter_dir=s.adapter_dir.with_name("ref-" + s.name))
                 for s in [*specs, *refill]]
    ref = ReferenceTrainer(tiny_base, data, evaluator, progress=False).train(ref_specs)
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    queue = list(refill)
    got = PackedTrainer(tiny_base, data, evaluator, progress=False).train(
        specs, refill=lambda: queue.pop(0) if queue else None)
    after = tiny_base.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    return ref, got


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_one_trial_pack_matches_the_reference_path(init, tiny_base, train_data, fresh_tiny, tmp_path):
    ref, got = _both(tiny_base, train_data, [spec("one", tmp_path, init=init)])
    assert_same(ref[0], got[0], fresh_tiny, tiny_base.tokenizer)


def test_mixed_inits_and_ranks_in_one_pack_match_the_reference_path(tiny_base, train_data, evaluator, fresh_tiny,
                                                                   tmp_path):
    specs = [spec("default-r2", tmp_path, r=2, init="default", steps=3, targets=("q", "v")),
             spec("pissa-free", tmp_path, r=4, alpha_rule="free", alpha=6.0, steps=5),
             spec("olora-rslora", tmp_path, r=2, alpha_rule="rslora", alpha=4.0, steps=4, targets=("k", "o"))]
    # joins the live pack when the first trial leaves: A0, B0 taken from the projections inside the wrappers
    late = [spec("late-olora", tmp_path, r=8, init="olora", steps=2, targets=("q", "mlp"))]
    ref, got = _both(tiny_base, train_data, specs, late, evaluator)
    assert [r.spec.name for r in got] == [s.name for s in [*specs, *late]]
    assert all(r.final is not None for r in [*ref, *got])
    for a, b in zip(ref, got):
        assert_same(a, b, fresh_tiny, tiny_base.tokenizer)


def test_a_fresh_pissa_trial_computes_the_base_function(tiny_base, train_data):
    """W0 + s (B0 A0 - B0 A0): before any step the pack's model is the base, up to fp32 rounding."""
    want = logits_of(tiny_base.model, tiny_base.tokenizer)
    pack = Pack(tiny_base, train_data, None, compile=False)
    try:
        s = TrialSpec(LoraConfig(r=4, init="pissa", targets=("q", "k", "v", "o", "mlp")), TrainConfig(batch_size=4))
        pack.relayout([pack.new_slot(pack.new_result(s))])
        torch.testing.assert_close(logits_of(pack.model, tiny_base.tokenizer), want, rtol=0, atol=1e-5)
        a, b = next(iter(pack.slot_weights(pack.slots[0]).values()))
        assert torch.count_nonzero(b) > 0 and torch.equal(a, next(iter(pack.slot_weights(
            pack.slots[0], pack.initial).values()))[0])  # trained from A0 (B0 != 0), corrected by a frozen copy
    finally:
        pack.close()


def test_refused_on_a_quantized_base(tiny_base, train_data, monkeypatch):
    monkeypatch.setattr(tiny_base, "quantization", "8bit")
    spec_ = TrialSpec(LoraConfig(r=2, init="olora"), TrainConfig(steps=1, batch_size=4), name="p")
    with pytest.raises(UserError, match=r"^lora\.init=olora rewrites the adapted base weights, which a 8bit base"):
        PackedTrainer(tiny_base, train_data, None, progress=False).train([spec_])
