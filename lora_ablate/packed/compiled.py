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
        self.compiled = [[torch.compile(block) for block in ml] for ml in lists]

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


def _compile_blocks(model: torch.nn.Module) -> _CompiledBlocks | None:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1 and any(isinstance(x, torch.nn.Linear) for x in m.modules())]
    return _CompiledBlocks(model, lists) if lists else None
