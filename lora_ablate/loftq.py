"""LoftQ (Li et al. 2023, arXiv 2310.08659) on a bitsandbytes 4-bit base, as peft's
``replace_lora_weights_loftq`` does it for an already-quantized model: the base stays the ordinary 4-bit
quantization Q(W) of the original weights W, and each adapted projection's LoRA A0, B0 are set so that
``Q(W) + scale * B0 A0`` is the best rank-r approximation of W (the truncated SVD of W - Q(W)). The adapter
is a plain LoRA adapter on that same 4-bit base; nothing in the base changes, so no frozen correction.

Not peft's own function, for two reasons found in its source (peft 0.21): ``_loftq_init_new`` moves the
weights to a hard-coded "cuda" (or "xpu") device, so neither it nor ``replace_lora_weights_loftq`` runs on a
CPU; and it makes ``B0 A0`` (not ``scale * B0 A0``) approximate W - Q(W), ignoring the LoRA scaling, so for
any lora_alpha != r (alpha_rule free, rslora) peft's LoftQ corrects the quantization error scale times over.
This is the same single step (the base is fixed, so more alternating iterations would requantize it), the
same symmetric split of the singular values (B0 = U sqrt(S), A0 = sqrt(S) Vh), with S divided by the
scale. Both training paths take their A0, B0 from here, computed once per (projection, r, scale).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from lora_ablate.errors import UserError
from lora_ablate.models import LoadedModel, unquantized_weights

# the 4-bit weight of a projection -> {(r, scale): (A0, B0)}; gone with the base
_FACTORS = WeakTensorKeyDictionary()


def loftq_factors(base: LoadedModel, module_names: Sequence[str], r: int,
                  scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (A0 [r, in], B0 [out, r]), fp32 on the weight's device, for LoRA of rank ``r`` and scale
    ``scale`` on the 4-bit projections ``module_names`` of ``base``."""
    layers = {name: _four_bit(base, name) for name in module_names}
    missing = [n for n, layer in layers.items() if (r, scale) not in _FACTORS.get(layer.weight, {})]
    originals = unquantized_weights(base, missing) if missing else {}
    out = {}
    for name, layer in layers.items():
        cached = _FACTORS.setdefault(layer.weight, {})
        if (r, scale) not in cached:
            cached[(r, scale)] = _factors(quantization_error(layer, originals.pop(name)), r, scale)
        out[name] = cached[(r, scale)]
    return out


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """deq(Q(W)) of a bitsandbytes ``Linear4bit``, fp32 [out, in]: the weight its forward multiplies by."""
    import bitsandbytes as bnb

    weight, state = layer.weight, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # models.load_base keeps it off (_no_cpu_repack)
        raise UserError(f"the 4-bit weight of a {type(layer).__name__} was repacked for bitsandbytes' CPU "
                        "inference kernel; load the base with lora_ablate.models.load_base")
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def quantization_error(layer: torch.nn.Module, original: torch.Tensor) -> torch.Tensor:
    """W - deq(Q(W)) of a 4-bit projection whose original weight is ``original``, fp32 on its device."""
    q = dequantized(layer)
    return original.to(device=q.device, dtype=torch.float32) - q


def _factors(residual: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with ``scale * B0 A0`` the rank-r truncated SVD of ``residual``."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = (S[:r] / scale).sqrt()
    return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root).contiguous()


def _four_bit(base: LoadedModel, name: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    layer = base.model.get_submodule(name)
    layer = getattr(layer, "base_layer", layer)  # inside a LoRA or packed wrapper (a trial joining a live pack)
    if not isinstance(layer, bnb.nn.Linear4bit):
        raise UserError(f"lora.init=loftq needs a bitsandbytes 4-bit base; {name} is {type(layer).__name__}")
    return layer
