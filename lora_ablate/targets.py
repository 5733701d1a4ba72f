"""Map LoRA target roles (q, k, v, o, mlp) to the module names of a concrete architecture.

This is the one place in the project that knows architecture-specific module names. Everything
else speaks in roles; :func:`resolve_targets` turns a role subset into a :class:`TargetPlan` whose
``target_modules`` regex goes straight into ``peft.LoraConfig`` (peft ``re.fullmatch``-es a string
``target_modules`` against every full module name) and whose ``module_names`` list exactly the
layers that regex adapts.

Fused q/k/v. Some architectures (gpt2 ``c_attn``, gpt_neox ``query_key_value``, phi3 ``qkv_proj``)
compute q, k and v with one matrix. LoRA on that matrix adapts all three projections at once, so
"q and v only" cannot be expressed there. Silently adapting k as well would make an ablation row
mean something different on such models than on llama, and slicing the adapter output per
projection is beyond what peft offers, so a role subset that covers only part of a fused matrix is
REFUSED with a one-line :class:`UserError`. Asking for all of q, k and v (with or without o and mlp)
maps to the fused module, whose role in ``TargetPlan.role_of`` is ``"qkv"``.

Module-name suffixes are matched on whole dotted components, so ``q_proj`` matches
``model.layers.0.self_attn.q_proj`` but not ``xq_proj``. Where a bare name is ambiguous the suffix
carries its parent (gpt2 has both ``attn.c_proj`` and ``mlp.c_proj``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.pytorch_utils import Conv1D

from lora_ablate.errors import UserError, choices
from lora_ablate.vocab import ROLES, canonical_roles, unknown_roles

FUSED = "qkv"
_QKV = ("q", "k", "v")

_LLAMA_LIKE = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}

# model_type -> role -> module-name suffixes. Fused architectures have a "qkv" role instead of q, k, v.
# "gemma3" (the multimodal wrapper) is deliberately absent: its vision tower has q_proj too.
_ARCHITECTURES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "opt": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("out_proj",), "mlp": ("fc1", "fc2")},
    "phi": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("self_attn.dense",),
            "mlp": ("mlp.fc1", "mlp.fc2")},
    "gpt2": {FUSED: ("attn.c_attn",), "o": ("attn.c_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "gpt_neox": {FUSED: ("attention.query_key_value",), "o": ("attention.dense",),
                 "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")},
    "phi3": {FUSED: ("qkv_proj",), "o": ("o_proj",), "mlp": ("gate_up_proj", "down_proj")},
}

KNOWN_ARCHITECTURES = tuple(sorted(_ARCHITECTURES))

# Architectures whose logits are exactly ``lm_head(get_decoder()(...).last_hidden_state)``: no soft-capping or
# scaling after the head (gemma2 and gemma3 soft-cap their logits, so they are absent).
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"})


@dataclass(frozen=True)
class TargetPlan:
    architecture: str
    roles: tuple[str, ...]
    target_modules: str
    module_names: tuple[str, ...]
    role_of: dict = field(hash=False)  # a dict cannot be hashed; the other fields identify the plan
    shapes: dict = field(hash=False, default_factory=dict)  # module name -> (out, in) features

    def rank_error(self, r: int) -> str:
        """Why rank ``r`` cannot adapt every module ('' if it can): B·A has rank at most the smaller side of
        the layer, so a larger r only trains (and saves) parameters that cannot change the update."""
        if not self.shapes:
            return ""
        name, shape = min(self.shapes.items(), key=lambda kv: min(kv[1]))
        if r <= min(shape):
            return ""
        return (f"lora.r={r} is above the rank of target module {name!r} ({shape[0]}x{shape[1]}, out x in); "
                f"use lora.r <= {min(shape)} on this model")

    def describe(self) -> str:
        """One line, e.g. ``llama: q->q_proj, v->v_proj (60 modules)``."""
        table = _ARCHITECTURES[self.architecture]
        parts = [f"{role}->{'+'.join(table[role])}" for role in _table_roles(self.roles, table)]
        return f"{self.architecture}: {', '.join(parts)} ({len(self.module_names)} modules)"


def role_names(model_type: str) -> dict[str, tuple[str, ...]]:
    """Role -> module-name suffixes for a known architecture (fused ones have a "qkv" key, not q/k/v)."""
    if model_type not in _ARCHITECTURES:
        raise UserError(f"unknown architecture {model_type!r}; known architectures: {choices(KNOWN_ARCHITECTURES)}")
    return dict(_ARCHITECTURES[model_type])


def plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(decoder, head weight [V, d]) when the model's logits are exactly the decoder's final states times the
    head's weight transposed, so a loss may skip materialising them; None for any other model."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PLAIN_HEAD:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:  # noqa: E721 - a subclass may do more
        return None
    return model.get_decoder(), head.weight


def linear_module_suffixes(model: torch.nn.Module) -> list[str]:
    """Sorted unique last name parts of every Linear/Conv1D layer (peft wrappers seen through)."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model)})


