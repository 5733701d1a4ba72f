"""The words study and export share: target roles, trial states, metric directions, how a param value is
shown and how a configuration is keyed.

Both sides meet only in the stores (Optuna, MLflow), so each word is defined here once rather than kept in
step by docstrings. Imports nothing heavy: ``export`` and ``status`` run without torch.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from enum import StrEnum
from typing import Iterable

ROLES = ("q", "k", "v", "o", "mlp")
# Seed is the repeat axis: a trial param (``train.seed`` in the config), never an ablation axis.
SEED_PARAM, SEED_KEY = "seed", "train.seed"
DERIVED_PARAMS = ("scaling", "trainable_params")  # trial params that follow from the others


def canonical_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """The roles of ``roles`` in q,k,v,o,mlp order, each once, so that [v, q] and [q, v] are one
    configuration; a name that is no role is left out (check with :func:`unknown_roles`)."""
    given = set(roles)
    return tuple(r for r in ROLES if r in given)


def unknown_roles(roles: Iterable[str]) -> list[str]:
    return [r for r in roles if r not in ROLES]


def targets_text(roles: Iterable[str]) -> str:
    """The tracking form of a role set, as Optuna and MLflow store it: ``q,v``."""
    return ",".join(canonical_roles(roles))


def role_order(text: str) -> tuple:
    """Sort key of a targets value (``q,v``): fewer roles first, then by role order."""
    roles = str(text).split(",")
    return len(roles), [ROLES.index(r) if r in ROLES else len(ROLES) for r in roles], str(text)


def format_value(v) -> str:
    """A param value as people read it: floats to four significant digits, which tells sampled learning
    rates apart and is what ``compare --a/--b`` accepts back (export's tables, ``status``, trial lines)."""
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return f"{v:.4g}"
    return str(v)


# The held-out metrics a study may optimise, and the way each one improves.
METRIC_DIRECTIONS = {"nll": "minimize", "ppl": "minimize", "exact_match": "maximize", "rouge_l": "maximize",
                     "squad_match": "maximize"}
LOWER_IS_BETTER = ("loss",)  # training curves: not an objective, but they go down


def metric_direction(metric: str) -> str:
    """``<set>/<metric>`` (or a bare metric) -> minimize or maximize: losses go down, scores go up."""
    name = metric.rsplit("/", 1)[-1]
    return METRIC_DIRECTIONS.get(name) or ("minimize" if name in LOWER_IS_BETTER else "maximize")


def config_hash(settings: dict) -> str:
    """The key of a configuration: a short hash of its settings (the seeds of one configuration share it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class State(StrEnum):
    """A trial's state, by Optuna's names; what the ``lora_ablate.state`` tag and the reports say."""

    WAITING = "WAITING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAIL = "FAIL"
    PRUNED = "PRUNED"

    @property
    def run_status(self) -> str:
        """The MLflow run status of a trial that ended so (a pruned trial was stopped on purpose: KILLED)."""
        return RUN_STATUS.get(self, "FAILED")

    @classmethod
    def of_run(cls, status: str) -> State:
        """The state of a trial run by its MLflow status alone (a run lacking the state tag); an unfinished
        run is RUNNING (a worker still busy, or killed)."""
        return next((s for s, st in RUN_STATUS.items() if st == status), cls.RUNNING)



FINAL_STATES = (State.COMPLETE, State.FAIL, State.PRUNED)  # what a trial of one invocation ends as
RUN_STATUS = {State.COMPLETE: "FINISHED", State.FAIL: "FAILED", State.PRUNED: "KILLED"}
_WORDS = {State.COMPLETE: "complete", State.FAIL: "failed", State.PRUNED: "pruned", State.RUNNING: "unfinished"}


def state_word(state: str) -> str:
    """How a report says a state: ``3 failed, 1 unfinished``."""
    return _WORDS.get(state, str(state).lower())
