"""One trial between ask and tell: its params through the Optuna trial, its identity (config key), what it
carries while it trains, and the hooks that send its curves to tracking and its held-out loss to the
pruner."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_ablate.config import Experiment
from lora_ablate.spaces import Space
from lora_ablate.study.settings import Objective
from lora_ablate.tracking import Tracker, TrialRecord
from lora_ablate.trial import TrialHooks, TrialPruned, TrialSpec
from lora_ablate.vocab import SEED_KEY, config_hash


@dataclass
class InFlight:
    trial: object  # optuna.Trial
    params: dict
    record: TrialRecord
    spec: TrialSpec | None = None  # None: the trial could not be built and is failed at once
    run_id: str = ""
    started: float = field(default_factory=time.perf_counter)


def suggest(trial, space: Space, seeds: list[int]) -> dict:
    """Every axis through the trial: enqueued values come back as they are, the others are sampled."""
    for a in space.axes:
        if a.kind in ("grid", "choice"):
            trial.suggest_categorical(a.name, list(a.values))
        elif a.kind in ("uniform", "log_uniform"):
            trial.suggest_float(a.name, a.low, a.high, log=a.kind == "log_uniform")
        else:
            trial.suggest_int(a.name, int(a.low), int(a.high), log=a.kind == "log_int")
    trial.suggest_int("seed", seeds[0], seeds[-1])
    return dict(trial.params)


def config_key(trial_exp: Experiment) -> str:
    """Hash of the trial's resolved settings without its seed: the seeds of one configuration share it."""
    flat = {k: v for k, v in trial_exp.flat().items()
            if k != SEED_KEY and not k.startswith(("study.", "tracking."))}
    return config_hash(flat)


def adapter_dir(staging: Path | None) -> Path | None:
    return staging / "adapter" if staging is not None else None


def size(value) -> float:
    """Order choice values by the memory they need: a rank by itself, targets by how many roles."""
    return len(value.split(",")) if isinstance(value, str) else float(value)


class Hooks(TrialHooks):
    """Live curves to tracking, and intermediate held-out loss to the pruner. ``flights`` (spec name ->
    InFlight) is the runner's own map: a trial that joins a pack later is found in it too."""

    def __init__(self, flights: dict[str, InFlight], tracker: Tracker, objective: Objective, prune: bool):
        self.flights, self.tracker, self.objective, self.prune = flights, tracker, objective, prune

    def on_train_log(self, spec: TrialSpec, step: int, values: dict) -> None:
        self.tracker.log_step(self.flights[spec.name].run_id, step, {f"train/{k}": v for k, v in values.items()})

    def on_eval(self, spec: TrialSpec, step: int, values: dict) -> None:
        flight = self.flights[spec.name]
        self.tracker.log_step(flight.run_id, step, values)
        key = f"{self.objective.set}/nll"
        if not self.prune or key not in values:
            return
        # the pruner compares in the study's direction; NLL falls as a maximised score rises
        value = values[key] if self.objective.direction == "minimize" else -values[key]
        flight.trial.report(value, step)
        if flight.trial.should_prune():
            raise TrialPruned(f"pruned at step {step}: {key}={values[key]:.4f}")
