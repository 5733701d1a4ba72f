"""Everything a trial needs that does not change between trials: the frozen base, the tokenised training
data and the held-out evaluator. Built once per worker; bad input is found before the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ablate.config import DataConfig, EvalConfig, Experiment, ModelConfig
from lora_ablate.data import Encoded, EvalSet, Example, encode_all, load_eval_sets, load_train
from lora_ablate.evaluation import Evaluator
from lora_ablate.leakage import Leakage, check
from lora_ablate.models import LoadedModel, load_base


@dataclass
class Context:
    base: LoadedModel
    train: Encoded
    evaluator: Evaluator


def _setup_data(data: DataConfig, ev: EvalConfig, with_train: bool = True) -> tuple[list[Example], list[EvalSet]]:
    return (load_train(data) if with_train else []), load_eval_sets(ev, data)


def check_leakage(exp: Experiment, echo=print) -> Leakage:
    """What a train or study checks before it starts: its training records against its held-out sets."""
    return check(load_train(exp.data), load_eval_sets(exp.eval, exp.data), exp.data.max_leakage, echo)


def _setup_model(model: ModelConfig) -> LoadedModel:
    return load_base(model)


def build_context(exp: Experiment, targets=None, with_train: bool = True, rank: int | None = None) -> Context:
    """Data first (cheap, fails fast on a bad file), then the model, then targets and tokenisation.

    ``with_train=False`` (evaluating a saved adapter) skips the training records: ``train`` is empty.
    ``rank`` is the largest lora.r to be trained (default: the experiment's when it trains).
    """
    from lora_ablate.targets import check_targets

    examples, sets = _setup_data(exp.data, exp.eval, with_train)
    base = _setup_model(exp.model)
    if rank is None and with_train and not targets:
        rank = exp.lora.r
    check_targets(base.model, targets or [exp.lora.targets], rank, exp.lora.fused_subset)
    train = encode_all(examples, base.tokenizer, exp.data.template, exp.data.max_length)
    return Context(base, train, Evaluator(sets, base.tokenizer, exp.data, exp.eval))
