"""Part of a fused q/k/v matrix (lora.fused_subset=rows): one stock-peft adapter whose B is block-structured,
on the reference path and the packed path."""

import copy

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from lora_ablate.config import LoraConfig, TrainConfig
from lora_ablate.errors import UserError
from lora_ablate.reference import fused_row_mask, fused_row_masks, lora_config
from lora_ablate.targets import resolve_targets
from lora_ablate.trial import TrialSpec

H = 64
_ATTN = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
FUSED = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(intermediate_size=2 * H, **_ATTN),
    "phi3": lambda: transformers.Phi3Config(intermediate_size=2 * H, num_key_value_heads=2, pad_token_id=0,
                                            eos_token_id=0, bos_token_id=0, **_ATTN),
    "falcon": lambda: transformers.FalconConfig(**_ATTN),  # multi-query: [q | k | v]
    "falcon-new": lambda: transformers.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **_ATTN),
    "falcon-mha": lambda: transformers.FalconConfig(multi_query=False, **_ATTN),  # per head interleaved
    "bloom": lambda: transformers.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=128),
}
R = 2


def _train_a_little(model, masks_for):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 12))
    for _ in range(3):
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return ids


def _fused_layer(model, plan):
    name = next(iter(plan.fused_rows))
    return name, model.base_model.model.get_submodule(name)


@pytest.mark.parametrize("arch", sorted(FUSED))
@pytest.mark.parametrize("roles", [("q",), ("k", "v"), ("q", "v", "o")])
def test_partial_fused_changes_only_its_rows_and_loads_with_stock_peft(arch, roles, tmp_path):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(FUSED[arch]()).eval()
    model = copy.deepcopy(original)
    spec = TrialSpec(LoraConfig(r=R, targets=roles, fused_subset="rows"), TrainConfig())
    plan = resolve_targets(model, roles, "rows")
    assert plan.fused_rows and " rows of qkv->" in plan.describe()
    peft_model = get_peft_model(model, lora_config(spec, plan))
    masks = fused_row_masks(peft_model, plan, R)
    ids = _train_a_little(peft_model, masks)

    name, layer = _fused_layer(peft_model, plan)
    B = layer.lora_B["default"].weight
    assert B.shape[1] == R * len([r for r in roles if r in "qkv"])
    assert torch.count_nonzero(B[masks[0] == 0]) == 0 and torch.count_nonzero(B) > 0  # trained, structure kept
    x = torch.randn(3, H)
    diff = (layer(x) - layer.get_base_layer()(x)).abs().amax(0)
    adapted = torch.cat(list(plan.fused_rows[name].values()))
    rest = torch.ones_like(diff, dtype=torch.bool)
    rest[adapted] = False
    assert torch.all(diff[rest] == 0) and torch.all(diff[adapted] > 0)

    # trainable parameters: r per role, on that role's rows only (what a separate q/k/v projection would have)
    in_f = layer.lora_A["default"].weight.shape[1]
    per_layer = sum(R * in_f + R * len(rows) for rows in plan.fused_rows[name].values())
    fused_params = sum(m.numel() - int((m == 0).sum()) + R * len(plan.fused_rows[name]) * in_f for m in masks)
    assert fused_params == per_layer * len(plan.fused_rows)

    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "a"))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_scale_is_the_trials_on_the_fused_matrix_too():
    model = AutoModelForCausalLM.from_config(FUSED["gpt2"]())
    for rule, alpha in (("rank", 16.0), ("free", 6.0), ("rslora", 6.0)):
        lora = LoraConfig(r=R, targets=("q", "v", "o"), fused_subset="rows", alpha_rule=rule, alpha=alpha)
        plan = resolve_targets(model, lora.targets, "rows")
        peft_model = get_peft_model(copy.deepcopy(model), lora_config(TrialSpec(lora, TrainConfig()), plan))
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        assert {m.r["default"] for m in layers} == {R, 2 * R}
        assert all(m.scaling["default"] == pytest.approx(lora.scaling) for m in layers), rule


def test_rows_is_opt_in_and_unknown_layouts_are_refused():
    model = AutoModelForCausalLM.from_config(FUSED["gpt2"]())
    with pytest.raises(UserError, match="would adapt k and v too"):
        resolve_targets(model, ["q"])
    bigcode = AutoModelForCausalLM.from_config(transformers.GPTBigCodeConfig(
        n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UserError, match=r"row layout per role is not known for gpt_bigcode"):
        resolve_targets(bigcode, ["q"], "rows")


# --- the packed path ------------------------------------------------------------------------------------------

def _loaded(arch):
    from lora_ablate.models import LoadedModel
    from lora_ablate.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = FUSED[arch]()
    cfg.vocab_size = len(tok)
    for dropout in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(cfg, dropout):  # the model's own dropout draws differ between the paths' batch layouts
            setattr(cfg, dropout, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, f"tiny-{arch}", "in-process", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])  # [q | k | v] blocks; per head interleaved
def test_packed_fused_rows_match_the_reference_path(arch, one_thread, tmp_path):
    from safetensors.torch import load_file

    from lora_ablate.data import encode_all, load_examples
    from lora_ablate.packed import PackedTrainer
    from lora_ablate.reference import ReferenceTrainer

    base = _loaded(arch)
    data = encode_all(load_examples("builtin:train", size=32, seed=0), base.tokenizer, "alpaca", 48)

    def spec(name, roles, r, lr=1e-2, **train):
        tc = TrainConfig(steps=4, batch_size=4, lr=lr, log_every=1, seed=len(name), weight_decay=0.1, **train)
        return TrialSpec(LoraConfig(r=r, targets=roles, fused_subset="rows"), tc, name=name,
                         adapter_dir=tmp_path / name)

    # a part-adapted matrix next to one the other trial adapts whole (its B unmasked in the same block)
    specs = [spec("q", ("q",), 2, lr=0.1), spec("kvo", ("k", "v", "o"), 4, max_grad_norm=0.5)]
    ref_specs = [TrialSpec(s.lora, s.train, name=s.name, adapter_dir=tmp_path / f"ref-{s.name}") for s in specs]
    ref = ReferenceTrainer(base, data, None, progress=False).train(ref_specs)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    got = PackedTrainer(base, data, None, progress=False).train(specs)
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items())

    ids = torch.tensor([data.input_ids[0][:24], data.input_ids[1][:24]])
    original = copy.deepcopy(base.model)
    for a, b in zip(ref, got):
        assert b.status == a.status == "ok", (b.error, a.error)
        assert (b.targets, b.trainable_params, b.tokens) == (a.targets, a.trainable_params, a.tokens)
        for ha, hb in zip(a.history, b.history, strict=True):
            assert abs(ha["loss"] - hb["loss"]) <= 1e-4 * ha["loss"], (a.spec.name, ha, hb)
        plan = resolve_targets(base.model, a.spec.lora.targets, "rows")
        state = load_file(str(b.adapter_dir / "adapter_model.safetensors"))
        for name, rows in plan.fused_rows.items():
            B = state[f"base_model.model.{name}.lora_B.weight"]
            mask = fused_row_mask(rows, B.shape[0], a.spec.lora.r)
            assert torch.count_nonzero(B[mask == 0]) == 0 and torch.count_nonzero(B[mask == 1]) == mask.sum()
        logits = []
        for r in (a, b):
            with torch.no_grad():
                logits.append(PeftModel.from_pretrained(copy.deepcopy(original), str(r.adapter_dir)).eval()(
                    input_ids=ids).logits)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            trained = (logits[1] - original(input_ids=ids).logits).abs().amax()
        assert trained > 1e-3, trained  # well above the paths' difference: it trained
