"""``train_packed`` (and ``PackedTrainer``, the same behind the ``Trainer`` interface): trials joining the
pack, the step loop, logging, intermediate and final evaluation, trials leaving (finished, failed, pruned),
free slots refilled, and a pack that runs out of GPU memory trained again in halves."""

from __future__ import annotations

import gc
import logging
import math
import time
from typing import Callable, Sequence

import torch

from lora_ablate.data import Encoded
from lora_ablate.errors import one_line
from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel
from lora_ablate.packed.adapter_dir import export_adapter
from lora_ablate.packed.attention import require_attention, resolve_attention
from lora_ablate.packed.heldout import packed_nll, packed_reports
from lora_ablate.packed.pack import Pack
from lora_ablate.packed.slot import Slot
from lora_ablate.trial import Trainer, TrialFailed, TrialHooks, TrialPruned, TrialResult, TrialSpec

log = logging.getLogger(__name__)


class PackedTrainer(Trainer):
    """``train_packed`` as a ``Trainer``: ``specs`` start together in one pack, refills take freed slots."""

    def __init__(self, base: LoadedModel, data: Encoded, evaluator: Evaluator | None,
                 hooks: TrialHooks | None = None, progress: bool = True, **options):
        self.base, self.data, self.evaluator, self.hooks, self.progress = base, data, evaluator, hooks, progress
        self.options = options  # train_packed's keywords: compile, lora_dtype, fused_head, cuda_graphs, attention
        # refused when the trainer is made, before any trial is asked
        require_attention(options.get("attention", "auto"), base.model, base.device)

    def train(self, specs: Sequence[TrialSpec], on_result: Callable[[TrialResult], None] | None = None,
              refill: Callable[[], TrialSpec | None] | None = None) -> list[TrialResult]:
        return train_packed(self.base, specs, self.data, self.evaluator, self.hooks, self.progress, refill=refill,
                            on_result=on_result, **self.options)


def train_packed(base: LoadedModel, specs: Sequence[TrialSpec], data: Encoded, evaluator: Evaluator | None = None,
                 hooks: TrialHooks | None = None, progress: bool = True, *,
                 refill: Callable[[], TrialSpec | None] | None = None,
                 on_result: Callable[[TrialResult], None] | None = None,
                 compile: bool = False, lora_dtype: torch.dtype | None = None,
                 fused_head: bool | None = None, cuda_graphs: bool | None = None,
                 packing: bool | None = None, attention: str = "auto") -> list[TrialResult]:
    """Train ``specs`` together in one pack; one TrialResult per trial, in the order trials joined.

    ``refill()`` is asked for a new spec whenever a trial leaves the pack (finished, failed, pruned), and
    the new trial takes the free slot (None: the pack shrinks). ``on_result(result)`` is called as soon as
    each trial is done, before the rest of the pack finishes. ``compile`` runs the model's repeated blocks
    through torch.compile while training (falling back to eager if compilation fails). ``lora_dtype`` is
    the dtype of the adapter products: None computes them in the activations' dtype (bf16 on a bf16 base,
    like autocast) on fp32 master weights; ``torch.float32`` casts the activations up as peft does.
    ``fused_head`` computes the training loss from the final hidden states in chunks, never holding the
    full logits (packed/loss.py; architectures with a plain LM head only), and ``cuda_graphs`` replays each
    training step as one CUDA graph (packed/pack.py); both default to on for a CUDA base and off elsewhere,
    where the eager reference path is kept bit for bit. ``packing`` concatenates each trial's examples of
    a micro-batch into one row under a document mask, so a step costs about its real tokens
    (packed/varlen.py; SDPA models only); default on for a CUDA base, off elsewhere. ``attention`` is
    ``study.attention``: "varlen" runs the packed rows' attention as flash varlen attention over each
    example's own tokens, with no mask (packed/attention.py), "flex" gives them a FlexAttention BlockMask
    (masked tiles are skipped), both for a CUDA SDPA model with packing on only (UserError otherwise); "sdpa"
    the dense boolean mask under SDPA; "auto" varlen where it can train, else sdpa.

    Out of GPU memory (``torch.OutOfMemoryError``, e.g. another process on the GPU took it): a step of a
    pack of several trials abandons the pack, and its unfinished trials are trained again from step 0 (the
    same trials: their seeds decide them) in two packs of half its size, one after the other, the second
    with ``refill``; this halves again where needed. Trials already reported stay as they were, and the
    retry does not send ``hooks`` the steps the abandoned attempt already sent (MLflow would keep both
    values of a step, Optuna's pruner would be told a step twice). A held-out evaluation, intermediate or
    final, is run again on each half of its trials. A trial that runs out of memory alone fails, with the
    error's line as its reason.
    """
    hooks = hooks or TrialHooks()
    if not specs:
        return []
    options = dict(compile=compile, lora_dtype=lora_dtype, fused_head=fused_head, cuda_graphs=cuda_graphs,
                   packing=packing, attention=attention)
    results, oom = _one_pack(base, specs, data, evaluator, hooks, progress, refill, on_result, **options)
    if oom is None:
        return results
    step, left = oom
    _free(base.device)
    half = (len(left) + 1) // 2
    log.warning("pack of %d ran out of GPU memory at step %d; training its %d trials again in packs of %s",
                len(left), step, len(left), half if 2 * half == len(left) else f"{half} and {len(left) - half}")
    results = [r for r in results if all(r is not s.result for s in left)]  # on_result never saw them
    hooks = _Unreported(hooks, {id(s.spec): s.done for s in left})
    for part, last in ((left[:half], False), (left[half:], True)):
        # refills join the last pack only: waiting trials are not held up behind them
        results += train_packed(base, [s.spec for s in part], data, evaluator, hooks, progress,
                                refill=refill if last else None, on_result=on_result, **options)
    return results


