"""Sequence packing for the pack's training steps: each trial's micro-batch as one row of concatenated
examples, so a step computes about its real tokens instead of K * b rows padded to the longest example.

For every micro-batch, trial k's b examples are laid end to end in row k (positions restart at 0 at each
example), and the K rows are right-padded to one width L (a multiple of ``WIDTH``). Attention (``sdpa``)
is a 4-D boolean mask [K, 1, L, L], "same document and causal", built on the device from a per-token
document id by broadcasting only (no host sync, so a CUDA graph can capture it). transformers returns a user-given
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
The price under ``sdpa``: attention under an explicit mask is dense O(L^2) per row (SDPA cannot skip the
masked blocks, and its flash kernel does not take a mask), with L about b times the mean example length.
For the linear layers the cost is the real tokens. With ``flex`` (``study.attention=flex``) the same "same document and
causal" rule is a FlexAttention BlockMask instead (``document_block_mask``): tiles (128 x 128) that no
query may attend are never computed, so attention costs about the tiles covering each example's own
causal triangle (for examples of a few hundred tokens, a few times those triangles, not L^2 / 2). It is
built from the same per-token document ids by device operations only (no host sync), so it is built
inside a captured CUDA graph like the boolean mask (still one [K, 1, L, L] boolean pass per micro-batch,
shared by all layers; building it at tile granularity would save that too).

With ``varlen`` (``study.attention=varlen``, what ``auto`` takes on a CUDA SDPA model that can train it) there
is no mask at all: the K rows are flattened to K * L tokens and cut into segments by cumulative offsets
(``segment_offsets``), and flash varlen attention (packed/attention.py) runs causal attention inside each
segment, so attention costs each example's own causal triangle and the dense O(L^2) masked attention and
its mask are gone. Each row has one segment per example and one for its padding tail (padding attends
padding only: nothing is NaN); a trial with fewer examples than the span's most gets empty segments, so
every micro-batch's offsets have one shape, K * (b_max + 1) + 1, as a CUDA graph's static buffer needs. The
offsets are precomputed on the host with the tables and uploaded with them. The padding between trials'
rows (below) stays: the rows still share one width.

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
from lora_ablate.packed.attention import CU_SEQLENS, MAX_LEN

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
    ``cu_seqlens[j]`` [ga, K * (b_max + 1) + 1] int32 (``attention`` varlen only, else None): the segment
    offsets of each micro-batch's rows flattened to K * L tokens (``segment_offsets``), b_max the most
    examples a trial has in a micro-batch of the span, so every step's table has one shape.
    ``real[j]`` / ``computed[j]``: tokens of step j that are examples' / that the forward runs over.
    """

    def __init__(self, flat: _FlatData, per_micro: list[list[list[list[int]]]], graphed: bool,
                 device: torch.device, attention: str = "sdpa"):
        """``per_micro[j][m][k]``: the example indices of trial k in micro-batch m of step j; ``attention``
        (resolved ``study.attention``): what the rows' attention reads, the boolean document mask (sdpa),
        a BlockMask (flex, ``document_block_mask``) or segment offsets (varlen)."""
        self.attention = attention
        self.widths, self.real, self.computed = [], [], []
        most = max((len(ex) for step in per_micro for micro in step for ex in micro), default=0)
        host, offsets = [], []
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
            if attention == "varlen":
                offsets.append(np.stack([segment_offsets([flat.lengths[ex] for ex in micro], w, most)
                                         for micro, w in zip(step, ws)]))
            self.widths.append(ws)
            self.real.append(sum(map(sum, lens)))
            self.computed.append(K * sum(ws))
        host += offsets
        sizes = [t.size for t in host]
        whole = torch.from_numpy(np.concatenate([t.reshape(-1) for t in host])).to(device)  # one upload
        views = [v.view(t.shape) for v, t in zip(whole.split(sizes), host)]
        self.tables = views[:len(per_micro)]
        self.cu_seqlens = views[len(per_micro):] or None
        self.flat = flat

    def rows(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``batch`` reads of step j: its tables and segment offsets (None unless varlen)."""
        return self.tables[j], None if self.cu_seqlens is None else self.cu_seqlens[j]

    def static(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Buffers every step's ``rows`` fit in, for graph replays."""
        ga, _, K = self.tables[0].shape[:3]
        table = torch.empty(ga, 3, K, max(t.shape[-1] for t in self.tables), dtype=torch.int32,
                            device=self.tables[0].device)
        return table, None if self.cu_seqlens is None else torch.empty_like(self.cu_seqlens[0])

    def load(self, static: tuple[torch.Tensor, torch.Tensor | None], j: int) -> None:
        table, offsets = self.rows(j)
        static[0][..., :table.shape[-1]].copy_(table)
        if offsets is not None:
            static[1].copy_(offsets)

    def batch(self, rows: tuple[torch.Tensor, torch.Tensor | None], m: int,
              width: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """ids, labels [K, L] and the model's attention inputs and ``position_ids`` of micro-batch m of
        ``rows`` (``rows(j)`` or the ``static`` buffers), L = ``width``."""
        table, offsets = rows
        index, pos, doc = table[m, :, :, :width].unbind(0)
        flat_index = index.reshape(-1)
        ids = self.flat.ids.index_select(0, flat_index).view(index.shape)
        labels = self.flat.labels.index_select(0, flat_index).view(index.shape)
        if self.attention == "varlen":  # every segment fits in a row: the row width bounds them all
            extra = {CU_SEQLENS: offsets[m], MAX_LEN: width}
        else:
            extra = {"attention_mask": document_block_mask(doc) if self.attention == "flex" else document_mask(doc)}
        return ids, labels, {**extra, "position_ids": pos.long()}


def segment_offsets(lengths: list[np.ndarray], width: int, most: int) -> np.ndarray:
    """cu_seqlens [K * (most + 1) + 1] of K rows of width ``width`` flattened end to end, ``lengths[k]`` the
    lengths of row k's examples: per row a segment per example, ``most - len(lengths[k])`` empty ones, then
    the row's padding tail (padding attends padding only, so no query is left with nothing to attend)."""
    ends = []
    for k, n in enumerate(lengths):
        inner = np.cumsum(n, dtype=np.int64)
        filled = int(inner[-1]) if len(inner) else 0
        ends.append(k * width + np.concatenate([inner, np.full(most - len(n), filled), [width]]))
    return np.concatenate([[0], *ends]).astype(np.int32)
