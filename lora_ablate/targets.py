"""Map LoRA target roles (q, k, v, o, mlp) to the module names of a concrete architecture.

This is the one place in the project that knows architecture-specific module names. Everything
else speaks in roles; :func:`resolve_targets` turns a role subset into a :class:`TargetPlan` whose
``target_modules`` regex goes straight into ``peft.LoraConfig`` (peft ``re.fullmatch``-es a string
``target_modules`` against every full module name) and whose ``module_names`` list exactly the
layers that regex adapts.

Fused q/k/v. Some architectures (gpt2 ``c_attn``, gpt_neox ``query_key_value``, phi3 ``qkv_proj``)
compute q, k and v with one matrix. LoRA on that matrix adapts all three projections at once, so
"q and v only" cannot be expressed there. Silently adapting k as well would make an ablation row
mean something different on such models than on llama, and slicing the adapter output per
projection is beyond what peft offers, so a role subset that covers only part of a fused matrix is
REFUSED with a one-line :class:`UserError`. Asking for all of q, k and v (with or without o and mlp)
maps to the fused module, whose role in ``TargetPlan.role_of`` is ``"qkv"``.
With ``fused_subset="rows"`` (``lora.fused_subset``) a subset is expressible after all, in the standard peft
format: one adapter on the fused matrix with rank r per adapted role, where the trainer holds B's rows of the
roles left out at exactly zero; ``TargetPlan.fused_rows`` says which output rows each role owns, from the
architecture's own split of the matrix (``_FUSED_LAYOUTS``: [q|k|v] blocks, per head, or per kv group).

Architectures the table does not list. Their roles are inferred from the repeated decoder block's module
names and shapes, checked against the config (hidden size, heads, kv heads, head dim): either separate q, k,
v (and o) projections under the common names (``q_proj``/``query``/``q``, ...) with widths heads x head dim
and kv heads x head dim, or one fused matrix whose output width is q + 2 kv. Only what both names and shapes
make certain is adapted; a role they leave ambiguous is refused when asked for, naming the modules and the
rule that failed. The row layout of an inferred fused matrix is never guessed (per head interleaved or in
q|k|v blocks cannot be told from shapes), so only all of q, k, v together is offered there.

Module-name suffixes are matched on whole dotted components, so ``q_proj`` matches
``model.layers.0.self_attn.q_proj`` but not ``xq_proj``. Where a bare name is ambiguous the suffix
carries its parent (gpt2 has both ``attn.c_proj`` and ``mlp.c_proj``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.pytorch_utils import Conv1D

from lora_ablate.errors import UserError, choices
from lora_ablate.vocab import ROLES, canonical_roles, unknown_roles

FUSED = "qkv"
_QKV = ("q", "k", "v")

_LLAMA_LIKE = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}

# model_type -> role -> module-name suffixes. Fused architectures have a "qkv" role instead of q, k, v.
# "gemma3" (the multimodal wrapper) is deliberately absent: its vision tower has q_proj too.
_ARCHITECTURES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "opt": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("out_proj",), "mlp": ("fc1", "fc2")},
    "phi": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("self_attn.dense",),
            "mlp": ("mlp.fc1", "mlp.fc2")},
    "gpt2": {FUSED: ("attn.c_attn",), "o": ("attn.c_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "gpt_neox": {FUSED: ("attention.query_key_value",), "o": ("attention.dense",),
                 "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")},
    "phi3": {FUSED: ("qkv_proj",), "o": ("o_proj",), "mlp": ("gate_up_proj", "down_proj")},
}

KNOWN_ARCHITECTURES = tuple(sorted(_ARCHITECTURES))

# Architectures whose logits are exactly ``lm_head(get_decoder()(...).last_hidden_state)``: no soft-capping or
# scaling after the head (gemma2 and gemma3 soft-cap their logits, so they are absent).
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"})


# Architectures whose attention is plain causal softmax attention over every earlier position (no soft-capping,
# no attention sinks, no chunked attention), so decoding may bring its own cache and padding mask
# (lora_ablate/decode.py): only a sliding window, when one is on, limits it to rows no longer than the window.
_PLAIN_DECODING = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class TargetPlan:
    architecture: str
    roles: tuple[str, ...]
    target_modules: str
    module_names: tuple[str, ...]
    role_of: dict = field(hash=False)  # a dict cannot be hashed; the other fields identify the plan
    shapes: dict = field(hash=False, default_factory=dict)  # module name -> (out, in) features
    table: dict = field(default=None, hash=False, compare=False)  # role -> suffixes; None: _ARCHITECTURES'
    inferred: bool = False  # the table came from the model's names and shapes, not from _ARCHITECTURES
    # fused_subset="rows": fused module name -> {adapted role: its output rows}; empty when no part is adapted
    fused_rows: dict = field(default_factory=dict, hash=False, compare=False)

    def rank_error(self, r: int) -> str:
        """Why rank ``r`` cannot adapt every module ('' if it can): B·A has rank at most the smaller side of
        the layer, so a larger r only trains (and saves) parameters that cannot change the update."""
        if not self.shapes:
            return ""
        name, shape = min(self.shapes.items(), key=lambda kv: min(kv[1]))
        if r <= min(shape):
            return ""
        return (f"lora.r={r} is above the rank of target module {name!r} ({shape[0]}x{shape[1]}, out x in); "
                f"use lora.r <= {min(shape)} on this model")

    def _label(self, role: str) -> str:
        if role == FUSED and self.fused_rows:  # e.g. "q+v rows of" the fused matrix
            return "+".join(r for r in _QKV if r in self.roles) + " rows of " + FUSED
        return role

    @property
    def fused_suffix(self) -> str | None:
        """The fused matrix's suffix when only part of it is adapted (its adapter then has rank r per role)."""
        return (self.table or _ARCHITECTURES[self.architecture])[FUSED][0] if self.fused_rows else None

    def describe(self) -> str:
        """One line, e.g. ``llama: q->q_proj, v->v_proj (60 modules)``."""
        table = self.table or _ARCHITECTURES[self.architecture]
        parts = [f"{self._label(role)}->{'+'.join(table[role])}" for role in _table_roles(self.roles, table)]
        arch = f"{self.architecture} (inferred)" if self.inferred else self.architecture
        return f"{arch}: {', '.join(parts)} ({len(self.module_names)} modules)"


