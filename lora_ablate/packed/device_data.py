"""The training set on the device, gathered into each step's stacked micro-batches by index."""

from __future__ import annotations

import torch

from lora_ablate.data import IGNORE, Encoded


class _DeviceData:
    """The whole training set pre-tokenised on the device, right-padded to its longest example.

    Row ``n`` (one past the data) is the filler row: all padding, no labels. Batches are gathered by index
    on the device and cut to their longest example, which is exactly the single path's ``Encoded.batch``.
    """

    def __init__(self, data: Encoded, pad_id: int, device: torch.device):
        every = data.batch(range(len(data)), pad_id)
        filler = torch.full((1, every["input_ids"].shape[1]), pad_id, dtype=torch.long)
        self.filler = len(data)
        self.ids = torch.cat([every["input_ids"], filler]).to(device)
        self.labels = torch.cat([every["labels"], torch.full_like(filler, IGNORE)]).to(device)

    def batch(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[:, :width].index_select(0, rows), self.labels[:, :width].index_select(0, rows)
