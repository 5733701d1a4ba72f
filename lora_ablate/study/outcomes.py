"""What a study invocation reports: each trial's outcome (a line and the progress bar, as it is told), the
report of the invocation and the summary its parent run records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lora_ablate.study.settings import Objective
from lora_ablate.trial import TrialResult
from lora_ablate.vocab import FINAL_STATES, State, format_value


@dataclass
class TrialOutcome:
    number: int
    params: dict
    state: str  # one of FINAL_STATES
    value: float | None = None
    reason: str = ""
    seconds: float = 0.0
    run_id: str = ""
    result: TrialResult | None = None


@dataclass
class StudyReport:
    name: str
    storage: str
    objective: Objective
    outcomes: list[TrialOutcome] = field(default_factory=list)  # in the order the trials were told
    remaining: int = 0  # trials the space still needs after this invocation
    best: dict | None = None  # {"number", "value", "params"} over the whole study
    counts: dict = field(default_factory=dict)  # trial state -> number, whole study
    base: dict = field(default_factory=dict)  # the base model's held-out metrics, {"<set>/<metric>": value}


def best_value(study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None


def best_trial(study) -> dict | None:
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {"number": best.number, "value": best.value, "params": best.params}


def study_summary(study) -> dict[str, float]:
    """The parent run's closing metrics: trials per final state over the whole study, and the best value."""
    trials = study.get_trials(deepcopy=False)
    summary = {f"trials/{s.lower()}": float(sum(t.state.name == s for t in trials)) for s in FINAL_STATES}
    best = best_value(study)
    if best is not None:
        summary["trials/best_value"] = best  # not best/value: the UI charts a section per prefix, by name
    return summary


def describe(o: TrialOutcome, objective: Objective) -> str:
    params = " ".join(f"{k}={format_value(v)}" for k, v in o.params.items())
    if o.state == State.COMPLETE:
        what = f"{objective.name}={o.value:.4f}"
    else:
        what = f"{o.state}: {o.reason}"
    return f"trial {o.number} [{params}] {what} ({o.seconds:.0f} s)"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def remaining_line(elapsed: float, done: int, total: int) -> str:
    """What the study's remaining trials will take at the pace so far (the model's load not counted, and
    a pack's trials overlap, so it is the invocation's wall clock per trial told)."""
    left = total - done
    if left <= 0 or done <= 0:
        return ""
    return (f"estimated time left: about {duration(elapsed / done * left)} for {left} more "
            f"trial{'s' if left != 1 else ''} ({duration(elapsed / done)} a trial so far)")


class Progress:
    """The study's progress bar over this invocation's trials, and one printed line per trial as it is told."""

    def __init__(self, name: str, total: int, objective: Objective, enabled: bool, clock=time.monotonic):
        from tqdm.auto import tqdm

        self.objective, self.total, self.clock = objective, total, clock
        self.started, self.done = clock(), 0
        self.bar = tqdm(total=total, desc=f"study {name}", unit="trial", disable=not enabled, dynamic_ncols=True)

    def told(self, outcome: TrialOutcome, best: float | None) -> None:
        self.bar.update(1)
        self.done += 1
        if best is not None:
            self.bar.set_postfix_str(f"best {self.objective.name}={best:.4f}")
        self.bar.write(describe(outcome, self.objective))
        if self.done == 1 and not self.bar.disable:
            line = remaining_line(self.clock() - self.started, self.done, self.total)
            if line:
                self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
