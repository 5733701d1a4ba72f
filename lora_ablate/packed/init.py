"""LoRA initialisation identical to peft's: A by the same RNG calls, shapes and order as ``get_peft_model``;
PiSSA/OLoRA's A0, B0 by peft's own layer code on a copy of each base projection (the shared base is never
changed); LoftQ's A0, B0 from lora_ablate/loftq.py, as the reference path takes them."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Mapping, Sequence

import torch

from lora_ablate.loftq import loftq_factors
from lora_ablate.models import LoadedModel
from lora_ablate.packed.layers import PackedLoraLinear, _features
from lora_ablate.trial import BASE_MUTATING_INITS, TrialSpec, peft_config


def initial_factors(base: LoadedModel, spec: TrialSpec, module_names: Sequence[str],
                    ranks: Mapping[str, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (A0 [r, in], B0 [out, r]) as peft's ``get_peft_model`` initialises them for ``spec`` after
    ``torch.manual_seed(seed)`` (LoftQ: as train_one sets them after it); B0 None where peft zeroes it
    (default, gaussian). ``ranks``: a module's rank where it is not ``lora.r`` (a part-adapted fused matrix:
    r per adapted role, peft's rank_pattern)."""
    if spec.lora.init in BASE_MUTATING_INITS:
        return _base_mutating_factors(base, spec, module_names)
    a = initial_A(base, spec, module_names, ranks)  # for LoftQ too: its A0 replaces peft's draws, which stay drawn
    if spec.lora.init == "loftq":
        # non-zero starting values of the trained factors, nothing frozen (the 4-bit base is LoftQ's base)
        return loftq_factors(base, module_names, spec.lora.r, spec.lora.scaling)
    return {name: (a[name], None) for name in module_names}


def initial_A(base: LoadedModel, spec: TrialSpec, module_names: Sequence[str],
              ranks: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA A matrices peft's ``get_peft_model`` creates for ``spec`` (init default or gaussian) after
    ``torch.manual_seed(seed)`` (loftq: the default's); ``ranks`` as for ``initial_factors``.

    peft builds, per adapted module in model order, ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each
    constructor draws a Kaiming-uniform init from the CPU generator), then re-draws A (Kaiming-uniform
    a=sqrt(5), or normal std 1/r) and zeroes B; the weights are then cast to the base layer's dtype and
    upcast back to fp32 (peft's autocast_adapter_dtype). Same calls, same shapes, same order here.
    """
    torch.manual_seed(spec.train.seed)  # as train_one does right before get_peft_model
    out = {}
    with _one_thread():
        for name in module_names:
            out[name] = _draw_A(base, spec, name, (ranks or {}).get(name, spec.lora.r))
    return out


@contextlib.contextmanager
def _one_thread():
    """Hundreds of small CPU draws and casts per trial: on a GPU host whose cores are busy compiling, each
    one's wake-up of the intra-op thread pool took milliseconds (5 s of a 21-trial study on an H200). CPU
    random draws are serial whatever the thread count, so the values are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _draw_A(base: LoadedModel, spec: TrialSpec, name: str, r: int) -> torch.Tensor:
    layer = _bare(base, name)
    in_f, out_f = _features(layer)
    a = torch.empty(r, in_f)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r) constructor
    torch.nn.init.kaiming_uniform_(torch.empty(out_f, r), a=math.sqrt(5))  # nn.Linear(r, out) constructor
    if spec.lora.init in ("default", "loftq"):
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        torch.nn.init.normal_(a, std=1 / r)
    weight_dtype = getattr(getattr(layer, "weight", None), "dtype", torch.float32)
    if weight_dtype in (torch.float16, torch.bfloat16):
        a = a.to(weight_dtype).float()
    return a


def _base_mutating_factors(base: LoadedModel, spec: TrialSpec,
                           module_names: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PiSSA/OLoRA's A0, B0 from peft itself: each projection is copied (peft subtracts scale * B0 A0 from the
    weight it initialises from) and given a LoRA layer by ``inject_adapter_in_model`` with the trial's config,
    in model order after the trial's seed, so the RNG draws of peft's layer constructors and peft's SVD/QR,
    scaling and dtype casts are exactly those of the single path."""
    import peft

    torch.manual_seed(spec.train.seed)  # as train_one does: later draws (dropout, K = 1) then see the same state
    cfg = peft_config(spec.lora, "layer")
    out = {}
    for name in module_names:
        holder = torch.nn.Module()
        holder.layer = copy.deepcopy(_bare(base, name))
        holder = peft.inject_adapter_in_model(cfg, holder)
        # get_peft_model's autocast_adapter_dtype: adapters cast to a half-precision base's dtype come back as fp32
        a, b = (m["default"].weight.detach().float() for m in (holder.layer.lora_A, holder.layer.lora_B))
        out[name] = (a, b)
    return out


def _bare(base: LoadedModel, name: str) -> torch.nn.Module:
    layer = base.model.get_submodule(name)
    # a trial joining a live pack (refill): the base projection is inside the pack's wrapper
    return layer.base_layer if isinstance(layer, PackedLoraLinear) else layer
