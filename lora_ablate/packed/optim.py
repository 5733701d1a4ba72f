"""The pack's optimiser on its flat [K, numel] fp32 state: per-trial gradient clipping and AdamW, each a
few whole-pack tensor operations whatever K and the number of modules; for K = 1, torch's own calls."""

from __future__ import annotations

import torch

from lora_ablate.packed.slot import Slot

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults, which the single path uses
CLIP_EPS = 1e-6  # clip_grad_norm_'s max_norm / (norm + 1e-6)


def _adam_scalars(slot: Slot, step: int) -> tuple[float, float, float]:
    """(1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2)) for the slot's optimizer step ``step``."""
    lr = slot.lrs[step - 1] if step <= len(slot.lrs) else 0.0
    return 1 - lr * slot.train.weight_decay, lr / (1 - BETA1 ** step), (1 - BETA2 ** step) ** 0.5


def clip_per_trial_(grads: torch.Tensor, max_norm: torch.Tensor) -> None:
    """``clip_grad_norm_`` on each row of ``grads`` [K, numel] with its own ``max_norm`` [K] (0: none)."""
    norm = torch.linalg.vector_norm(grads, dim=1)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))  # max_grad_norm 0: no clipping
    grads.mul_(coef.unsqueeze(1))


def adamw_single_(p, g, m, v, decay: float, step_size: float, bc2_sqrt: float, decay_on: bool) -> None:
    """torch.optim.AdamW's single-tensor step with Python scalars: literally torch's calls (K = 1)."""
    if decay_on:
        p.mul_(decay)
    m.lerp_(g, 1 - BETA1)
    v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
    p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(EPS), value=-step_size)


def adamw_per_trial_(p, g, m, v, decay: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor,
                     decay_on: bool) -> None:
    """The same step on every row at once; the scalars are [K], one value per trial."""
    decay, step_size, bc2_sqrt = decay.unsqueeze(1), step_size.unsqueeze(1), bc2_sqrt.unsqueeze(1)
    if decay_on:
        p.mul_(decay)
    m.lerp_(g, 1 - BETA1)
    v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
    # addcdiv_ computes p + (value * m) / denom; the same roundings with a per-row value:
    p.add_(m.mul(-step_size).div_((v.sqrt() / bc2_sqrt).add_(EPS)))
