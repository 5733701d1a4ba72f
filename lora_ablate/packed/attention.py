"""The attention of the pack's training forwards: causal SDPA without a padding mask for right-padded
batches; for sequence-packed rows (packed/varlen.py), ``study.attention`` decides: SDPA under a dense
boolean document mask (``sdpa``), FlexAttention under a document BlockMask (``flex``), or flash varlen
attention over each example's own tokens with no mask at all (``varlen``, what ``auto`` takes where it can
train).

``varlen``: the K packed rows [K, L] are flattened to one stream of K * L tokens, cut into segments by
cumulative offsets (``cu_seqlens``, one segment per example and one per row's padding tail; the tables are
precomputed in ``_VarlenPlan``), and ``torch.nn.attention.varlen.varlen_attn`` runs causal attention inside
each segment: every example attends its own causal triangle only, so the dense O(L^2) masked attention (and
building its mask) is gone. The offsets and the row width reach the attention function as the model call's
own keyword arguments (``CU_SEQLENS``, ``MAX_LEN``), which transformers passes from the decoder's forward
through every decoder layer into the attention interface. The kernel is the module-level ``varlen_kernel``,
which tests on a CPU (no flash kernel there) swap for a per-segment SDPA reference.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from lora_ablate.attention_impl import implementation, register
from lora_ablate.config import ATTENTIONS
from lora_ablate.errors import UserError, choices

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch before 2.10
    _varlen_attn = None

_CAUSAL_IMPL = "lora_ablate_causal_sdpa"
_FLEX_IMPL = "flex_attention"  # transformers' own integration: GQA, scaling and soft-capping as the model does
_VARLEN_IMPL = "lora_ablate_varlen"
CU_SEQLENS = "lora_ablate_cu_seqlens"  # the model call's keywords for varlen rows (names transformers never uses)
MAX_LEN = "lora_ablate_max_len"
# torch 2.11 shares kv heads natively; later versions' wrapper refuses Hq != Hkv unless asked to
_GQA = {"enable_gqa": True} if _varlen_attn is not None and \
    "enable_gqa" in inspect.signature(_varlen_attn).parameters else {}
_DROPOUTS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")  # config names, by family
_NEEDS = {"flex": "FlexAttention", "varlen": "flash varlen attention"}  # the choices that have requirements


def causal_attention(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Route training forwards to SDPA with ``is_causal`` and no mask at all (lora_ablate/attention_impl.py:
    under a name the mask registry does not know, no mask is built), so SDPA takes its causal (flash)
    kernel. Only for SDPA models; anything else keeps its own path."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa" or not _register_causal():
        return contextlib.nullcontext()
    return implementation(model, _CAUSAL_IMPL)


def packed_attention(model: torch.nn.Module, attention: str) -> contextlib.AbstractContextManager:
    """Route the training forwards of sequence-packed rows under ``attention`` (resolved: sdpa, flex or
    varlen). flex: transformers' flex_attention, which reads the BlockMask given as the 4-D
    ``attention_mask`` (``masking_utils`` returns 4-D masks unchanged). varlen: ``_varlen_forward``, under a
    name the mask registry does not know, so no mask is built (as for ``causal_attention``). sdpa: the
    model's own SDPA under the boolean mask given."""
    if attention == "flex":
        return implementation(model, _FLEX_IMPL)
    if attention == "varlen" and _register_varlen():
        return implementation(model, _VARLEN_IMPL)
    return contextlib.nullcontext()


@functools.cache  # once per process: every training step asks
def _register_causal() -> bool:
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return False
    return register(_CAUSAL_IMPL, sdpa_attention_forward)


@functools.cache
def _register_varlen() -> bool:
    return register(_VARLEN_IMPL, _varlen_forward)


def varlen_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_len: int, scale: float | None) -> torch.Tensor:
    """Causal attention inside each segment of ``cu_seqlens`` (int32 offsets): query [T, H, D], key and value
    [T, Hkv, D] -> [T, H, D]. Flash varlen, CUDA only."""
    return _varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale,
                        window_size=(-1, 0), **_GQA)


