"""Ablation studies: a search space run as a resumable Optuna study of LoRA trials over one loaded base.

The only module that imports optuna. Below it the engine trains ``TrialSpec`` lists and knows nothing of
Optuna; tracking is a ``Tracker`` handed in (a no-op one with tracking off).

Scheduling is by params, from what the storage holds. Before each ask the next trial's grid cell and seed
are enqueued (``enqueue_trial``); TPE (multivariate, constant liar) then draws the sampled axes, and the
other seeds of a sampled configuration are enqueued with its full params. So, per (configuration, seed):

- a COMPLETE or PRUNED trial means done: it is never trained again, whatever invocation or worker ran it;
- a WAITING or RUNNING one is left to whoever holds it (another worker, or a retry queued by the heartbeat);
- FAILED only: trained again on the next invocation (``study.retry_failed=false`` makes a failure final).

Pure grids do not use Optuna's GridSampler: it tracks cells by grid id and by the identity of the whole
search space, so it counts a failed cell as visited (never retried), forgets every finished cell when
``--seeds`` changes, and a failed cell retried through ``enqueue_trial`` raises ``KeyError('grid_id')`` in
its ``after_trial`` once one cell is left (optuna 5.0). With every trial enqueued, a grid never consults the
sampler at all.

Optuna's heartbeat runs only inside ``study.optimize``; this ask/tell loop beats for its trials itself, and
fails stale RUNNING trials (a killed worker) before asking, which queues them again
(``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_ablate.config import Experiment
from lora_ablate.engine import TrialHooks, TrialPruned, TrialResult, TrialSpec, train_trials
from lora_ablate.errors import UserError, choices
from lora_ablate.spaces import Space, params_per_rank
from lora_ablate.tracking import StudyInfo, Tracker, TrialRecord, redact

HEARTBEAT_S = 10
GRACE_S = 30  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
STALE_RETRIES = 3
METRIC_DIRECTIONS = {"nll": "minimize", "ppl": "minimize", "exact_match": "maximize", "rouge_l": "maximize"}
GENERATED = ("exact_match", "rouge_l")
# per (configuration, seed), by precedence: a DONE trial beats a BUSY one beats one that failed in this
# invocation (SETTLED: retried by the next invocation, not in a loop by this one) beats an older failure
FAILED, SETTLED, BUSY, DONE = "failed", "settled", "busy", "done"
PRECEDENCE = (FAILED, SETTLED, BUSY, DONE)


@dataclass(frozen=True)
class Objective:
    set: str
    metric: str
    direction: str

    @property
    def name(self) -> str:
        return f"{self.set}/{self.metric}"


@dataclass
class TrialOutcome:
    number: int
    params: dict
    state: str  # COMPLETE, FAIL, PRUNED
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
    outcomes: list[TrialOutcome] = field(default_factory=list)
    remaining: int = 0  # trials the space still needs after this invocation
    best: dict | None = None  # {"number", "value", "params"} over the whole study
    counts: dict = field(default_factory=dict)  # trial state -> number, whole study
    base: dict = field(default_factory=dict)  # the base model's held-out metrics, {"<set>/<metric>": value}


# ----------------------------------------------------------------------------- checks (no side effects)


def eval_set_name(entry: str) -> str:
    """The name a held-out set reports its metrics under (as ``data.load_eval_set`` names it)."""
    from lora_ablate.suite import evals_dir

    if entry.startswith("builtin:"):
        return entry.split(":", 1)[1]
    if (evals_dir() / "sets" / f"{entry}.yaml").is_file():
        return entry
    return Path(entry).stem


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
    return exp.study.storage or f"sqlite:///{Path(exp.study.workspace).resolve() / 'optuna.db'}"


def seeds_of(exp: Experiment) -> list[int]:
    return [exp.train.seed + i for i in range(exp.study.seeds)]


def base_config(exp: Experiment, space: Space) -> dict:
    """The settings every trial of the study shares: resuming with different ones would mix two studies."""
    varied = {a.key for a in space.axes} | {"train.seed"} | ({"lora.r"} if space.budget else set())
    return {k: v for k, v in exp.flat().items()
            if k not in varied and k != "eval.base" and not k.startswith(("study.", "tracking."))}


# ----------------------------------------------------------------------------- scheduling


def _params_of(t) -> dict:
    """Params of a trial, including the ones only enqueued so far (a WAITING trial has no params yet)."""
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class Plan:
    todo: list[dict]  # params to enqueue, in order: full (cell x seed, a retry, a known config's other seed)
    #                   or partial (a grid cell and the first seed: TPE samples the rest)
    remaining: int  # trials the space still needs, counting every seed of configurations not yet sampled
    extra: dict | None  # a new sample beyond the space's budget (None for a pure grid)
    counts: dict


def plan(space: Space, seeds: list[int], trials, retry_failed: bool, settled: frozenset[int] = frozenset()) -> Plan:
    """What the space still needs, given the study's ``trials``; ``settled``: numbers of trials that failed in
    this invocation."""
    from optuna.trial import TrialState

    names = [a.name for a in space.axes]
    grid_names = [a.name for a in space.grid_axes]
    cells = space.cells()
    cell_keys = [_key(c) for c in cells]
    status: dict[tuple[str, int], str] = {}
    configs: dict[str, dict[str, dict]] = {k: {} for k in cell_keys}  # cell -> config key -> config
    partial_busy = {k: 0 for k in cell_keys}
    counts: dict[str, int] = {}
    if space.kind == "grid":
        for c, k in zip(cells, cell_keys):
            configs[k][k] = c
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        p = _params_of(t)
        cell = _key({n: p.get(n) for n in grid_names})
        if cell not in configs or "seed" not in p:
            continue  # a cell this version of the space no longer has
        state = (DONE if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                 else BUSY if t.state in (TrialState.WAITING, TrialState.RUNNING)
                 else SETTLED if t.number in settled else FAILED)
        if not all(n in p for n in names):
            partial_busy[cell] += state == BUSY  # a new sample whose sampled axes are not drawn yet
            continue
        config = {n: p[n] for n in names}
        ck = _key(config)
        configs[cell].setdefault(ck, config)
        prev = status.get((ck, p["seed"]))
        if prev is None or PRECEDENCE.index(state) > PRECEDENCE.index(prev):
            status[(ck, p["seed"])] = state

    todo, partial_siblings = [], 0
    for seed in seeds:  # seed-major: a timeout or interrupt leaves the first seed complete across the grid
        for cell in cell_keys:
            for ck, config in configs[cell].items():
                s = status.get((ck, seed))
                if s is None or (s == FAILED and retry_failed):
                    todo.append({**config, "seed": seed})
    new: list[dict] = []
    if space.kind != "grid":
        missing = {k: space.samples - len(configs[k]) - partial_busy[k] for k in cell_keys}
        for i in range(max(missing.values(), default=0)):  # round-robin over cells
            new += [{**c, "seed": seeds[0]} for c, k in zip(cells, cell_keys) if missing[k] > i]
        partial_siblings = sum(partial_busy.values()) * (len(seeds) - 1)
    extra = None
    if space.kind != "grid":
        fewest = min(zip(cells, cell_keys), key=lambda ck: len(configs[ck[1]]) + partial_busy[ck[1]])[0]
        extra = {**fewest, "seed": seeds[0]}
    # WAITING trials (a stale trial queued again, an enqueue whose worker died) are asked first
    remaining = len(todo) + len(new) * len(seeds) + partial_siblings + counts.get("WAITING", 0)
    return Plan(todo + new, remaining, extra, counts)


# ----------------------------------------------------------------------------- Optuna plumbing


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeat with ask/tell, enqueued trials, multivariate TPE: all marked experimental, all intended
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class _StaleTrials:
    """Called by Optuna for each RUNNING trial whose heartbeat stopped: queue it again, and remember it so
    that its MLflow run can be closed as failed."""

    def __init__(self):
        import optuna

        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES)
        self.found = []

    def __call__(self, study, trial) -> None:
        self.retry(study, trial)
        self.found.append(trial)


def open_storage(url: str, stale: Callable | None = None):
    import optuna
    import sqlalchemy.exc

    # the heartbeat thread writes while the main thread does: give SQLite time instead of "locked"
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, heartbeat_stale_trial_callback=stale)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open Optuna storage {redact(url)}: {first}") from None


def _sampler(space: Space, exp: Experiment, n_trials_before: int):
    import optuna

    # seeded, but differently per invocation: a resumed study must not redraw its first random samples
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                      n_startup_trials=space.startup_trials, seed=exp.train.seed + n_trials_before)


def _pruner(exp: Experiment):
    import optuna

    if exp.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=exp.eval.every)
    if exp.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=exp.eval.every, max_resource=exp.train.steps)
    return optuna.pruners.NopPruner()


def _load_or_create(exp: Experiment, space: Space, objective: Objective, stale: _StaleTrials):
    import optuna

    url = storage_url(exp)
    if not exp.study.storage:
        Path(exp.study.workspace).mkdir(parents=True, exist_ok=True)
    storage = open_storage(url, stale)
    name = study_name(exp, space)
    existing = name in optuna.study.get_all_study_names(storage)
    n_before = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)) if existing else 0
    study = optuna.create_study(storage=storage, study_name=name, direction=objective.direction,
                                sampler=_sampler(space, exp, n_before), pruner=_pruner(exp), load_if_exists=True)
    shared = base_config(exp, space)
    if not existing:
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


@contextmanager
def _heartbeat(storage, trial_ids: list[int]):
    """Record heartbeats for the trials in flight (Optuna's own thread only runs inside optimize)."""
    stop = threading.Event()

    def beat():
        while True:
            for tid in trial_ids:
                storage.record_heartbeat(tid)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _trial_id(trial) -> int:
    # the storage API (heartbeats, get_trial) takes the storage's trial id, which Trial keeps private
    return trial._trial_id


def _suggest(trial, space: Space, seeds: list[int]) -> dict:
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
            if k != "train.seed" and not k.startswith(("study.", "tracking."))}
    return hashlib.sha256(_key(flat).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the worker


@dataclass
class _InFlight:
    trial: object  # optuna.Trial
    params: dict
    record: TrialRecord
    spec: TrialSpec | None = None
    run_id: str = ""
    started: float = field(default_factory=time.perf_counter)


class _Hooks(TrialHooks):
    """Live curves to tracking, and intermediate held-out loss to the pruner."""

    def __init__(self, flights: dict[str, _InFlight], tracker: Tracker, objective: Objective, prune: bool):
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


class StudyRunner:
    """One worker: the base model loaded once, trials asked from Optuna in packs and trained on it."""

    def __init__(self, exp: Experiment, space: Space, tracker: Tracker | None = None, context=None,
                 progress: bool = True, on_trial: Callable[[TrialOutcome], None] | None = None):
        _quiet_optuna()
        self.exp, self.space = exp, space
        self.objective = check_study(exp, space)
        self.tracker = tracker or Tracker()
        self.ctx = context
        self.progress, self.on_trial = progress, on_trial
        self.seeds = seeds_of(exp)
        self.stale = _StaleTrials()
        self.study = self.storage = None
        self.failed_now: set[int] = set()  # trial numbers that failed in this invocation
        self.pack = 1
        self._per_rank: dict[tuple, int] = {}

    # -- public

    def run(self) -> StudyReport:
        import optuna

        t0 = time.monotonic()
        self.study, self.storage = _load_or_create(self.exp, self.space, self.objective, self.stale)
        name = self.study.study_name
        report = StudyReport(name, redact(storage_url(self.exp)), self.objective)
        self._fail_stale()
        first = self._plan()
        budget = self.exp.study.n_trials or first.remaining
        if self.space.kind == "grid":
            budget = min(budget, first.remaining)
        if budget == 0:
            return self._finish(report, first)
        if self.ctx is None:
            from lora_ablate.context import build_context

            self.ctx = build_context(self.exp, targets=self.space.target_sets() or None)
        base = self.ctx.base
        self.tracker.start_study(StudyInfo(name, self.space.name, self.objective.name, self.objective.direction,
                                           report.storage, self.exp, base.source))
        status = "FAILED"
        try:
            if self.exp.eval.base:
                base_report = self.ctx.evaluator.run(base.model, base.device)
                report.base = base_report.flat()
                self.tracker.log_base(base_report)
            self.pack = self._pack_size()
            self._loop(report, budget, t0)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            trials = self.study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            summary = {f"trials/{s.lower()}": float(sum(t.state.name == s for t in trials))
                       for s in ("COMPLETE", "FAIL", "PRUNED")}
            if done:
                summary["best/value"] = self.study.best_value
            self.tracker.end_study(status, summary)
        return self._finish(report, self._plan(settle=False))  # this run's failures: the next run's work

    # -- steps

    def _finish(self, report: StudyReport, final: Plan) -> StudyReport:
        report.remaining, report.counts = final.remaining, final.counts
        try:
            best = self.study.best_trial
            report.best = {"number": best.number, "value": best.value, "params": best.params}
        except ValueError:  # no complete trial yet
            report.best = None
        return report

    def _plan(self, settle: bool = True) -> Plan:
        return plan(self.space, self.seeds, self.study.get_trials(deepcopy=False), self.exp.study.retry_failed,
                    frozenset(self.failed_now) if settle else frozenset())

    def _fail_stale(self) -> None:
        import optuna

        optuna.storages.fail_stale_trials(self.study)
        for t in self.stale.found:
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:
                self.tracker.fail_run(run_id, f"no heartbeat for {GRACE_S} s: its worker stopped; queued again")
        self.stale.found.clear()

    def _loop(self, report: StudyReport, budget: int, t0: float) -> None:
        from tqdm.auto import tqdm

        timeout = self.exp.study.timeout
        bar = tqdm(total=budget, desc=f"study {self.study.study_name}", unit="trial", disable=not self.progress,
                   dynamic_ncols=True)
        asked = 0
        try:
            while asked < budget and not (timeout and time.monotonic() - t0 > timeout):
                self._fail_stale()
                flights = self._ask(min(self.pack, budget - asked))
                if not flights:
                    break
                asked += len(flights)
                for outcome in self._run(flights):
                    report.outcomes.append(outcome)
                    bar.update(1)
                    best = self._best_value()
                    if best is not None:
                        bar.set_postfix_str(f"best {self.objective.name}={best:.4f}")
                    bar.write(_describe(outcome, self.objective))
                    if self.on_trial is not None:
                        self.on_trial(outcome)
        finally:
            bar.close()

    def _best_value(self) -> float | None:
        try:
            return self.study.best_value
        except ValueError:
            return None

    def _ask(self, n: int) -> list[_InFlight]:
        from optuna.trial import TrialState

        extend = self.exp.study.n_trials > 0
        flights = []
        for _ in range(n):
            trials = self.study.get_trials(deepcopy=False)
            if not any(t.state == TrialState.WAITING for t in trials):
                p = self._plan()
                nxt = p.todo[0] if p.todo else (p.extra if extend else None)
                if nxt is None:
                    break
                self.study.enqueue_trial(nxt)
            trial = self.study.ask()
            # a trial without any heartbeat is never found stale: beat once before anything can go wrong
            self.storage.record_heartbeat(_trial_id(trial))
            flights.append(self._prepare(trial))
        return flights

    def _prepare(self, trial) -> _InFlight:
        """Params -> the trial's experiment and spec; a trial that cannot be built fails right here."""
        flight = _InFlight(trial, {}, TrialRecord(trial.number, {}, None))
        try:
            flight.params = _suggest(trial, self.space, self.seeds)
            trial_exp = self.space.trial_experiment(self.exp, flight.params, self._params_per_rank)
        except (UserError, ValueError) as e:  # e.g. a trial enqueued by hand with a value outside the space
            flight.params = _params_of(self.storage.get_trial(_trial_id(trial)))
            flight.record = TrialRecord(trial.number, flight.params, None, state="FAIL",
                                        reason=f"invalid trial params {flight.params}: {e}")
            flight.run_id = self.tracker.start_trial(flight.record)
            if flight.run_id:
                trial.set_user_attr("mlflow_run_id", flight.run_id)
            return flight
        key = config_key(trial_exp)
        flight.record = TrialRecord(trial.number, flight.params, trial_exp, key)
        flight.run_id = self.tracker.start_trial(flight.record)
        trial.set_user_attr("config_key", key)
        if flight.run_id:
            trial.set_user_attr("mlflow_run_id", flight.run_id)
        flight.spec = TrialSpec(trial_exp.lora, trial_exp.train, name=f"trial-{trial.number}",
                                adapter_dir=_adapter_dir(self.tracker.staging_dir(flight.run_id)))
        return flight

    def _pack_size(self) -> int:
        """study.pack, or for auto what the packed engine measures fits (a few trials on a CPU)."""
        if self.exp.study.pack != "auto":
            return int(self.exp.study.pack)
        from lora_ablate.packed import auto_pack_size

        return auto_pack_size(self.ctx.base, self._largest_trials(), self.ctx.train)

    def _largest_trials(self) -> list[TrialSpec]:
        """A spec per grid cell with every sampled axis at its largest value: the memory a pack must hold."""
        specs = []
        for cell in self.space.cells():
            params = {**cell, "seed": self.seeds[0]}
            for a in self.space.sampled_axes:
                params[a.name] = max(a.values, key=_size) if a.values else (int(a.high) if "int" in a.kind else a.high)
            trial = self.space.trial_experiment(self.exp, params, self._params_per_rank)
            specs.append(TrialSpec(trial.lora, trial.train))
        return specs

    def _params_per_rank(self, roles: tuple[str, ...]) -> int:
        if roles not in self._per_rank:
            self._per_rank[roles] = params_per_rank(self.ctx.base.model, roles)
        return self._per_rank[roles]

    def _run(self, flights: list[_InFlight]) -> list[TrialOutcome]:
        runnable = [f for f in flights if f.spec is not None]
        by_name = {f.spec.name: f for f in runnable}
        hooks = _Hooks(by_name, self.tracker, self.objective, self.exp.study.pruner != "none")
        ctx = self.ctx
        results: list[TrialResult] = []
        with _heartbeat(self.storage, [_trial_id(f.trial) for f in flights]):
            try:
                if runnable:
                    # one path for the whole study: pack 1 is the plain peft trial, the reference
                    results = train_trials(ctx.base, [f.spec for f in runnable], ctx.train, ctx.evaluator,
                                           hooks, progress=self.progress, packed=self.pack > 1)
            except KeyboardInterrupt:
                for f in flights:
                    self._tell(f, None, "FAIL", "interrupted (the trial is trained again on resume)")
                raise
            except Exception as e:  # noqa: BLE001 - any trial error is recorded and the study goes on
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
                return [self._tell(f, None, "FAIL", reason) for f in flights]
        outcomes = [self._tell(f, None, f.record.state, f.record.reason) for f in flights if f.spec is None]
        for f, r in zip(runnable, results):
            outcomes.append(self._judge(f, r))
        return outcomes

    def _judge(self, f: _InFlight, r: TrialResult) -> TrialOutcome:
        if r.status == "pruned":
            return self._tell(f, r, "PRUNED", r.error)
        if r.status != "ok":
            return self._tell(f, r, "FAIL", r.error)
        value = r.final.metrics.get(self.objective.set, {}).get(self.objective.metric) if r.final else None
        if value is None or not math.isfinite(value):
            return self._tell(f, r, "FAIL", f"objective {self.objective.name} is {value}")
        return self._tell(f, r, "COMPLETE", "", value)

    def _tell(self, f: _InFlight, r: TrialResult | None, state: str, reason: str,
              value: float | None = None) -> TrialOutcome:
        from optuna.trial import TrialState

        seconds = time.perf_counter() - f.started
        trial = f.trial
        if reason:
            trial.set_user_attr("fail_reason", reason)
        if r is not None and r.final is not None:
            for k, v in r.final.flat("final/").items():
                trial.set_user_attr(k, v)
        if state == "PRUNED":
            self.study.tell(trial, state=TrialState.PRUNED)
        elif state == "COMPLETE":
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            self.failed_now.add(trial.number)
        record = f.record
        record.state, record.reason, record.result, record.wall_s = state, reason, r, seconds
        if f.run_id:
            self.tracker.finish_trial(f.run_id, record)
        return TrialOutcome(trial.number, f.params, state, value, reason, seconds, f.run_id, r)


def _size(value) -> float:
    """Order choice values by the memory they need: a rank by itself, targets by how many roles."""
    return len(value.split(",")) if isinstance(value, str) else float(value)


def _adapter_dir(staging: Path | None) -> Path | None:
    return staging / "adapter" if staging is not None else None


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _describe(o: TrialOutcome, objective: Objective) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in o.params.items())
    if o.state == "COMPLETE":
        what = f"{objective.name}={o.value:.4f}"
    else:
        what = f"{o.state}: {o.reason}"
    return f"trial {o.number} [{params}] {what} ({o.seconds:.0f} s)"