def role_names(model_type: str) -> dict[str, tuple[str, ...]]:
    """Role -> module-name suffixes for a known architecture (fused ones have a "qkv" key, not q/k/v)."""
    if model_type not in _ARCHITECTURES:
        raise UserError(f"unknown architecture {model_type!r}; known architectures: {choices(KNOWN_ARCHITECTURES)}")
    return dict(_ARCHITECTURES[model_type])


def plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(decoder, head weight [V, d]) when the model's logits are exactly the decoder's final states times the
    head's weight transposed, so a loss may skip materialising them; None for any other model."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PLAIN_HEAD:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:  # noqa: E721 - a subclass may do more
        return None
    return model.get_decoder(), head.weight


def plain_decoding(model: torch.nn.Module, length: int) -> bool:
    """Whether rows of up to ``length`` tokens of ``model`` attend every earlier position of their own row under
    transformers' SDPA attention: the decoding of lora_ablate/decode.py is then exactly the model's."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_DECODING or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return window is None or length <= window


def linear_module_suffixes(model: torch.nn.Module) -> list[str]:
    """Sorted unique last name parts of every Linear/Conv1D layer (peft wrappers seen through)."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model)})


def resolve_targets(model: torch.nn.Module, roles: Sequence[str], fused_subset: str = "refuse") -> TargetPlan:
    """The modules of ``model`` that LoRA on ``roles`` adapts, and the peft regex that selects them.

    ``fused_subset="rows"``: a subset of q, k, v on a fused matrix adapts that matrix, and the plan's
    ``fused_rows`` say which output rows each adapted role owns (the trainer keeps the others' B rows zero)."""
    roles = _canonical_roles(roles)
    arch = getattr(getattr(model, "config", None), "model_type", None)
    inferred = arch not in _ARCHITECTURES
    if inferred:
        table, problems = _infer_table(model, arch)
        asked = [r for r in roles if r not in table and not (r in _QKV and FUSED in table)]
        if asked:
            why = problems.get(asked[0]) or problems.get("attention") or f"no module plays role {asked[0]}"
            raise UserError(
                f"unknown architecture {arch!r}: no role -> module mapping for it (known architectures: "
                f"{choices(KNOWN_ARCHITECTURES)}) and target {asked[0]} cannot be inferred: {why}; its linear "
                f"modules are: {choices(linear_module_suffixes(model))}")
    else:
        table = _ARCHITECTURES[arch]
    partial = FUSED in table and 0 < len([r for r in _QKV if r in roles]) < len(_QKV)
    if partial and fused_subset == "rows" and arch not in _FUSED_LAYOUTS:
        raise UserError(f"{arch} fuses q, k and v in one matrix ({choices(table[FUSED])}) whose row layout per role "
                        f"is not known for {arch}; targets [{', '.join(roles)}] need it: use all of q, k, v or none")
    if not (partial and fused_subset == "rows"):
        _refuse_partial_fused(arch, roles, table)

    linear = _linear_modules(model)
    role_of: dict[str, str] = {}
    for role in _table_roles(roles, table):
        hits = {s: [name for name, _ in linear if _has_suffix(name, s)] for s in table[role]}
        missing = [s for s, names in hits.items() if not names]
        if missing:
            asked = "q, k, v" if role == FUSED else role
            raise UserError(
                f"target {asked} maps to {choices(table[role])} on {arch}, but this model has no module named "
                f"{' or '.join(missing)}; its linear modules are: {choices(linear_module_suffixes(model))}")
        role_of.update((name, role) for names in hits.values() for name in names)

    suffixes = [s for role in _table_roles(roles, table) for s in table[role]]
    # (?:.*\.)? anchors each suffix on a dotted component whatever the prefix (bare or peft-wrapped model)
    pattern = r"(?:.*\.)?(?:" + "|".join(re.escape(s) for s in suffixes) + r")"
    names = tuple(name for name, _ in linear if name in role_of)
    fused_rows = {}
    if partial:
        for name in names:
            if _has_suffix(name, table[FUSED][0]):
                rows = _FUSED_LAYOUTS[arch](_config_shape(model.config)[0], _features_of(_base(model, name))[1],
                                            model.config)
                fused_rows[name] = {r: rows[r] for r in _QKV if r in roles}
                role_of[name] = FUSED
    shapes = {name: _features(module) for name, module in linear if name in role_of}
    return TargetPlan(arch, roles, pattern, names, {name: role_of[name] for name in names}, shapes,
                      table=dict(table) if inferred or partial else None, inferred=inferred, fused_rows=fused_rows)


