"""One worker's ask/tell loop: the base model loaded once, trials asked from Optuna and trained on it, and
each trial told (to Optuna, then tracking) as soon as it finishes.

One trial's life, top to bottom in the "one trial" section below: ``_ask_one`` asks Optuna for it,
``_prepare`` builds its experiment and spec (or fails it at once), the trainer trains it (its hooks send
curves to tracking and held-out loss to the pruner), ``_on_result`` judges its result and ``_tell`` tells
Optuna, then tracking, then the progress bar.

Every trial goes through one ``Trainer`` (``make_trainer``: pack 1 is the plain peft path, the reference;
a pack of K > 1 the packed engine) with two bound methods of this runner as callbacks, so the trainer
never sees Optuna: ``on_result`` tells a trial's result the moment it is done (finished, failed, diverged
or pruned), and ``refill`` asks for the next trial (in a pack: to take the freed slot), within
``--n-trials``, ``--timeout`` and what the space still needs (None: the trainer stops, a pack shrinks). The
packed engine accepts any spec mid-pack (targets are unioned and ranks padded when the pack is re-laid
out; batch size, accumulation and schedule stay per trial); only gradient checkpointing and compilation
are set for the pack by its first trials, which changes memory, not a trial's numbers. One call of the
trainer therefore usually runs the whole invocation; the loop calls it again when it has drained (no work
at the time, or a trial alone in its pack ran out of memory; a larger pack that does is trained again in
halves inside the trainer).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from lora_ablate.config import Experiment
from lora_ablate.errors import UserError
from lora_ablate.spaces import Space, params_per_rank
from lora_ablate.stores import worker_id
from lora_ablate.study import claims, heartbeat
from lora_ablate.study.outcomes import Progress, StudyReport, TrialOutcome, best_trial, best_value, study_summary
from lora_ablate.study.schedule import Plan, params_of, plan
from lora_ablate.study.settings import check_study, seeds_of, storage_url
from lora_ablate.study.storage import load_or_create, quiet_optuna, study_exists, unwritable
from lora_ablate.study.trials import Hooks, InFlight, adapter_dir, config_key, size, suggest
from lora_ablate.study.workers import timed
from lora_ablate.tracking import StudyInfo, Tracker, TrialRecord, run_name
from lora_ablate.trainers import make_trainer
from lora_ablate.trial import Trainer, TrialResult, TrialSpec
from lora_ablate.workspace import redact

INTERRUPTED = "interrupted (the trial is trained again on resume)"
POLL_S = 1.0  # how often an idle worker of a pool looks for work again


class StudyRunner:
    """One worker: the base model loaded once, trials asked from Optuna in packs and trained on it."""

    def __init__(self, exp: Experiment, space: Space, tracker: Tracker | None = None, context=None,
                 progress: bool = True, on_trial: Callable[[TrialOutcome], None] | None = None,
                 wait: bool = False):
        quiet_optuna()
        self.wait = wait  # a worker of a pool: stop only when no trial of the study runs anywhere
        self.claims: claims.Claims | None = None
        self.exp, self.space = exp, space
        self.objective = check_study(exp, space)
        self.tracker = tracker or Tracker()
        self.ctx = context
        self.progress, self.on_trial = progress, on_trial
        self.seeds = seeds_of(exp)
        self.study = self.storage = None
        self.failed_now: set[int] = set()  # trial numbers that failed in this invocation
        self._per_rank: dict[tuple, int] = {}
        # the loop's state, read and changed by the trainer's callbacks (refill asks, on_result tells)
        self.flying: dict[str, InFlight] = {}  # spec name -> a trial asked and not told yet
        self.beats: heartbeat.Heartbeat | None = None
        self.report: StudyReport | None = None
        self.bar: Progress | None = None
        self.budget = self.asked = 0
        self.t0 = 0.0

    # -- public

    def run(self) -> StudyReport:
        self.t0 = time.monotonic()
        if self.ctx is None and not study_exists(self.exp, self.space):
            # a new study: data, eval sets, model and targets load first, so bad input fails before the
            # study exists and leaves no empty study of its name behind
            self.ctx = self._context()
        self.study, self.storage = load_or_create(self.exp, self.space, self.objective)
        name = self.study.study_name
        self.claims = claims.Claims(self.storage, name)
        report = StudyReport(name, redact(storage_url(self.exp)), self.objective)
        self._settle()
        first = self._plan()
        # nothing left but, maybe, a trial of a worker killed moments ago: it looks alive until its beat is late
        idle = first.remaining == 0 and (self.space.kind == "grid" or not self.exp.study.n_trials)
        if idle and not self._settle(wait=True):
            return self._finish(report, first)
        # no fixed count without --n-trials: trials of dead workers found stale on the way are queued again,
        # and this invocation trains them too (the plan, not a count taken at the start, says when to stop)
        budget = self.exp.study.n_trials or math.inf
        if self.ctx is None:  # resuming: the model loads only when there is something to train
            self.ctx = self._context()
        base = self.ctx.base
        self.tracker.start_study(StudyInfo(name, self.space.name, self.objective.name, self.objective.direction,
                                           report.storage, self.exp, base.source,
                                           tuple(a.name for a in self.space.axes),
                                           str(self.space.path or ""), self.space.description))
        status = "FAILED"
        self.ctx.evaluator.progress = self.progress
        try:
            with heartbeat.Heartbeat(self.study, self.tracker.parent_id) as self.beats:
                if self.exp.eval.base:
                    base_report = self.ctx.evaluator.run(base.model, base.device)
                    report.base = base_report.flat()
                    self.tracker.log_base(base_report)
                self._loop(report, budget, self._pack_size(), self.exp.study.n_trials or self._plan().remaining)
                self._settle()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.beats = None
            self.tracker.end_study(status, study_summary(self.study))
        return self._finish(report, self._plan(settle=False))  # this run's failures: the next run's work

    # -- the loop

    def _loop(self, report: StudyReport, budget: float, pack: int, shown: int) -> None:
        self.report, self.budget, self.asked = report, budget, 0
        ctx = self.ctx
        hooks = Hooks(self.flying, self.tracker, self.objective, self.exp.study.pruner != "none")
        cuda = ctx.base.device.type == "cuda"
        # study.pack=1 is the reference loop; auto on a GPU is the packed engine even if only one trial fits
        trainer = make_trainer(ctx.base, ctx.train, ctx.evaluator, hooks, pack=pack, progress=self.progress,
                               fast=cuda and self.exp.study.pack == "auto", compile=self.exp.study.compiles(cuda),
                               attention=self.exp.study.attention)
        self.bar = Progress(self.study.study_name, shown, self.objective, self.progress)
        try:
            while flights := self._ask(pack):
                self._train(trainer, flights)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: whatever is in flight is trained again on resume
            self._fail_flying(INTERRUPTED)
            raise
        finally:
            self.bar.close()

    def _may_ask(self) -> bool:
        timeout = self.exp.study.timeout
        return self.asked < self.budget and not (timeout and time.monotonic() - self.t0 > timeout)

    def _ask(self, n: int) -> list[InFlight]:
        """Up to ``n`` trials to train (fewer when the budget, the timeout or the space runs out). A trial
        that cannot be built is told FAIL at once and another is asked in its place."""
        flights: list[InFlight] = []
        if not self._may_ask():
            return flights
        self._settle()
        while len(flights) < n and self._may_ask():
            flight = self._ask_one()
            if flight is None:
                break
            if flight.spec is None:
                self._tell(flight, None, flight.record.state, flight.record.reason)
                continue
            self.flying[flight.spec.name] = flight
            flights.append(flight)
        return flights

    def _train(self, trainer: Trainer, flights: list[InFlight]) -> None:
        """Train ``flights`` and whatever ``refill`` hands the trainer after them; every trial is told exactly
        once."""
        try:
            trainer.train([f.spec for f in flights], on_result=self._on_result, refill=self._refill)
        except Exception as e:  # noqa: BLE001 - any trial error is recorded and the study goes on
            self._fail_flying(f"{type(e).__name__}: {' '.join(str(e).split())}"[:500])
        self._fail_flying("the engine returned no result for this trial")  # never expected: no trial left RUNNING

    def _refill(self) -> TrialSpec | None:
        """The trainer has room for a trial: the next one's spec, or None when this invocation has no more."""
        flights = self._ask(1)
        return flights[0].spec if flights else None

    def _fail_flying(self, reason: str) -> None:
        for f in list(self.flying.values()):
            self._tell(f, None, "FAIL", reason)

    # -- one trial, in the order of its life

    def _ask_one(self) -> InFlight | None:
        # WAITING first (a dead worker's trial queued again, one enqueued by hand), then a planned trial this
        # worker claims (see claims.py: never check-then-enqueue, which lets two workers train one cell)
        while True:
            with timed("ask"):
                trial = claims.take_waiting(self.study)
                if trial is None:
                    trials = self.study.get_trials(deepcopy=False)
                    p = plan(self.space, self.seeds, trials, self.exp.study.retry_failed, frozenset(self.failed_now))
                    nxt = self.claims.first(p.todo, trials)
                    if nxt is None and self.exp.study.n_trials > 0 and p.extra is not None and not p.todo:
                        nxt = p.extra  # a sample beyond the space's budget: any number of them is right
                    if nxt is not None:
                        trial = claims.create_running(self.study, nxt)
            if trial is not None:
                break
            # out of work: a pack's other trials train on meanwhile; a pool's worker stays while others' trials
            # run; otherwise a dead worker's trial may still come back (its beat is late, not yet missing)
            if self.flying:
                return None
            if self._wait_for_others(trials):
                continue
            if not self._settle(wait=True):
                return None
        self.asked += 1
        self.beats.add(trial)  # beaten at once: a trial without any heartbeat is never found stale
        trial.set_user_attr("worker", worker_id())  # for status, and a person looking for it
        return self._prepare(trial)

    def _wait_for_others(self, trials) -> bool:
        """Nothing to claim now. A worker of a pool (``wait``) stays while other workers' trials run: one of
        them may die, and its trial is then failed by its heartbeat and queued again for whoever is left."""
        from optuna.trial import TrialState

        mine = {heartbeat.trial_id(f.trial) for f in self.flying.values()}
        others = [t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in mine]
        if not (self.wait and others and not self.flying and self._may_ask()):
            return False
        time.sleep(POLL_S)
        self._settle()
        return True

    def _prepare(self, trial) -> InFlight:
        """Params -> the trial's experiment and spec; a trial that cannot be built fails right here."""
        flight = InFlight(trial, {}, TrialRecord(trial.number, {}, None))
        try:
            with timed("suggest"):
                flight.params = suggest(trial, self.space, self.seeds)
            trial_exp = self.space.trial_experiment(self.exp, flight.params, self._params_per_rank)
        except (UserError, ValueError) as e:  # e.g. a trial enqueued by hand with a value outside the space
            flight.params = params_of(self.storage.get_trial(heartbeat.trial_id(trial)))
            flight.record = TrialRecord(trial.number, flight.params, None, state="FAIL",
                                        reason=f"invalid trial params {flight.params}: {e}")
            flight.run_id = self.tracker.start_trial(flight.record)
            if flight.run_id:
                trial.set_user_attr("mlflow_run_id", flight.run_id)
            return flight
        key = config_key(trial_exp)
        flight.record = TrialRecord(trial.number, flight.params, trial_exp, key)
        with timed("mlflow_start"):
            flight.run_id = self.tracker.start_trial(flight.record)
        trial.set_user_attr("config_key", key)
        if flight.run_id:
            trial.set_user_attr("mlflow_run_id", flight.run_id)
        # the training bar's label: the trial's MLflow run name, and its number, since the name also keys
        # self.flying (two sampled values may be shown alike) and the trial's closing line leads with it
        label = f"{run_name(flight.params, tuple(a.name for a in self.space.axes), trial.number)} #{trial.number}"
        flight.spec = TrialSpec(trial_exp.lora, trial_exp.train, name=label,
                                adapter_dir=adapter_dir(self.tracker.staging_dir(flight.run_id)))
        return flight

    def _on_result(self, r: TrialResult) -> TrialOutcome:
        """The trainer is done with a trial: judge its result and tell it."""
        f = self.flying[r.spec.name]
        if r.status == "pruned":
            return self._tell(f, r, "PRUNED", r.error)
        if r.status != "ok":
            return self._tell(f, r, "FAIL", r.error)
        value = r.final.metrics.get(self.objective.set, {}).get(self.objective.metric) if r.final else None
        if value is None or not math.isfinite(value):
            return self._tell(f, r, "FAIL", f"objective {self.objective.name} is {value}")
        return self._tell(f, r, "COMPLETE", "", value)

    def _tell(self, f: InFlight, r: TrialResult | None, state: str, reason: str,
              value: float | None = None) -> TrialOutcome:
        from optuna.trial import TrialState

        seconds = time.perf_counter() - f.started
        trial = f.trial
        if reason:
            trial.set_user_attr("fail_reason", reason)
        if r is not None and r.final is not None:
            for k, v in r.final.flat("final/").items():
                trial.set_user_attr(k, v)

        def commit():
            with timed("tell"):
                if state == "PRUNED":
                    self.study.tell(trial, state=TrialState.PRUNED)
                elif state == "COMPLETE":
                    self.study.tell(trial, value)
                else:
                    self.study.tell(trial, state=TrialState.FAIL)
                    self.failed_now.add(trial.number)

        record = f.record
        record.state, record.reason, record.result, record.wall_s = state, reason, r, seconds
        # Optuna is told only once MLflow holds the run's metrics and artifacts (a kill before leaves a stale
        # trial, trained again; a kill after, a run that the next invocation closes by Optuna's state)
        record.commit = commit
        with timed("mlflow_finish"):  # includes the tell, which it makes once MLflow holds the run
            self.tracker.finish_trial(f.run_id, record)
        if f.spec is not None:
            self.flying.pop(f.spec.name, None)
        self.beats.discard(trial)
        outcome = TrialOutcome(trial.number, f.params, state, value, reason, seconds, f.run_id, r)
        self.report.outcomes.append(outcome)
        self.bar.told(outcome, best_value(self.study))
        if self.on_trial is not None:
            self.on_trial(outcome)
        return outcome

    # -- helpers

    def _finish(self, report: StudyReport, final: Plan) -> StudyReport:
        report.remaining, report.counts = final.remaining, final.counts
        report.best = best_trial(self.study)
        return report

    def _plan(self, settle: bool = True) -> Plan:
        return plan(self.space, self.seeds, self.study.get_trials(deepcopy=False), self.exp.study.retry_failed,
                    frozenset(self.failed_now) if settle else frozenset())


    def _settle(self, wait: bool = False) -> int:
        """Fail dead workers' stale trials (queued again) and close the MLflow runs that dead invocations left
        RUNNING; with ``wait``, first wait for other workers' late beats (``heartbeat.await_dead``). Returns
        how many trials were queued again."""
        name = self.study.study_name

        def parents():
            return self.tracker.running_parents(name)

        if wait:
            queued = heartbeat.await_dead(self.study, self.tracker, self.beats, parents, self.claims)
        else:
            queued = heartbeat.fail_stale(self.study, self.tracker, self.beats, self.claims)
        finished = {t.user_attrs["mlflow_run_id"]: (t.state.name, t.user_attrs.get("fail_reason", ""))
                    for t in self.study.get_trials(deepcopy=False)
                    if t.state.is_finished() and t.user_attrs.get("mlflow_run_id")}
        self.tracker.close_dead(name, finished, heartbeat.dead_parents(self.study, parents()))
        return queued

    def _context(self):
        from lora_ablate.context import build_context

        return build_context(self.exp, targets=self.space.target_sets() or None,
                             rank=self.space.largest_rank(self.exp))

    def _pack_size(self) -> int:
        """study.pack, or for auto what the packed engine measures fits on a GPU; on a CPU auto is 1, the
        reference loop (the packed engine's CPU step is the reference arithmetic, with little to gain)."""
        if self.exp.study.pack != "auto":
            return int(self.exp.study.pack)
        if self.ctx.base.device.type != "cuda":
            return 1
        from lora_ablate.packed import auto_pack_size

        return auto_pack_size(self.ctx.base, self._largest_trials(), self.ctx.train)

    def _largest_trials(self) -> list[TrialSpec]:
        """A spec per grid cell with every sampled axis at its largest value: the memory a pack must hold."""
        specs = []
        for cell in self.space.cells():
            params = {**cell, "seed": self.seeds[0]}
            for a in self.space.sampled_axes:
                params[a.name] = max(a.values, key=size) if a.values else (int(a.high) if "int" in a.kind else a.high)
            trial = self.space.trial_experiment(self.exp, params, self._params_per_rank)
            specs.append(TrialSpec(trial.lora, trial.train))
        return specs

    def _params_per_rank(self, roles: tuple[str, ...]) -> int:
        if roles not in self._per_rank:
            self._per_rank[roles] = params_per_rank(self.ctx.base.model, roles)
        return self._per_rank[roles]


def run_study(exp: Experiment, space: Space, tracker: Tracker | None = None, context=None, progress: bool = True,
              on_trial: Callable[[TrialOutcome], None] | None = None, wait: bool = False) -> StudyReport:
    """Run (or resume) the study of ``space`` on ``exp``: everything the space still needs, or
    ``study.n_trials`` trials. ``context`` reuses an already loaded base, data and evaluator. ``on_trial`` is
    called with each outcome as the trial is told (with packs, while the pack's other trials still train)."""
    try:
        return StudyRunner(exp, space, tracker, context, progress, on_trial, wait).run()
    except Exception as e:
        why = unwritable(e)
        if why is None:
            raise
        # every write is ordered so that a store that stops taking them leaves a resumable study (see
        # docs/reliability.md): one line, not the chain of tracebacks of each layer that met it
        raise UserError(f"cannot write the study's stores ({why}): {redact(storage_url(exp))}, "
                        f"{redact(exp.tracking.uri) or 'the workspace MLflow store'}; free space or make them "
                        "writable, then run the same command again to resume") from None