def _one_pack(base: LoadedModel, specs: Sequence[TrialSpec], data: Encoded, evaluator, hooks: TrialHooks,
              progress: bool, refill, on_result, *, compile: bool, lora_dtype, fused_head, cuda_graphs, packing,
              attention: str) -> tuple[list[TrialResult], tuple[int, list[Slot]] | None]:
    """``specs`` and their refills trained in one pack: the results and, if a step of several trials ran out
    of memory, (that step of the pack, its unfinished slots), else None."""
    results: list[TrialResult] = []
    checkpointing = any(s.train.gradient_checkpointing for s in specs)
    cuda = base.device.type == "cuda"
    packing = cuda if packing is None else packing
    attention = resolve_attention(attention, base.model, base.device, packing)
    pack = Pack(base, data, lora_dtype, compile and not checkpointing,
                 fused_head=cuda if fused_head is None else fused_head,
                 # checkpointing saves and restores the RNG state and bitsandbytes' kernels sync with the
                 # host, neither of which a graph capture allows
                 graphs=(cuda and not checkpointing and base.quantization == "none") if cuda_graphs is None
                 else cuda_graphs,
                 packing=packing, attention=attention)
    if checkpointing:  # a pack shares one forward: checkpointing is on for all if any trial asks for it
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    oom = None
    try:
        joining = [_join(spec, pack, results, on_result) for spec in specs]
        slots = [s for s in joining if s is not None]
        while not slots and refill is not None and (spec := refill()) is not None:
            slots = [s for s in [_join(spec, pack, results, on_result)] if s is not None]
        if slots:
            oom = _run(pack, slots, evaluator, hooks, progress, refill, results, on_result)
    finally:
        pack.close()
        if checkpointing:
            base.model.gradient_checkpointing_disable()
        base.model.eval()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return results, oom


