"""Claims: which worker creates the trial of a planned (configuration, seed), decided by the database.

``schedule.plan`` says what the space still needs from a snapshot of the trials; two workers reading the same
snapshot would train the same cell. So before a planned trial is created, its worker inserts a claim row
keyed by (study, params, attempt) into a table of its own in the Optuna storage's database: the primary
key lets exactly one insert win, whatever the number of workers or machines. ``attempt`` is how many trials
with these params the snapshot already holds, so a failed cell retried later, or another sample of a grid
cell, is a new key, and a worker whose snapshot is stale loses the claim and plans again.

The winner then creates the trial already RUNNING (``create_running``) instead of ``enqueue_trial`` + ``ask``:
``ask`` pops *any* WAITING trial, so with several workers an enqueued cell could be taken by another worker
and the enqueuer's ``ask`` would get a trial the sampler invents. WAITING trials (a dead worker's trial
queued again by the heartbeat, one enqueued by hand) are taken with ``take_waiting``, the same
compare-and-set ``ask`` uses, but without ever falling back to a new trial.

A claim whose worker died between its claim and its trial would block the cell forever: a claim older than
the heartbeat's grace period whose trial the storage still does not hold is taken over (compare-and-set on
its time).
"""

from __future__ import annotations

import hashlib
import time

from lora_ablate.stores import retry_race, worker_label
from lora_ablate.study import heartbeat
from lora_ablate.study.schedule import key_of, params_of

TABLE = "lora_ablate_claims"


def _table(metadata):
    import sqlalchemy as sa

    return sa.Table(TABLE, metadata,
                    sa.Column("study", sa.String(512), primary_key=True),
                    sa.Column("params_key", sa.String(64), primary_key=True),
                    sa.Column("attempt", sa.Integer, primary_key=True),
                    sa.Column("params", sa.Text, nullable=False),
                    sa.Column("worker", sa.String(256), nullable=False),
                    sa.Column("claimed_at", sa.Float, nullable=False))


def attempt_of(params: dict, trials) -> int:
    """Trials in ``trials`` with these params (a partial ``params``, a grid cell and seed, matches every
    sample drawn in it)."""
    return sum(1 for t in trials if all(params_of(t).get(k) == v for k, v in params.items()))


class Claims:
    def __init__(self, storage, study_name: str):
        import sqlalchemy as sa

        self.engine = storage.engine
        self.study = study_name
        self.table = _table(sa.MetaData())
        # created by whichever worker comes first; create_all checks first, the others lose on the catalog
        retry_race(lambda: self.table.metadata.create_all(self.engine, checkfirst=True))

    def claim(self, params: dict, attempt: int) -> bool:
        """Whether this worker won (study, params, attempt)."""
        import sqlalchemy as sa

        key = hashlib.sha1(key_of(params).encode()).hexdigest()
        now = time.time()
        row = {"study": self.study, "params_key": key, "attempt": attempt, "params": key_of(params),
               "worker": worker_label(), "claimed_at": now}
        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert().values(**row))
            return True
        except sa.exc.IntegrityError:
            pass
        t = self.table.c
        where = (t.study == self.study) & (t.params_key == key) & (t.attempt == attempt)
        with self.engine.begin() as conn:
            held = conn.execute(sa.select(t.claimed_at).where(where)).scalar()
            if held is None or now - held < heartbeat.GRACE_S:
                return False
            # the snapshot that gave ``attempt`` holds no trial for it, and its claim is old: its worker died
            taken = conn.execute(self.table.update().where(where & (t.claimed_at == held))
                                 .values(worker=row["worker"], claimed_at=now))
            return taken.rowcount == 1

    def claim_retry(self, study, trial) -> bool:
        """Whether this worker queues the retry of ``trial``, a dead worker's stale trial (see
        ``heartbeat.fail_stale``): the same key as a planned retry of its params, so only one is made."""
        params = params_of(trial)
        return self.claim(params, attempt_of(params, study.get_trials(deepcopy=False)))

    def first(self, todo: list[dict], trials) -> dict | None:
        """The first of the planned ``todo`` this worker wins, or None when others hold them all."""
        extra: dict[str, int] = {}  # a partial todo may repeat (several samples of one cell): one key each
        for params in todo:
            k = key_of(params)
            attempt = attempt_of(params, trials) + extra.get(k, 0)
            extra[k] = extra.get(k, 0) + 1
            if self.claim(params, attempt):
                return params
        return None


def create_running(study, params: dict):
    """A new trial of ``params`` (its other axes left to the sampler), RUNNING in this worker's hands."""
    import optuna
    from optuna.trial import TrialState

    template = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={"fixed_params": params})
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return _trial(study, trial_id)


def take_waiting(study):
    """A WAITING trial set RUNNING by this worker, or None (never a new trial, unlike ``study.ask``)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return _trial(study, t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def _trial(study, trial_id: int):
    import optuna

    # what ``ask`` does before it hands out a trial: TPE (constant liar) then sees every worker's trials
    # as they are now, not this process's cached copy
    local = getattr(study, "_thread_local", None)
    if local is not None:
        local.cached_all_trials = None
    return optuna.Trial(study, trial_id)