def check_targets(model: torch.nn.Module, target_sets: Sequence[Sequence[str]], rank: int | None = None,
                  fused_subset: str = "refuse") -> None:
    """Refuse, as one UserError line, a subset of ``target_sets`` that does not resolve on ``model``, or a
    lora.r ``rank`` above the rank of a module it adapts (None: no rank to check): what train and study refuse
    before they write anything. Only module names, shapes and the config are read, so the meta-device
    skeleton of ``models.check_base`` answers as the loaded model does: a parent that only starts workers
    refuses the same input without loading the weights."""
    for roles in target_sets:
        plan = resolve_targets(model, roles, fused_subset)
        if rank is not None and (error := plan.rank_error(rank)):
            raise UserError(error)


def _features(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) features of a Linear or Conv1D, seen through a peft wrapper (a 4-bit weight is packed, so
    not its shape)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    in_f, out_f = _features_of(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)
    return out_f, in_f


def _canonical_roles(roles: Sequence[str]) -> tuple[str, ...]:
    if isinstance(roles, str):
        roles = [roles]
    bad = unknown_roles(roles)
    if bad:
        raise UserError(f"unknown target role {bad[0]!r}; choose a subset of: {choices(ROLES)}")
    if not roles:
        raise UserError(f"no target roles given; choose a non-empty subset of: {choices(ROLES)}")
    return canonical_roles(roles)


