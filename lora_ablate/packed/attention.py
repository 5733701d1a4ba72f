"""Causal SDPA without a padding mask for the pack's right-padded training forwards."""

from __future__ import annotations

import contextlib
import functools

import torch

_CAUSAL_IMPL = "lora_ablate_causal_sdpa"


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


@functools.cache  # once per process: every training step asks
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