def _free(device: torch.device) -> None:
    """The memory of an attempt that ran out of it, back for the next attempt and for other processes (the
    collector: an abandoned pack refers to itself through its Steps, so only it frees the pack's tensors)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Unreported(TrialHooks):
    """``hooks`` for trials trained again, less the steps their abandoned attempt already reported
    (``reported``: id of the spec -> its steps done then)."""

    def __init__(self, hooks: TrialHooks, reported: dict[int, int]):
        self.hooks, self.reported = hooks, reported

    def on_train_log(self, spec: TrialSpec, step: int, values: dict) -> None:
        if step > self.reported.get(id(spec), 0):
            self.hooks.on_train_log(spec, step, values)

    def on_eval(self, spec: TrialSpec, step: int, values: dict) -> None:
        if step > self.reported.get(id(spec), 0):
            self.hooks.on_eval(spec, step, values)


def _join(spec: TrialSpec, pack: Pack, results: list, on_result) -> Slot | None:
    """A slot for ``spec``, or None if it failed before it could start (e.g. too little data)."""
    result = pack.new_result(spec)
    results.append(result)
    try:
        return pack.new_slot(result)
    except TrialFailed as e:
        result.status, result.error = "failed", str(e)
        if on_result:
            on_result(result)
        return None


def _run(pack: Pack, slots: list[Slot], evaluator, hooks: TrialHooks, progress: bool, refill,
         results: list, on_result) -> tuple[int, list[Slot]] | None:
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
    oom, steps = None, 0
    while pack.slots:
        try:
            pack.step()
        except torch.OutOfMemoryError as e:
            if len(pack.slots) > 1:  # train_packed trains them again in smaller packs
                oom = steps + 1, pack.slots
            else:
                _leave(pack.slots[0], "failed", one_line(e), on_result, pack)
            break
        steps += 1
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
    return oom


def _after_step(pack: Pack, evaluator, hooks: TrialHooks, on_result) -> list[Slot]:
    """Logging, intermediate evaluation and the end of trials after a step; returns the slots leaving."""
    leaving: list[Slot] = []
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
            t = time.perf_counter()
            scores = _in_halves(packed_nll, pack, evaluator, due)
            _evaluating(pack, time.perf_counter() - t)
            for s, nll in zip(due, scores):
                if isinstance(nll, str):
                    leaving.append(_leave(s, "failed", nll, on_result, pack))
                    continue
                values = {f"{name}/nll": v[0] for name, v in nll.items()}
                s.result.evals.append({"step": s.done, **values})
                _hook(s, leaving, on_result, pack, hooks.on_eval, s.spec, s.done, values)
    done = [s for s in pack.slots if s.finished and s not in leaving]
    if done:
        t = time.perf_counter()
        _finish(pack, done, evaluator, leaving, on_result)  # stamps the finished before their evaluation
        _evaluating(pack, time.perf_counter() - t)
    return leaving


def _evaluating(pack: Pack, seconds: float) -> None:
    """Held-out evaluation is not training time (as on the single path): every trial in the pack waited."""
    for s in pack.slots:
        s.eval_seconds += seconds


def _hook(slot: Slot, leaving: list, on_result, pack: Pack, fn, *args) -> bool:
    """Call a trial's hook; a TrialPruned/TrialFailed it raises ends that trial only."""
    try:
        fn(*args)
        return True
    except TrialPruned as e:
        leaving.append(_leave(slot, "pruned", str(e) or "pruned", on_result, pack))
    except TrialFailed as e:
        leaving.append(_leave(slot, "failed", one_line(e), on_result, pack))
    return False


def _leave(slot: Slot, status: str, error: str, on_result, pack: Pack) -> Slot:
    slot.result.status, slot.result.error = status, error
    _stamp(slot, pack)
    if on_result:
        on_result(slot.result)
    return slot


def _stamp(slot: Slot, pack: Pack) -> None:
    """Tokens, time and the trial's share of the pack's peak memory, as of now."""
    if pack.device.type == "cuda":
        torch.cuda.synchronize(pack.device)
        slot.result.peak_mem_mb = torch.cuda.max_memory_allocated(pack.device) / 2**20 / max(1, pack.max_k)
    slot.result.tokens = sum(slot.tokens[:slot.done])
    slot.result.train_seconds = time.perf_counter() - slot.t0 - slot.eval_seconds


def _finish(pack: Pack, done: list[Slot], evaluator, leaving: list, on_result) -> None:
    """Final evaluation (packed) and export of the trials that completed their steps."""
    for s in done:
        _stamp(s, pack)
    reports = _in_halves(packed_reports, pack, evaluator, done) if evaluator is not None else [None] * len(done)
    for s, report in zip(done, reports):
        if isinstance(report, str):
            leaving.append(_leave(s, "failed", report, on_result, pack))
            continue
        s.result.final = report
        if s.spec.adapter_dir is not None:
            export_adapter(pack, s, s.spec.adapter_dir)
            s.result.adapter_dir = s.spec.adapter_dir
        leaving.append(s)
        if on_result:
            on_result(s.result)


def _in_halves(evaluate, pack: Pack, evaluator: Evaluator, slots: list[Slot]) -> list:
    """``evaluate(pack, evaluator, slots)`` (packed_nll, packed_reports), run again on each half of ``slots``
    when it runs out of GPU memory (fewer trials, smaller batches); a trial out of memory alone gets the
    error's line in place of its result."""
    try:
        return evaluate(pack, evaluator, slots)
    except torch.OutOfMemoryError as e:
        if len(slots) == 1:
            return [one_line(e)]
    _free(pack.device)
    half = (len(slots) + 1) // 2
    log.warning("held-out evaluation of %d trials ran out of GPU memory; evaluating them again in halves",
                len(slots))
    return _in_halves(evaluate, pack, evaluator, slots[:half]) + _in_halves(evaluate, pack, evaluator, slots[half:])
