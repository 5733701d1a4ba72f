"""The pack: the frozen base with K trials' adapters installed and their flat fp32 state; trials join
(``new_result``, ``new_slot``, ``relayout``), are bound to the adapted modules, step (``step``, planned and
run by packed/step.py) and leave again (``relayout``, ``close``)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from lora_ablate.data import Encoded
from lora_ablate.models import LoadedModel
from lora_ablate.packed.compiled import _compile_blocks
from lora_ablate.packed.device_data import _DeviceData
from lora_ablate.packed.graphs import StepGraphs
from lora_ablate.packed.init import initial_factors
from lora_ablate.packed.layers import PackedLoraLinear, _features, _parent
from lora_ablate.packed.layout import _carry, _Layout
from lora_ablate.packed.slot import Slot, make_slot
from lora_ablate.packed.step import Steps
from lora_ablate.packed.varlen import _FlatData
from lora_ablate.reference import check_init, fused_row_mask
from lora_ablate.targets import TargetPlan, _linear_modules, plain_head, resolve_targets
from lora_ablate.trial import BASE_MUTATING_INITS, TrialFailed, TrialResult, TrialSpec

# Each module's A and B are views with gaps between trials' rows, which autograd's layout contract calls
# "not dense"; it still accumulates into them in place, which is what the flat gradient relies on.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class Pack:
    """The frozen base with K trials' adapters installed, their flat state, and their steps.

    Driven by ``train_packed``; step by step (as tests do): ``slots = [pack.new_slot(pack.new_result(spec))
    ...]``, ``pack.relayout(slots)``, then ``pack.step()`` as often as the shortest trial has steps left;
    ``pack.close()`` restores the base.
    """

    def __init__(self, base: LoadedModel, data: Encoded, lora_dtype: torch.dtype | None, compile: bool,
                 fused_head: bool = False, graphs: bool = False, packing: bool = False, attention: str = "sdpa"):
        self.base, self.model, self.device = base, base.model, base.device
        # the decoder and head weight when the loss may skip the full logits (see packed/loss.py)
        self.head = plain_head(self.model) if fused_head else None
        self.graphs = StepGraphs(base.device) if graphs and base.device.type == "cuda" else None
        self.lora_dtype = lora_dtype
        self.data = _DeviceData(data, base.tokenizer.pad_token_id, base.device)
        # sequence packing (packed/varlen.py): each trial's micro-batch as one row; each study.attention needs SDPA
        packing = packing and getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        self.flat = _FlatData(data, base.tokenizer.pad_token_id, base.device) if packing else None
        self.attention = attention  # resolved study.attention of the packed rows (packed/attention.py)
        self.real_tokens = self.computed_tokens = 0  # since the pack began: the padding fraction, cheaply
        self.slots: list[Slot] = []
        self.layout: _Layout | None = None
        self.weights = self.grads = self.exp_avg = self.exp_avg_sq = None  # [K, numel] fp32
        self.initial: torch.Tensor | None = None  # [K, numel] frozen A0, B0 (PiSSA/OLoRA trials), else None
        self.row_masks: list[tuple[torch.Tensor, torch.Tensor]] = []  # see _row_masks
        self.wrappers: dict[str, PackedLoraLinear] = {}
        self.leaves: list[torch.Tensor] = []
        self.encoded = data
        self.dims = {name: _features(layer) for name, layer in _linear_modules(self.model)}  # model order
        self.plans: dict[tuple, TargetPlan] = {}
        self.compiled = _compile_blocks(self.model) if compile else None
        self.max_k = 0
        self.steps: Steps | None = None

    # ------------------------------------------------------------------ membership

    def relayout(self, slots: list[Slot]) -> None:
        """Make ``slots`` the pack: survivors keep their exact state, new slots start from their init."""
        carried = [s for s in slots if s.row is not None]
        fresh = [s for s in slots if s.row is None]
        slots = carried + fresh
        names = {n for s in slots for n in s.modules}  # the union of the trials' targets
        layout = _Layout(tuple((n, *self.dims[n], max(s.rank(n) for s in slots if n in s.modules))
                               for n in self.dims if n in names))
        K, numel = len(slots), layout.numel
        new = [torch.zeros(K, numel, device=self.device) for _ in range(4)]  # weights, grads, exp_avg, exp_avg_sq
        # the frozen A0, B0 of PiSSA/OLoRA trials (zero rows for the others); only when a trial has them
        initial = torch.zeros(K, numel, device=self.device) \
            if any(s.spec.lora.init in BASE_MUTATING_INITS for s in slots) else None
        running = torch.zeros(K, device=self.device)  # summed losses since each trial's last log
        if carried:
            old_rows = torch.tensor([s.row for s in carried], device=self.device)
            running[:len(carried)] = self.running.index_select(0, old_rows)
            old = (self.weights, None, self.exp_avg, self.exp_avg_sq, self.initial)
            for dst, src in zip((*new, initial), old):
                if src is not None and dst is not None:
                    _carry(src, self.layout, old_rows, dst, layout)
        for k, slot in enumerate(fresh, start=len(carried)):
            weights, factors = self._initial_rows(slot, layout)
            new[0][k].copy_(weights)
            if factors is not None:
                initial[k].copy_(factors)
        for k, slot in enumerate(slots):
            slot.row = k
        self.slots, self.layout = slots, layout
        if self.graphs is not None:
            self.graphs.clear()  # they point at the old flat tensors
        self.weights, self.grads, self.exp_avg, self.exp_avg_sq = new
        self.initial = initial
        self.row_masks = self._row_masks()
        self.running = running
        self.max_k = max(self.max_k, K)
        self._install(layout.names)
        self._bind()
        self.steps = Steps(self)

    def new_result(self, spec: TrialSpec) -> TrialResult:
        """The result a trial of ``spec`` starts from; a bad target or an init it cannot honour raises UserError,
        as on the single path."""
        plan = self.plan(spec.lora.targets, spec.lora.fused_subset)
        check_init(spec, plan, self.base.quantization)
        return TrialResult(spec, targets=plan.describe(), scaling=spec.lora.scaling)

    def new_slot(self, result: TrialResult) -> Slot:
        """The trial of ``result`` as a slot, placed by the next ``relayout``; TrialFailed when it cannot
        start (fewer training records than its batch size)."""
        spec = result.spec
        plan = self.plan(spec.lora.targets, spec.lora.fused_subset)
        if error := plan.rank_error(spec.lora.r):
            raise TrialFailed(error)
        slot = make_slot(spec, result, plan, self.encoded)
        result.trainable_params = sum(self._trained_entries(slot, name) for name in slot.modules)
        return slot

    def _trained_entries(self, slot: Slot, name: str) -> int:
        """A's and B's entries the slot trains on module ``name``; B's entries held at zero on a part-adapted
        fused matrix are not counted, as on the single path."""
        rank, (in_f, out_f) = slot.rank(name), self.dims[name]
        return rank * in_f + (int(self._row_mask(slot, name).sum()) if name in slot.plan.fused_rows else rank * out_f)

    def _row_mask(self, slot: Slot, name: str) -> torch.Tensor:
        return fused_row_mask(slot.plan.fused_rows[name], self.dims[name][1], slot.spec.lora.r)

    def _row_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(gradient of B [K, out, r], its mask) for each module some trial adapts in part (fused rows): the
        optimiser multiplies the gradient by the mask first, so B's rows of the roles left out, which start
        at zero, get zero moments and updates and stay exactly zero, as the single path's gradient hook keeps
        them."""
        out, grads = [], self.layout.blocks(self.grads)
        for name in self.layout.names:
            fused = [s for s in self.slots if name in s.plan.fused_rows]
            if fused:
                g = grads[name][1]
                mask = torch.ones(g.shape)  # trials that adapt all of the matrix (or none of it): unmasked
                for s in fused:
                    mask[s.row, :, :s.rank(name)] = self._row_mask(s, name)
                out.append((g, mask.to(self.device)))
        return out

    def _initial_rows(self, slot: Slot, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slot's starting weights row, and its frozen A0, B0 row when its init subtracts them from the base
        (PiSSA, OLoRA; else None: LoftQ's non-zero B0 is just where B starts)."""
        row = torch.zeros(1, layout.numel)
        blocks = layout.blocks(row)
        names = [n for n in layout.names if n in slot.modules]
        for name, (a, b) in initial_factors(self.base, slot.spec, names, {n: slot.rank(n) for n in names}).items():
            r = slot.rank(name)
            blocks[name][0][0, :r] = a
            if b is not None:  # else B stays zero, as peft initialises it
                blocks[name][1][0, :, :r] = b
        row = row[0].to(self.device)
        # trained from A0, B0 and corrected by them, frozen: W0 + s (B A - B0 A0), peft's W_res + s B A
        return row, (row.clone() if slot.spec.lora.init in BASE_MUTATING_INITS else None)

    def plan(self, targets: tuple, fused_subset: str = "refuse") -> TargetPlan:
        """resolve_targets on the bare base (the wrappers would hide the projections from it)."""
        key = (targets, fused_subset)
        if key not in self.plans:
            wrapped = list(self.wrappers.items())
            for name, _ in wrapped:
                parent, attr = _parent(self.model, name)
                setattr(parent, attr, self.wrappers[name].base_layer)
            try:
                self.plans[key] = resolve_targets(self.model, targets, fused_subset)
            finally:
                for name, wrapper in wrapped:
                    parent, attr = _parent(self.model, name)
                    setattr(parent, attr, wrapper)
        return self.plans[key]

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
        i_blocks = self.layout.blocks(self.initial) if self.initial is not None else {}
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
            a0, b0 = i_blocks.get(name, (None, None))
            if a0 is not None and rows is not None:
                a0, b0 = a0.index_select(0, rows), b0.index_select(0, rows)
            wrapper.init_A, wrapper.init_B = a0, b0
            wrapper.single_scale, wrapper.keep, wrapper.single_p = scales[0], keep, ps[0]
            wrapper.compute_dtype = self.lora_dtype

    @contextlib.contextmanager
    def selected(self, slots: list[Slot]):
        """Evaluate only ``slots``: the wrappers see just their rows, in this order."""
        if [s.row for s in slots] == list(range(len(self.slots))):
            yield
            return
        self._bind(torch.tensor([s.row for s in slots], device=self.device))
        try:
            yield
        finally:
            self._bind()

    # ------------------------------------------------------------------ steps

    def step(self) -> None:
        """One optimizer step of every slot; losses accumulate on the device (no host sync)."""
        self.steps.step()

    def optimizer_step(self) -> None:
        """The second half of ``step`` alone: clipping and AdamW of every slot on whatever is in ``grads``
        (then zeroed), the step counted. Tests feed their own gradients through it."""
        self.steps.optimizer_step()

    # ------------------------------------------------------------------ bookkeeping

    def take_running(self, slots: list[Slot]) -> list[float]:
        """The slots' summed losses since their last log (one host sync for all), then zeroed."""
        values = self.running.tolist()
        for s in slots:
            self.running[s.row].zero_()
        return [values[s.row] for s in slots]

    def slot_grads(self, slot: Slot) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.slot_weights(slot, self.grads)

    def slot_weights(self, slot: Slot, flat: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        """The slot's own (unpadded) A [r, in] and B [out, r] per adapted module (views into ``flat``,
        by default the weights)."""
        blocks = self.layout.blocks(self.weights if flat is None else flat)
        return {name: (a[slot.row, :slot.rank(name)], b[slot.row, :, :slot.rank(name)])
                for name, (a, b) in blocks.items() if name in slot.modules}
