"""A pack's steps between two membership changes: their plan (data rows, widths, loss divisors, AdamW
scalars, precomputed on the device) and one optimizer step of every trial (forward and backward of each
micro-batch, clipping, AdamW), run eagerly (the reference) or, on a GPU, as a replay of a CUDA graph of the
whole step (``graphs``, see packed/graphs.py)."""

from __future__ import annotations

import contextlib
import logging

import torch

from lora_ablate.errors import first_line
from lora_ablate.evaluation import token_nll
from lora_ablate.packed.attention import causal_attention, packed_attention
from lora_ablate.packed.graphs import MIN_SPAN, bucket_widths
from lora_ablate.packed.loss import head_nll
from lora_ablate.packed.optim import (
    _adam_scalars,
    adamw_per_trial_,
    adamw_single_,
    clip_per_trial_,
)
from lora_ablate.packed.varlen import _VarlenPlan

log = logging.getLogger(__name__)


class Steps:
    """The plan of the steps until the next membership change, and how one of them runs. ``pack`` is the
    ``Pack`` that made it (untyped here: pack.py imports this module)."""

    def __init__(self, pack):
        self.pack = pack
        slots, dev, data = pack.slots, pack.device, pack.data
        self.span = min(s.train.steps - s.done for s in slots)  # a slot finishes (and the pack changes) then
        self.j = 0
        self.ga = max(s.train.grad_accum for s in slots)
        b = max(s.train.batch_size for s in slots)
        filler = [data.filler] * b
        rows = []  # [span][ga][K * b]: each trial's micro-batch padded with filler rows to the pack's batch
        self.widths = [[2] * self.ga for _ in range(self.span)]  # >= 2: a next-token loss needs two tokens
        for j in range(self.span):
            rows.append([])
            for m in range(self.ga):
                flat = []
                for s in slots:
                    i = (s.done + j) * s.train.grad_accum + m
                    real = s.batches[i] if m < s.train.grad_accum else []
                    flat += real + filler[len(real):]
                    if real:
                        self.widths[j][m] = max(self.widths[j][m], s.widths[i])
                rows[j].append(flat)
        self.graphed = pack.graphs is not None and not pack.graphs.failed and self.span >= MIN_SPAN
        if self.graphed:
            self.widths = bucket_widths(self.widths, data.ids.shape[1])
        self.rows = torch.tensor(rows, dtype=torch.long).to(dev)
        self.host_tokens = [(sum(s.tokens[s.done + j] for s in slots), len(rows[j][0]) * sum(self.widths[j]))
                            for j in range(self.span)]  # (real, computed) per step
        self.varlen: _VarlenPlan | None = None
        if pack.flat is not None:  # the same examples, one concatenated row per trial and micro-batch
            self.varlen = _VarlenPlan(pack.flat, [[[s.batches[(s.done + j) * s.train.grad_accum + m]
                                                    if m < s.train.grad_accum else [] for s in slots]
                                                   for m in range(self.ga)] for j in range(self.span)],
                                      self.graphed, dev, attention=pack.attention)
            self.widths = self.varlen.widths
            self.host_tokens = list(zip(self.varlen.real, self.varlen.computed))
        # each step's label tokens per trial over its whole accumulation window (the single path's divisor)
        self.host_window = [[s.window[s.done + j] for s in slots] for j in range(self.span)]
        self.window = torch.tensor(self.host_window, dtype=torch.float32).to(dev)  # [span, K]
        self.max_norm = torch.tensor([s.train.max_grad_norm for s in slots], device=dev)
        self.clip = any(s.train.max_grad_norm for s in slots)
        self.decay_on = any(s.train.weight_decay for s in slots)
        # AdamW's per-step scalars in float64 on the host, as torch computes them, then one upload
        host = [[_adam_scalars(s, s.done + j + 1) for j in range(self.span)] for s in slots]
        self.host_scalars = host
        table = torch.tensor(host, dtype=torch.float64).to(torch.float32)  # [K, span, 3]
        self.scalars = table.permute(2, 1, 0).contiguous().to(dev)  # [3, span, K]
        if self.graphed:  # what each replay reads: this step's slice of the tables above, copied in
            self.static = (torch.empty_like(self.rows[0]) if self.varlen is None else self.varlen.static(),
                           torch.empty_like(self.window[0]), torch.empty_like(self.scalars[:, 0]))

    # ------------------------------------------------------------------ one optimizer step

    def step(self) -> None:
        if self.graphed and self._replay():
            self._advance()
            return
        rows = self.rows[self.j] if self.varlen is None else self.varlen.rows(self.j)
        self._forward_backward(rows, self.widths[self.j], self.window[self.j], self.host_window[self.j])
        self.optimizer_step()

    def optimizer_step(self) -> None:
        """Clipping and AdamW on the gradients there are, which are then zeroed; the step is counted."""
        self._mask()
        self._clip()
        self._adamw()
        self.pack.grads.zero_()
        self._advance()

    def _advance(self) -> None:
        real, computed = self.host_tokens[self.j]
        self.pack.real_tokens += real
        self.pack.computed_tokens += computed
        for s in self.pack.slots:
            s.done += 1
        self.j += 1

    def _forward_backward(self, rows, widths, window, host_window=None) -> None:
        pack = self.pack
        if pack.compiled is None:
            self._micro_batches(rows, widths, window, host_window)
            return
        running = pack.running.clone()
        try:
            with pack.compiled.active():
                self._micro_batches(rows, widths, window, host_window)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is the reference anyway
            log.warning("torch.compile failed (%s: %s); training this pack eagerly",
                        type(e).__name__, first_line(e))
            pack.compiled.restore()
            pack.compiled = None
            pack.grads.zero_()
            pack.running.copy_(running)
            self._micro_batches(rows, widths, window, host_window)

    def _micro_batches(self, rows: torch.Tensor, widths: list[int], window: torch.Tensor,
                       host_window: list[float] | None) -> None:
        """Forward and backward of the step's micro-batches; ``rows`` [ga, K*b] (packing: the varlen plan's
        ``rows``, tables [ga, 3, K, >= width] and segment offsets), ``window`` [K] on the device.
        With ``host_window`` (the same divisors on the host), K = 1 reduces exactly as the single path."""
        pack = self.pack
        K = len(pack.slots)
        with self._attention():
            for m in range(self.ga):
                if self.varlen is None:
                    ids, labels, extra = *pack.data.batch(rows[m], widths[m]), {}
                else:
                    ids, labels, extra = self.varlen.batch(rows, m, widths[m])
                nll = self._nll(ids, labels, **extra)
                # summed NLL over the trial's window tokens (all its micro-batches of this step); a slot with
                # fewer micro-batches gets filler rows here: loss 0
                if K == 1 and host_window is not None:  # the single path's reductions, to the bit
                    loss = (nll.sum() / host_window[0]).view(1)
                else:
                    loss = nll.view(K, -1).sum(1) / window
                loss.sum().backward()
                pack.running += loss.detach()  # per micro-batch, in the single path's order

    def _attention(self) -> contextlib.AbstractContextManager:
        """Right padding + causal attention: real tokens never see padding, so no padding mask is needed.
        Packed rows bring their own: a boolean document mask for the model's SDPA, a BlockMask that only
        transformers' flex_attention reads, or the segment offsets of flash varlen attention."""
        if self.varlen is None:
            return causal_attention(self.pack.model)
        return packed_attention(self.pack.model, self.varlen.attention)

    def _nll(self, ids: torch.Tensor, labels: torch.Tensor, **extra) -> torch.Tensor:
        """Per-token next-token NLL of the batch (0 where masked); ``extra``: packed rows' position_ids and
        attention_mask or varlen segment offsets (keywords the model passes through to its attention)."""
        pack = self.pack
        if pack.head is not None:
            decoder, weight = pack.head
            # compiled on a GPU whether or not the blocks are: a small graph, and most of the loss's time
            return head_nll(decoder(input_ids=ids, use_cache=False, **extra).last_hidden_state, weight, labels,
                            compiled=pack.device.type == "cuda")
        return token_nll(pack.model(input_ids=ids, use_cache=False, **extra).logits, labels)[0]

    def _mask(self) -> None:
        """B's rows of the fused roles a trial leaves out get no gradient (packed/pack.py ``_row_masks``)."""
        for grad, mask in self.pack.row_masks:
            grad.mul_(mask)

    def _clip(self) -> None:
        if not self.clip:
            return
        if len(self.pack.slots) == 1:
            torch.nn.utils.clip_grad_norm_(self.pack.leaves, self.pack.slots[0].train.max_grad_norm)
            return
        clip_per_trial_(self.pack.grads, self.max_norm)

    def _adamw(self) -> None:
        """torch.optim.AdamW (single-tensor form, decoupled weight decay) on every row at once."""
        pack = self.pack
        state = pack.weights, pack.grads, pack.exp_avg, pack.exp_avg_sq
        if len(pack.slots) == 1:  # Python scalars: literally torch's calls
            adamw_single_(*state, *self.host_scalars[0][self.j], self.decay_on)
            return
        adamw_per_trial_(*state, *self.scalars[:, self.j], self.decay_on)  # each [K], one value per trial

    # ------------------------------------------------------------------ the step as a CUDA graph

    def _replay(self) -> bool:
        """Run this step as a CUDA graph (captured on first use of its widths); False: run it eagerly."""
        key = tuple(self.widths[self.j])
        rows, window, scalars = self.static
        if self.varlen is None:
            rows.copy_(self.rows[self.j])
        else:
            self.varlen.load(rows, self.j)
        window.copy_(self.window[self.j])
        scalars.copy_(self.scalars[:, self.j])
        return self.pack.graphs.replay(key, lambda: self._capture(list(key)))

    def _capture(self, widths: list[int]) -> torch.cuda.CUDAGraph | None:
        """The whole step (forward and backward of every micro-batch, clipping, AdamW, zeroing the gradients)
        over the static buffers."""
        pack = self.pack
        rows, window, scalars = self.static
        running = pack.running.clone()

        def undo() -> None:  # what the warm-up passes changed
            pack.grads.zero_()
            pack.running.copy_(running)

        def body() -> None:
            with pack.compiled.active() if pack.compiled is not None else contextlib.nullcontext():
                self._micro_batches(rows, widths, window, None)
            self._mask()
            if self.clip:
                clip_per_trial_(pack.grads, self.max_norm)
            adamw_per_trial_(pack.weights, pack.grads, pack.exp_avg, pack.exp_avg_sq, *scalars, self.decay_on)
            pack.grads.zero_()

        # evaluation re-binds the wrappers to fresh scale tensors; the graph keeps reading these
        keep = [(w.lora_A, w.lora_B, w.scale, w.keep, w.init_A, w.init_B) for w in pack.wrappers.values()]
        graph = pack.graphs.capture(tuple(widths), lambda: self._forward_backward(rows, widths, window), undo, body,
                                    keep)
        self.graphed = graph is not None
        return graph
