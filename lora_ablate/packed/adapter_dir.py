"""A trial of the pack written as a stock peft adapter directory."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_ablate.packed.pack import Pack
from lora_ablate.packed.slot import Slot
from lora_ablate.reference import lora_config
from lora_ablate.trial import BASE_MUTATING_INITS


def export_adapter(pack: Pack, slot: Slot, dest: Path) -> None:
    """Write the slot's adapter as peft's ``save_pretrained`` would: adapter_config.json and
    adapter_model.safetensors with ``base_model.model.<module>.lora_A.weight`` keys, fp32, unpadded.

    A PiSSA/OLoRA trial is written as ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes
    it on the single path: the plain rank-2r LoRA ``[A; A0]``, ``[B, -B0]`` on the original base (its update
    s (B A - B0 A0) is what the trial trained on top of W0), with peft's config changes for it."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    lora = slot.spec.lora
    cfg = lora_config(slot.spec, slot.plan)  # a part-adapted fused matrix: r per role (rank/alpha patterns)
    cfg.base_model_name_or_path = pack.base.name_or_path
    cfg.inference_mode = True
    weights = pack.slot_weights(slot)
    if lora.init in BASE_MUTATING_INITS:
        initial = pack.slot_weights(slot, pack.initial)
        weights = {name: (torch.cat([a, initial[name][0]], 0), torch.cat([b, -initial[name][1]], 1))
                   for name, (a, b) in weights.items()}
        # peft's save_pretrained for a converted adapter: twice the rank, the same scale
        cfg.init_lora_weights = True
        cfg.r *= 2
        cfg.lora_alpha *= 2 ** 0.5 if cfg.use_rslora else 2
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(dest))
    state = {}
    for name, (a, b) in weights.items():
        state[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(state, str(dest / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    pack.base.record_identity(dest)