def run_study(exp: Experiment, space: Space, tracker: Tracker | None = None, context=None, progress: bool = True,
              on_trial: Callable[[TrialOutcome], None] | None = None) -> StudyReport:
    """Run (or resume) the study of ``space`` on ``exp``: everything the space still needs, or
    ``study.n_trials`` trials. ``context`` reuses an already loaded base, data and evaluator."""
    return StudyRunner(exp, space, tracker, context, progress, on_trial).run()


# ----------------------------------------------------------------------------- status


@dataclass
class StudyStatus:
    name: str
    direction: str
    objective: str
    space: str
    trials: list[dict]  # {"number", "state", "params", "value", "reason"}


def study_status(url: str, name: str | None = None) -> list[StudyStatus]:
    import optuna

    _quiet_optuna()
    storage = open_storage(url)
    names = sorted(s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False))
    if name is not None:
        if name not in names:
            raise UserError(f"unknown study {name!r} in {redact(url)}; studies there: {choices(names) or '(none)'}")
        names = [name]
    out = []
    for n in names:
        study = optuna.load_study(study_name=n, storage=storage)
        rows = [{"number": t.number, "state": t.state.name, "params": _params_of(t), "value": t.value,
                 "reason": t.user_attrs.get("fail_reason", "")} for t in study.get_trials(deepcopy=False)]
        out.append(StudyStatus(n, study.direction.name.lower(), study.user_attrs.get("objective", ""),
                               study.user_attrs.get("space", ""), rows))
    return out
