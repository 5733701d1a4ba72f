"""Packed evaluation: held-out NLL and greedy generation for several trials of a pack at once, each
group of trials over the same stacked batch, giving ``Evaluator.run``'s reports per trial."""

from __future__ import annotations

import contextlib

import torch

from lora_ablate.decode import new_tokens
from lora_ablate.evaluation import EvalReport, Evaluator, answer, left_padded, token_nll
from lora_ablate.packed.attention import causal_attention
from lora_ablate.packed.loss import head_token_nll
from lora_ablate.packed.pack import Pack
from lora_ablate.packed.slot import Slot

GENERATE_ROWS = 4  # generation holds a KV cache, not full logits: this many times a step's rows at once


def _eval_groups(pack: Pack, slots: list[Slot], eval_batch: int, factor: int = 1) -> list[list[Slot]]:
    """Slots evaluated together: at most ``factor`` times the rows of a training step per forward, so
    scoring (full-vocabulary logits per token, like training) never needs more memory than training;
    generation keeps only the last position's logits and passes ``factor`` > 1."""
    train_rows = len(pack.slots) * max(s.train.batch_size for s in pack.slots)
    g = max(1, factor * train_rows // max(1, eval_batch))
    return [slots[i:i + g] for i in range(0, len(slots), g)]


def _chunked(pack: Pack) -> bool:
    return pack.device.type == "cuda" and pack.head is not None


def _nll_groups(pack: Pack, slots: list[Slot], eval_batch: int) -> list[list[Slot]]:
    return _eval_groups(pack, slots, eval_batch, factor=GENERATE_ROWS if _chunked(pack) else 1)


@torch.no_grad()
def packed_nll(pack: Pack, evaluator: Evaluator, slots: list[Slot]) -> list[dict]:
    """``Evaluator.nll`` for each slot, all slots of a group over the same held-out batch at once."""
    out: list[dict] = []
    model, device, pad = pack.model, pack.device, evaluator.tokenizer.pad_token_id
    # On a GPU, as training does: causal attention with no padding mask (the batches are right-padded, so
    # no real token sees padding) and the NLL from the final states in chunks, never the full logits; that
    # frees the memory for GENERATE_ROWS times a training step's rows per forward.
    fast = _chunked(pack)
    model.eval()
    try:
        for group in _nll_groups(pack, slots, evaluator.cfg.batch_size):
            g, res = len(group), [dict() for _ in group]
            with pack.selected(group), causal_attention(model) if fast else contextlib.nullcontext():
                for s in evaluator.sets:
                    enc = evaluator.encoded[s.name]
                    per_ex, counts = [[0.0] * len(enc) for _ in group], [[0] * len(enc) for _ in group]
                    # on a GPU longest first, so a batch pads little (a row's NLL is its own: right padding,
                    # causal attention); on a CPU in file order, the single path's batches to the bit
                    order = sorted(range(len(enc)), key=lambda i: -len(enc.input_ids[i])) if fast \
                        else list(range(len(enc)))
                    for start in range(0, len(enc), evaluator.cfg.batch_size):
                        idx = order[start:start + evaluator.cfg.batch_size]
                        b = enc.batch(idx, pad, device)
                        ids, labels = b["input_ids"].repeat(g, 1), b["labels"].repeat(g, 1)
                        if fast:
                            decoder, weight = pack.head
                            tok, mask = head_token_nll(decoder(input_ids=ids, use_cache=False).last_hidden_state,
                                                       weight, labels)
                        else:
                            logits = model(input_ids=ids, attention_mask=b["attention_mask"].repeat(g, 1)).logits
                            tok, mask = token_nll(logits, labels)
                        ex = (tok.sum(1) / mask.sum(1).clamp(min=1)).view(g, -1).tolist()
                        n = mask.sum(1).view(g, -1).tolist()
                        for k in range(g):
                            for j, i in enumerate(idx):
                                per_ex[k][i], counts[k][i] = ex[k][j], n[k][j]
                        evaluator.tick(f"{s.name} NLL")
                    for k in range(g):
                        total = sum(a * c for a, c in zip(per_ex[k], counts[k])) / max(1, sum(counts[k]))
                        res[k][s.name] = (total, per_ex[k], counts[k])
            out += res
    finally:
        model.train()
    return out


@torch.no_grad()
def packed_generate(pack: Pack, evaluator: Evaluator, slots: list[Slot], name: str) -> list[list[str]]:
    """``Evaluator.generate`` (greedy, left-padded, cut at '###') for each slot; each group of slots
    decodes the same prompts together on the stacked batch (lora_ablate/decode.py)."""
    tok, cfg = evaluator.tokenizer, evaluator.cfg
    prompts = evaluator.prompts[name]
    out: list[list[str]] = []
    model = pack.model
    model.eval()
    try:
        for group in _eval_groups(pack, slots, cfg.batch_size, factor=GENERATE_ROWS):
            g, preds = len(group), [[""] * len(prompts) for _ in group]
            with pack.selected(group):
                for idx in evaluator.generation_chunks(name, pack.device, model, copies=g):
                    chunk = [prompts[i] for i in idx]
                    ids, mask = left_padded(chunk, tok.pad_token_id)
                    gen = new_tokens(model, ids.repeat(g, 1).to(pack.device), mask.repeat(g, 1).to(pack.device),
                                     cfg.max_new_tokens, tok.pad_token_id, tok.eos_token_id)
                    rows = gen.view(g, len(chunk), -1)
                    for k in range(g):
                        for i, row in zip(idx, rows[k]):
                            preds[k][i] = answer(tok, row)
                    evaluator.tick(f"{name} generation")
            out += preds
    finally:
        model.train()
    return out


def _steps(pack: Pack, evaluator: Evaluator, slots: list[Slot]) -> int:
    """The batches and generate calls of ``packed_reports``: what its progress bar counts."""
    cfg = evaluator.cfg
    steps = sum(len(_nll_groups(pack, slots, cfg.batch_size)) * -(-len(evaluator.encoded[s.name]) // cfg.batch_size)
                for s in evaluator.sets)
    steps += sum(len(evaluator.generation_chunks(s.name, pack.device, pack.model, copies=len(group)))
                 for group in _eval_groups(pack, slots, cfg.batch_size, factor=GENERATE_ROWS)
                 for s in evaluator.sets if evaluator.generates(s))
    return steps


def packed_reports(pack: Pack, evaluator: Evaluator, slots: list[Slot]) -> list[EvalReport]:
    """``Evaluator.run`` for each slot: per-set NLL/ppl (and generation metrics), per-example rows."""
    with evaluator.bar(_steps(pack, evaluator, slots), f" of {len(slots)} trial{'s' if len(slots) != 1 else ''}"):
        nlls = packed_nll(pack, evaluator, slots)
        reports = [EvalReport() for _ in slots]
        for s in evaluator.sets:
            preds = packed_generate(pack, evaluator, slots, s.name) if evaluator.generates(s) else None
            for k, report in enumerate(reports):
                report.add(s, nlls[k][s.name], preds[k] if preds is not None else None)
    return reports
