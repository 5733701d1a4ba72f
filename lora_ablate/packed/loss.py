"""Next-token NLL from the final hidden states, with the LM head and the cross-entropy done in chunks.

Why: for the default model the head's logits are 49,152 wide, so a pack of 16 trials x 8 x 256 tokens
would hold 6.4 GB of fp32 logits, write and read them several times per step, and keep them for the
backward. Here each chunk of tokens gets its logits, its log-sum-exp and its gradient with respect to
the hidden states in one go; only the per-token NLL [N] and that gradient [N, d] outlive the chunk.
The base is frozen, so the head's weight needs no gradient at all.

Arithmetic, against ``token_nll(lm_head(h))``: the same bf16 (or fp32) logits, upcast to fp32, the same
log-softmax; the gradient is (softmax - onehot) cast to the weight's dtype and multiplied by the
weight, as autograd does, except that the upstream per-token factor (1 / label tokens of the trial) is
applied after that product instead of before it: one extra rounding in bf16, none that matters in fp32.
"""

from __future__ import annotations

import logging

import torch

from lora_ablate.data import IGNORE
from lora_ablate.evaluation import token_nll

log = logging.getLogger(__name__)

CHUNK_BYTES = 2**29  # fp32 logits per chunk: 512 MiB, whatever the vocabulary


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: a multiple of 256 whose fp32 logits fit ``CHUNK_BYTES``."""
    return max(256, CHUNK_BYTES // (4 * vocab) // 256 * 256)


def _chunk(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL [c] (0 where ignored) and d NLL / d h [c, d] of one chunk. Written for Inductor: after the head's
    matmul, one reduction (log-sum-exp) and one pointwise pass (softmax minus one-hot, cast) over the logits;
    eager, the same arithmetic in a few more passes (an H200 spent 32 of 97 ms a step there at K = 16)."""
    logits = (h @ weight.t()).float()
    valid = target != IGNORE
    t = target.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    nll = (lse - logits.gather(1, t)).squeeze(1) * valid
    onehot = torch.arange(logits.shape[1], device=logits.device) == t
    probs = torch.exp(logits - lse) - onehot.to(logits.dtype)
    grad = (probs.to(weight.dtype) @ weight) * valid.unsqueeze(1).to(weight.dtype)
    return nll, grad


_compiled = {}  # "chunk": the torch.compile'd _chunk, or None once compiling it failed


def _chunk_fn(compiled: bool):
    if not compiled:
        return _chunk
    if "chunk" not in _compiled:
        # automatic dynamic shapes: the last chunk's size changes with every batch width on eager steps, and
        # a static graph per size would recompile each time
        _compiled["chunk"] = torch.compile(_chunk)
    return _compiled["chunk"] or _chunk


class _HeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, rows, compiled):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        fn = _chunk_fn(compiled)
        for s in range(0, hidden.shape[0], rows):
            try:
                nll[s:s + rows], grad[s:s + rows] = fn(hidden[s:s + rows], weight, target[s:s + rows])
            except Exception as e:  # noqa: BLE001 - no compiler here (or it broke): the eager chunk is the same
                if fn is _chunk:
                    raise
                log.warning("torch.compile of the LM-head loss failed (%s); computing it eagerly", type(e).__name__)
                _compiled["chunk"], fn = None, _chunk
                nll[s:s + rows], grad[s:s + rows] = fn(hidden[s:s + rows], weight, target[s:s + rows])
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream.unsqueeze(1).to(grad.dtype), None, None, None, None


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Per-token next-token NLL [B, T] (0 where the next label is masked and at the last position) of the
    logits ``hidden @ weight.T``; differentiable with respect to ``hidden`` only.

    ``hidden`` [B, T, d] are the decoder's final (normed) states, ``weight`` [V, d] the LM head's,
    ``labels`` [B, T] the batch's labels (IGNORE where masked). Position t predicts label t + 1.
    ``compiled`` runs each chunk through torch.compile (falling back to eager if that fails).
    """
    B, T, d = hidden.shape
    target = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE)], dim=1).reshape(-1)
    nll = _HeadNLL.apply(hidden.reshape(B * T, d), weight.detach(), target, chunk_rows(weight.shape[0]),
                         compiled)
    return nll.view(B, T)


@torch.no_grad()
def head_token_nll(hidden: torch.Tensor, weight: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_nll`` of the logits ``hidden @ weight.T`` [B, T, d] x [V, d], a few rows at a time so the
    batch's fp32 logits are never all held at once."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0] * hidden.shape[1]))
    parts = [token_nll(h @ weight.t(), y) for h, y in zip(hidden.split(rows), labels.split(rows))]
    return torch.cat([nll for nll, _ in parts]), torch.cat([mask for _, mask in parts])
