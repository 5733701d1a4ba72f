"""The Optuna side of a study: the storage, the study itself (created, or loaded and checked against this
run's settings), its sampler and pruner."""

from __future__ import annotations

import errno
import os
import time
import warnings
from pathlib import Path

from lora_ablate.config import Experiment
from lora_ablate.errors import UserError
from lora_ablate.spaces import Space
from lora_ablate.stores import db_url, missing_driver_hint, retry_race
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
        # a fresh store: the processes that start together all create the schema; one wins, the others retry
        return retry_race(lambda: optuna.storages.RDBStorage(
            db_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.HEARTBEAT_S,
            grace_period=heartbeat.GRACE_S))
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = missing_driver_hint(url) if isinstance(e, ImportError) else ""
        raise UserError(f"cannot open Optuna storage {redact(url)}: {first}{hint}") from None


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


# the study's own settings a worker joining from another machine needs (``worker`` rebuilds the run from them)
WORKER_SETTINGS = ("seeds", "objective", "direction", "pruner", "retry_failed", "space", "name", "compile", "attention")
ATTRS_WAIT_S = 10.0  # how long a process that lost the creation race waits for the winner's settings


def stored_setup(exp: Experiment, space: Space) -> dict:
    """What a worker needs to run this study from the storage alone: the base experiment (without store URLs,
    workspace or invocation limits: those are the worker's own) and the space's definition."""
    raw = exp.to_dict()
    raw["study"] = {k: v for k, v in raw.get("study", {}).items() if k in WORKER_SETTINGS}
    raw.pop("tracking", None)
    return {"experiment": raw, "space_def": space_definition(space)}


def space_definition(space: Space) -> dict | None:
    """The space as its file wrote it (None for a space built in code: a worker then loads it by name)."""
    import yaml

    if space.path is None or not Path(space.path).is_file():
        return None
    raw = yaml.safe_load(Path(space.path).read_text()) or {}
    return {**raw, "name": space.name}


def _create(storage, name: str, direction: str) -> bool:
    """Create the study in the storage: True for the one process that did, False for those that found it."""
    import optuna

    def attempt() -> bool:
        try:
            storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], name)
            return True
        except optuna.exceptions.DuplicatedStudyError:
            return False

    return retry_race(attempt)


def _settled_attrs(study) -> dict:
    """The study's user attrs once its creator has written them (it creates first, then writes)."""
    deadline = time.monotonic() + ATTRS_WAIT_S
    while "base_config" not in (attrs := study.user_attrs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return attrs


def _set_attrs(study, attrs: dict) -> None:
    for key, value in attrs.items():
        # two joiners may both add a key the creator has not written (one insert wins the unique key)
        retry_race(lambda k=key, v=value: study.set_user_attr(k, v))


def load_or_create(exp: Experiment, space: Space, objective: Objective):
    """(study, storage): the study of this name, created with this run's settings, or loaded if they match.
    Any number of processes may call this at once on a fresh store: one creates, the others join."""
    import optuna

    url = storage_url(exp)
    if not exp.study.storage:
        Path(exp.study.workspace).mkdir(parents=True, exist_ok=True)
    storage = open_storage(url)
    name = study_name(exp, space)
    # not optuna.create_study(load_if_exists=True): it cannot say who created the study
    created = _create(storage, name, objective.direction)
    loaded = optuna.load_study(study_name=name, storage=storage)
    n_before = 0 if created else len(loaded.get_trials(deepcopy=False))
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(space, exp, n_before),
                              pruner=pruner(exp))
    # optuna-dashboard's axis says what it is, not "Objective 0" (every joiner writes the same)
    retry_race(lambda: study.set_metric_names([objective.name]))
    shared = base_config(exp, space)
    mine_attrs = {"space": space.name, "kind": space.kind, "objective": objective.name, "base_config": shared,
                  **stored_setup(exp, space)}
    attrs = {} if created else _settled_attrs(study)
    # a study that never got a trial (its first run was stopped before one) takes this run's settings
    if mine_attrs["space_def"] is None and attrs.get("space_def"):
        del mine_attrs["space_def"]  # a worker's space is built from the stored one, which stays the reference
    if created or not attrs or (n_before == 0 and study.direction.name.lower() == objective.direction):
        _set_attrs(study, mine_attrs)
        return study, storage
    mine = f"{objective.name} ({objective.direction})"
    theirs = f"{attrs.get('objective')} ({study.direction.name.lower()})"
    hint = "use --study-name NEW for a new study, or the same settings to resume"
    if mine != theirs:
        raise UserError(f"study {name!r} in {redact(url)} optimises {theirs}; this run asks for {mine}: {hint}")
    stored = attrs.get("base_config", {})
    # a setting added since the study was created is not in its record; the study ran with its default
    defaults = Experiment().flat()
    diff = sorted(k for k in set(stored) | set(shared) if stored.get(k, defaults.get(k)) != shared.get(k))
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {shared.get(k)!r})" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise UserError(f"study {name!r} in {redact(url)} was run with {shown}{more}: {hint}")
    if "experiment" not in attrs:  # a study created before workers could join it
        _set_attrs(study, stored_setup(exp, space))
    return study, storage
