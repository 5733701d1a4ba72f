"""The adapted projections while a pack lives: :class:`PackedLoraLinear` wraps a base projection and adds
every trial's own low-rank update to that trial's rows; plus the module-tree helpers that find, swap and
measure the projections it wraps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PackedLoraLinear(torch.nn.Module):
    """``base(x) + scale_k * (dropout(x_k) @ A_k^T) @ B_k^T`` for each trial k's rows of the stacked batch,
    minus ``scale_k * (x_k @ A0_k^T) @ B0_k^T`` when a trial starts from non-zero A0, B0 (PiSSA, OLoRA).

    Installed in place of an adapted projection for the pack's lifetime. A, B and the per-trial vectors are
    plain attributes bound by the pack (not registered parameters: the base's parameter list and state
    dict stay the base's own).

    The frozen correction is peft's residual base ``W0 - scale * B0 A0`` without writing it into the shared
    W0: the same function, per trial. It sees x before dropout because peft's residual is part of the base
    layer, which dropout never touches.
    """

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A: torch.Tensor | None = None  # [K, r, in] fp32 leaf
        self.lora_B: torch.Tensor | None = None  # [K, out, r] fp32 leaf
        self.scale: torch.Tensor | None = None  # [K, 1, 1]; 0 for a trial that does not adapt this module
        self.single_scale = 1.0  # the same, as a Python float, for K == 1
        self.keep: torch.Tensor | None = None  # [K, 1, 1] dropout keep-probabilities; None: no dropout at all
        self.single_p = 0.0
        self.compute_dtype: torch.dtype | None = None  # None: the activations' dtype
        self.init_A: torch.Tensor | None = None  # [K, r, in] frozen A0; None: no trial of the pack needs one
        self.init_B: torch.Tensor | None = None  # [K, out, r] frozen B0 (zero for trials whose B0 is zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dtype = self.compute_dtype or x.dtype
        xa = x.to(dtype)
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)  # no-ops in fp32; fp32 masters, low-precision math
        initial = None if self.init_A is None else (self.init_A.to(dtype), self.init_B.to(dtype))
        if A.shape[0] == 1:
            # peft's exact operations (lora_B(lora_A(dropout(x))) * scaling), so one trial matches train_one
            xd = F.dropout(xa, self.single_p, training=True) if self.training and self.single_p > 0 else xa
            d = F.linear(F.linear(xd, A[0]), B[0])
            if initial is not None:
                d = d - F.linear(F.linear(xa, initial[0][0]), initial[1][0])
            d = d * self.single_scale
        else:
            xs = xa.reshape(A.shape[0], -1, xa.shape[-1])  # [K, rows*tokens, in]: trial-major stacking
            xd = xs * (torch.rand_like(xs) < self.keep) / self.keep if self.training and self.keep is not None else xs
            d = torch.bmm(torch.bmm(xd, A.transpose(1, 2)), B.transpose(1, 2))
            if initial is not None:
                d = d - torch.bmm(torch.bmm(xs, initial[0].transpose(1, 2)), initial[1].transpose(1, 2))
            d = (d * self.scale).view(*y.shape)
        # peft adds in the promoted dtype and casts back; identical to y + d when both are y's dtype
        return (y + d).to(y.dtype)


def _features(layer: torch.nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    in_f, out_f = layer.weight.shape  # transformers Conv1D (gpt2) stores W as [in, out]
    return int(in_f), int(out_f)


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr
