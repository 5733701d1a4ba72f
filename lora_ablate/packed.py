"""Packed trials: K LoRA trials trained together in one pass over the shared frozen base.

The K trials' batches are stacked along the batch dimension (trial-major: rows ``k*b .. (k+1)*b`` belong to
trial k). The frozen base runs once per micro-batch over the whole stack; every adapted projection is
replaced for the pack's lifetime by a :class:`PackedLoraLinear` that adds each trial's own low-rank update
to that trial's rows with two batched matrix products over stacked A [K, r, in] and B [K, out, r].

What a trial keeps to itself, exactly as on the single path (``engine.train_one``):
  rank (zero-padded to the pack's largest, padding provably stays zero: its gradients are exactly 0),
  alpha rule and scale, targets (a projection the trial does not adapt has scale 0 and zero weights),
  learning rate and schedule, weight decay, seed (LoRA A init reproduces peft's RNG calls), init, data
  order (``batch_order`` with its seed), batch size (short trials get all-masked filler rows), gradient
  accumulation, token-mean loss per micro-batch, gradient clipping and AdamW state, dropout rate.

All trainable state of the pack lives in four flat fp32 tensors of shape [numel, K] (weights, gradients,
AdamW's two moments; trial-minor, so each module's block is a dense, permuted view and its gradient can
alias the flat gradient under autograd's layout contract); each module's A and B are leaf views into
them. So the optimiser, the per-trial gradient norm and the clipping are a dozen whole-pack tensor
operations whatever K and the number of modules, and no per-step value ever leaves the device
(schedules and data order are precomputed on it).

A trial that diverges, is pruned or finishes leaves the pack: its column is dropped and the surviving
columns are copied, bit for bit, into a re-laid-out pack (a new trial may take the slot, see ``refill``).

K = 1 is the fast single trial: the same code with peft's own operations for the adapter product and
``clip_grad_norm_``, so on CPU in fp32 its losses and weights equal ``train_one``'s bit for bit on
unpadded batches. (On right-padded batches the pack attends causally without a padding mask, which is
exact in arithmetic but not the same SDPA kernel: differences in the last bits.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lora_ablate.data import IGNORE, Encoded
from lora_ablate.engine import (TrialFailed, TrialHooks, TrialPruned, TrialResult, TrialSpec, batch_order,
                                lr_lambda, peft_config)
from lora_ablate.evaluation import GEN_METRICS, EvalReport, Evaluator, token_nll
from lora_ablate.models import LoadedModel
from lora_ablate.targets import TargetPlan, _linear_modules, resolve_targets

log = logging.getLogger(__name__)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults, which the single path uses
CLIP_EPS = 1e-6  # clip_grad_norm_'s max_norm / (norm + 1e-6)
MAX_PACK = 32  # measured on an H200: aggregate tokens/s flattens between 16 and 32 (docs/benchmarks.md)
CPU_PACK = 4  # auto on a CPU: time, not memory, is the limit there, and gains flatten after a few trials
GENERATE_ROWS = 4  # generation holds a KV cache, not full logits: this many times a step's rows at once
_CAUSAL_IMPL = "lora_ablate_causal_sdpa"

# ----------------------------------------------------------------------------------------- the wrapper


class PackedLoraLinear(torch.nn.Module):
    """``base(x) + scale_k * (dropout(x_k) @ A_k^T) @ B_k^T`` for each trial k's rows of the stacked batch.

    Installed in place of an adapted projection for the pack's lifetime. A, B and the per-trial vectors are
    plain attributes bound by the pack (not registered parameters: the base's parameter list and state
    dict stay the base's own).
    """

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A: torch.Tensor | None = None  # [K, r, in] fp32 leaf
        self.lora_B: torch.Tensor | None = None  # [K, out, r] fp32 leaf
        self.scale: torch.Tensor | None = None  # [K, 1, 1]; 0 for a trial that does not adapt this module
        self.single_scale = 1.0  # the same, as a Python float, for K == 1
        self.keep: torch.Tensor | None = None  # [K, 1, 1] dropout keep-probabilities; None: no dropout at all
        self.single_p = 0.0
        self.compute_dtype: torch.dtype | None = None  # None: the activations' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dtype = self.compute_dtype or x.dtype
        xa = x.to(dtype)
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)  # no-ops in fp32; fp32 masters, low-precision math
        if A.shape[0] == 1:
            # peft's exact operations (lora_B(lora_A(dropout(x))) * scaling), so one trial matches train_one
            if self.training and self.single_p > 0:
                xa = F.dropout(xa, self.single_p, training=True)
            d = F.linear(F.linear(xa, A[0]), B[0]) * self.single_scale
        else:
            xs = xa.reshape(A.shape[0], -1, xa.shape[-1])  # [K, rows*tokens, in]: trial-major stacking
            if self.training and self.keep is not None:
                xs = xs * (torch.rand_like(xs) < self.keep) / self.keep
            d = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * self.scale
            d = d.view(*y.shape)
        # peft adds in the promoted dtype and casts back; identical to y + d when both are y's dtype
        return (y + d).to(y.dtype)


# ----------------------------------------------------------------------------------------- layout


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


# ----------------------------------------------------------------------------------------- one trial


@dataclass(eq=False)
class _Slot:
    """One trial inside the pack: its spec, result and everything precomputed for it."""

    spec: TrialSpec
    result: TrialResult
    plan: TargetPlan
    batches: list[list[int]]  # steps * grad_accum micro-batches of example indices
    widths: list[int]  # longest example of each micro-batch
    tokens: list[int]  # real tokens of each optimizer step
    lrs: list[float]  # learning rate used by optimizer step s (index s-1), as LambdaLR gives it
    row: int | None = None  # the trial's index in the pack (column of the flat tensors); None until placed
    done: int = 0  # optimizer steps taken
    t0: float = 0.0

    @property
    def train(self):
        return self.spec.train

    @functools.cached_property
    def modules(self) -> frozenset[str]:
        return frozenset(self.plan.module_names)

    @property
    def finished(self) -> bool:
        return self.done >= self.train.steps

    def lr_after(self, step: int) -> float:
        """What the single path logs at ``step``: LambdaLR's lr after ``step`` scheduler steps."""
        return self.train.lr * lr_lambda(self.train)(step)


def _make_slot(spec: TrialSpec, result: TrialResult, plan: TargetPlan, data: Encoded) -> _Slot:
    tc = spec.train
    order = batch_order(len(data), tc.batch_size, tc.seed)  # raises TrialFailed when data < batch
    batches = [next(order) for _ in range(tc.steps * tc.grad_accum)]
    lengths = [len(ids) for ids in data.input_ids]
    widths = [max(lengths[i] for i in b) for b in batches]
    per_micro = [sum(lengths[i] for i in b) for b in batches]
    tokens = [sum(per_micro[s * tc.grad_accum:(s + 1) * tc.grad_accum]) for s in range(tc.steps)]
    f = lr_lambda(tc)
    lrs = [tc.lr * f(s) for s in range(tc.steps)]  # step s+1 runs with LambdaLR's lr after s steps
    return _Slot(spec, result, plan, batches, widths, tokens, lrs)


def initial_A(base: LoadedModel, spec: TrialSpec, module_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The LoRA A matrices peft's ``get_peft_model`` creates for ``spec`` after ``torch.manual_seed(seed)``.

    peft builds, per adapted module in model order, ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each
    constructor draws a Kaiming-uniform init from the CPU generator), then re-draws A (Kaiming-uniform
    a=sqrt(5), or normal std 1/r) and zeroes B; the weights are then cast to the base layer's dtype and
    upcast back to fp32 (peft's autocast_adapter_dtype). Same calls, same shapes, same order here.
    """
    r = spec.lora.r
    torch.manual_seed(spec.train.seed)  # as train_one does right before get_peft_model
    out = {}
    for name in module_names:
        layer = base.model.get_submodule(name)
        in_f, out_f = _features(layer)
        a = torch.empty(r, in_f)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r) constructor
        torch.nn.init.kaiming_uniform_(torch.empty(out_f, r), a=math.sqrt(5))  # nn.Linear(r, out) constructor
        if spec.lora.init == "default":
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            torch.nn.init.normal_(a, std=1 / r)
        weight_dtype = getattr(getattr(layer, "weight", None), "dtype", torch.float32)
        if weight_dtype in (torch.float16, torch.bfloat16):
            a = a.to(weight_dtype).float()
        out[name] = a
    return out


def _features(layer: torch.nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    in_f, out_f = layer.weight.shape  # transformers Conv1D (gpt2) stores W as [in, out]
    return int(in_f), int(out_f)


# ----------------------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------------------- the pack


class _Pack:
    """The frozen base with K trials' adapters installed, their flat state, and one training step."""

    def __init__(self, base: LoadedModel, data: Encoded, lora_dtype: torch.dtype | None, compile: bool):
        self.base, self.model, self.device = base, base.model, base.device
        self.lora_dtype = lora_dtype
        self.data = _DeviceData(data, base.tokenizer.pad_token_id, base.device)
        self.slots: list[_Slot] = []
        self.layout: _Layout | None = None
        self.weights = self.grads = self.exp_avg = self.exp_avg_sq = None  # [numel, K] fp32
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
        new = [torch.zeros(numel, K, device=self.device) for _ in range(4)]  # weights, grads, exp_avg, exp_avg_sq
        running = torch.zeros(K, device=self.device)  # summed losses since each trial's last log
        if carried:
            old_rows = torch.tensor([s.row for s in carried], device=self.device)
            running[:len(carried)] = self.running.index_select(0, old_rows)
            old = (self.weights, None, self.exp_avg, self.exp_avg_sq)
            for dst, src in zip(new, old):
                if src is not None:
                    self._carry(src, self.layout, old_rows, dst, layout)
        for k, slot in enumerate(fresh, start=len(carried)):
            new[0][:, k].copy_(self._initial_column(slot, layout))
        for k, slot in enumerate(slots):
            slot.row = k
        self.slots, self.layout = slots, layout
        self.weights, self.grads, self.exp_avg, self.exp_avg_sq = new
        self.running = running
        self.max_k = max(self.max_k, K)
        self._install(layout.names)
        self._bind()
        self._plan()

    @staticmethod
    def _carry(src, src_layout: _Layout, rows, dst, dst_layout: _Layout) -> None:
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

    def _initial_column(self, slot: _Slot, layout: _Layout) -> torch.Tensor:
        column = torch.zeros(layout.numel, 1)
        blocks = layout.blocks(column)
        names = [n for n in layout.names if n in slot.modules]
        for name, a in initial_A(self.base, slot.spec, names).items():
            blocks[name][0][0, :slot.spec.lora.r] = a  # B stays zero, as peft initialises it
        return column[:, 0].to(self.device)

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
        self.rows = torch.tensor(rows, dtype=torch.long).to(dev)
        self.ga_div = torch.tensor([float(s.train.grad_accum) for s in slots], device=dev)
        self.max_norm = torch.tensor([s.train.max_grad_norm for s in slots], device=dev)
        self.clip = any(s.train.max_grad_norm for s in slots)
        self.decay_on = any(s.train.weight_decay for s in slots)
        # AdamW's per-step scalars in float64 on the host, as torch computes them, then one upload
        host = [[_adam_scalars(s, s.done + j + 1) for j in range(self.span)] for s in slots]
        self.host_scalars = host
        table = torch.tensor(host, dtype=torch.float64).to(torch.float32)  # [K, span, 3]
        self.scalars = table.permute(2, 1, 0).contiguous().to(dev)  # [3, span, K]

    # ------------------------------------------------------------------ one optimizer step

    def step(self) -> None:
        """One optimizer step of every slot; losses accumulate on the device (no host sync)."""
        self._forward_backward()
        self._clip()
        self._adamw()
        self.grads.zero_()
        for s in self.slots:
            s.done += 1
        self.j += 1

    def _forward_backward(self) -> None:
        if self.compiled is None:
            self._micro_batches()
            return
        running = self.running.clone()
        try:
            with self.compiled.active():
                self._micro_batches()
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is the reference anyway
            log.warning("torch.compile failed (%s: %s); training this pack eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compiled.restore()
            self.compiled = None
            self.grads.zero_()
            self.running.copy_(running)
            self._micro_batches()

    def _micro_batches(self) -> None:
        K = len(self.slots)
        # right padding + causal attention: real tokens never see padding, so no padding mask is needed
        with _causal_attention(self.model):
            for m in range(self.ga):
                ids, labels = self.data.batch(self.rows[self.j, m], self.widths[self.j][m])
                logits = self.model(input_ids=ids, use_cache=False).logits
                nll, mask = token_nll(logits, labels)
                if K == 1:  # the single path's reductions, to the bit
                    loss = (nll.sum() / mask.sum().clamp(min=1)).view(1)
                else:
                    loss = nll.view(K, -1).sum(1) / mask.view(K, -1).sum(1).clamp(min=1)
                loss = loss / self.ga_div  # a slot with fewer micro-batches gets filler rows here: loss 0
                loss.sum().backward()
                self.running += loss.detach()  # per micro-batch, in the single path's order

    def _clip(self) -> None:
        if not self.clip:
            return
        if len(self.slots) == 1:
            torch.nn.utils.clip_grad_norm_(self.leaves, self.slots[0].train.max_grad_norm)
            return
        norm = torch.linalg.vector_norm(self.grads, dim=0)
        coef = (self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        coef = torch.where(self.max_norm > 0, coef, torch.ones_like(coef))  # max_grad_norm 0: no clipping
        self.grads.mul_(coef)

    def _adamw(self) -> None:
        """torch.optim.AdamW (single-tensor form, decoupled weight decay) on every row at once."""
        p, g, m, v = self.weights, self.grads, self.exp_avg, self.exp_avg_sq
        if len(self.slots) == 1:  # Python scalars: literally torch's calls
            decay, step_size, bc2_sqrt = self.host_scalars[0][self.j]
            if self.decay_on:
                p.mul_(decay)
            m.lerp_(g, 1 - BETA1)
            v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(EPS), value=-step_size)
            return
        decay, step_size, bc2_sqrt = self.scalars[:, self.j]  # each [K], one value per trial
        if self.decay_on:
            p.mul_(decay)
        m.lerp_(g, 1 - BETA1)
        v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        # addcdiv_ computes p + (value * m) / denom; the same roundings with a per-row value:
        p.add_(m.mul(-step_size).div_((v.sqrt() / bc2_sqrt).add_(EPS)))

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


def _adam_scalars(slot: _Slot, step: int) -> tuple[float, float, float]:
    """(1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2)) for the slot's optimizer step ``step``."""
    lr = slot.lrs[step - 1] if step <= len(slot.lrs) else 0.0
    return 1 - lr * slot.train.weight_decay, lr / (1 - BETA1 ** step), (1 - BETA2 ** step) ** 0.5


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def _causal_attention(model: torch.nn.Module):
    """Route training forwards to SDPA with ``is_causal`` and no mask at all.

    An attention implementation name that transformers' mask registry does not know makes
    ``create_causal_mask`` return None without looking at the inputs (its contract for external attention
    backends), so no mask is built and nothing is read back to the host; SDPA then takes its causal
    (flash) kernel. Only for SDPA models; anything else keeps its own path.
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or not _register_causal():
        yield
        return
    cfg._attn_implementation = _CAUSAL_IMPL
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"


def _register_causal() -> bool:
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    if _CAUSAL_IMPL in ALL_MASK_ATTENTION_FUNCTIONS:  # then masks would be built after all
        return False
    AttentionInterface.register(_CAUSAL_IMPL, sdpa_attention_forward)
    return True


class _CompiledBlocks:
    """torch.compile'd copies of the model's repeated blocks (one graph serves all layers), swapped into
    their ModuleLists only while training steps run; evaluation and generation use the eager blocks."""

    def __init__(self, model: torch.nn.Module, lists: list[torch.nn.ModuleList]):
        self.model, self.lists = model, lists
        self.eager = [list(ml) for ml in lists]
        self.compiled = [[torch.compile(block) for block in ml] for ml in lists]

    @contextlib.contextmanager
    def active(self):
        # The first block's input (frozen embeddings) would not require grad while every later block's
        # does: a second graph to compile for each shape. Asking for the (unused) embedding gradient costs
        # one activation-gradient through one block and saves that compilation.
        embeddings = self.model.get_input_embeddings()
        hook = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_()) \
            if embeddings is not None else None
        self._swap(self.compiled)
        try:
            yield
        finally:
            self._swap(self.eager)
            if hook is not None:
                hook.remove()

    def restore(self) -> None:
        self._swap(self.eager)

    def _swap(self, blocks) -> None:
        for ml, mods in zip(self.lists, blocks):
            for i, mod in enumerate(mods):
                ml[i] = mod


def _compile_blocks(model: torch.nn.Module) -> _CompiledBlocks | None:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1 and any(isinstance(x, torch.nn.Linear) for x in m.modules())]
    return _CompiledBlocks(model, lists) if lists else None


# ----------------------------------------------------------------------------------------- evaluation


def _eval_groups(pack: _Pack, slots: list[_Slot], eval_batch: int, factor: int = 1) -> list[list[_Slot]]:
    """Slots evaluated together: at most ``factor`` times the rows of a training step per forward, so
    scoring (full-vocabulary logits per token, like training) never needs more memory than training;
    generation keeps only the last position's logits and passes ``factor`` > 1."""
    train_rows = len(pack.slots) * max(s.train.batch_size for s in pack.slots)
    g = max(1, factor * train_rows // max(1, eval_batch))
    return [slots[i:i + g] for i in range(0, len(slots), g)]


@torch.no_grad()
def packed_nll(pack: _Pack, evaluator: Evaluator, slots: list[_Slot]) -> list[dict]:
    """``Evaluator.nll`` for each slot, all slots of a group over the same held-out batch at once."""
    out: list[dict] = []
    model, device, pad = pack.model, pack.device, evaluator.tokenizer.pad_token_id
    model.eval()
    try:
        for group in _eval_groups(pack, slots, evaluator.cfg.batch_size):
            g, res = len(group), [dict() for _ in group]
            with pack.selected(group):
                for s in evaluator.sets:
                    enc = evaluator.encoded[s.name]
                    per_ex, counts = [[] for _ in group], [[] for _ in group]
                    for start in range(0, len(enc), evaluator.cfg.batch_size):
                        idx = list(range(start, min(start + evaluator.cfg.batch_size, len(enc))))
                        b = enc.batch(idx, pad, device)
                        logits = model(input_ids=b["input_ids"].repeat(g, 1),
                                       attention_mask=b["attention_mask"].repeat(g, 1)).logits
                        tok, mask = token_nll(logits, b["labels"].repeat(g, 1))
                        ex = (tok.sum(1) / mask.sum(1).clamp(min=1)).view(g, -1).tolist()
                        n = mask.sum(1).view(g, -1).tolist()
                        for k in range(g):
                            per_ex[k] += ex[k]
                            counts[k] += n[k]
                    for k in range(g):
                        total = sum(a * c for a, c in zip(per_ex[k], counts[k])) / max(1, sum(counts[k]))
                        res[k][s.name] = (total, per_ex[k], counts[k])
            out += res
    finally:
        model.train()
    return out


@torch.no_grad()
def packed_generate(pack: _Pack, evaluator: Evaluator, slots: list[_Slot], name: str) -> list[list[str]]:
    """``Evaluator.generate`` (greedy, left-padded, cut at '###') for each slot; each group of slots
    decodes the same prompts together through HF ``generate`` on the stacked batch."""
    tok, cfg = evaluator.tokenizer, evaluator.cfg
    prompts = evaluator.prompts[name]
    out: list[list[str]] = []
    model = pack.model
    model.eval()
    try:
        for group in _eval_groups(pack, slots, cfg.batch_size, factor=GENERATE_ROWS):
            g, preds = len(group), [[] for _ in group]
            with pack.selected(group):
                for start in range(0, len(prompts), cfg.batch_size):
                    chunk = prompts[start:start + cfg.batch_size]
                    width = max(map(len, chunk))
                    ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for i, p in enumerate(chunk):
                        ids[i, width - len(p):] = torch.tensor(p)
                        mask[i, width - len(p):] = 1
                    gen = model.generate(input_ids=ids.repeat(g, 1).to(pack.device),
                                         attention_mask=mask.repeat(g, 1).to(pack.device), do_sample=False,
                                         max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id)
                    rows = gen[:, width:].view(g, len(chunk), -1)
                    for k in range(g):
                        preds[k] += [tok.decode(row, skip_special_tokens=True).split("###")[0].strip()
                                     for row in rows[k]]
            out += preds
    finally:
        model.train()
    return out


def packed_reports(pack: _Pack, evaluator: Evaluator, slots: list[_Slot]) -> list[EvalReport]:
    """``Evaluator.run`` for each slot: per-set NLL/ppl (and generation metrics), per-example rows."""
    from lora_ablate.metrics import score

    nlls = packed_nll(pack, evaluator, slots)
    reports = [EvalReport() for _ in slots]
    for s in evaluator.sets:
        preds = packed_generate(pack, evaluator, slots, s.name) if evaluator.cfg.generate else None
        refs = [ex.output for ex in s.examples]
        for k, report in enumerate(reports):
            mean_nll, per_ex, counts = nlls[k][s.name]
            m = {"nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)), "n": float(len(per_ex))}
            rows = [{"set": s.name, "idx": i, "family": ex.family, "nll": per_ex[i], "tokens": counts[i]}
                    for i, ex in enumerate(s.examples)]
            if preds is not None:
                for metric in GEN_METRICS:
                    mean, scores = score(metric, preds[k], refs)
                    m[metric] = mean
                    for row, sc in zip(rows, scores):
                        row[metric] = sc
                for row, p in zip(rows, preds[k]):
                    row["prediction"] = p
            report.metrics[s.name] = m
            report.examples += rows
    return reports


# ----------------------------------------------------------------------------------------- export


def export_adapter(pack: _Pack, slot: _Slot, dest: Path) -> None:
    """Write the slot's adapter as peft's ``save_pretrained`` would: adapter_config.json and
    adapter_model.safetensors with ``base_model.model.<module>.lora_A.weight`` keys, fp32, unpadded."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    cfg = peft_config(slot.spec.lora, slot.plan.target_modules)
    cfg.base_model_name_or_path = pack.model.__dict__.get("name_or_path") or None
    cfg.inference_mode = True
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(dest))
    state = {}
    for name, (a, b) in pack.slot_weights(slot).items():
        state[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(state, str(dest / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------- training


def train_packed(base: LoadedModel, specs: Sequence[TrialSpec], data: Encoded, evaluator: Evaluator | None = None,
                 hooks: TrialHooks | None = None, progress: bool = True, *,
                 refill: Callable[[], TrialSpec | None] | None = None,
                 on_result: Callable[[TrialResult], None] | None = None,
                 compile: bool = False, lora_dtype: torch.dtype | None = None) -> list[TrialResult]:
    """Train ``specs`` together in one pack; one TrialResult per trial, in the order trials joined.

    ``refill()`` is asked for a new spec whenever a trial leaves the pack (finished, failed, pruned), and
    the new trial takes the free slot (None: the pack shrinks). ``on_result(result)`` is called as soon as
    each trial is done, before the rest of the pack finishes. ``compile`` runs the model's repeated blocks
    through torch.compile while training (falling back to eager if compilation fails). ``lora_dtype`` is
    the dtype of the adapter products: None computes them in the activations' dtype (bf16 on a bf16 base,
    like autocast) on fp32 master weights; ``torch.float32`` casts the activations up as peft does.
    """
    hooks = hooks or TrialHooks()
    if not specs:
        return []
    results: list[TrialResult] = []
    pack = _Pack(base, data, lora_dtype, compile and not any(s.train.gradient_checkpointing for s in specs))
    checkpointing = any(s.train.gradient_checkpointing for s in specs)
    if checkpointing:  # a pack shares one forward: checkpointing is on for all if any trial asks for it
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        joining = [_join(spec, pack, results, on_result) for spec in specs]
        slots = [s for s in joining if s is not None]
        while not slots and refill is not None and (spec := refill()) is not None:
            slots = [s for s in [_join(spec, pack, results, on_result)] if s is not None]
        if slots:
            _run(pack, slots, evaluator, hooks, progress, refill, results, on_result)
    finally:
        pack.close()
        if checkpointing:
            base.model.gradient_checkpointing_disable()
        base.model.eval()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _join(spec: TrialSpec, pack: _Pack, results: list, on_result) -> _Slot | None:
    """A slot for ``spec``, or None if it failed before it could start (e.g. too little data)."""
    plan = pack.plan(spec.lora.targets)  # a bad target raises UserError, as on the single path
    result = TrialResult(spec, targets=plan.describe(), scaling=spec.lora.scaling)
    results.append(result)
    try:
        slot = _make_slot(spec, result, plan, pack.encoded)
    except TrialFailed as e:
        result.status, result.error = "failed", str(e)
        if on_result:
            on_result(result)
        return None
    result.trainable_params = sum(spec.lora.r * sum(pack.dims[n]) for n in slot.modules)
    return slot


def _run(pack: _Pack, slots: list[_Slot], evaluator, hooks: TrialHooks, progress: bool, refill,
         results: list, on_result) -> None:
    from tqdm.auto import tqdm

    device = pack.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pack.model.train()
    t0 = time.perf_counter()
    for s in slots:
        s.t0 = t0
    pack.relayout(slots)
    bar = tqdm(total=max(s.train.steps for s in slots), desc=f"pack of {len(slots)}", disable=not progress,
               leave=False, mininterval=1.0)
    while pack.slots:
        try:
            pack.step()
        except torch.OutOfMemoryError as e:
            for s in pack.slots:
                _leave(s, "failed", " ".join(str(e).split())[:500], on_result, pack)
            pack.slots = []
            break
        bar.update(1)
        leaving = _after_step(pack, evaluator, hooks, on_result)
        if leaving:
            staying = [s for s in pack.slots if s not in leaving]
            while refill is not None and len(staying) < len(pack.slots):
                spec = refill()
                if spec is None:
                    break
                slot = _join(spec, pack, results, on_result)
                if slot is not None:
                    slot.t0 = time.perf_counter()
                    staying.append(slot)
            if staying:
                pack.relayout(staying)
            else:
                pack.slots = []
    bar.close()


def _after_step(pack: _Pack, evaluator, hooks: TrialHooks, on_result) -> list[_Slot]:
    """Logging, intermediate evaluation and the end of trials after a step; returns the slots leaving."""
    leaving: list[_Slot] = []
    due = [s for s in pack.slots if s.done % s.train.log_every == 0 or s.finished]
    for s, summed in zip(due, pack.take_running(due) if due else []):
        mean_loss = summed / (s.done % s.train.log_every or s.train.log_every)
        if not math.isfinite(mean_loss):
            leaving.append(_leave(s, "failed", f"training loss became {mean_loss} by step {s.done}", on_result, pack))
            continue
        values = {"loss": mean_loss, "lr": s.lr_after(s.done)}
        s.result.history.append({"step": s.done, **values})
        _hook(s, leaving, on_result, pack, hooks.on_train_log, s.spec, s.done, values)
    live = [s for s in pack.slots if s not in leaving]
    if evaluator is not None and evaluator.cfg.every:
        due = [s for s in live if s.done % evaluator.cfg.every == 0 and not s.finished]
        if due:
            for s, nll in zip(due, packed_nll(pack, evaluator, due)):
                values = {f"{name}/nll": v[0] for name, v in nll.items()}
                s.result.evals.append({"step": s.done, **values})
                _hook(s, leaving, on_result, pack, hooks.on_eval, s.spec, s.done, values)
    done = [s for s in pack.slots if s.finished and s not in leaving]
    if done:
        _finish(pack, done, evaluator, leaving, on_result)
    return leaving


def _hook(slot: _Slot, leaving: list, on_result, pack: _Pack, fn, *args) -> bool:
    """Call a trial's hook; a TrialPruned/TrialFailed it raises ends that trial only."""
    try:
        fn(*args)
        return True
    except TrialPruned as e:
        leaving.append(_leave(slot, "pruned", str(e) or "pruned", on_result, pack))
    except TrialFailed as e:
        leaving.append(_leave(slot, "failed", " ".join(str(e).split())[:500], on_result, pack))
    return False


def _leave(slot: _Slot, status: str, error: str, on_result, pack: _Pack) -> _Slot:
    slot.result.status, slot.result.error = status, error
    _stamp(slot, pack)
    if on_result:
        on_result(slot.result)
    return slot


def _stamp(slot: _Slot, pack: _Pack) -> None:
    """Tokens, time and the trial's share of the pack's peak memory, as of now."""
    if pack.device.type == "cuda":
        torch.cuda.synchronize(pack.device)
        slot.result.peak_mem_mb = torch.cuda.max_memory_allocated(pack.device) / 2**20 / max(1, pack.max_k)
    slot.result.tokens = sum(slot.tokens[:slot.done])
    slot.result.train_seconds = time.perf_counter() - slot.t0


def _finish(pack: _Pack, done: list[_Slot], evaluator, leaving: list, on_result) -> None:
    """Final evaluation (packed) and export of the trials that completed their steps."""
    for s in done:
        _stamp(s, pack)
    try:
        reports = packed_reports(pack, evaluator, done) if evaluator is not None else [None] * len(done)
    except torch.OutOfMemoryError as e:
        leaving += [_leave(s, "failed", " ".join(str(e).split())[:500], on_result, pack) for s in done]
        return
    for s, report in zip(done, reports):
        s.result.final = report
        if s.spec.adapter_dir is not None:
            export_adapter(pack, s, s.spec.adapter_dir)
            s.result.adapter_dir = s.spec.adapter_dir
        leaving.append(s)
        if on_result:
            on_result(s.result)


# ----------------------------------------------------------------------------------------- pack size


def auto_pack_size(base: LoadedModel, specs_example: TrialSpec | Sequence[TrialSpec], data: Encoded, *,
                   limit: int = MAX_PACK, headroom: float = 0.6) -> int:
    """How many trials like ``specs_example`` fit on the GPU together, measured rather than guessed.

    One training step of a probe pack of 1 and of 3 copies of the most demanding trial (largest rank,
    all targets, largest batch, on the longest training examples) gives the memory per trial and the
    fixed part; the pack is then as large as the free memory (times ``headroom``) allows, at most
    ``limit``. The headroom is generous because the probe cannot see allocator fragmentation: at 0.9
    an H200 ran out of memory with 20 GiB reserved but unallocated. Evaluation is grouped so that it never holds more rows than a training step. On a CPU
    there is no memory to size from and packing gains little beyond a few trials: ``CPU_PACK``.
    """
    specs = [specs_example] if isinstance(specs_example, TrialSpec) else list(specs_example)
    if base.device.type != "cuda":
        return max(1, min(limit, CPU_PACK))
    probe = _probe_spec(specs)
    rows = _longest(data, probe.train.batch_size)
    peaks = {k: _probe_peak(base, probe, rows, k) for k in (1, 3)}
    per_trial = (peaks[3] - peaks[1]) / 2
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(base.device)
    return fit_pack(free * headroom, peaks[1] - per_trial, per_trial, limit)


def fit_pack(budget: float, fixed: float, per_trial: float, limit: int) -> int:
    """The largest K in [1, limit] with fixed + K * per_trial <= budget (bytes)."""
    if per_trial <= 0:
        return limit
    return max(1, min(limit, int((budget - max(0.0, fixed)) // per_trial)))


def _probe_spec(specs: list[TrialSpec]) -> TrialSpec:
    first = specs[0]
    targets = tuple({t for s in specs for t in s.lora.targets})
    lora = dataclasses.replace(first.lora, r=max(s.lora.r for s in specs), targets=targets,
                               dropout=max(s.lora.dropout for s in specs))
    train = dataclasses.replace(first.train, steps=1, log_every=1, grad_accum=1,
                                batch_size=max(s.train.batch_size for s in specs),
                                gradient_checkpointing=all(s.train.gradient_checkpointing for s in specs))
    return TrialSpec(lora, train, name="probe")


def _longest(data: Encoded, n: int) -> Encoded:
    idx = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))[:n]
    return Encoded([data.input_ids[i] for i in idx], [data.labels[i] for i in idx])


def _probe_peak(base: LoadedModel, spec: TrialSpec, data: Encoded, k: int) -> int:
    """Peak bytes one step of a pack of ``k`` copies of ``spec`` adds to what is allocated now."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(base.device)
    torch.cuda.reset_peak_memory_stats(base.device)
    train_packed(base, [spec] * k, data, None, progress=False)
    return torch.cuda.max_memory_allocated(base.device) - before