def resolve_targets(model: torch.nn.Module, roles: Sequence[str]) -> TargetPlan:
    """The modules of ``model`` that LoRA on ``roles`` adapts, and the peft regex that selects them."""
    roles = _canonical_roles(roles)
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in _ARCHITECTURES:
        raise UserError(
            f"unknown architecture {arch!r}: no role -> module mapping for it (known architectures: "
            f"{choices(KNOWN_ARCHITECTURES)}); its linear modules are: {choices(linear_module_suffixes(model))}")
    table = _ARCHITECTURES[arch]
    _refuse_partial_fused(arch, roles, table)

    linear = _linear_modules(model)
    role_of: dict[str, str] = {}
    for role in _table_roles(roles, table):
        hits = {s: [name for name, _ in linear if _has_suffix(name, s)] for s in table[role]}
        missing = [s for s, names in hits.items() if not names]
        if missing:
            asked = "q, k, v" if role == FUSED else role
            raise UserError(
                f"target {asked} maps to {choices(table[role])} on {arch}, but this model has no module named "
                f"{' or '.join(missing)}; its linear modules are: {choices(linear_module_suffixes(model))}")
        role_of.update((name, role) for names in hits.values() for name in names)

    suffixes = [s for role in _table_roles(roles, table) for s in table[role]]
    # (?:.*\.)? anchors each suffix on a dotted component whatever the prefix (bare or peft-wrapped model)
    pattern = r"(?:.*\.)?(?:" + "|".join(re.escape(s) for s in suffixes) + r")"
    names = tuple(name for name, _ in linear if name in role_of)
    shapes = {name: _features(module) for name, module in linear if name in role_of}
    return TargetPlan(arch, roles, pattern, names, {name: role_of[name] for name in names}, shapes)


def _features(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) features of a Linear or Conv1D, seen through a peft wrapper (a 4-bit weight is packed, so
    not its shape)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(layer, Conv1D):
        return (layer.nf, layer.weight.shape[0])
    return (layer.out_features, layer.in_features)


def _canonical_roles(roles: Sequence[str]) -> tuple[str, ...]:
    if isinstance(roles, str):
        roles = [roles]
    bad = unknown_roles(roles)
    if bad:
        raise UserError(f"unknown target role {bad[0]!r}; choose a subset of: {choices(ROLES)}")
    if not roles:
        raise UserError(f"no target roles given; choose a non-empty subset of: {choices(ROLES)}")
    return canonical_roles(roles)


def _refuse_partial_fused(arch: str, roles: tuple[str, ...], table: dict) -> None:
    if FUSED not in table:
        return
    asked = [r for r in _QKV if r in roles]
    if asked and len(asked) < len(_QKV):
        extra = " and ".join(r for r in _QKV if r not in asked)
        raise UserError(
            f"{arch} fuses q, k and v in one matrix ({choices(table[FUSED])}); targets [{', '.join(roles)}] "
            f"would adapt {extra} too: use all of q, k, v together or none of them")


def _table_roles(roles: tuple[str, ...], table: dict) -> list[str]:
    """The table keys for ``roles``: q, k, v collapse into "qkv" on fused architectures."""
    if FUSED not in table:
        return list(roles)
    out = [FUSED] if set(_QKV) <= set(roles) else []
    return out + [r for r in roles if r not in _QKV]


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(full name, layer) of every Linear/Conv1D in model order.

    On a peft-wrapped model an adapted layer is a lora.Linear holding the original as ``base_layer``
    next to its own ``lora_A``/``lora_B`` Linears; report the wrapper under its own name (the name
    peft matches) and skip its insides, so a second adapter resolves to the same layers as the first.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save copies, trainable tokens

    out, inside = [], None
    for name, module in model.named_modules():
        # named_modules is depth-first, so a wrapper's insides follow it directly
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        layer = module
        if isinstance(module, BaseTunerLayer):
            layer, inside = module.get_base_layer(), name + "."
        elif isinstance(module, AuxiliaryTrainingWrapper):
            layer, inside = getattr(module, "original_module", None), name + "."
        if isinstance(layer, (torch.nn.Linear, Conv1D)):
            out.append((name, module))
    return out
