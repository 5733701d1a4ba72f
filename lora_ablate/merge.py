"""Merging a trained adapter into a full-precision base for inference (``train --merge``).

An adapter trained on a bitsandbytes 8-bit or 4-bit base (QLoRA style) is deployed merged into a
full-precision reload of the same base: the k-bit weights are the full ones plus quantization noise, and
that noise is typically far larger than s*BA, so folding the update into the k-bit weights (requantizing
W + s*BA) loses most of it. ``merge_adapter`` does the full-precision merge and records what it costs: the
logit difference between the k-bit base + adapter (what was trained and evaluated) and the merged model,
and how much of the update a k-bit merge would have rounded away. See docs/quantization.md.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Iterable

import torch

from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel, reload_full_precision

MERGE_INFO = "merge.json"  # in merged/: what was merged into what, and the k-bit merge's numbers


def merge_adapter(base: LoadedModel, adapter_dir: Path, dest: Path, evaluator: Evaluator | None = None) -> dict:
    """Fold the adapter's B·A into a full-precision base and save a plain transformers model into ``dest``
    (with the tokenizer, ``merge.json`` and a README). An unquantized ``base`` is merged into directly; a
    k-bit one is reloaded unquantized from the same source first, and the returned record then holds
    ``logits`` (k-bit + adapter against merged, on ``evaluator``'s held-out sets) and ``kbit_merge``
    (the update a merge into the k-bit weights would lose). ``base`` is handed back without the adapter."""
    from peft import PeftModel

    info: dict = {"base_model": base.identity, "trained_on": base.quantization}
    if base.quantization == "none":
        merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
        info["merged_into"] = str(base.dtype).removeprefix("torch.")
    else:
        full = reload_full_precision(base)
        info["merged_into"] = str(full.dtype).removeprefix("torch.")
        kbit = PeftModel.from_pretrained(base.model, str(adapter_dir))
        merged = PeftModel.from_pretrained(full.model, str(adapter_dir)).merge_and_unload()
        if evaluator is not None:
            info["logits"] = logit_difference(kbit, merged, heldout_batches(evaluator, base.device))
        info["kbit_merge"] = kbit_merge_loss(kbit)
        kbit.unload()
    merged.save_pretrained(str(dest))
    base.tokenizer.save_pretrained(str(dest))
    (Path(dest) / MERGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    (Path(dest) / "README.md").write_text(_readme(base, info))
    return info


def heldout_batches(evaluator: Evaluator, device) -> Iterable[dict]:
    """The evaluator's held-out sets (eval.size examples each) in its batches: the comparison's inputs."""
    for s in evaluator.sets:
        enc = evaluator.encoded[s.name]
        for start in range(0, len(enc), evaluator.cfg.batch_size):
            idx = list(range(start, min(start + evaluator.cfg.batch_size, len(enc))))
            yield enc.batch(idx, evaluator.tokenizer.pad_token_id, device)


@torch.no_grad()
def logit_difference(model_a, model_b, batches: Iterable[dict]) -> dict:
    """How far two models' next-token logits are apart on ``batches`` (input_ids, attention_mask), over
    every real (unpadded) token: max and mean absolute difference, and the fraction of tokens whose argmax
    (the greedy next token) agrees."""
    worst, total, agree, tokens = 0.0, 0.0, 0, 0
    for b in batches:
        mask = b["attention_mask"].bool()
        la = model_a(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[mask]
        lb = model_b(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[mask]
        diff = (la - lb).abs()
        worst = max(worst, diff.max().item())
        total += diff.mean(-1).sum().item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        tokens += la.shape[0]
    return {"max_abs": worst, "mean_abs": total / max(1, tokens), "argmax_agree": agree / max(1, tokens),
            "tokens": tokens}


@torch.no_grad()
def kbit_merge_loss(peft_model) -> dict:
    """What merging into the k-bit weights would keep of the update: each adapted bitsandbytes layer is
    merged by peft itself (dequantize, add s*BA, requantize with the layer's own scheme), the requantized
    weight's change is compared with s*BA, and the layer is put back exactly as it was.

    ``update_lost``: ||recovered - s*BA|| / ||s*BA|| over all adapted weights (1.0: nothing of the update
    survives; above 1: the requantization adds more noise than update); ``entries_unchanged``: the fraction
    of weight entries whose quantized value did not move at all."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    err2 = upd2 = 0.0
    same = entries = modules = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        adapter = module.active_adapters[0]
        layer = module.get_base_layer()
        state = getattr(layer, "state", None)  # 8-bit layers keep the int8 matrix and its scales here
        kept_weight, kept_state = layer.weight, dict(vars(state)) if state is not None else None
        before = dequantize_bnb_weight(layer.weight, state).float()
        delta = module.get_delta_weight(adapter).float()
        with warnings.catch_warnings():  # peft warns that a k-bit merge rounds: measuring that is the point
            warnings.simplefilter("ignore")
            module.merge(adapter_names=[adapter])
        after = dequantize_bnb_weight(layer.weight, state).float()
        layer.weight = kept_weight
        if state is not None:
            vars(state).update(kept_state)
        module.merged_adapters.remove(adapter)
        moved = after - before
        err2 += (moved - delta).pow(2).sum().item()
        upd2 += delta.pow(2).sum().item()
        same += (moved == 0).sum().item()
        entries += moved.numel()
        modules += 1
    return {"update_lost": math.sqrt(err2 / upd2) if upd2 else None,
            "entries_unchanged": same / max(1, entries), "modules": modules}


def summary_line(info: dict) -> str:
    """One line on a k-bit merge: the logit difference and what a k-bit merge would have lost."""
    parts = [f"merged the {info['trained_on']}-trained adapter into a {info['merged_into']} reload of the base"]
    if lg := info.get("logits"):
        parts.append(f"logits vs {info['trained_on']} + adapter: max |diff| {lg['max_abs']:.4g}, "
                     f"mean {lg['mean_abs']:.4g}, argmax agree {lg['argmax_agree']:.2%} ({lg['tokens']} tokens)")
    km = info.get("kbit_merge") or {}
    if km.get("update_lost") is not None:
        parts.append(f"merging into the {info['trained_on']} weights instead would lose {km['update_lost']:.0%} "
                     f"of the update ({km['entries_unchanged']:.0%} of entries unchanged)")
    return "; ".join(parts)


def _readme(base: LoadedModel, info: dict) -> str:
    ident = base.identity
    lines = ["# Merged model", "",
             f"The base `{base.name_or_path}` with a LoRA adapter (`../adapter`) merged into its weights, saved in "
             f"{info['merged_into']}; load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`.", "",
             "Base identity: " + ", ".join(f"{k}={v}" for k, v in sorted(ident.items())) + "."]
    if info["trained_on"] != "none":
        lines += ["", f"The adapter was trained on a bitsandbytes {info['trained_on']} base and merged into a "
                      f"full-precision ({info['merged_into']}) reload of the same base, so this model's outputs "
                      f"differ slightly from the k-bit base + adapter that was trained and evaluated:",
                  "", summary_line(info) + ".", "", f"The numbers are in `{MERGE_INFO}`."]
    return "\n".join(lines) + "\n"
