"""The pack: the frozen base with K trials' adapters installed, their flat fp32 state, and one training
step (forward and backward of every micro-batch, clipping, AdamW) for all of them at once.

A step runs eagerly (the reference) or, on a GPU, as a replay of a CUDA graph of the whole step
(``graphs``, see packed/graphs.py).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from lora_ablate.data import Encoded
from lora_ablate.errors import first_line
from lora_ablate.evaluation import token_nll
from lora_ablate.models import LoadedModel
from lora_ablate.packed.attention import _causal_attention
from lora_ablate.packed.compiled import _compile_blocks
from lora_ablate.packed.data import _DeviceData
from lora_ablate.packed.graphs import MIN_SPAN, StepGraphs, bucket_widths
from lora_ablate.packed.init import initial_A
from lora_ablate.packed.layers import PackedLoraLinear, _features, _parent
from lora_ablate.packed.layout import _carry, _Layout
from lora_ablate.packed.loss import head_nll
from lora_ablate.packed.optim import _adam_scalars, adamw_per_trial_, adamw_single_, clip_per_trial_
from lora_ablate.packed.slot import _Slot
from lora_ablate.targets import TargetPlan, _linear_modules, plain_head, resolve_targets

log = logging.getLogger(__name__)

# Each module's A and B are views with gaps between trials' rows, which autograd's layout contract calls
# "not dense"; it still accumulates into them in place, which is what the flat gradient relies on.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class _Pack:
    """The frozen base with K trials' adapters installed, their flat state, and one training step."""

    def __init__(self, base: LoadedModel, data: Encoded, lora_dtype: torch.dtype | None, compile: bool,
                 fused_head: bool = False, graphs: bool = False):
        self.base, self.model, self.device = base, base.model, base.device
        # the decoder and head weight when the loss may skip the full logits (see packed/loss.py)
        self.head = plain_head(self.model) if fused_head else None
        self.graphs = StepGraphs(base.device) if graphs and base.device.type == "cuda" else None
        self.graphed = False  # this layout's steps replay graphs
        self.lora_dtype = lora_dtype
        self.data = _DeviceData(data, base.tokenizer.pad_token_id, base.device)
        self.slots: list[_Slot] = []
        self.layout: _Layout | None = None
        self.weights = self.grads = self.exp_avg = self.exp_avg_sq = None  # [K, numel] fp32
        self.wrappers: dict[str, PackedLoraLinear] = {}
        self.leaves: list[torch.Tensor] = []
        self.encoded = data
        self.dims = {name: _features(layer) for name, layer in _linear_modules(self.model)}  # model order
        self.plans: dict[tuple, TargetPlan] = {}
        self.compiled = _compile_blocks(self.model) if compile else None
        self.max_k = 0

    # ------------------------------------------------------------------ membership

    def relayout(self, slots: list[_Slot]) -> None:
        """Make ``slots`` the pack: survivors keep their exact state, new slots start from their init."""
        carried = [s for s in slots if s.row is not None]
        fresh = [s for s in slots if s.row is None]
        slots = carried + fresh
        names = {n for s in slots for n in s.modules}  # the union of the trials' targets
        layout = _Layout(max(s.spec.lora.r for s in slots),
                         tuple((n, *self.dims[n]) for n in self.dims if n in names))
        K, numel = len(slots), layout.numel
        new = [torch.zeros(K, numel, device=self.device) for _ in range(4)]  # weights, grads, exp_avg, exp_avg_sq
        running = torch.zeros(K, device=self.device)  # summed losses since each trial's last log
        if carried:
            old_rows = torch.tensor([s.row for s in carried], device=self.device)
            running[:len(carried)] = self.running.index_select(0, old_rows)
            old = (self.weights, None, self.exp_avg, self.exp_avg_sq)
            for dst, src in zip(new, old):
                if src is not None:
                    _carry(src, self.layout, old_rows, dst, layout)
        for k, slot in enumerate(fresh, start=len(carried)):
            new[0][k].copy_(self._initial_row(slot, layout))
        for k, slot in enumerate(slots):
            slot.row = k
        self.slots, self.layout = slots, layout
        if self.graphs is not None:
            self.graphs.clear()  # they point at the old flat tensors
        self.weights, self.grads, self.exp_avg, self.exp_avg_sq = new
        self.running = running
        self.max_k = max(self.max_k, K)
        self._install(layout.names)
        self._bind()
        self._plan()

    def _initial_row(self, slot: _Slot, layout: _Layout) -> torch.Tensor:
        row = torch.zeros(1, layout.numel)
        blocks = layout.blocks(row)
        names = [n for n in layout.names if n in slot.modules]
        for name, a in initial_A(self.base, slot.spec, names).items():
            blocks[name][0][0, :slot.spec.lora.r] = a  # B stays zero, as peft initialises it
        return row[0].to(self.device)

    def plan(self, targets: tuple) -> TargetPlan:
        """resolve_targets on the bare base (the wrappers would hide the projections from it)."""
        if targets not in self.plans:
            wrapped = list(self.wrappers.items())
            for name, _ in wrapped:
                parent, attr = _parent(self.model, name)
                setattr(parent, attr, self.wrappers[name].base_layer)
            try:
                self.plans[targets] = resolve_targets(self.model, targets)
            finally:
                for name, wrapper in wrapped:
                    parent, attr = _parent(self.model, name)
                    setattr(parent, attr, wrapper)
        return self.plans[targets]

    def _install(self, names: list[str]) -> None:
        for name in names:
            if name not in self.wrappers:
                parent, attr = _parent(self.model, name)
                wrapper = PackedLoraLinear(getattr(parent, attr))
                wrapper.train(self.model.training)
                setattr(parent, attr, wrapper)
                self.wrappers[name] = wrapper
        for name in [n for n in self.wrappers if n not in names]:
            self._uninstall(name)

    def _uninstall(self, name: str) -> None:
        parent, attr = _parent(self.model, name)
        setattr(parent, attr, self.wrappers.pop(name).base_layer)

    def close(self) -> None:
        """Put every original module back: the base is exactly as before the pack."""
        for name in list(self.wrappers):
            self._uninstall(name)
        if self.compiled is not None:
            self.compiled.restore()
        if self.graphs is not None:
            self.graphs.clear()

    # ------------------------------------------------------------------ binding

    def _bind(self, rows: torch.Tensor | None = None) -> None:
        """Point every wrapper at the pack's tensors (or, for evaluation, at a subset of its rows)."""
        slots = self.slots if rows is None else [self.slots[i] for i in rows.tolist()]
        K = len(slots)
        w_blocks, g_blocks = self.layout.blocks(self.weights), self.layout.blocks(self.grads)
        scale_cache: dict[tuple, torch.Tensor] = {}
        ps = [s.spec.lora.dropout for s in slots]
        keep = None if not any(ps) else torch.tensor([1 - p for p in ps], device=self.device).view(K, 1, 1)
        self.leaves = []
        for name, wrapper in self.wrappers.items():
            a, b = w_blocks[name]
            if rows is None:
                # leaves aliasing the flat weights; their .grad aliases the flat grads, where autograd
                # accumulates in place, so the optimiser and clipping see every gradient in one tensor
                a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
                a.grad, b.grad = g_blocks[name]
                self.leaves += [a, b]
            else:
                a, b = a.index_select(0, rows), b.index_select(0, rows)
            scales = tuple(s.spec.lora.scaling if name in s.modules else 0.0 for s in slots)
            if scales not in scale_cache:
                scale_cache[scales] = torch.tensor(scales, device=self.device).view(K, 1, 1)
            wrapper.lora_A, wrapper.lora_B, wrapper.scale = a, b, scale_cache[scales]
            wrapper.single_scale, wrapper.keep, wrapper.single_p = scales[0], keep, ps[0]
            wrapper.compute_dtype = self.lora_dtype

    @contextlib.contextmanager
    def selected(self, slots: list[_Slot]):
        """Evaluate only ``slots``: the wrappers see just their rows, in this order."""
        if [s.row for s in slots] == list(range(len(self.slots))):
            yield
            return
        self._bind(torch.tensor([s.row for s in slots], device=self.device))
        try:
            yield
        finally:
            self._bind()

    # ------------------------------------------------------------------ the step plan

    def _plan(self) -> None:
        """Everything the steps until the next membership change need, precomputed on the device."""
        slots, dev = self.slots, self.device
        self.span = min(s.train.steps - s.done for s in slots)  # a slot finishes (and the pack changes) then
        self.j = 0
        self.ga = max(s.train.grad_accum for s in slots)
        b = max(s.train.batch_size for s in slots)
        filler = [self.data.filler] * b
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
        self.graphed = self.graphs is not None and not self.graphs.failed and self.span >= MIN_SPAN
        if self.graphed:
            self.widths = bucket_widths(self.widths, self.data.ids.shape[1])
        self.rows = torch.tensor(rows, dtype=torch.long).to(dev)
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
            self.static = (torch.empty_like(self.rows[0]), torch.empty_like(self.window[0]),
                           torch.empty_like(self.scalars[:, 0]))

    # ------------------------------------------------------------------ one optimizer step

    def step(self) -> None:
        """One optimizer step of every slot; losses accumulate on the device (no host sync)."""
        if not (self.graphed and self._replay()):
            self._forward_backward(self.rows[self.j], self.widths[self.j], self.window[self.j], self.host_window[self.j])
            self._clip()
            self._adamw()
            self.grads.zero_()
        for s in self.slots:
            s.done += 1
        self.j += 1

    def _forward_backward(self, rows, widths, window, host_window=None) -> None:
        if self.compiled is None:
            self._micro_batches(rows, widths, window, host_window)
            return
        running = self.running.clone()
        try:
            with self.compiled.active():
                self._micro_batches(rows, widths, window, host_window)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is the reference anyway
            log.warning("torch.compile failed (%s: %s); training this pack eagerly",
                        type(e).__name__, first_line(e))
            self.compiled.restore()
            self.compiled = None
            self.grads.zero_()
            self.running.copy_(running)
            self._micro_batches(rows, widths, window, host_window)

    def _micro_batches(self, rows: torch.Tensor, widths: list[int], window: torch.Tensor,
                       host_window: list[float] | None) -> None:
        """Forward and backward of the step's micro-batches; ``rows`` [ga, K*b], ``window`` [K] on the device.
        With ``host_window`` (the same divisors on the host), K = 1 reduces exactly as the single path."""
        K = len(self.slots)
        # right padding + causal attention: real tokens never see padding, so no padding mask is needed
        with _causal_attention(self.model):
            for m in range(self.ga):
                ids, labels = self.data.batch(rows[m], widths[m])
                nll = self._nll(ids, labels)
                # summed NLL over the trial's window tokens (all its micro-batches of this step); a slot with
                # fewer micro-batches gets filler rows here: loss 0
                if K == 1 and host_window is not None:  # the single path's reductions, to the bit
                    loss = (nll.sum() / host_window[0]).view(1)
                else:
                    loss = nll.view(K, -1).sum(1) / window
                loss.sum().backward()
                self.running += loss.detach()  # per micro-batch, in the single path's order

    def _nll(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token next-token NLL of the batch (0 where masked)."""
        if self.head is not None:
            decoder, weight = self.head
            # compiled on a GPU whether or not the blocks are: a small graph, and most of the loss's time
            return head_nll(decoder(input_ids=ids, use_cache=False).last_hidden_state, weight, labels,
                            compiled=self.device.type == "cuda")
        return token_nll(self.model(input_ids=ids, use_cache=False).logits, labels)[0]

    def _clip(self) -> None:
        if not self.clip:
            return
        if len(self.slots) == 1:
            torch.nn.utils.clip_grad_norm_(self.leaves, self.slots[0].train.max_grad_norm)
            return
        clip_per_trial_(self.grads, self.max_norm)

    def _adamw(self) -> None:
        """torch.optim.AdamW (single-tensor form, decoupled weight decay) on every row at once."""
        state = self.weights, self.grads, self.exp_avg, self.exp_avg_sq
        if len(self.slots) == 1:  # Python scalars: literally torch's calls
            adamw_single_(*state, *self.host_scalars[0][self.j], self.decay_on)
            return
        adamw_per_trial_(*state, *self.scalars[:, self.j], self.decay_on)  # each [K], one value per trial

    # ------------------------------------------------------------------ the step as a CUDA graph

    def _replay(self) -> bool:
        """Run this step as a CUDA graph (captured on first use of its widths); False: run it eagerly."""
        key = tuple(self.widths[self.j])
        rows, window, scalars = self.static
        rows.copy_(self.rows[self.j])
        window.copy_(self.window[self.j])
        scalars.copy_(self.scalars[:, self.j])
        return self.graphs.replay(key, lambda: self._capture(list(key)))

    def _capture(self, widths: list[int]) -> torch.cuda.CUDAGraph | None:
        """The whole step (forward and backward of every micro-batch, clipping, AdamW, zeroing the gradients)
        over the static buffers."""
        rows, window, scalars = self.static
        running = self.running.clone()

        def undo() -> None:  # what the warm-up passes changed
            self.grads.zero_()
            self.running.copy_(running)

        def body() -> None:
            with self.compiled.active() if self.compiled is not None else contextlib.nullcontext():
                self._micro_batches(rows, widths, window, None)
            if self.clip:
                clip_per_trial_(self.grads, self.max_norm)
            adamw_per_trial_(self.weights, self.grads, self.exp_avg, self.exp_avg_sq, *scalars, self.decay_on)
            self.grads.zero_()

        # evaluation re-binds the wrappers to fresh scale tensors; the graph keeps reading these
        keep = [(w.lora_A, w.lora_B, w.scale, w.keep) for w in self.wrappers.values()]
        graph = self.graphs.capture(tuple(widths), lambda: self._forward_backward(rows, widths, window), undo, body,
                                    keep)
        self.graphed = graph is not None
        return graph

    # ------------------------------------------------------------------ bookkeeping

    def take_running(self, slots: list[_Slot]) -> list[float]:
        """The slots' summed losses since their last log (one host sync for all), then zeroed."""
        values = self.running.tolist()
        for s in slots:
            self.running[s.row].zero_()
        return [values[s.row] for s in slots]

    def slot_grads(self, slot: _Slot) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.slot_weights(slot, self.grads)

    def slot_weights(self, slot: _Slot, flat: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        """The slot's own (unpadded) A [r, in] and B [out, r] per adapted module (views into ``flat``,
        by default the weights)."""
        r = slot.spec.lora.r
        blocks = self.layout.blocks(self.weights if flat is None else flat)
        return {name: (a[slot.row, :r], b[slot.row, :, :r]) for name, (a, b) in blocks.items() if name in slot.modules}
