"""Heartbeats of this worker's trials, and stale trials of dead workers.

Optuna's heartbeat thread runs only inside ``study.optimize``; the ask/tell loop beats for its own trials
here. A RUNNING trial whose heartbeat is older than ``GRACE_S`` belongs to a worker that died: it is failed
before the next ask, which queues it again (``RetryHeartbeatStaleTrialCallback``), and its MLflow run is
closed as failed.
"""

from __future__ import annotations

import os
import threading

# the environment may shorten them (tests that kill workers, a pool that wants faster recovery); every worker
# of a study must use the same values
HEARTBEAT_S = int(os.environ.get("LORA_ABLATE_HEARTBEAT_S", 10))
GRACE_S = int(os.environ.get("LORA_ABLATE_GRACE_S", 30))  # a RUNNING trial without a heartbeat this long: dead
STALE_RETRIES = 3


def trial_id(trial) -> int:
    # the storage API (heartbeats, get_trial) takes the storage's trial id, which Trial keeps private
    return trial._trial_id


class StaleTrials:
    """Called by Optuna for each RUNNING trial whose heartbeat stopped: queue it again, and remember it so
    that its MLflow run can be closed as failed."""

    def __init__(self):
        import optuna

        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES)
        self.found = []

    def __call__(self, study, trial) -> None:
        self.retry(study, trial)
        self.found.append(trial)


class Heartbeat:
    """Beats every ``HEARTBEAT_S`` seconds, from a thread, for the trials in flight: a trial is added when it
    is asked (and beaten at once: a trial without any heartbeat is never found stale) and discarded when it
    is told, so trials may join and leave while a pack trains."""

    def __init__(self, storage):
        self.storage = storage
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

    def beat(self) -> None:
        with self._lock:
            ids = sorted(self._ids)
        for tid in ids:
            self.storage.record_heartbeat(tid)

    def _run(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale(study, stale: StaleTrials, tracker, heartbeat: Heartbeat | None = None) -> None:
    """Fail (and so queue again) the stale RUNNING trials of dead workers; close their MLflow runs. Our own
    trials in flight are beaten first, so that they are never taken for a dead worker's."""
    import optuna

    if heartbeat is not None:
        heartbeat.beat()
    optuna.storages.fail_stale_trials(study)
    for t in stale.found:
        run_id = t.user_attrs.get("mlflow_run_id") or tracker.trial_run_id(study.study_name, t.number)
        if run_id:
            tracker.fail_run(run_id, f"no heartbeat for {GRACE_S} s: its worker stopped; queued again")
    stale.found.clear()