def _refuse_partial_fused(arch: str, roles: tuple[str, ...], table: dict) -> None:
    if FUSED not in table:
        return
    asked = [r for r in _QKV if r in roles]
    if asked and len(asked) < len(_QKV):
        extra = " and ".join(r for r in _QKV if r not in asked)
        raise UserError(
            f"{arch} fuses q, k and v in one matrix ({choices(table[FUSED])}); targets [{', '.join(roles)}] "
            f"would adapt {extra} too: use all of q, k, v together or none of them")


def _table_roles(roles: tuple[str, ...], table: dict) -> list[str]:
    """The table keys for ``roles``: q, k, v collapse into "qkv" on fused architectures."""
    if FUSED not in table:
        return list(roles)
    out = [FUSED] if any(r in roles for r in _QKV) else []
    return out + [r for r in roles if r not in _QKV]


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(full name, layer) of every Linear/Conv1D in model order.

    On a peft-wrapped model an adapted layer is a lora.Linear holding the original as ``base_layer``
    next to its own ``lora_A``/``lora_B`` Linears; report the wrapper under its own name (the name
    peft matches) and skip its insides, so a second adapter resolves to the same layers as the first.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save copies, trainable tokens

    out, inside = [], None
    for name, module in model.named_modules():
        # named_modules is depth-first, so a wrapper's insides follow it directly
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        layer = module
        if isinstance(module, BaseTunerLayer):
            layer, inside = module.get_base_layer(), name + "."
        elif isinstance(module, AuxiliaryTrainingWrapper):
            layer, inside = getattr(module, "original_module", None), name + "."
        if isinstance(layer, (torch.nn.Linear, Conv1D)):
            out.append((name, module))
    return out


# the common names of separate projections; "dense" and "c_proj" count as o only inside an attention block
_SEPARATE_NAMES = {"q": ("q_proj", "query", "q", "wq"), "k": ("k_proj", "key", "k", "wk"),
                   "v": ("v_proj", "value", "v", "wv"), "o": ("o_proj", "out_proj", "dense", "c_proj", "o", "wo")}
_LAYER = re.compile(r"^(.*)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Shape:
    hidden: int
    heads: int
    head_dim: int
    kv_heads: tuple[int, ...]  # every kv-head count the config states (falcon states several)

    def describe(self, kv: int | None = None) -> str:
        kvs = kv if kv is not None else "/".join(map(str, self.kv_heads))
        return f"hidden {self.hidden}, heads {self.heads}, kv heads {kvs}, head dim {self.head_dim}"


def _config_shape(config) -> tuple[_Shape | None, str]:
    def first(*names):
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "n_heads")
    if hidden is None or heads is None:
        return None, "its config states no hidden size and number of attention heads to check shapes against"
    head_dim = first("head_dim") or hidden // heads
    kv = {heads}
    for n in ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"):
        if first(n):
            kv.add(first(n))
    if getattr(config, "multi_query", False):  # falcon, gpt_bigcode: one k and one v head
        kv.add(1)
    return _Shape(hidden, heads, head_dim, tuple(sorted(kv))), ""


