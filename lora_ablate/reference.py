"""The reference training path: ``ReferenceTrainer`` trains trials one at a time with plain peft, each
adapter injected into the shared base and unloaded again afterwards, so the base is the same before and
after every trial. The packed engine (``lora_ablate.packed``) is tested against it.

Gradient accumulation is token-weighted: an optimizer step's loss is the summed token NLL of all its
``grad_accum`` micro-batches divided by their total label tokens, so its gradient is exactly that of one
batch of ``batch_size * grad_accum``; the logged training loss is that same token mean per step (averaged
over the steps since the last log).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lora_ablate.config import init_error
from lora_ablate.data import Encoded
from lora_ablate.errors import UserError, one_line
from lora_ablate.evaluation import Evaluator, token_nll
from lora_ablate.loftq import loftq_factors
from lora_ablate.models import LoadedModel
from lora_ablate.targets import resolve_targets
from lora_ablate.trial import (
    BASE_MUTATING_INITS,
    DENSE_B_INITS,
    Trainer,
    TrialFailed,
    TrialHooks,
    TrialPruned,
    TrialResult,
    TrialSpec,
    batch_order,
    label_tokens,
    lr_lambda,
    peft_config,
    window_tokens,
)


class ReferenceTrainer(Trainer):
    """The reference path: one trial after another through ``train_one``."""

    def __init__(self, base: LoadedModel, data: Encoded, evaluator: Evaluator | None,
                 hooks: TrialHooks | None = None, progress: bool = True):
        self.base, self.data, self.evaluator = base, data, evaluator
        self.hooks, self.progress = hooks or TrialHooks(), progress

    def train(self, specs: Sequence[TrialSpec], on_result: Callable[[TrialResult], None] | None = None,
              refill: Callable[[], TrialSpec | None] | None = None) -> list[TrialResult]:
        results = []
        for spec in _then_refills(specs, refill):
            results.append(train_one(self.base, spec, self.data, self.evaluator, self.hooks, self.progress))
            if on_result is not None:
                on_result(results[-1])
        return results


def _then_refills(specs: Sequence[TrialSpec], refill: Callable[[], TrialSpec | None] | None) -> Iterator[TrialSpec]:
    yield from specs
    while refill is not None and (spec := refill()) is not None:
        yield spec


def train_one(base: LoadedModel, spec: TrialSpec, data: Encoded, evaluator: Evaluator | None,
              hooks: TrialHooks, progress: bool = True) -> TrialResult:
    import peft

    plan = resolve_targets(base.model, spec.lora.targets, spec.lora.fused_subset)
    result = TrialResult(spec, targets=plan.describe(), scaling=spec.lora.scaling)
    if error := plan.rank_error(spec.lora.r):  # refused before training, not trained and saved at full size
        result.status, result.error = "failed", error
        return result
    check_init(spec, plan, base.quantization)
    # LoftQ's A0, B0 from the 4-bit weights and the original ones (no RNG: the seed's draws are unchanged)
    loftq = loftq_factors(base, plan.module_names, spec.lora.r, spec.lora.scaling) \
        if spec.lora.init == "loftq" else {}
    mutates = spec.lora.init in BASE_MUTATING_INITS
    # PiSSA/OLoRA subtract scale * B0 A0 from each adapted weight: kept here to put the shared base back
    originals = {name: base.model.get_submodule(name).weight.detach().clone() for name in plan.module_names} \
        if mutates else {}
    torch.manual_seed(spec.train.seed)  # LoRA A init and dropout
    if spec.train.gradient_checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(base.model, lora_config(spec, plan))
    set_factors(model, loftq)
    masked = fused_row_masks(model, plan, spec.lora.r)
    initial = tempfile.TemporaryDirectory(prefix="lora-init-") if mutates and spec.adapter_dir is not None else None
    try:
        if initial is not None:
            # peft's documented conversion: the untrained A0, B0 saved as a plain (init True) adapter, then
            # save_pretrained folds -B0 A0 into a rank-2r adapter that fits the ORIGINAL base
            cfg = model.peft_config["default"]
            cfg.init_lora_weights = True
            model.save_pretrained(str(Path(initial.name) / "initial"))
            cfg.init_lora_weights = spec.lora.init
        # B entries held at zero by a row mask are not trained parameters
        result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad) \
            - sum(int((m == 0).sum()) for m in masked)
        _train(model, base, spec, data, evaluator, hooks, result, progress)
        if evaluator is not None:
            result.final = evaluator.run(model, base.device)
        if spec.adapter_dir is not None:
            convert = {"path_initial_model_for_weight_conversion": str(Path(initial.name) / "initial")} \
                if initial is not None else {}
            model.save_pretrained(str(spec.adapter_dir), **convert)
            base.record_identity(spec.adapter_dir)
            result.adapter_dir = spec.adapter_dir
    except TrialPruned as e:
        result.status, result.error = "pruned", str(e) or "pruned"
    except (TrialFailed, torch.OutOfMemoryError) as e:
        result.status, result.error = "failed", one_line(e)
    finally:
        # restore the shared base exactly: the LoRA layers are removed, nothing merged
        base.model = model.unload()
        with torch.no_grad():
            for name, weight in originals.items():
                base.model.get_submodule(name).weight.copy_(weight)
        if initial is not None:
            initial.cleanup()
        if spec.train.gradient_checkpointing:
            base.model.gradient_checkpointing_disable()
        base.model.eval()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def check_init(spec: TrialSpec, plan, quantization: str) -> None:
    """Refuse (UserError) a PiSSA/OLoRA/LoftQ init where it cannot be honoured exactly (both training paths)."""
    if error := init_error(spec.lora.init, quantization):  # the experiment's check, for a spec built without one
        raise UserError(error)
    if spec.lora.init not in DENSE_B_INITS:
        return
    if plan.fused_rows:
        raise UserError(f"lora.init={spec.lora.init} starts from a dense B on the fused matrix, which "
                        f"lora.fused_subset=rows must keep zero outside the adapted roles' rows; use all of q, k, v")
    if spec.lora.init in BASE_MUTATING_INITS and quantization != "none":
        raise UserError(f"lora.init={spec.lora.init} rewrites the adapted base weights, which a "
                        f"{quantization} base cannot give back exactly; use model.quantization=none")


def set_factors(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the peft ``model``'s LoRA layers on the named modules their A0, B0 (LoftQ's), in place."""
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)


