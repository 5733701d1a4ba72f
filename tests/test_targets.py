"""Role -> module resolution on tiny random models of every supported architecture (no downloads)."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_ablate.errors import UserError
from lora_ablate.targets import (
    KNOWN_ARCHITECTURES,
    TargetPlan,
    linear_module_suffixes,
    plain_decoding,
    plain_head,
    resolve_targets,
    role_names,
)

LAYERS = 2
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)

# model_type -> (config factory, per-layer module names (relative to the layer) for q, k, v, o, mlp).
# Fused architectures list their qkv matrix under each of q, k, v.
_LLAMA_NAMES = {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
                "o": ["self_attn.o_proj"], "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
ARCHS = {
    "llama": (lambda: transformers.LlamaConfig(**_COMMON), "model.layers", _LLAMA_NAMES),
    "mistral": (lambda: transformers.MistralConfig(**_COMMON), "model.layers", _LLAMA_NAMES),
    "qwen2": (lambda: transformers.Qwen2Config(**_COMMON), "model.layers", _LLAMA_NAMES),
    "qwen3": (lambda: transformers.Qwen3Config(head_dim=8, **_COMMON), "model.layers", _LLAMA_NAMES),
    "gemma": (lambda: transformers.GemmaConfig(head_dim=8, **_COMMON), "model.layers", _LLAMA_NAMES),
    "gemma2": (lambda: transformers.Gemma2Config(head_dim=8, **_COMMON), "model.layers", _LLAMA_NAMES),
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(head_dim=8, **_COMMON), "model.layers", _LLAMA_NAMES),
    "opt": (lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                           vocab_size=128, word_embed_proj_dim=32),
            "model.decoder.layers",
            {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
             "o": ["self_attn.out_proj"], "mlp": ["fc1", "fc2"]}),
    "phi": (lambda: transformers.PhiConfig(**_COMMON), "model.layers",
            {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
             "o": ["self_attn.dense"], "mlp": ["mlp.fc1", "mlp.fc2"]}),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=128, n_positions=64,
                                             bos_token_id=0, eos_token_id=0),
             "transformer.h",
             {"q": ["attn.c_attn"], "k": ["attn.c_attn"], "v": ["attn.c_attn"], "o": ["attn.c_proj"],
              "mlp": ["mlp.c_fc", "mlp.c_proj"]}),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                                    num_attention_heads=4, vocab_size=128),
                 "gpt_neox.layers",
                 {"q": ["attention.query_key_value"], "k": ["attention.query_key_value"],
                  "v": ["attention.query_key_value"], "o": ["attention.dense"],
                  "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}),
    "phi3": (lambda: transformers.Phi3Config(pad_token_id=0, eos_token_id=0, bos_token_id=0, **_COMMON),
             "model.layers",
             {"q": ["self_attn.qkv_proj"], "k": ["self_attn.qkv_proj"], "v": ["self_attn.qkv_proj"],
              "o": ["self_attn.o_proj"], "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]}),
}
FUSED = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi3": "qkv_proj"}

_cache: dict[str, torch.nn.Module] = {}


def tiny(arch: str) -> torch.nn.Module:
    """A fresh tiny random model (built once per arch, then deep-copied: peft mutates what it wraps)."""
    import copy
    if arch not in _cache:
        torch.manual_seed(0)
        _cache[arch] = AutoModelForCausalLM.from_config(ARCHS[arch][0]())
    return copy.deepcopy(_cache[arch])


def expected(arch: str, roles) -> list[str]:
    prefix, per_layer = ARCHS[arch][1], ARCHS[arch][2]
    rel = {n for r in roles for n in per_layer[r]}
    return sorted(f"{prefix}.{i}.{n}" for i in range(LAYERS) for n in rel)


def lora_adapted(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def test_every_known_architecture_is_tested():
    assert set(KNOWN_ARCHITECTURES) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("roles", [["q", "v"], ["o"], ["q", "k", "v", "o"], ["mlp"], ["q", "k", "v", "o", "mlp"]])
def test_resolves_roles_and_peft_adapts_exactly_those(arch, roles):
    if arch in FUSED and roles == ["q", "v"]:
        pytest.skip("partial fused subsets are refused (tested below)")
    model = tiny(arch)
    plan = resolve_targets(model, roles)
    assert plan.architecture == arch
    assert plan.roles == tuple(roles)
    assert sorted(plan.module_names) == expected(arch, roles)
    # model order, as named_modules() yields them
    order = [n for n, _ in model.named_modules()]
    assert list(plan.module_names) == sorted(plan.module_names, key=order.index)
    assert set(plan.role_of) == set(plan.module_names)
    assert plan.describe().startswith(f"{arch}: ") and f"({len(plan.module_names)} modules)" in plan.describe()

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=plan.target_modules,
                                                  fan_in_fan_out=arch == "gpt2"))
    assert lora_adapted(peft_model) == set(plan.module_names)


def test_exact_names_and_roles_llama():
    plan = resolve_targets(tiny("llama"), ["v", "q"])  # order-insensitive
    assert plan.roles == ("q", "v")
    assert plan.module_names == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                 "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    assert plan.role_of["model.layers.1.self_attn.v_proj"] == "v"
    assert plan.describe() == "llama: q->q_proj, v->v_proj (4 modules)"
    mlp = resolve_targets(tiny("llama"), ["mlp"])
    assert len(mlp.module_names) == LAYERS * 3
    assert set(mlp.role_of.values()) == {"mlp"}


def test_gpt2_attention_output_is_not_the_mlp_projection():
    model = tiny("gpt2")
    o = resolve_targets(model, ["o"])
    assert o.module_names == ("transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj")
    assert o.describe() == "gpt2: o->attn.c_proj (2 modules)"
    mlp = resolve_targets(model, ["mlp"])
    assert mlp.module_names == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                                "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj")


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_qkv_accepted_together(arch):
    plan = resolve_targets(tiny(arch), ["q", "k", "v"])
    assert len(plan.module_names) == LAYERS
    assert all(n.endswith("." + FUSED[arch]) for n in plan.module_names)
    assert set(plan.role_of.values()) == {"qkv"}
    assert "qkv->" in plan.describe()
    full = resolve_targets(tiny(arch), ["q", "k", "v", "o", "mlp"])
    assert sorted(set(full.role_of.values())) == ["mlp", "o", "qkv"]


@pytest.mark.parametrize("arch", sorted(FUSED))
@pytest.mark.parametrize("roles,extra", [(["q", "v"], "k"), (["q"], "k and v"), (["k", "v", "o"], "q"),
                                         (["v", "mlp"], "q and k")])
def test_fused_partial_subsets_refused(arch, roles, extra):
    with pytest.raises(UserError) as e:
        resolve_targets(tiny(arch), roles)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{arch} fuses q, k and v in one matrix" in msg and FUSED[arch] in msg
    assert f"would adapt {extra} too" in msg
    assert "use all of q, k, v together or none of them" in msg


def test_fused_message_matches_the_documented_example():
    with pytest.raises(UserError, match=r"^gpt2 fuses q, k and v in one matrix \(attn\.c_attn\); targets \[q, v\] "
                                        r"would adapt k too: use all of q, k, v together or none of them$"):
        resolve_targets(tiny("gpt2"), ["q", "v"])


class _Weird(torch.nn.Module):
    """A model of an unknown architecture (or a known one, lacking some modules)."""

    def __init__(self, model_type, names=("wq", "wo")):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.block = torch.nn.ModuleDict({n: torch.nn.Linear(4, 4) for n in names})
        self.norm = torch.nn.LayerNorm(4)


def test_unknown_architecture_lists_linear_modules_and_known_ones():
    with pytest.raises(UserError) as e:
        resolve_targets(_Weird("weird"), ["q"])
    msg = str(e.value)
    assert "'weird'" in msg and "wo, wq" in msg and "llama" in msg and "gpt2" in msg
    assert "\n" not in msg


def test_model_without_config_is_an_unknown_architecture():
    with pytest.raises(UserError, match="unknown architecture None"):
        resolve_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["q"])


def test_missing_role_modules_named():
    model = _Weird("llama", names=("q_proj", "v_proj"))
    assert resolve_targets(model, ["q", "v"]).module_names == ("block.q_proj", "block.v_proj")
    with pytest.raises(UserError) as e:
        resolve_targets(model, ["q", "mlp"])
    msg = str(e.value)
    assert "mlp" in msg and "gate_proj, up_proj, down_proj" in msg and "q_proj, v_proj" in msg


@pytest.mark.parametrize("roles", [["q", "x"], ["attn"], []])
def test_unknown_or_empty_roles(roles):
    with pytest.raises(UserError, match="q, k, v, o, mlp"):
        resolve_targets(tiny("llama"), roles)


def test_role_names():
    assert role_names("llama")["mlp"] == ("gate_proj", "up_proj", "down_proj")
    assert role_names("gpt2") == {"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")}
    assert role_names("opt")["o"] == ("out_proj",)
    with pytest.raises(UserError, match="known architectures"):
        role_names("bert")


def test_linear_module_suffixes():
    assert linear_module_suffixes(tiny("gpt2")) == ["c_attn", "c_fc", "c_proj", "lm_head"]
    assert linear_module_suffixes(_Weird("weird")) == ["wo", "wq"]


def test_peft_wrapped_model_resolves_to_the_same_layers():
    model = tiny("llama")
    bare = resolve_targets(model, ["q", "v"])
    suffixes = linear_module_suffixes(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=bare.target_modules))
    # lora_A / lora_B / base_layer are peft's insides, not layers of the model
    assert linear_module_suffixes(peft_model) == suffixes
    wrapped = resolve_targets(peft_model, ["q", "v"])
    assert wrapped.module_names == tuple("base_model.model." + n for n in bare.module_names)
    assert wrapped.target_modules == bare.target_modules
    # a second adapter on the wrapped model lands on the same layers
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=wrapped.target_modules))
    second = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "second" in m.lora_A}
    assert second == set(wrapped.module_names)


def test_plan_is_frozen_and_hashable():
    plan = resolve_targets(tiny("llama"), ["q"])
    assert isinstance(plan, TargetPlan)
    with pytest.raises(AttributeError):
        plan.roles = ("v",)
    hash(plan)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_plain_head_only_where_logits_are_final_states_times_head(arch):
    """The fused training loss (packed/loss.py) trusts plain_head: wherever it answers, the model's logits
    must be exactly its decoder's final states times the head's weight; gemma2/3 soft-cap, so never there."""
    model = tiny(arch).eval()
    found = plain_head(model)
    assert (found is not None) == (arch in {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}), arch
    if found is None:
        return
    decoder, weight = found
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(input_ids=ids).last_hidden_state @ weight.t(), model(input_ids=ids).logits)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_plain_decoding_only_where_greedy_decoding_is_generates(arch):
    """lora_ablate/decode.py trusts plain_decoding: wherever it answers, decoding with its own cache and padding
    mask gives generate's tokens; everywhere else held-out generation goes through generate itself."""
    from lora_ablate.decode import greedy, new_tokens

    model = tiny(arch).eval()
    model.generation_config.pad_token_id = None
    plain = arch in {"llama", "mistral", "qwen2", "qwen3"}
    assert plain_decoding(model, 64) == plain, arch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :7] = 0  # left padding
    ids[mask == 0] = 0
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0,
                              eos_token_id=1)[:, 9:]
        assert torch.equal(new_tokens(model, ids, mask, 6, 0, 1), want), arch
        if plain:
            assert torch.equal(greedy(model, ids, mask, 6, 0, 1), want), arch


def test_a_sliding_window_shorter_than_the_rows_is_not_plain_decoding():
    model = AutoModelForCausalLM.from_config(transformers.MistralConfig(**_COMMON, sliding_window=8))
    assert plain_decoding(model, 8) and not plain_decoding(model, 9)