def _infer_table(model: torch.nn.Module, arch) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(role -> layer-relative suffixes, role -> why it could not be inferred) for an unlisted architecture.

    The problems key "attention" explains a failure that leaves q, k, v and o all unknown."""
    if arch is None:
        return {}, {"attention": "the model has no config.model_type"}
    shape, why = _config_shape(getattr(model, "config", None))
    if shape is None:
        return {}, {"attention": why}
    layer0 = _first_block(model)
    if layer0 is None:
        return {}, {"attention": "no repeated decoder block (modules named <blocks>.<i>.<name>) holds linear layers"}
    blocks, n_layers, layer = layer0
    table, problems = {}, {}

    attn_parent = _infer_separate(layer, shape, table, problems)
    if attn_parent is None:
        attn_parent = _infer_fused(layer, shape, table, problems)
    if attn_parent is not None:
        _infer_mlp(layer, attn_parent, table, problems)
    # a suffix that also names modules outside the block stack (a vision tower, a second stack) is not certain
    linear = _linear_modules(model)
    for role, suffixes in list(table.items()):
        for s in suffixes:
            hits = [n for n, _ in linear if _has_suffix(n, s)]
            if len(hits) != n_layers or any(not n.startswith(blocks + ".") for n in hits):
                del table[role]
                problems[role] = (f"{s} names {len(hits)} modules, not exactly one in each of the {n_layers} "
                                  f"blocks of {blocks}")
                break
    return table, problems


def _first_block(model) -> tuple[str, int, dict[str, torch.nn.Module]] | None:
    """(block stack prefix, number of blocks, layer-relative name -> linear layer of block 0) of the stack with
    the most blocks."""
    stacks: dict[str, dict[int, dict[str, torch.nn.Module]]] = {}
    for name, module in _linear_modules(model):
        m = _LAYER.match(name)
        if m:
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            stacks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = layer
    if not stacks:
        return None
    prefix = max(stacks, key=lambda p: len(stacks[p]))
    return prefix, len(stacks[prefix]), stacks[prefix][min(stacks[prefix])]


def _features_of(layer) -> tuple[int, int]:
    """(in, out) of a Linear or a transformers Conv1D (which stores its weight [in, out])."""
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return int(layer.in_features), int(layer.out_features)


def _shapes(layer: dict[str, torch.nn.Module], names) -> str:
    return ", ".join(f"{n} [{_features_of(layer[n])[1]}x{_features_of(layer[n])[0]}]" for n in names)


def _siblings(layer: dict, parent: str) -> list[str]:
    return [n for n in layer if n.rpartition(".")[0] == parent]


def _infer_separate(layer: dict, shape: _Shape, table: dict, problems: dict) -> str | None:
    """Separate q, k, v (and o) projections under one parent; returns that parent, or None."""
    by_parent: dict[str, dict[str, list[str]]] = {}
    for name in layer:
        parent, _, leaf = name.rpartition(".")
        for role, leaves in _SEPARATE_NAMES.items():
            if leaf in leaves:
                by_parent.setdefault(parent, {}).setdefault(role, []).append(name)
    candidates = [p for p, roles in by_parent.items() if all(len(roles.get(r, [])) == 1 for r in _QKV)]
    if not candidates:
        problems["attention"] = "no block holds exactly one each of q_proj/query/q, k_proj/key/k, v_proj/value/v"
        return None
    if len(candidates) > 1:
        problems["attention"] = f"several parents hold q/k/v projections ({choices(candidates)})"
        return None
    parent = candidates[0]
    q, k, v = (by_parent[parent][r][0] for r in _QKV)
    qw = shape.heads * shape.head_dim
    (q_in, q_out), (k_in, k_out), (v_in, v_out) = (_features_of(layer[n]) for n in (q, k, v))
    kv = k_out // shape.head_dim if k_out % shape.head_dim == 0 else None
    rule = (f"q out = heads x head dim = {qw}, k and v out = kv heads x head dim, in = hidden {shape.hidden} "
            f"({shape.describe()})")
    if not (q_out == qw and k_out == v_out and kv in shape.kv_heads
            and q_in == k_in == v_in == shape.hidden):
        problems["attention"] = f"{_shapes(layer, (q, k, v))} break the rule {rule}"
        return None
    table.update(q=(q,), k=(k,), v=(v,))
    _infer_o(layer, parent, shape, (q, k, v), by_parent[parent].get("o", []), table, problems)
    return parent


def _infer_o(layer: dict, parent: str, shape: _Shape, taken, named: list[str], table: dict, problems: dict) -> None:
    want = (shape.heads * shape.head_dim, shape.hidden)
    fits = [n for n in _siblings(layer, parent) if n not in taken and _features_of(layer[n]) == want]
    by_name = [n for n in fits if n in named]
    pick = by_name if len(by_name) == 1 else fits
    if len(pick) == 1:
        table["o"] = (pick[0],)
    else:
        others = [n for n in _siblings(layer, parent) if n not in taken]
        problems["o"] = (f"the o projection must be the one linear layer next to q/k/v in {parent} with in = "
                         f"heads x head dim = {want[0]} and out = hidden {want[1]}; found "
                         f"{len(pick)} among: {_shapes(layer, others) or 'none'}")


def _infer_fused(layer: dict, shape: _Shape, table: dict, problems: dict) -> str | None:
    """One matrix of output width q + 2 kv (for a kv-head count the config states); returns its parent."""
    widths = {shape.head_dim * (shape.heads + 2 * kv): kv for kv in shape.kv_heads}
    fits = [n for n in layer if _features_of(layer[n])[0] == shape.hidden and _features_of(layer[n])[1] in widths]
    if len(fits) != 1:
        rule = " or ".join(f"{w} (kv heads {kv})" for w, kv in widths.items())
        separate = problems.get("attention", "")
        problems["attention"] = (
            f"{separate}; and {'no' if not fits else 'more than one'} linear layer of a block has in = hidden "
            f"{shape.hidden} and the fused q/k/v output width q + 2 kv = {rule} ({shape.describe()})"
            + (f": {_shapes(layer, fits)}" if fits else f"; the block's layers: {_shapes(layer, layer)}"))
        return None
    problems.pop("attention", None)
    fused = fits[0]
    table[FUSED] = (fused,)
    parent = fused.rpartition(".")[0]
    _infer_o(layer, parent, shape, (fused,), [n for n in _siblings(layer, parent)
                                              if n.rpartition(".")[2] in _SEPARATE_NAMES["o"]], table, problems)
    return parent


def _infer_mlp(layer: dict, attn_parent: str, table: dict, problems: dict) -> None:
    """The block's other linear layers are its MLP when they all sit in the block or under one child of it."""
    rest = [n for n in layer if n.rpartition(".")[0] != attn_parent and n not in sum(table.values(), ())]
    parents = {n.rpartition(".")[0] for n in rest}
    if len(rest) >= 2 and len(parents) == 1 and "." not in next(iter(parents)):  # "" is the block itself (opt)
        table["mlp"] = tuple(rest)
    else:
        problems["mlp"] = (f"the MLP must be the block's other linear layers (at least two), all in the block or "
                           f"all under one child of it; found: {choices(rest) or 'none'}")


