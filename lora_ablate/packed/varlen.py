"""Sequence packing for the pack's training steps: each trial's examples of a micro-batch laid end to end
in a few rows, so a step computes about its real tokens instead of K * b rows padded to the longest example.

For every micro-batch, trial k's b examples fill rows ``k*R .. (k+1)*R`` (positions restart at 0 at each
example), and all K*R rows are right-padded to one width L (a multiple of ``WIDTH``). Attention is a 4-D
boolean mask [K*R, 1, L, L], "same document and causal", built on the device from a per-token document id
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

How many rows (``_layout``): attention under an explicit mask is dense per row (SDPA cannot skip masked
blocks, and the flash kernel takes no mask), so one row of all b examples (~b times the mean length) would
make attention quadratic in the micro-batch. Splitting a trial's examples over R balanced rows cuts that
by about R, at the price of rounding R rows up to the widest. Each step takes the R that minimises the
estimated cost (linear layers per token plus attention per key, ``ATTENTION_TOKENS``). Rows stay
trial-major with the same R for every trial, which ``PackedLoraLinear``'s bmm and the per-trial loss
need. The choice depends on the examples' lengths alone, so it is the same in every run.

What padding remains: all K*R rows share the width of the fullest, so a step computes K times its fullest
trial, not the sum of the trials. Trials with the same data order pad little; trials whose rows differ
(other batch sizes, seeds) pad by the spread of their summed lengths (~1.6x the real tokens for 21 trials
of 8 T0 examples in a step). Removing it needs trials of unequal token counts in one stream, i.e. the LoRA
product as a grouped GEMM over per-trial token offsets (``torch._grouped_mm``) instead of equal-rows bmm;
a FlexAttention document BlockMask would let rows grow without the quadratic cost.

With CUDA graphs every distinct (R, width) pattern is a capture: widths above ``FINE`` round up on a
coarser grid (1/8 of the width's power of two), which wastes at most about 1/8 there and keeps the
patterns few.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_ablate.data import IGNORE, Encoded

WIDTH = 64  # packed rows round up to a multiple of this
ROW = 512  # rows are split until they hold about this many tokens, where splitting pays (``_layout``)
# Keys per query at which attention costs a token what the linear layers do: parameters / (2 * hidden *
# layers) for a decoder (4 FLOPs a key and head dim per layer against 2 a parameter); ~3,900 for the 135M
# default, and of that order for small decoders generally
ATTENTION_TOKENS = 4096
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


def rows_of(examples: list[int], lengths: np.ndarray, n_rows: int) -> list[list[int]]:
    """One trial's examples of a micro-batch spread over ``n_rows`` rows as evenly as it goes: longest
    first, each into the emptiest row (ties to the lowest), so it depends on the lengths alone."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [0] * n_rows
    for i in sorted(examples, key=lambda i: (-int(lengths[i]), i)):
        r = min(range(n_rows), key=lambda r: (fill[r], r))
        rows[r].append(i)
        fill[r] += int(lengths[i])
    return [row for row in rows if row]