def lora_config(spec: TrialSpec, plan):
    """The peft config of a trial on ``plan`` (rank r per adapted role on a part-adapted fused matrix)."""
    fused = (plan.fused_suffix, len(next(iter(plan.fused_rows.values())))) if plan.fused_rows else None
    return peft_config(spec.lora, plan.target_modules, fused)


def fused_row_masks(model, plan, r: int) -> list[torch.Tensor]:
    """Keep each part-adapted fused matrix's B block-structured: role i's rows use only B's columns
    i*r..(i+1)*r, the rows of roles left out stay exactly zero. B starts at zero and a masked gradient is zero
    there, so AdamW's moments and update are zero there too (weight decay of zero is zero): no drift, ever.
    Returns the masks (1 = trained)."""
    masks = []
    for name, rows in plan.fused_rows.items():
        layer = model.base_model.model.get_submodule(name)
        weight = layer.lora_B["default"].weight
        mask = fused_row_mask(rows, weight.shape[0], r).to(weight)
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda g, m=mask: g * m)
        masks.append(mask)
    return masks


def fused_row_mask(role_rows: dict, out_features: int, r: int) -> torch.Tensor:
    """B's block structure on a part-adapted fused matrix, [out, r * roles]: 1 where adapted role i's output
    rows meet B's columns i*r..(i+1)*r, 0 elsewhere (both training paths)."""
    mask = torch.zeros(out_features, r * len(role_rows))
    for i, rows in enumerate(role_rows.values()):
        mask[rows.cpu(), i * r:(i + 1) * r] = 1
    return mask


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