def _base(model, name):
    layer = model.get_submodule(name)
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _blocks(shape: _Shape, width: int, config) -> dict[str, torch.Tensor]:
    """[q | k | v], each head-major: gpt2 c_attn, phi3 qkv_proj, falcon multi-query."""
    idx, q = torch.arange(width), shape.heads * shape.head_dim
    kv = (width - q) // 2
    return {"q": idx[:q], "k": idx[q:q + kv], "v": idx[q + kv:]}


def _per_head(shape: _Shape, width: int, config) -> dict[str, torch.Tensor]:
    """[heads, (q, k, v), head dim]: gpt_neox, bloom, falcon without multi-query."""
    grid = torch.arange(width).view(shape.heads, 3, shape.head_dim)
    return {r: grid[:, i].reshape(-1) for i, r in enumerate(_QKV)}


def _falcon(shape: _Shape, width: int, config) -> dict[str, torch.Tensor]:
    if getattr(config, "new_decoder_architecture", False):  # [kv groups, (q..., k, v), head dim]
        kv = (width // shape.head_dim - shape.heads) // 2
        grid = torch.arange(width).view(kv, shape.heads // kv + 2, shape.head_dim)
        return {"q": grid[:, :-2].reshape(-1), "k": grid[:, -2].reshape(-1), "v": grid[:, -1].reshape(-1)}
    return _blocks(shape, width, config) if getattr(config, "multi_query", False) else _per_head(shape, width, config)


# model_type -> the output rows of q, k and v in its fused matrix, as its attention splits them
_FUSED_LAYOUTS = {"gpt2": _blocks, "phi3": _blocks, "gpt_neox": _per_head, "bloom": _per_head, "falcon": _falcon}
