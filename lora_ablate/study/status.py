"""``status``: every study in a storage with its trials, read only."""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_ablate.errors import UserError, choices
from lora_ablate.study.schedule import params_of
from lora_ablate.study.storage import open_storage, quiet_optuna
from lora_ablate.workspace import redact


@dataclass
class StudyStatus:
    name: str
    direction: str
    objective: str
    space: str
    trials: list[dict]  # {"number", "state", "params", "value", "reason"}
    workers: list = field(default_factory=list)  # workers.LiveWorker: who has trials RUNNING now


def study_status(url: str, name: str | None = None) -> list[StudyStatus]:
    import optuna

    from lora_ablate.study.workers import live_workers

    quiet_optuna()
    storage = open_storage(url)
    names = sorted(s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False))
    if name is not None:
        if name not in names:
            raise UserError(f"unknown study {name!r} in {redact(url)}; studies there: {choices(names) or '(none)'}")
        names = [name]
    out = []
    for n in names:
        study = optuna.load_study(study_name=n, storage=storage)
        rows = [{"number": t.number, "state": t.state.name, "params": params_of(t), "value": t.value,
                 "reason": t.user_attrs.get("fail_reason", "")} for t in study.get_trials(deepcopy=False)]
        out.append(StudyStatus(n, study.direction.name.lower(), study.user_attrs.get("objective", ""),
                               study.user_attrs.get("space", ""), rows, live_workers(storage, study)))
    return out
