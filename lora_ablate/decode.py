"""Greedy decoding for held-out generation, without HF ``generate``'s per-token costs.

Profiled on an H200 (docs/benchmarks.md): held-out ``model.generate(do_sample=False)`` in a study spent its
time in the host side of one SDPA call a layer, and a first version of this loop, 76-126 ms a token whatever
the number of rows, showed why: SDPA's cuDNN backend plans every new key length anew (2 ms a call). Besides
that, generate's dynamic cache concatenates every layer's keys and values anew at each token, GQA repeats the
kv heads of the whole cache for the masked kernel, and every token asks the host whether all rows are done.
Here instead:

- the prompt goes through the model once as ``generate`` does (same call, same 2-D mask, same positions),
  and its keys and values are copied into a cache allocated for the prompt plus every new token, which
  then grows by writing in place (``_Cache``);
- each new token is one forward of the model on one position per row, whose attention reads the cache up
  to the current length under a padding mask built once per call; on a GPU the query heads that share a
  kv head attend as a group (``_decode_attention``), so the cache is never repeated, and SDPA's cuDNN
  backend is left out (it plans each new cache length on the host: that, not the GPU, bounded a token);
- a row that produced EOS gets the pad id from then on, as ``generate`` does; whether every row is done is
  asked every ``CHECK_EVERY`` tokens only (the tokens after that are pads either way).

The arithmetic of a new token is ``generate``'s: on a CPU the attention is transformers' own SDPA function
on the same mask, cache length and positions, so the text is identical (tested); on a GPU the grouped heads
run other kernels, so bf16 can flip a near-tied token (measured, docs/benchmarks.md).

Used only where that is the whole story: an architecture whose attention is plain causal
(``targets.plain_decoding``) and a generation config that asks for nothing greedy decoding would skip
(``_plain_config``). Anything else goes through ``generate``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from lora_ablate.attention_impl import implementation, register
from lora_ablate.targets import plain_decoding

CHECK_EVERY = 4  # tokens between asking the host whether every row has stopped
# Of the free GPU memory, what one decoding call's cache may take; the prompt's forward needs the rest. A call's
# cost is mostly per token on the host, whatever its rows, so the fewer and wider the calls the better.
CACHE_SHARE = 0.4
MAX_ROWS = 16384  # rows of one call at most, whatever the memory: the prompt's forward grows with them
_IMPL = "lora_ablate_decode"  # lora_ablate/attention_impl.py: no mask is built for it
_MASK = "lora_ablate_padding"  # the keyword the padding mask travels under, to _decode_attention

# generation settings that change a greedy token (their neutral value); any other value: HF generate decodes
_NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
            "min_new_tokens": (None, 0), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
            "exponential_decay_length_penalty": (None,), "stop_strings": (None,), "watermarking_config": (None,),
            "num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None,),
            "guidance_scale": (None, 1.0), "prompt_lookup_num_tokens": (None,)}


def new_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad_id: int,
               eos_id: int | None) -> torch.Tensor:
    """Greedy continuations [B, <= max_new_tokens] of left-padded ``ids`` / ``mask`` [B, W] (pad_id after a row's
    EOS): ``greedy`` where it gives ``generate``'s tokens, else ``generate`` itself."""
    if fast_decoding(model, ids.shape[1] + max_new_tokens):
        return greedy(model, ids, mask, max_new_tokens, pad_id, eos_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id)
    return out[:, ids.shape[1]:]


