"""The engine: ``train_trials(base, specs, data, evaluator) -> list[TrialResult]``.

It takes a *list* of trial specs so that packing several trials into one pass over the frozen base is
another path of this function, not a redesign. The single path below is the reference: plain peft, one
adapter at a time, injected into the shared base and unloaded again afterwards, so the base is the same
before and after every trial.

Gradient accumulation is token-weighted: an optimizer step's loss is the summed token NLL of all its
``grad_accum`` micro-batches divided by their total label tokens, so its gradient is exactly that of one
batch of ``batch_size * grad_accum``; the logged training loss is that same token mean per step (averaged
over the steps since the last log).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_ablate.config import LoraConfig, TrainConfig
from lora_ablate.data import Encoded
from lora_ablate.errors import one_line
from lora_ablate.evaluation import EvalReport, Evaluator, token_nll
from lora_ablate.models import LoadedModel
from lora_ablate.targets import resolve_targets


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


def peft_config(lora: LoraConfig, target_modules):
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout,
                           target_modules=target_modules, use_rslora=lora.alpha_rule == "rslora",
                           init_lora_weights=True if lora.init == "default" else "gaussian",
                           bias="none", task_type="CAUSAL_LM")


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


def train_trials(base: LoadedModel, specs: list[TrialSpec], data: Encoded, evaluator: Evaluator | None,
                 hooks: TrialHooks | None = None, progress: bool = True, packed: bool = False) -> list[TrialResult]:
    hooks = hooks or TrialHooks()
    if packed:  # all specs in one pass over the base (lora_ablate.packed); K = 1 is the fast single trial
        from lora_ablate.packed import train_packed

        return train_packed(base, specs, data, evaluator, hooks, progress)
    return [train_one(base, spec, data, evaluator, hooks, progress) for spec in specs]


def train_one(base: LoadedModel, spec: TrialSpec, data: Encoded, evaluator: Evaluator | None,
              hooks: TrialHooks, progress: bool = True) -> TrialResult:
    import peft

    plan = resolve_targets(base.model, spec.lora.targets)
    result = TrialResult(spec, targets=plan.describe(), scaling=spec.lora.scaling)
    torch.manual_seed(spec.train.seed)  # LoRA A init and dropout
    if spec.train.gradient_checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(base.model, peft_config(spec.lora, plan.target_modules))
    try:
        result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _train(model, base, spec, data, evaluator, hooks, result, progress)
        if evaluator is not None:
            result.final = evaluator.run(model, base.device)
        if spec.adapter_dir is not None:
            model.save_pretrained(str(spec.adapter_dir))
            result.adapter_dir = spec.adapter_dir
    except TrialPruned as e:
        result.status, result.error = "pruned", str(e) or "pruned"
    except (TrialFailed, torch.OutOfMemoryError) as e:
        result.status, result.error = "failed", one_line(e)
    finally:
        # restore the shared base exactly: the LoRA layers are removed, nothing merged
        base.model = model.unload()
        if spec.train.gradient_checkpointing:
            base.model.gradient_checkpointing_disable()
        base.model.eval()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _train(model, base, spec: TrialSpec, data: Encoded, evaluator, hooks: TrialHooks, result: TrialResult,
           progress: bool):
    from tqdm.auto import tqdm

    tc = spec.train
    device = base.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    order = batch_order(len(data), tc.batch_size, tc.seed)
    pad = base.tokenizer.pad_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    running = torch.zeros((), device=device)  # summed on the device; read only at log steps (no per-step sync)
    tokens, t0, eval_seconds = 0, time.perf_counter(), 0.0  # held-out evals are not training time
    bar = tqdm(total=tc.steps, desc=spec.name, disable=not progress, leave=False, mininterval=1.0)
    counts = label_tokens(data)
    for step in range(1, tc.steps + 1):
        # the window's batches first: its label tokens divide every micro-batch's summed NLL, so the step's
        # gradient is that of one batch of batch_size * grad_accum (a token mean over the whole window)
        window = [next(order) for _ in range(tc.grad_accum)]
        n_window = window_tokens(counts, window)
        for idx in window:
            tokens += sum(len(data.input_ids[i]) for i in idx)
            b = data.batch(idx, pad, device)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll, _ = token_nll(logits, b["labels"])
            loss = nll.sum() / n_window
            loss.backward()
            running += loss.detach()
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            n = step % tc.log_every or tc.log_every
            mean_loss = running.item() / n
            running.zero_()
            if not math.isfinite(mean_loss):
                raise TrialFailed(f"training loss became {mean_loss} by step {step}")
            values = {"loss": mean_loss, "lr": sched.get_last_lr()[0]}
            result.history.append({"step": step, **values})
            elapsed = time.perf_counter() - t0 - eval_seconds
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            hooks.on_train_log(spec, step, values)
        if evaluator is not None and evaluator.cfg.every and step % evaluator.cfg.every == 0 and step < tc.steps:
            t_eval = time.perf_counter()
            values = {f"{name}/nll": v[0] for name, v in evaluator.nll(model, device).items()}
            eval_seconds += time.perf_counter() - t_eval
            result.evals.append({"step": step, **values})
            hooks.on_eval(spec, step, values)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    result.tokens, result.train_seconds = tokens, time.perf_counter() - t0 - eval_seconds