def _varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over packed rows: query [K, H, L, D], key and value [K, Hkv, L, D]
    -> ([K, L, H, D], None), attention within the segments of ``kwargs[CU_SEQLENS]``."""
    if CU_SEQLENS not in kwargs:
        raise RuntimeError(f"{type(module).__name__} did not pass the model call's keywords to its attention, "
                           "which study.attention=varlen needs; use study.attention=sdpa")
    # attention_refusal checks the config; this catches a model that names these elsewhere
    if dropout or kwargs.get("softcap") or kwargs.get("sliding_window"):
        raise RuntimeError(f"{type(module).__name__} asks for attention dropout, soft-capping or a sliding "
                           "window, which study.attention=varlen cannot apply; use study.attention=sdpa")
    K, H, L, _ = query.shape
    out = varlen_kernel(*(x.transpose(1, 2).reshape(K * L, x.shape[1], x.shape[-1]) for x in (query, key, value)),
                        kwargs[CU_SEQLENS], kwargs[MAX_LEN], scaling)
    return out.view(K, L, H, -1), None


def attention_refusal(attention: str, model: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``study.attention=<attention>`` cannot train ``model`` on ``device`` (one line), or None (always
    for sdpa and auto, which resolves to what can)."""
    if attention not in _NEEDS:
        return None
    if device.type != "cuda":
        # torch's flex_attention raises on any CPU input that needs a gradient, eager or compiled; the flash
        # varlen kernel is CUDA's alone
        return (f"FlexAttention has no backward on {device.type}" if attention == "flex"
                else f"flash varlen attention has no {device.type} kernel") + " (training needs a CUDA GPU)"
    if why := _flex_missing() if attention == "flex" else _varlen_missing():
        return why
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != "sdpa":  # sequence packing (what both replace the mask of) needs an SDPA model
        return f"the model runs attention {impl!r}, and sequence packing needs 'sdpa'"
    if attention == "flex" and not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} does not support transformers' flex_attention"
    if dropout := next((getattr(cfg, n) for n in _DROPOUTS if getattr(cfg, n, 0.0)), 0.0):
        return f"the model's attention dropout is {dropout}, which {_NEEDS[attention]} cannot apply"
    if attention == "varlen":
        if softcap := getattr(cfg, "attn_logit_softcapping", None):
            return f"the model soft-caps attention logits ({softcap}), which flash varlen attention cannot"
        # a window shorter than an example would change its attention; none is trusted, to be safe
        if (window := getattr(cfg, "sliding_window", None)) is not None:
            return f"the model has a sliding window ({window}), which flash varlen attention does not apply"
    return None


def _flex_missing() -> str | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
        from transformers.integrations.flex_attention import flex_attention_forward  # noqa: F401
    except ImportError:
        return f"this torch ({torch.__version__}) or transformers has no flex_attention"
    return None


def _varlen_missing() -> str | None:
    if _varlen_attn is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen.varlen_attn"
    if not _register_varlen():
        return "this transformers cannot route attention to an outside function (AttentionInterface)"
    return None


def attention_error(attention: str, why: str, model: torch.nn.Module | None = None,
                    device: torch.device | None = None) -> UserError:
    """``study.attention=<attention>`` refused, in one line: ``why``, and the choices that work (on ``model``
    and ``device``; without them, those with no requirements)."""
    valid = [a for a in ATTENTIONS if a != attention
             and (a not in _NEEDS or model is not None and attention_refusal(a, model, device) is None)]
    return UserError(f"study.attention={attention} cannot train here: {why}; choose one of: {choices(valid)}")


def require_attention(attention: str, model: torch.nn.Module, device: torch.device) -> None:
    """``attention_error`` unless ``study.attention=<attention>`` can train ``model`` on ``device``."""
    if why := attention_refusal(attention, model, device):
        raise attention_error(attention, why, model, device)


def resolve_attention(attention: str, model: torch.nn.Module, device: torch.device, packing: bool) -> str:
    """``study.attention`` as the packed rows run it: auto is varlen where that can train (packing on), else
    sdpa; flex or varlen where they cannot train is ``attention_error``."""
    if attention == "auto":
        return "varlen" if packing and attention_refusal("varlen", model, device) is None else "sdpa"
    require_attention(attention, model, device)
    if attention in _NEEDS and not packing:
        raise attention_error(attention, "it is for sequence-packed rows, and packing is off")
    return attention