def rows_per_call(model, length: int, device) -> int | None:
    """How many rows of up to ``length`` tokens one decoding call holds in ``CACHE_SHARE`` of the free memory
    of a GPU ``device`` (None elsewhere: there time, not memory, bounds a call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = getattr(model, "dtype", torch.bfloat16)
    size = dtype.itemsize if dtype.is_floating_point else 2  # a k-bit base decodes in its 16-bit compute dtype
    per_row = max(1, length) * cfg.num_hidden_layers * 2 * kv * head_dim * size
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_ROWS, int(free * CACHE_SHARE // per_row)))


def fast_decoding(model, length: int) -> bool:
    """Whether ``greedy`` gives ``generate``'s tokens for rows of up to ``length`` tokens on ``model``."""
    return plain_decoding(model, length) and _plain_config(getattr(model, "generation_config", None)) \
        and _register()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad_id: int,
           eos_id: int | None) -> torch.Tensor:
    """The new tokens [B, <= max_new_tokens] of greedy decoding from left-padded ``ids`` / ``mask`` [B, W];
    rows that stopped carry ``pad_id`` after their EOS."""
    B, W = ids.shape
    if max_new_tokens <= 0:
        return ids.new_empty(B, 0)
    if not _register():
        raise RuntimeError(f"attention implementation {_IMPL!r} cannot be registered with this transformers")
    cache_kw = _cache_keyword(model)
    positions = mask.long().cumsum(-1) - 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions.clamp(min=0), use_cache=True,
                logits_to_keep=1)
    cache = _Cache.after_prompt(getattr(out, cache_kw), W + max_new_tokens)
    token = out.logits[:, -1].float().argmax(-1)
    # the padding mask of the whole call: prompt padding, then every new position visible
    padding = torch.ones(B, 1, 1, W + max_new_tokens, dtype=torch.bool, device=ids.device)
    padding[:, 0, 0, :W] = mask.bool()
    no_padding = bool(mask.all())  # then generate passes no mask at all, and so do we
    position = positions[:, -1:] + 1
    live = torch.ones(B, dtype=torch.bool, device=ids.device)
    new, going = [], []  # the tokens, and whether any row was still going after each
    with implementation(model, _IMPL), _no_cudnn_attention(ids.device):
        for t in range(max_new_tokens):
            if eos_id is not None:
                token = torch.where(live, token, pad_id)
                live &= token != eos_id
            new.append(token)
            going.append(live.any())
            if t == max_new_tokens - 1 or (t % CHECK_EVERY == CHECK_EVERY - 1 and not bool(going[-1])):
                break
            length = W + t + 1
            out = model(input_ids=token[:, None], position_ids=position + t, use_cache=True, logits_to_keep=1,
                        **{cache_kw: cache, _MASK: None if no_padding else padding[..., :length]})
            token = out.logits[:, -1].float().argmax(-1)
    # generate stops at the token where the last row stopped: the pads checked past it are dropped
    steps = torch.stack(going).tolist()
    n = steps.index(False) + 1 if False in steps else len(new)
    return torch.stack(new[:n], 1)


class _Cache:
    """Keys and values of every layer in buffers [B, kv heads, capacity, head dim], filled up to ``length``;
    ``update`` is what the attention layers call (transformers' cache protocol)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def after_prompt(cls, prompt_cache, capacity: int) -> "_Cache":
        keys, values = [], []
        length = prompt_cache.layers[0].keys.shape[2]
        for layer in prompt_cache.layers:
            for name, dst in (("keys", keys), ("values", values)):
                src = getattr(layer, name)
                buf = src.new_empty(*src.shape[:2], capacity, src.shape[3])
                buf[:, :, :length] = src
                dst.append(buf)
                setattr(layer, name, None)  # freed as it is copied: the two caches are never both whole
        return cls(keys, values, length)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        n = key.shape[2]
        start = self.length
        self.keys[layer_idx][:, :, start:start + n] = key
        self.values[layer_idx][:, :, start:start + n] = value
        end = start + n
        if layer_idx == len(self.keys) - 1:  # every layer has written this position
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def _decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """One new position per row against the cache, under the call's padding mask (None: no padding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = kwargs.pop(_MASK, None)
    if query.device.type == "cpu" or query.shape[2] != 1 or query.shape[1] == key.shape[1]:
        # transformers' own SDPA call on contiguous keys, as generate's concatenated cache holds them: the same
        # arithmetic as generate's step
        return sdpa_attention_forward(module, query, key.contiguous(), value.contiguous(), mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return grouped_attention(query, key, value, mask, scaling), None


def grouped_attention(query, key, value, mask, scaling) -> torch.Tensor:
    """SDPA of one query position [B, H, 1, D] on keys / values [B, kv, S, D] (GQA: query head h reads kv head
    h // (H / kv), as transformers' ``repeat_kv`` lays them out) with the H / kv query heads of a kv head as
    one group of queries, so the cache is read once and never repeated; [B, 1, H, D] like the model's."""
    B, H, _, D = query.shape
    kv = key.shape[1]
    out = F.scaled_dot_product_attention(query.reshape(B, kv, H // kv, D), key, value, attn_mask=mask,
                                         scale=scaling)
    return out.reshape(B, H, 1, D).transpose(1, 2)


def _no_cudnn_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA without its cuDNN backend while tokens are decoded: the cache grows by one position a token, and
    cuDNN plans every new shape on the host (2 ms a call, 60 ms a token over 30 layers, profiled on an H200),
    while the flash and memory-efficient kernels take any length as it comes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@functools.cache  # once per process
def _register() -> bool:
    return register(_IMPL, _decode_attention)


def _plain_config(gen) -> bool:
    if gen is None:
        return True
    return all(getattr(gen, name, None) in neutral for name, neutral in _NEUTRAL.items())


def _cache_keyword(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``, earlier 5.x ``past_key_values``."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(core).forward).parameters else "past_key_values"
