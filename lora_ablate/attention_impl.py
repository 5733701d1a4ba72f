"""Attention implementations of lora_ablate's own inside transformers models: registered with transformers'
``AttentionInterface`` under names its mask registry does not know, and switched in for a model only while
the forwards that need them run.

Why an unknown name: for an implementation the mask registry does not list, ``create_causal_mask`` returns
None without looking at its inputs (transformers' contract for external attention backends), so no mask is
built and nothing is read back to the host; the implementation brings whatever masking it needs itself
(packed training rows: none or their segments; decoding: the call's padding mask).
"""

from __future__ import annotations

import contextlib

import torch


def register(name: str, forward) -> bool:
    """``forward`` as transformers' attention implementation ``name``; False where that is impossible."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    if name in ALL_MASK_ATTENTION_FUNCTIONS:  # then masks would be built after all
        return False
    AttentionInterface.register(name, forward)
    return True


@contextlib.contextmanager
def implementation(model: torch.nn.Module, impl: str):
    """The model's attention implementation is ``impl`` inside, and what it was after (evaluation and
    generation outside keep SDPA)."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = impl
    try:
        yield
    finally:
        cfg._attn_implementation = before
