"""Workers that join a study from the storage alone: the base experiment and the space a study was created
with are in its user attrs (``storage.stored_setup``), so a worker on any machine needs the study's name and
the stores' URLs, and no config file. Also who is working on a study right now (``live_workers``), and what
the shared stores cost each worker (``timed``, on with ``$LORA_ABLATE_TIMINGS``)."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

from lora_ablate.config import build_experiment
from lora_ablate.errors import UserError, choices
from lora_ablate.spaces import Space, load_space, parse_space
from lora_ablate.stores import worker_label
from lora_ablate.study.storage import open_storage, quiet_optuna
from lora_ablate.workspace import redact

TIMINGS_ENV = "LORA_ABLATE_TIMINGS"


@contextmanager
def timed(op: str):
    """With ``$LORA_ABLATE_TIMINGS=DIR``, append ``{op, seconds, worker}`` for the block to
    ``DIR/<worker>.jsonl``: how long a worker waits on the shared stores (claim/ask, tell, MLflow), which
    grows with the number of workers and is invisible in a trial's own wall time. Off, it costs one
    environment read. One file per process, so no two writers share a file."""
    folder = os.environ.get(TIMINGS_ENV)
    if not folder:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        who = worker_label()
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{who}.jsonl"), "a") as f:
            f.write(json.dumps({"op": op, "seconds": seconds, "worker": who, "t": time.time()}) + "\n")


def joined_setup(storage_url: str, name: str, study: dict, tracking: dict) -> tuple[Space, object]:
    """(space, base experiment) of study ``name`` as its storage holds it; ``study`` and ``tracking`` are this
    worker's own settings (workspace, pack, timeout; the tracking store), laid over the stored ones."""
    import optuna

    quiet_optuna()  # before the storage opens: its heartbeat setting warns, and a refusal is one line
    storage = open_storage(storage_url)
    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        known = f"; studies there: {choices(names)}" if names else "; it holds no study yet"
        raise UserError(f"no study {name!r} in {redact(storage_url)}{known}")
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    if "experiment" not in attrs:
        raise UserError(f"study {name!r} does not record its settings (created by an older lora_ablate); run "
                        "`python -m lora_ablate study` once with its settings to store them")
    space_def = attrs.get("space_def")
    space = parse_space(space_def, str(space_def.get("name") or attrs.get("space"))) if space_def \
        else load_space(str(attrs["space"]))
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in attrs["experiment"].items()}
    raw["study"] = {**raw.get("study", {}), "name": name, "storage": storage_url,
                    **{k: v for k, v in study.items() if v is not None}}
    raw["tracking"] = {k: v for k, v in tracking.items() if v is not None}
    return space, build_experiment(raw)


@dataclass
class LiveWorker:
    worker: str  # host-pid[-gpuN]
    running: list[int]  # its trials in flight
    last_beat: float | None  # seconds ago


def live_workers(storage, study) -> list[LiveWorker]:
    """The workers with trials RUNNING now, from the trials' ``worker`` attr and Optuna's heartbeat table."""
    import sqlalchemy as sa
    from optuna.trial import TrialState

    by_worker: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        label = f"{w.get('host', '?')}-{w.get('pid', '?')}" + (f"-gpu{w['gpu']}" if w.get("gpu") else "")
        by_worker.setdefault(label, []).append(t)
    beats: dict[int, float] = {}
    if by_worker:
        # Optuna's own table (its heartbeat API only answers "stale or not"), typed so that every driver
        # returns datetimes; they are the database's clock (PostgreSQL: session time zone; SQLite: UTC)
        table = sa.Table("trial_heartbeats", sa.MetaData(), sa.Column("trial_id", sa.Integer),
                         sa.Column("heartbeat", sa.DateTime))
        sqlite = storage.engine.dialect.name == "sqlite"
        try:
            with storage.engine.connect() as conn:
                rows = conn.execute(sa.select(table.c.trial_id, table.c.heartbeat)).all()
                now = _utcnow() if sqlite else conn.execute(
                    sa.select(sa.cast(sa.func.current_timestamp(), sa.DateTime))).scalar()
        except sa.exc.SQLAlchemyError:
            rows, now = [], None
        for tid, beat in rows:
            if beat is not None and now is not None:
                beats[tid] = (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()
    out = []
    for worker, trials in sorted(by_worker.items()):
        ages = [beats[t._trial_id] for t in trials if t._trial_id in beats]
        out.append(LiveWorker(worker, sorted(t.number for t in trials), min(ages) if ages else None))
    return out


def _utcnow():
    import datetime

    # SQLite's CURRENT_TIMESTAMP, which Optuna's heartbeat writes there, is UTC
    return datetime.datetime.fromtimestamp(time.time(), datetime.UTC).replace(tzinfo=None)
