"""Heartbeats of this worker (its trials in flight and its MLflow parent run), and what dead workers left.

Optuna's heartbeat thread runs only inside ``study.optimize``; the ask/tell loop beats for its own trials
here. A RUNNING trial whose heartbeat is older than ``GRACE_S`` belongs to a worker that died: it is failed
(with a ``fail_reason``, as every failed trial has) and queued again, and its MLflow run is closed as failed.

The same thread beats for the invocation's MLflow parent run, in the study's system attrs
(``ALIVE + run id`` -> unix time): MLflow has no heartbeat, and a parent run of a live worker must never be
closed by another one. A parent run whose beat is older than ``GRACE_S`` is closed as KILLED.

``HEARTBEAT_S`` and ``GRACE_S`` come from ``LORA_ABLATE_HEARTBEAT_S`` and ``LORA_ABLATE_GRACE_S`` when set
(the fault tests kill real processes and cannot wait 30 s per kill).
"""

from __future__ import annotations

import logging
import os
import threading
import time

# the environment may shorten them (tests that kill workers, a pool that wants faster recovery); every worker
# of a study must use the same values
HEARTBEAT_S = int(os.environ.get("LORA_ABLATE_HEARTBEAT_S", 10))  # Optuna takes whole seconds only
GRACE_S = float(os.environ.get("LORA_ABLATE_GRACE_S", 30))  # no heartbeat for this long: the worker is dead
STALE_RETRIES = 3
ALIVE = "lora_ablate.alive."  # + parent run id: a study system attr

log = logging.getLogger(__name__)


def trial_id(trial) -> int:
    # the storage API (heartbeats, get_trial) takes the storage's trial id, which Trial keeps private
    return trial._trial_id


def stale_reason() -> str:
    return f"no heartbeat for {GRACE_S:g} s: its worker stopped; queued again"


class Heartbeat:
    """Beats every ``HEARTBEAT_S`` seconds, from a thread, for the trials in flight and for ``run_id`` (the
    invocation's MLflow parent run, "" without tracking): a trial is added when it is asked (and beaten at
    once: a trial without any heartbeat is never found stale) and discarded when it is told, so trials may
    join and leave while a pack trains. A failed beat (a full disk, a locked or read-only store) is logged,
    not raised: the main thread meets the same store and reports it once."""

    def __init__(self, study, run_id: str = ""):
        self.study, self.storage, self.run_id = study, study._storage, run_id
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial) -> None:
        tid = trial_id(trial)
        self.storage.record_heartbeat(tid)
        with self._lock:
            self._ids.add(tid)

    def discard(self, trial) -> None:
        with self._lock:
            self._ids.discard(trial_id(trial))

    def mine(self) -> set[int]:
        with self._lock:
            return set(self._ids)

    def beat(self) -> None:
        for tid in sorted(self.mine()):
            self.storage.record_heartbeat(tid)
        if self.run_id:
            self.storage.set_study_system_attr(self.study._study_id, ALIVE + self.run_id, time.time())

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.debug("heartbeat failed: %s", e)
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self.beat()  # before the thread: a parent run without any beat is judged by its start time
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _retry(study, trial) -> None:
    """Queue a stale trial again, as Optuna's ``RetryHeartbeatStaleTrialCallback`` does, but without the
    dead attempt's reason and MLflow run: the retry is a new attempt, recorded afresh."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > STALE_RETRIES:
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", "mlflow_run_id")}
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, user_attrs=attrs,
                                        system_attrs={**trial.system_attrs, "failed_trial": history[0],
                                                      "retry_history": history}))


def fail_stale(study, tracker, heartbeat: Heartbeat | None = None, claims=None) -> int:
    """Fail (and queue again) the stale RUNNING trials of dead workers; close their MLflow runs with the same
    reason. Our own trials in flight are beaten first, so that they are never taken for a dead worker's.
    Returns how many were failed here (another worker may fail the same trial first: then it is theirs)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    if heartbeat is not None:
        heartbeat.beat()
    reason = stale_reason()
    failed = 0
    for tid in storage._get_stale_trial_ids(study._study_id):
        try:
            # the reason goes in first: Optuna refuses attrs on a finished trial
            storage.set_trial_user_attr(tid, "fail_reason", reason)
            if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        trial = storage.get_trial(tid)
        # behind the same claim as a planned retry: between this FAIL and the queued copy another worker's
        # plan sees a plain failure and plans its own retry; only one of them creates it
        if claims is None or claims.claim_retry(study, trial):
            _retry(study, trial)
        failed += 1
        run_id = trial.user_attrs.get("mlflow_run_id") or tracker.trial_run_id(study.study_name, trial.number)
        if run_id:
            tracker.fail_run(run_id, reason)
    return failed


def _trial_beats(study, exclude: set[int]) -> dict[str, tuple[object, float]]:
    """'trial:<id>' -> (last heartbeat, its age in s by the storage's clock) of the RUNNING trials not ours."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    session = getattr(study._storage, "_backend", study._storage).scoped_session()  # under the cache
    try:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = (session.query(models.TrialModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.state == TrialState.RUNNING,
                        models.TrialModel.study_id == study._study_id).all())
    finally:
        session.close()
    return {f"trial:{tid}": (hb, (now - hb.replace(tzinfo=None)).total_seconds())
            for tid, hb in rows if tid not in exclude}


def parent_beats(study, parents: dict[str, float]) -> dict[str, tuple[object, float]]:
    """'run:<id>' -> (last beat, its age in s) of the RUNNING parent runs ``parents`` (run id -> start time,
    the beat of a run killed before its first one)."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    now = time.time()
    beats = {rid: attrs.get(ALIVE + rid, start) for rid, start in parents.items()}
    return {f"run:{rid}": (b, now - b) for rid, b in beats.items()}


def dead_parents(study, parents: dict[str, float]) -> set[str]:
    return {k[4:] for k, (_, age) in parent_beats(study, parents).items() if age > GRACE_S}


def await_dead(study, tracker, heartbeat: Heartbeat | None, parents, claims=None) -> int:
    """Wait until every other worker's trial and parent run has either beaten (alive: left to it) or gone
    ``GRACE_S`` without a beat (dead: its trials failed and queued again, its runs closed after this).

    A worker killed just before this invocation started still looks alive by the age of its last beat; only
    a beat that does not come within ``HEARTBEAT_S`` tells, so this waits at most ``GRACE_S`` (and about one
    ``HEARTBEAT_S`` when the others are alive). ``parents()``: the other RUNNING parent runs (run id -> start
    time). Returns how many trials were failed and queued again."""
    first: dict[str, object] = {}
    deadline = time.monotonic() + GRACE_S + HEARTBEAT_S + 1
    failed = 0
    while True:
        failed += fail_stale(study, tracker, heartbeat, claims)
        mine = heartbeat.mine() if heartbeat is not None else set()
        beats = {**_trial_beats(study, mine), **parent_beats(study, parents())}
        pending = []
        for key, (beat, age) in beats.items():
            first.setdefault(key, beat)
            if beat == first[key] and age <= GRACE_S:
                pending.append(key)
        if failed or not pending or time.monotonic() > deadline:
            return failed
        time.sleep(min(1.0, HEARTBEAT_S / 2))
