"""torch.compile for the pack's training steps: compiled copies of the model's repeated blocks, swapped in
only while a step runs."""

from __future__ import annotations

import contextlib

import torch


class _CompiledBlocks:
    """torch.compile'd copies of the model's repeated blocks (one graph serves all layers), swapped into
    their ModuleLists only while training steps run; evaluation and generation use the eager blocks."""

    def __init__(self, model: torch.nn.Module, lists: list[torch.nn.ModuleList]):
        self.model, self.lists = model, lists
        self.eager = [list(ml) for ml in lists]
        # dynamic=False: one specialised graph per shape (packs of different K, width buckets) rather than
        # a dynamic-shape graph after the second shape; the recompile limit is raised to leave room for them
        _raise_recompile_limit(64)
        self.compiled = [[torch.compile(block, dynamic=False) for block in ml] for ml in lists]

    @contextlib.contextmanager
    def active(self):
        # The first block's input (frozen embeddings) would not require grad while every later block's
        # does: a second graph to compile for each shape. Asking for the (unused) embedding gradient costs
        # one activation-gradient through one block and saves that compilation.
        embeddings = self.model.get_input_embeddings()
        hook = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_()) \
            if embeddings is not None else None
        self._swap(self.compiled)
        try:
            yield
        finally:
            self._swap(self.eager)
            if hook is not None:
                hook.remove()

    def restore(self) -> None:
        self._swap(self.eager)

    def _swap(self, blocks) -> None:
        for ml, mods in zip(self.lists, blocks):
            for i, mod in enumerate(mods):
                ml[i] = mod


def _raise_recompile_limit(n: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
        if hasattr(config, name):
            setattr(config, name, max(n, getattr(config, name)))
            return


def _compile_blocks(model: torch.nn.Module) -> _CompiledBlocks | None:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1 and any(isinstance(x, torch.nn.Linear) for x in m.modules())]
    return _CompiledBlocks(model, lists) if lists else None
