"""Where each trial's adapters live in the pack's flat [K, numel] fp32 tensors, and how surviving trials'
rows are carried, bit for bit, into a re-laid-out pack.

Trial-major: each module's block is a [K, r, in] (or [K, out, r]) view whose inner dimensions are
contiguous, so the batched products read it directly and autograd accumulates each gradient into it
with coalesced writes (a trial-minor layout made every accumulation a strided scatter: 10 ms of a
97 ms step at K = 16 on an H200).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Layout:
    """Where each adapted module's A [r, in] and B [out, r] sit in a trial's row of the flat tensors; each
    module has the largest rank any trial of the pack gives it (a part-adapted fused matrix: r per role)."""

    modules: tuple[tuple[str, int, int, int], ...]  # (name, in_features, out_features, rank), model order

    @property
    def r(self) -> int:
        return max(r for _, _, _, r in self.modules)

    @property
    def numel(self) -> int:
        return sum(r * (i + o) for _, i, o, r in self.modules)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _, _ in self.modules]

    def blocks(self, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A [K, r, in], B [K, out, r]) views into ``flat`` [K, numel]."""
        out, off, K = {}, 0, flat.shape[0]
        for name, i, o, r in self.modules:
            a = flat[:, off:off + r * i].view(K, r, i)
            off += r * i
            b = flat[:, off:off + o * r].view(K, o, r)
            off += o * r
            out[name] = (a, b)
        return out


def _carry(src, src_layout: _Layout, rows, dst, dst_layout: _Layout) -> None:
    """Copy rows ``rows`` of ``src`` (laid out as ``src_layout``) into the first rows of ``dst``."""
    n = rows.numel()
    if src_layout == dst_layout:
        dst[:n] = src.index_select(0, rows)
        return
    dst_blocks = dst_layout.blocks(dst)
    for name, (a, b) in src_layout.blocks(src).items():
        if name in dst_blocks:  # else only departed trials adapted it
            da, db = dst_blocks[name]
            r = min(a.shape[1], da.shape[1])  # a survivor's rank fits both; beyond it there is only padding
            da[:n, :r] = a.index_select(0, rows)[:, :r]
            db[:n, :, :r] = b.index_select(0, rows)[:, :, :r]