def _layout(step: list[list[list[int]]], lengths: np.ndarray, cap: int, graphed: bool):
    """Rows per trial R for one step and each trial's examples balanced over them (``rows_of``): the R
    (at most ``cap`` tokens a row where examples allow) that minimises the step's estimated cost, K*R*W
    token passes of the linear layers plus attention, which is dense per row and so grows with R*W^2."""
    most = max(int(lengths[ex].sum()) if ex else 0 for micro in step for ex in micro)
    best = None
    for R in range(1, max(1, -(-most // cap)) + 1):
        rows = [[rows_of(ex, lengths, R) for ex in micro] for micro in step]
        W = max(packed_width(max([2, *(int(lengths[r].sum()) for rs in micro for r in rs)]), graphed)
                for micro in rows)
        cost = R * W * (1 + W / ATTENTION_TOKENS)
        if best is None or cost < best[0]:
            best = (cost, R, rows)
    return best[1], best[2]


class _VarlenPlan:
    """The packed rows of every micro-batch of a span, precomputed on the host and uploaded once.

    Each trial's examples of a micro-batch fill R rows of at most ``ROW`` tokens (R the most any trial of
    the step needs; a trial with fewer gets filler rows), trial-major: rows ``k*R .. (k+1)*R`` are trial
    k's, as ``PackedLoraLinear`` and the per-trial loss expect. Attention under the document mask is dense
    per row, so rows of ~``ROW`` tokens cost a fraction of one row of all b examples.

    ``tables[j]`` [ga, 3, K*R, Ls] int32: gather index into the flat store, position id, document id (-1:
    padding) of step j's micro-batches, Ls the step's widest; ``widths[j][m]`` micro-batch m's (R, L), which
    is also its CUDA-graph key. ``real[j]`` / ``computed[j]``: tokens of step j that are examples' / that the
    forward runs over.
    """

    def __init__(self, flat: _FlatData, per_micro: list[list[list[list[int]]]], graphed: bool,
                 device: torch.device, row: int | None = None):
        """``per_micro[j][m][k]``: the example indices of trial k in micro-batch m of step j."""
        cap = row or ROW
        self.K = len(per_micro[0][0]) if per_micro else 0
        self.widths, self.real, self.computed = [], [], []
        host = []
        for step in per_micro:
            R, rows = _layout(step, flat.lengths, cap, graphed)
            K = len(step[0])
            fills = [[int(flat.lengths[r].sum()) for rs in micro for r in rs] for micro in rows]
            # >= 2: a next-token loss needs two tokens (an all-filler micro-batch still runs, as padded)
            ws = [packed_width(max([2, *f]), graphed) for f in fills]
            Ls = max(ws)
            t = np.empty((len(step), 3, K * R, Ls), dtype=np.int32)
            t[:, 0], t[:, 1], t[:, 2] = flat.filler, 0, -1
            for m, micro in enumerate(rows):
                for k, trial_rows in enumerate(micro):
                    for r, ex in enumerate(trial_rows):
                        n = flat.lengths[ex]
                        total = int(n.sum())
                        # position within its example of every token of the row, then the gather index from it
                        first = np.repeat(np.cumsum(n) - n, n)
                        pos = np.arange(total) - first
                        t[m, 0, k * R + r, :total] = np.repeat(flat.starts[ex], n) + pos
                        t[m, 1, k * R + r, :total] = pos
                        t[m, 2, k * R + r, :total] = np.repeat(np.arange(len(ex)), n)
            host.append(t)
            self.widths.append([(R, w) for w in ws])
            self.real.append(sum(map(sum, fills)))
            self.computed.append(K * R * sum(ws))
        sizes = [t.size for t in host]
        whole = torch.from_numpy(np.concatenate([t.reshape(-1) for t in host])).to(device)  # one upload
        self.tables = [v.view(t.shape) for v, t in zip(whole.split(sizes), host)]
        self.flat = flat

    def static(self) -> torch.Tensor:
        """A buffer every step's table fits in, for graph replays."""
        ga = self.tables[0].shape[0]
        return torch.empty(ga, 3, max(t.shape[2] for t in self.tables), max(t.shape[-1] for t in self.tables),
                           dtype=torch.int32, device=self.tables[0].device)

    def load(self, static: torch.Tensor, j: int) -> None:
        t = self.tables[j]
        static[:, :, :t.shape[2], :t.shape[-1]].copy_(t)

    def batch(self, table: torch.Tensor, width: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """ids, labels [K*R, L] and the model's ``attention_mask`` / ``position_ids`` of one micro-batch
        (``table`` [3, >= K*R, >= L]; ``width`` = (R, L))."""
        R, L = width
        index, pos, doc = table[:, :self.K * R, :L].unbind(0)
        flat_index = index.reshape(-1)
        ids = self.flat.ids.index_select(0, flat_index).view(index.shape)
        labels = self.flat.labels.index_select(0, flat_index).view(index.shape)
        return ids, labels, {"attention_mask": document_mask(doc), "position_ids": pos.long()}
