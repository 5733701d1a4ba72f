"""What a study is, from its experiment and space alone: objective, name, storage, seeds and the settings
every trial shares. Checks only: nothing here writes, loads a model or opens a storage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_ablate.config import Experiment
from lora_ablate.errors import UserError, choices
from lora_ablate.spaces import Space
from lora_ablate.vocab import METRIC_DIRECTIONS, SEED_KEY
from lora_ablate.workspace import optuna_url

GENERATED = ("exact_match", "rouge_l", "squad_match")


@dataclass(frozen=True)
class Objective:
    set: str
    metric: str
    direction: str

    @property
    def name(self) -> str:
        return f"{self.set}/{self.metric}"


def eval_set_name(entry) -> str:
    """The name a held-out set reports its metrics under (as ``data.load_eval_set`` names it)."""
    from lora_ablate.suite import set_name

    return set_name(entry)


def objective_of(exp: Experiment) -> Objective:
    set_name, metric = exp.study.objective.split("/", 1)
    if metric not in METRIC_DIRECTIONS:
        raise UserError(f"study.objective={exp.study.objective!r}: unknown metric {metric!r}; choose one of: "
                        f"{choices(METRIC_DIRECTIONS)}")
    names = [eval_set_name(s) for s in exp.eval.sets]
    if set_name not in names:
        raise UserError(f"study.objective={exp.study.objective!r}: {set_name!r} is not a held-out set of this "
                        f"experiment; choose one of: {choices(names)}")
    if metric in GENERATED and not exp.eval.generate:
        raise UserError(f"study.objective={exp.study.objective!r} scores generations, but eval.generate=false")
    direction = METRIC_DIRECTIONS[metric] if exp.study.direction == "auto" else exp.study.direction
    return Objective(set_name, metric, direction)


def check_study(exp: Experiment, space: Space) -> Objective:
    """Everything about a study that can be wrong before anything is written or loaded."""
    space.check_axes(exp)
    objective = objective_of(exp)
    if exp.study.pruner != "none" and not exp.eval.every:
        raise UserError(f"study.pruner={exp.study.pruner} prunes on intermediate held-out loss; set eval.every=N "
                        f"(e.g. eval.every={max(1, exp.train.steps // 4)})")
    return objective


def study_name(exp: Experiment, space: Space) -> str:
    if exp.study.name:
        return exp.study.name
    model = exp.model.name.rstrip("/").rsplit("/", 1)[-1]
    return f"{space.name}-{Path(model).stem if model.endswith('.gguf') else model}"


def storage_url(exp: Experiment) -> str:
    return exp.study.storage or optuna_url(exp.study.workspace)


def seeds_of(exp: Experiment) -> list[int]:
    return [exp.train.seed + i for i in range(exp.study.seeds)]


def base_config(exp: Experiment, space: Space) -> dict:
    """The settings every trial of the study shares: resuming with different ones would mix two studies."""
    varied = {a.key for a in space.axes} | {SEED_KEY} | ({"lora.r"} if space.budget else set())
    return {k: v for k, v in exp.flat().items()
            if k not in varied and k != "eval.base" and not k.startswith(("study.", "tracking."))}
