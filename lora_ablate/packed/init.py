"""LoRA A initialisation identical to peft's: the same RNG calls, shapes and order as ``get_peft_model``."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lora_ablate.errors import UserError
from lora_ablate.models import LoadedModel
from lora_ablate.packed.layers import PackedLoraLinear, _features
from lora_ablate.trial import BASE_MUTATING_INITS, TrialSpec


def initial_A(base: LoadedModel, spec: TrialSpec, module_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The LoRA A matrices peft's ``get_peft_model`` creates for ``spec`` after ``torch.manual_seed(seed)``.

    peft builds, per adapted module in model order, ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each
    constructor draws a Kaiming-uniform init from the CPU generator), then re-draws A (Kaiming-uniform
    a=sqrt(5), or normal std 1/r) and zeroes B; the weights are then cast to the base layer's dtype and
    upcast back to fp32 (peft's autocast_adapter_dtype). Same calls, same shapes, same order here.
    """
    if spec.lora.init in BASE_MUTATING_INITS:
        # these inits move scale * B0 A0 out of the base weight: per trial, which one shared frozen base cannot do
        raise UserError(f"lora.init={spec.lora.init} changes the base weights per trial, which the packed engine "
                        f"shares between trials; use --pack 1 (study.pack=1: the reference peft loop)")
    r = spec.lora.r
    torch.manual_seed(spec.train.seed)  # as train_one does right before get_peft_model
    out = {}
    for name in module_names:
        layer = base.model.get_submodule(name)
        if isinstance(layer, PackedLoraLinear):  # a trial joining a live pack (refill): the base is inside
            layer = layer.base_layer
        in_f, out_f = _features(layer)
        a = torch.empty(r, in_f)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r) constructor
        torch.nn.init.kaiming_uniform_(torch.empty(out_f, r), a=math.sqrt(5))  # nn.Linear(r, out) constructor
        if spec.lora.init == "default":
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            torch.nn.init.normal_(a, std=1 / r)
        weight_dtype = getattr(getattr(layer, "weight", None), "dtype", torch.float32)
        if weight_dtype in (torch.float16, torch.bfloat16):
            a = a.to(weight_dtype).float()
        out[name] = a
    return out
