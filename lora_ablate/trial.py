"""The trial vocabulary both training paths share: what a trial is (``TrialSpec``), what it gives back
(``TrialResult``), how it reports while it trains (``TrialHooks``) and ends early (``TrialPruned``,
``TrialFailed``), the ``Trainer`` interface, and what both paths must derive from a spec identically: the
learning-rate schedule, the data order, the loss divisors and the peft adapter config.

It sits below both engines (``reference`` and ``packed``) and knows neither.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from lora_ablate.config import LoraConfig, TrainConfig
from lora_ablate.data import Encoded
from lora_ablate.evaluation import EvalReport


class TrialPruned(Exception):
    """Raised by a hook to stop a trial early (study pruning)."""


class TrialFailed(Exception):
    """A trial that cannot go on (non-finite loss, ...); the study records the reason and goes on."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything that distinguishes one trial."""

    lora: LoraConfig
    train: TrainConfig
    name: str = "trial"
    adapter_dir: Path | None = None  # where to save the trained adapter (None = do not save)


@dataclass
class TrialResult:
    spec: TrialSpec
    status: str = "ok"  # ok | failed | pruned
    error: str = ""
    targets: str = ""
    trainable_params: int = 0
    scaling: float = 1.0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"}
    evals: list[dict] = field(default_factory=list)  # intermediate held-out NLL: {"step", "<set>/nll", ...}
    final: EvalReport | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    peak_mem_mb: float = 0.0
    adapter_dir: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    def summary(self) -> dict:
        return {"status": self.status, "error": self.error, "targets": self.targets,
                "trainable_params": self.trainable_params, "scaling": self.scaling, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "tokens_per_s": self.tokens_per_s,
                "peak_mem_mb": self.peak_mem_mb, "final_train_loss": self.history[-1]["loss"] if self.history else None}


class TrialHooks:
    """Callbacks from inside a trial; the study uses them for tracking and pruning. No-ops by default."""

    def on_train_log(self, spec: TrialSpec, step: int, values: dict) -> None:
        pass

    def on_eval(self, spec: TrialSpec, step: int, values: dict) -> None:
        """May raise TrialPruned."""


class Trainer(ABC):
    """Trains trials on a shared base; one per training path (``reference``, ``packed``)."""

    @abstractmethod
    def train(self, specs: Sequence[TrialSpec], on_result: Callable[[TrialResult], None] | None = None,
              refill: Callable[[], TrialSpec | None] | None = None) -> list[TrialResult]:
        """Train ``specs``, then whatever ``refill()`` hands over until it returns None; one TrialResult per
        trial, in the order trials started. ``on_result(result)`` is called as soon as each trial is done
        (finished, failed or pruned), while others may still train."""


# inits that start from A0, B0 != 0 and so subtract scale * B0 A0 from the base weight they adapt (peft's
# PiSSA, OLoRA): a trial must put the shared base back, and its saved adapter is converted to plain LoRA
BASE_MUTATING_INITS = ("pissa", "olora")
# inits whose B0 is not zero: the base-mutating ones, and LoftQ (A0, B0 from the 4-bit base's quantization
# error; the base is left as it is, the adapter is plain LoRA on it: lora_ablate/loftq.py)
DENSE_B_INITS = (*BASE_MUTATING_INITS, "loftq")


def peft_config(lora: LoraConfig, target_modules, fused: tuple[str, int] | None = None):
    """``fused``: (suffix, roles) of a fused q/k/v matrix adapted in part: its adapter gets rank r per adapted
    role and the alpha that keeps the trial's scale (stock peft reads both back from rank/alpha_pattern)."""
    import re

    import peft

    # gaussian, pissa, olora are peft's own names; loftq's layers are made with the default init and then given
    # their A0, B0 (peft's "loftq" would quantize an unquantized base itself), so its saved adapter says True,
    # which is what a stock reload on the 4-bit base needs
    init = {"default": True, "loftq": True}.get(lora.init, lora.init)
    patterns = {}
    if fused is not None:
        rank = lora.r * fused[1]
        alpha = lora.scaling * (math.sqrt(rank) if lora.alpha_rule == "rslora" else rank)
        key = re.escape(fused[0])
        patterns = {"rank_pattern": {key: rank}, "alpha_pattern": {key: alpha}}
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout,
                           target_modules=target_modules, use_rslora=lora.alpha_rule == "rslora",
                           init_lora_weights=init, bias="none", task_type="CAUSAL_LM", **patterns)


def lr_lambda(train: TrainConfig):
    warm = int(train.warmup * train.steps)

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        if train.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, train.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1 - progress

    return f


def batch_order(n: int, batch: int, seed: int):
    """Endless stream of index batches: a fresh seeded permutation per epoch (ragged tail dropped)."""
    gen = torch.Generator().manual_seed(seed)
    if n < batch:
        raise TrialFailed(f"{n} training records are fewer than train.batch_size={batch}")
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def label_tokens(data: Encoded) -> list[int]:
    """Tokens each example contributes to the loss: labels after the next-token shift that are not
    IGNORE (what ``token_nll``'s mask counts for that row). Counted once per data set (every trial of a
    study asks again)."""
    return data.label_counts


def window_tokens(counts: list[int], batches: list[list[int]]) -> int:
    """Label tokens of an accumulation window (all micro-batches of one optimizer step), at least 1:
    every micro-batch's summed NLL is divided by it."""
    return max(1, sum(counts[i] for idx in batches for i in idx))
