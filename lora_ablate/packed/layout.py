"""Where each trial's adapters live in the pack's flat [numel, K] fp32 tensors, and how surviving trials'
columns are carried, bit for bit, into a re-laid-out pack."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Layout:
    """Where each adapted module's A [r, in] and B [out, r] sit in a trial's column of the flat tensors."""

    r: int
    modules: tuple[tuple[str, int, int], ...]  # (name, in_features, out_features), model order

    @property
    def numel(self) -> int:
        return sum(self.r * (i + o) for _, i, o in self.modules)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.modules]

    def blocks(self, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A [K, r, in], B [K, out, r]) views into ``flat`` [numel, K]."""
        out, off, K, r = {}, 0, flat.shape[1], self.r
        for name, i, o in self.modules:
            a = flat[off:off + r * i].view(r, i, K).permute(2, 0, 1)
            off += r * i
            b = flat[off:off + o * r].view(o, r, K).permute(2, 0, 1)
            off += o * r
            out[name] = (a, b)
        return out


def _carry(src, src_layout: _Layout, rows, dst, dst_layout: _Layout) -> None:
    """Copy columns ``rows`` of ``src`` (laid out as ``src_layout``) into the first columns of ``dst``."""
    n = rows.numel()
    if src_layout == dst_layout:
        dst[:, :n] = src.index_select(1, rows)
        return
    r = min(src_layout.r, dst_layout.r)  # a survivor's rank fits both; beyond it there is only padding
    dst_blocks = dst_layout.blocks(dst)
    for name, (a, b) in src_layout.blocks(src).items():
        if name in dst_blocks:  # else only departed trials adapted it
            da, db = dst_blocks[name]
            da[:n, :r] = a.index_select(0, rows)[:, :r]
            db[:n, :, :r] = b.index_select(0, rows)[:, :, :r]
