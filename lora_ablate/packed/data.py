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
        n, width = len(data), max(len(ids) for ids in data.input_ids)
        ids = torch.full((n + 1, width), pad_id, dtype=torch.long)
        labels = torch.full((n + 1, width), IGNORE, dtype=torch.long)
        for row, (i, lab) in enumerate(zip(data.input_ids, data.labels)):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(lab)] = torch.tensor(lab)
        self.filler = n
        self.ids, self.labels = ids.to(device), labels.to(device)

    def batch(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[:, :width].index_select(0, rows), self.labels[:, :width].index_select(0, rows)
