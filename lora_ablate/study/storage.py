"""The Optuna side of a study: the storage, the study itself (created, or loaded and checked against this
run's settings), its sampler and pruner."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

from lora_ablate.config import Experiment
from lora_ablate.errors import UserError
from lora_ablate.spaces import Space
from lora_ablate.study import heartbeat
from lora_ablate.study.settings import Objective, base_config, storage_url, study_name
from lora_ablate.workspace import optuna_db, redact

# what SQLite, SQLAlchemy and MLflow say, in the chain of whatever they raise, when a store cannot be written
_UNWRITABLE = ("database or disk is full", "readonly database", "read-only file system", "disk i/o error",
               "no space left on device", "unable to open database file")
_UNWRITABLE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def unwritable(error: BaseException) -> str | None:
    """Why a store could not be written (a full disk, a read-only store), from the chain of ``error``; None
    when the error is something else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _UNWRITABLE_ERRNOS:
            return os.strerror(error.errno)
        text = str(error).lower()
        found = next((u for u in _UNWRITABLE if u in text), None)
        if found:
            return found
        error = error.__cause__ or error.__context__
    return None


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeat with ask/tell, enqueued trials, multivariate TPE: all marked experimental, all intended
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def open_storage(url: str):
    import optuna
    import sqlalchemy.exc

    # the heartbeat thread writes while the main thread does: give SQLite time instead of "locked"
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.HEARTBEAT_S,
                                          grace_period=heartbeat.GRACE_S)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open Optuna storage {redact(url)}: {first}") from None


def sampler(space: Space, exp: Experiment, n_trials_before: int):
    import optuna

    # seeded, but differently per invocation: a resumed study must not redraw its first random samples
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                      n_startup_trials=space.startup_trials, seed=exp.train.seed + n_trials_before)


def pruner(exp: Experiment):
    import optuna

    if exp.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=exp.eval.every)
    if exp.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=exp.eval.every, max_resource=exp.train.steps)
    return optuna.pruners.NopPruner()


def study_exists(exp: Experiment, space: Space) -> bool:
    """Whether the storage already holds this run's study; creates no study (nor a workspace that is not there)."""
    import optuna

    if not exp.study.storage and not optuna_db(exp.study.workspace).exists():
        return False
    return study_name(exp, space) in optuna.study.get_all_study_names(open_storage(storage_url(exp)))


def load_or_create(exp: Experiment, space: Space, objective: Objective):
    """(study, storage): the study of this name, created with this run's settings, or loaded if they match."""
    import optuna

    url = storage_url(exp)
    if not exp.study.storage:
        Path(exp.study.workspace).mkdir(parents=True, exist_ok=True)
    storage = open_storage(url)
    name = study_name(exp, space)
    existing = name in optuna.study.get_all_study_names(storage)
    n_before = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)) if existing else 0
    study = optuna.create_study(storage=storage, study_name=name, direction=objective.direction,
                                sampler=sampler(space, exp, n_before), pruner=pruner(exp), load_if_exists=True)
    study.set_metric_names([objective.name])  # optuna-dashboard's axis says what it is, not "Objective 0"
    shared = base_config(exp, space)
    # a study that never got a trial (its first run was stopped before one) takes this run's settings
    if not existing or (n_before == 0 and study.direction.name.lower() == objective.direction):
        for key, value in {"space": space.name, "kind": space.kind, "objective": objective.name,
                           "base_config": shared}.items():
            study.set_user_attr(key, value)
        return study, storage
    attrs = study.user_attrs
    mine = f"{objective.name} ({objective.direction})"
    theirs = f"{attrs.get('objective')} ({study.direction.name.lower()})"
    hint = "use --study-name NEW for a new study, or the same settings to resume"
    if mine != theirs:
        raise UserError(f"study {name!r} in {redact(url)} optimises {theirs}; this run asks for {mine}: {hint}")
    stored = attrs.get("base_config", {})
    diff = sorted(k for k in set(stored) | set(shared) if stored.get(k) != shared.get(k))
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {shared.get(k)!r})" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise UserError(f"study {name!r} in {redact(url)} was run with {shown}{more}: {hint}")
    return study, storage
