"""Roles inferred from names and shapes for architectures the table does not list (tiny configs, no downloads)."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_ablate.errors import UserError
from lora_ablate.targets import KNOWN_ARCHITECTURES, _infer_table, resolve_targets

H = 64
_ATTN = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)

# name -> (config factory, per-layer names relative to the block for q, k, v (fused: the same), o, mlp, blocks)
UNLISTED = {
    "falcon": (lambda: transformers.FalconConfig(**_ATTN),  # multi-query: qkv width 64 + 2 x 16
               {"qkv": ["self_attention.query_key_value"], "o": ["self_attention.dense"],
                "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}, "transformer.h"),
    "falcon-new": (lambda: transformers.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **_ATTN),
                   {"qkv": ["self_attention.query_key_value"], "o": ["self_attention.dense"],
                    "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}, "transformer.h"),
    "starcoder2": (lambda: transformers.Starcoder2Config(intermediate_size=2 * H, num_key_value_heads=2, **_ATTN),
                   {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
                    "o": ["self_attn.o_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]}, "model.layers"),
    "gptj": (lambda: transformers.GPTJConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                             rotary_dim=8, bos_token_id=0, eos_token_id=0),
             {"q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "o": ["attn.out_proj"],
              "mlp": ["mlp.fc_in", "mlp.fc_out"]}, "transformer.h"),
    "bloom": (lambda: transformers.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=128),
              {"qkv": ["self_attention.query_key_value"], "o": ["self_attention.dense"],
               "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}, "transformer.h"),
    "gpt_bigcode": (lambda: transformers.GPTBigCodeConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=128,
                                                          n_positions=64, bos_token_id=0, eos_token_id=0),
                    {"qkv": ["attn.c_attn"], "o": ["attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
                    "transformer.h"),
}
_cache = {}


def build(name):
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = AutoModelForCausalLM.from_config(UNLISTED[name][0]())
    return copy.deepcopy(_cache[name])


def expected(name, roles):
    per_layer, prefix = UNLISTED[name][1], UNLISTED[name][2]
    keys = {("qkv" if r in "qkv" and "qkv" in per_layer else r) for r in roles}
    return sorted(f"{prefix}.{i}.{n}" for i in range(2) for k in keys for n in per_layer[k])


def test_unlisted_really_are_unlisted():
    assert not {AutoModelForCausalLM.from_config(UNLISTED[n][0]()).config.model_type for n in ("falcon", "gptj")} \
        & set(KNOWN_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(UNLISTED))
@pytest.mark.parametrize("roles", [["q", "k", "v"], ["o"], ["mlp"], ["q", "k", "v", "o", "mlp"], ["q", "v"]])
def test_inferred_roles_and_peft_adapts_exactly_those(name, roles):
    model = build(name)
    if roles == ["q", "v"] and "qkv" in UNLISTED[name][1]:
        with pytest.raises(UserError, match=r"fuses q, k and v in one matrix .*would adapt k too"):
            resolve_targets(model, roles)
        return
    plan = resolve_targets(model, roles)
    assert plan.inferred and plan.describe().startswith(f"{model.config.model_type} (inferred): ")
    assert sorted(plan.module_names) == expected(name, roles)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=plan.target_modules))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(plan.module_names)


_KNOWN = {
    "llama": lambda: transformers.LlamaConfig(intermediate_size=2 * H, num_key_value_heads=2, **_ATTN),
    "qwen3": lambda: transformers.Qwen3Config(intermediate_size=2 * H, num_key_value_heads=2, head_dim=8, **_ATTN),
    "opt": lambda: transformers.OPTConfig(hidden_size=H, ffn_dim=2 * H, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=128, word_embed_proj_dim=H),
    "gpt2": lambda: transformers.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(intermediate_size=2 * H, **_ATTN),
    "phi3": lambda: transformers.Phi3Config(intermediate_size=2 * H, num_key_value_heads=2, pad_token_id=0,
                                            eos_token_id=0, bos_token_id=0, **_ATTN),
}


@pytest.mark.parametrize("arch", sorted(_KNOWN))
def test_inference_agrees_with_the_table(arch):
    """The rules, run on listed architectures (qwen3 with head_dim != hidden / heads), find the table's modules."""
    model = AutoModelForCausalLM.from_config(_KNOWN[arch]())
    table, problems = _infer_table(model, arch)
    assert not problems
    for role, suffixes in table.items():
        roles = ["q", "k", "v"] if role == "qkv" else [role]
        listed = set(resolve_targets(model, roles).module_names)
        found = {n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)}
        assert found == listed, role


def test_shapes_that_break_the_config_are_refused_naming_modules_and_rule():
    model = build("starcoder2")
    model.config.num_key_value_heads = 4  # k/v are 32 wide: 2 kv heads of 16, which the config no longer states
    with pytest.raises(UserError) as e:
        resolve_targets(model, ["q", "v"])
    msg = str(e.value)
    assert "\n" not in msg and "'starcoder2'" in msg and "target q cannot be inferred" in msg
    assert "self_attn.k_proj [32x64]" in msg and "k and v out = kv heads x head dim" in msg
    assert "kv heads 4" in msg and "q_proj" in msg


def test_fused_width_that_matches_no_kv_count_is_refused():
    model = build("falcon")
    model.config.multi_query = False  # a 96-wide qkv is then neither 3 x 64 nor anything the config states
    with pytest.raises(UserError) as e:
        resolve_targets(model, ["q", "k", "v"])
    msg = str(e.value)
    assert "fused q/k/v output width q + 2 kv = 192 (kv heads 4)" in msg
    assert "self_attention.query_key_value [96x64]" in msg


def test_suffix_outside_the_block_stack_is_not_certain():
    model = build("gptj")
    model.extra = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"q_proj": torch.nn.Linear(H, H)})})
    with pytest.raises(UserError, match=r"attn\.q_proj names 3 modules, not exactly one in each of the 2 blocks"):
        resolve_targets(model, ["q"])
    assert len(resolve_targets(model, ["v"]).module_names) == 2
