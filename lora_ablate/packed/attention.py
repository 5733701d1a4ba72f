"""The attention of the pack's training forwards: causal SDPA without a padding mask for right-padded
batches, and FlexAttention under a document BlockMask for sequence-packed rows (``study.attention=flex``)."""

from __future__ import annotations

import contextlib
import functools

import torch

from lora_ablate.config import ATTENTIONS
from lora_ablate.errors import UserError, choices

_CAUSAL_IMPL = "lora_ablate_causal_sdpa"
_FLEX_IMPL = "flex_attention"  # transformers' own integration: GQA, scaling and soft-capping as the model does


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


def flex_refusal(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``study.attention=flex`` cannot train ``model`` on ``device`` (one line), or None."""
    if device.type != "cuda":
        # torch's flex_attention raises on any CPU input that needs a gradient, eager or compiled
        return f"FlexAttention has no backward on {device.type} (training needs a CUDA GPU)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
        from transformers.integrations.flex_attention import flex_attention_forward  # noqa: F401
    except ImportError:
        return f"this torch ({torch.__version__}) or transformers has no flex_attention"
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != "sdpa":  # sequence packing (what flex replaces the mask of) needs an SDPA model
        return f"the model runs attention {impl!r}, and sequence packing needs 'sdpa'"
    if not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} does not support transformers' flex_attention"
    if getattr(cfg, "attention_dropout", 0.0):  # transformers' flex path refuses dropout in training
        return f"the model's attention_dropout is {cfg.attention_dropout}, which flex_attention cannot apply"
    return None


def flex_error(why: str) -> UserError:
    """``study.attention=flex`` refused, in one line: ``why``, and the choices that work."""
    return UserError(f"study.attention=flex cannot train here: {why}; choose one of: "
                     f"{choices(a for a in ATTENTIONS if a != 'flex')}")


def require_flex(model: torch.nn.Module, device: torch.device) -> None:
    """``flex_error`` unless ``study.attention=flex`` can train ``model`` on ``device``."""
    if why := flex_refusal(model, device):
        raise flex_error(why)


@contextlib.contextmanager
def _flex_attention(model: torch.nn.Module):
    """Route the forwards inside to transformers' flex_attention, which reads a BlockMask given as the 4-D
    ``attention_mask`` (``masking_utils`` returns 4-D masks unchanged); the model is switched back after, so
    evaluation and generation keep SDPA."""
    cfg = model.config
    impl = cfg._attn_implementation
    cfg._attn_implementation = _FLEX_IMPL
    try:
        yield
    finally:
        cfg._attn_implementation = impl
