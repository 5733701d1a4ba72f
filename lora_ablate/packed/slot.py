"""One trial inside the pack: its spec and result, and its data order, token counts and learning rates
precomputed from the spec exactly as the single path (``reference.train_one``) derives them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lora_ablate.data import Encoded
from lora_ablate.targets import TargetPlan
from lora_ablate.trial import TrialResult, TrialSpec, batch_order, label_tokens, lr_lambda, window_tokens


@dataclass(eq=False)
class Slot:
    """One trial inside the pack: its spec, result and everything precomputed for it."""

    spec: TrialSpec
    result: TrialResult
    plan: TargetPlan
    batches: list[list[int]]  # steps * grad_accum micro-batches of example indices
    widths: list[int]  # longest example of each micro-batch
    tokens: list[int]  # real tokens of each optimizer step
    window: list[int]  # label tokens of each optimizer step (>= 1): the divisor of its micro-batches' NLL sums
    lrs: list[float]  # learning rate used by optimizer step s (index s-1), as LambdaLR gives it
    row: int | None = None  # the trial's index in the pack (row of the flat tensors); None until placed
    done: int = 0  # optimizer steps taken
    t0: float = 0.0
    eval_seconds: float = 0.0  # held-out evaluations (its own and other trials') since t0: not training time

    @property
    def train(self):
        return self.spec.train

    @functools.cached_property
    def modules(self) -> frozenset[str]:
        return frozenset(self.plan.module_names)

    def rank(self, name: str) -> int:
        """The trial's rank on module ``name``: r, or r per adapted role on a part-adapted fused matrix."""
        rows = self.plan.fused_rows.get(name)
        return self.spec.lora.r * (len(rows) if rows else 1)

    @property
    def finished(self) -> bool:
        return self.done >= self.train.steps

    def lr_after(self, step: int) -> float:
        """What the single path logs at ``step``: LambdaLR's lr after ``step`` scheduler steps."""
        return self.train.lr * lr_lambda(self.train)(step)


def make_slot(spec: TrialSpec, result: TrialResult, plan: TargetPlan, data: Encoded) -> Slot:
    tc = spec.train
    order = batch_order(len(data), tc.batch_size, tc.seed)  # raises TrialFailed when data < batch
    batches = [next(order) for _ in range(tc.steps * tc.grad_accum)]
    lengths = [len(ids) for ids in data.input_ids]
    widths = [max(lengths[i] for i in b) for b in batches]
    per_micro = [sum(lengths[i] for i in b) for b in batches]
    tokens = [sum(per_micro[s * tc.grad_accum:(s + 1) * tc.grad_accum]) for s in range(tc.steps)]
    counts = label_tokens(data)
    window = [window_tokens(counts, batches[s * tc.grad_accum:(s + 1) * tc.grad_accum]) for s in range(tc.steps)]
    f = lr_lambda(tc)
    lrs = [tc.lr * f(s) for s in range(tc.steps)]  # step s+1 runs with LambdaLR's lr after s steps
    return Slot(spec, result, plan, batches, widths, tokens, window, lrs)
