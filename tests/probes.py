"""Logits of two fixed texts: how the adapter tests compare a trained model with its stock-peft reload."""

from types import SimpleNamespace

import torch

TEXTS = ("### Instruction:\nReverse the word.\n\n### Response:\nelppa", "the of and 12 apple")


def logits_of(model, tok):
    batch = tok(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


class LogitsProbe:
    """Stands in for the evaluator: the trained model's logits, taken where train_one takes its final report."""

    cfg = SimpleNamespace(every=0)

    def __init__(self, tok):
        self.tok = tok

    def run(self, model, device):
        was = model.training
        model.eval()
        out = logits_of(model, self.tok)
        model.train(was)
        return out
