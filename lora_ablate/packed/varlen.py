"""Sequence packing for the pack's training steps: each trial's micro-batch as one row of concatenated
examples, so a step computes about its real tokens instead of K * b rows padded to the longest example.

For every micro-batch, trial k's b examples are laid end to end in row k (positions restart at 0 at each
example), and the K rows are right-padded to one width L (a multiple of ``WIDTH``). Attention is a 4-D
boolean mask [K, 1, L, L], "same document and causal", built on the device from a per-token document id
by broadcasting only (no host sync, so a CUDA graph can capture it). transformers returns a user-given
4-D mask unchanged (``masking_utils._preprocess_mask_arguments``) and its SDPA integration passes it to
``scaled_dot_product_attention``. Padding tokens are a document of their own (id -1): they attend to
earlier padding only, so no query row is fully masked (which would make SDPA's softmax NaN) and no real
token ever sees them.

What stays exactly as on the padded path: each trial's tokens, positions and attention context are those
of its examples alone, and every example's first token has no target. In the padded path position 0
never had one (``token_nll`` reads labels[1:]); here its label is set to IGNORE in the flat store, so the
previous example's last token is not trained to predict it. Per-token NLL, hence the loss, is the padded
path's up to the arithmetic of a different attention kernel and summation order.

Why one row per trial and micro-batch (not rows of a fixed capacity, bin-packed): the trial-major stacking
that PackedLoraLinear relies on (rows ``k*R .. (k+1)*R`` belong to trial k) stays R = 1, each micro-batch
has one width (one graph-key entry), and there is no packing decision that could differ between runs.
The price: attention under an explicit mask is dense O(L^2) per row (SDPA cannot skip the masked blocks,
and the flash kernel does not take a mask), with L about b times the mean example length. For the linear
layers the cost is the real tokens. With ``flex`` (``study.attention=flex``) the same "same document and
causal" rule is a FlexAttention BlockMask instead (``document_block_mask``): tiles (128 x 128) that no
query may attend are never computed, so attention costs about the tiles covering each example's own
causal triangle (for examples of a few hundred tokens, a few times those triangles, not L^2 / 2). It is
built from the same per-token document ids by device operations only (no host sync), so it is built
inside a captured CUDA graph like the boolean mask (still one [K, 1, L, L] boolean pass per micro-batch,
shared by all layers; building it at tile granularity would save that too).

What padding remains: all K rows share the width of the longest, so a step computes K times its longest
trial row, not the sum of the rows. Trials with the same data order pad at most WIDTH each; trials whose
rows differ (other batch sizes, seeds) pad by the spread of their rows' summed lengths, which for b
examples grows like sqrt(b) while the padded path's grows like b. Removing it needs trials of unequal token
counts in one stream, i.e. the LoRA product as a grouped GEMM over per-trial token offsets on the device
(``torch._grouped_mm``) instead of PackedLoraLinear's equal-rows bmm.

With CUDA graphs every distinct width pattern is a capture, and summed lengths spread more than maxima:
widths above ``FINE`` round up on a coarser grid (1/8 of the width's power of two), which wastes at most
about 1/8 there and keeps the patterns few.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_ablate.data import IGNORE, Encoded

WIDTH = 64  # packed rows round up to a multiple of this
FINE = 512  # with graphs, widths above this round up to 1/8 of their power of two (at least WIDTH)


def packed_width(w: int, graphed: bool) -> int:
    w = max(WIDTH, -(-w // WIDTH) * WIDTH)
    if graphed and w > FINE:
        step = max(WIDTH, 1 << (w.bit_length() - 4))
        w = -(-w // step) * step
    return w


class _FlatData:
    """Every training example's ids and labels end to end on the device, plus one filler token (pad id,
    no label) at the end; the first label of each example is IGNORE (see the module docstring)."""

    def __init__(self, data: Encoded, pad_id: int, device: torch.device):
        self.lengths = np.array([len(x) for x in data.input_ids], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.filler = int(self.lengths.sum())
        ids = [t for x in data.input_ids for t in x] + [pad_id]
        labels = [t for y in data.labels for t in [IGNORE, *y[1:]]] + [IGNORE]
        self.ids = torch.tensor(ids, dtype=torch.long).to(device)
        self.labels = torch.tensor(labels, dtype=torch.long).to(device)


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """[K, 1, L, L] bool, True where query t may attend key s: same document and s <= t."""
    L = doc.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    return (doc.unsqueeze(-1) == doc.unsqueeze(-2)).unsqueeze(1) & causal


def document_block_mask(doc: torch.Tensor):
    """``document_mask`` as a FlexAttention BlockMask [K, 1, L, L] (one head row: every head shares it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    K, L = doc.shape
    return create_block_mask(same_document_causal, K, None, L, L, device=doc.device)


class _VarlenPlan:
    """The packed rows of every micro-batch of a span, precomputed on the host and uploaded once.

    ``tables[j]`` [ga, 3, K, Ls] int32: gather index into the flat store, position id, document id (-1:
    padding) of step j's micro-batches, Ls the step's widest; ``widths[j][m]`` micro-batch m's width L.
    ``real[j]`` / ``computed[j]``: tokens of step j that are examples' / that the forward runs over.
    """

    def __init__(self, flat: _FlatData, per_micro: list[list[list[list[int]]]], graphed: bool,
                 device: torch.device, flex: bool = False):
        """``per_micro[j][m][k]``: the example indices of trial k in micro-batch m of step j; ``flex``:
        the rows' mask is a BlockMask (``document_block_mask``) for transformers' flex_attention."""
        self.flex = flex
        self.widths, self.real, self.computed = [], [], []
        host = []
        for step in per_micro:
            lens = [[int(flat.lengths[ex].sum()) if ex else 0 for ex in micro] for micro in step]
            # >= 2: a next-token loss needs two tokens (an all-filler micro-batch still runs, as padded)
            ws = [packed_width(max(2, *ls), graphed) for ls in lens]
            K, Ls = len(step[0]), max(ws)
            t = np.empty((len(step), 3, K, Ls), dtype=np.int32)
            t[:, 0], t[:, 1], t[:, 2] = flat.filler, 0, -1
            for m, micro in enumerate(step):
                for k, ex in enumerate(micro):
                    if not ex:
                        continue
                    n = flat.lengths[ex]
                    total = int(n.sum())
                    # position within its example of every token of the row, then the gather index from it
                    first = np.repeat(np.cumsum(n) - n, n)
                    pos = np.arange(total) - first
                    t[m, 0, k, :total] = np.repeat(flat.starts[ex], n) + pos
                    t[m, 1, k, :total] = pos
                    t[m, 2, k, :total] = np.repeat(np.arange(len(ex)), n)
            host.append(t)
            self.widths.append(ws)
            self.real.append(sum(map(sum, lens)))
            self.computed.append(K * sum(ws))
        sizes = [t.size for t in host]
        whole = torch.from_numpy(np.concatenate([t.reshape(-1) for t in host])).to(device)  # one upload
        self.tables = [v.view(t.shape) for v, t in zip(whole.split(sizes), host)]
        self.flat = flat

    def static(self) -> torch.Tensor:
        """A buffer every step's table fits in, for graph replays."""
        ga, _, K = self.tables[0].shape[:3]
        return torch.empty(ga, 3, K, max(t.shape[-1] for t in self.tables), dtype=torch.int32,
                           device=self.tables[0].device)

    def load(self, static: torch.Tensor, j: int) -> None:
        t = self.tables[j]
        static[..., :t.shape[-1]].copy_(t)

    def batch(self, table: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """ids, labels [K, L] and the model's ``attention_mask`` / ``position_ids`` of one micro-batch
        (``table`` [3, K, >= L])."""
        index, pos, doc = table[:, :, :width].unbind(0)
        flat_index = index.reshape(-1)
        ids = self.flat.ids.index_select(0, flat_index).view(index.shape)
        labels = self.flat.labels.index_select(0, flat_index).view(index.shape)
        mask = document_block_mask(doc) if self.flex else document_mask(doc)
        return ids, labels, {"attention_mask": mask, "position_ids": pos.long()}
