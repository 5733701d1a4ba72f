"""Held-out evaluation: token NLL / perplexity of the reference outputs, and greedy generations scored
with the metric modules under ``evals/metrics``. Per-example scores are kept for paired statistics.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_ablate.config import DataConfig, EvalConfig
from lora_ablate.data import IGNORE, EvalSet, encode_all, prompt_ids
from lora_ablate.decode import fast_decoding, new_tokens, rows_per_call

GEN_METRICS = ("exact_match", "rouge_l")


@dataclass
class EvalReport:
    """``metrics[set][name]`` (nll, ppl, n, and exact_match/rouge_l when generating) and one row per example."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def flat(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{s}/{k}": v for s, m in self.metrics.items() for k, v in m.items()}

    def add(self, s: EvalSet, nll: tuple[float, list[float], list[int]], preds: list[str] | None) -> None:
        """One set's metrics and per-example rows, from ``Evaluator.nll``'s result and the predictions
        (None: NLL only). Shared by the single and the packed evaluation."""
        from lora_ablate.metrics import score

        mean_nll, per_ex, counts = nll
        m = {"nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)), "n": float(len(per_ex))}
        rows = [{"set": s.name, "idx": i, "family": ex.family, "nll": per_ex[i], "tokens": counts[i]}
                for i, ex in enumerate(s.examples)]
        if preds is not None:
            refs = [ex.output for ex in s.examples]
            for metric in s.metrics or GEN_METRICS:
                mean, scores = score(metric, preds, refs)
                m[metric] = mean
                for row, sc in zip(rows, scores):
                    row[metric] = sc
            for row, p in zip(rows, preds):
                row["prediction"] = p
        self.metrics[s.name] = m
        self.examples += rows


class Evaluator:
    """Pre-tokenises the held-out sets once; evaluates any model (base, peft-wrapped, merged) on them."""

    def __init__(self, sets: list[EvalSet], tokenizer, data: DataConfig, cfg: EvalConfig):
        self.sets, self.tokenizer, self.cfg = sets, tokenizer, cfg
        self.progress = False  # a bar over a whole run()'s batches and generate calls; the CLI sets it
        self._bar = None
        self.encoded = {s.name: encode_all(s.examples, tokenizer, data.template, data.max_length) for s in sets}
        # generation prompts leave room for the answer inside the model's context budget
        budget = max(8, data.max_length - cfg.max_new_tokens)
        self.prompts = {s.name: [prompt_ids(ex, tokenizer, data.template)[-budget:] for ex in s.examples]
                        for s in sets}

    @torch.no_grad()
    def nll(self, model, device) -> dict[str, tuple[float, list[float], list[int]]]:
        """Per set: (token-weighted mean NLL, per-example mean NLL, per-example token count)."""
        out = {}
        was_training = model.training
        model.eval()
        for s in self.sets:
            enc = self.encoded[s.name]
            per_ex, counts = [], []
            for start in range(0, len(enc), self.cfg.batch_size):
                idx = list(range(start, min(start + self.cfg.batch_size, len(enc))))
                b = enc.batch(idx, self.tokenizer.pad_token_id, device)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                tok_nll, mask = token_nll(logits, b["labels"])
                per_ex += (tok_nll.sum(1) / mask.sum(1).clamp(min=1)).tolist()
                counts += mask.sum(1).tolist()
                self.tick(f"{s.name} NLL")
            total = sum(n * c for n, c in zip(per_ex, counts)) / max(1, sum(counts))
            out[s.name] = (total, per_ex, counts)
        model.train(was_training)
        return out

    @torch.no_grad()
    def generate(self, model, device, name: str) -> list[str]:
        """Greedy, batched, left-padded; the answer ends at EOS or at a new '###' section."""
        tok = self.tokenizer
        was_training = model.training
        model.eval()
        prompts = self.prompts[name]
        preds: list[str] = [""] * len(prompts)
        for idx in self.generation_chunks(name, device, model, copies=1):
            ids, mask = left_padded([prompts[i] for i in idx], tok.pad_token_id)
            gen = new_tokens(model, ids.to(device), mask.to(device), self.cfg.max_new_tokens, tok.pad_token_id,
                             tok.eos_token_id)
            for i, row in zip(idx, gen):
                preds[i] = answer(tok, row)
            self.tick(f"{name} generation")
        model.train(was_training)
        return preds

    def generation_chunks(self, name: str, device, model, copies: int) -> list[list[int]]:
        """The prompts of set ``name`` in decoding calls, longest first so a call pads little: eval.batch_size
        prompts a call on a CPU, and on a GPU as many as one call's cache holds in free memory
        (``decode.rows_per_call``) when each prompt is decoded ``copies`` times (once per trial of a pack)."""
        prompts = self.prompts[name]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        size = self.cfg.batch_size
        longest = max(map(len, prompts), default=0) + self.cfg.max_new_tokens
        rows = rows_per_call(model, longest, device)
        if rows is not None:
            # generate's cache is concatenated anew at every token: old and new copies are briefly both held
            rows = rows if fast_decoding(model, longest) else rows // 2
            size = max(size, rows // max(1, copies))
        return [order[i:i + size] for i in range(0, len(order), size)]

    def generates(self, s: EvalSet, generate: bool | None = None) -> bool:
        """Whether set ``s`` is scored on generations (a retention set by default is not)."""
        return (self.cfg.generate if generate is None else generate) and s.generate

    def tick(self, what: str) -> None:
        """One batch or generate call done (a no-op outside a run() with progress on)."""
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    @contextmanager
    def bar(self, steps: int, who: str = ""):
        """The bar that ``tick`` advances, open for one evaluation of ``steps`` batches and generate calls
        (of ``who``: a pack's trials); shown only with ``progress`` on."""
        from tqdm.auto import tqdm

        examples = sum(len(s.examples) for s in self.sets)
        self._bar = tqdm(total=steps, desc=f"eval{who} {len(self.sets)} sets, {examples} examples", unit="batch",
                         disable=not self.progress, leave=False, mininterval=1.0)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def run(self, model, device, generate: bool | None = None) -> EvalReport:
        report = EvalReport()
        steps = sum(-(-len(self.encoded[s.name]) // self.cfg.batch_size)
                    + (len(self.generation_chunks(s.name, device, model, 1)) if self.generates(s, generate) else 0)
                    for s in self.sets)
        with self.bar(steps):
            nlls = self.nll(model, device)
            for s in self.sets:
                preds = self.generate(model, device, s.name) if self.generates(s, generate) else None
                report.add(s, nlls[s.name], preds)
        return report


def answer(tokenizer, row: torch.Tensor) -> str:
    """A generated continuation as the answer: up to EOS or a new '###' section."""
    return tokenizer.decode(row, skip_special_tokens=True).split("###")[0].strip()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A generation batch: the prompts left-padded to the longest, (input_ids, attention_mask) on the CPU."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where masked) and the mask, for next-token prediction, computed in fp32."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.clamp(min=0).reshape(-1),
                          reduction="none").view(target.shape)
    return nll * mask, mask
