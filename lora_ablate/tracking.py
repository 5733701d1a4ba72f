"""MLflow tracking of studies, by the schema in docs/tracking.md: one experiment per study, one parent run
per ``study`` invocation, one nested run per trial.

The only module that writes to MLflow (``export.runs`` reads the store back; ``ui_server`` serves it).
``mlflow`` is imported only when tracking is on, so a study with
``--no-tracking`` neither needs nor loads it. Runs are addressed by id through ``MlflowClient`` (never
the fluent active-run stack), so several trials of a pack can be open at once.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lora_ablate.config import Experiment
from lora_ablate.stores import creation_lock, db_url, retry_race, worker_id, worker_label
from lora_ablate.vocab import State
from lora_ablate.workspace import artifact_root, mlflow_uri, redact

if TYPE_CHECKING:  # annotations only: reading a store (export, status) must not import torch
    from lora_ablate.evaluation import EvalReport
    from lora_ablate.trial import TrialResult

TAG = "lora_ablate."
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
# Step metrics of a run are written at most this often (and whenever the run ends): with one store
# transaction per trial per log step, a pack of 21 trials trained at 86 ms a step through the CLI on an H200
# with the sqlite store, 52.5 ms with these batches.
FLUSH_SECONDS = 10.0


@dataclass
class StudyInfo:
    """What the parent run records about one study invocation."""

    name: str
    space: str
    objective: str
    direction: str
    storage: str
    exp: Experiment  # the study's base experiment (before the axes)
    model_source: str = ""
    axes: tuple[str, ...] = ()  # the space's axes as Optuna params (not what they determine, e.g. r under a budget)


@dataclass
class TrialRecord:
    """One trial as tracking sees it: ``params`` are its Optuna params, ``exp`` its resolved experiment."""

    number: int
    params: dict
    exp: Experiment | None
    config_key: str = ""
    state: str = State.RUNNING  # then one of FINAL_STATES
    reason: str = ""
    result: TrialResult | None = None
    wall_s: float = 0.0


def trial_params(exp: Experiment, params: dict) -> dict[str, str]:
    """The documented top-level params, then the whole resolved config as ``cfg.<section>.<key>``."""
    lora, train = exp.lora, exp.train
    out = {"r": lora.r, "alpha": lora.lora_alpha, "alpha_rule": lora.alpha_rule, "scaling": lora.scaling,
           "lr": train.lr, "targets": ",".join(lora.targets), "seed": train.seed, "steps": train.steps}
    # a space may vary other settings (dropout, warmup, ...): their Optuna names are params too
    out.update({k: v for k, v in params.items() if k not in out})
    out.update({f"cfg.{k}": v for k, v in redacted(exp).flat().items()})
    return {k: str(v) for k, v in out.items()}


def redacted(exp: Experiment) -> Experiment:
    """``exp`` with the passwords of its store URLs masked: what a run records (params, config.yaml)."""
    from lora_ablate.config import replace

    return replace(exp, study={"storage": redact(exp.study.storage)}, tracking={"uri": redact(exp.tracking.uri)})


class Tracker:
    """Tracking switched off: every call is a no-op, so a study runs the same without MLflow."""

    enabled = False

    def start_study(self, info: StudyInfo) -> None:
        pass

    def log_base(self, report: EvalReport) -> None:
        pass

    def start_trial(self, trial: TrialRecord) -> str:
        """Open the trial's run; returns its id ("" when off)."""
        return ""

    def staging_dir(self, run_id: str) -> Path | None:
        """A folder for the trial's artifacts (the engine saves the adapter there); None when off."""
        return None

    def log_step(self, run_id: str, step: int, values: dict[str, float]) -> None:
        pass

    def finish_trial(self, run_id: str, trial: TrialRecord) -> None:
        pass

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close the run of a trial whose worker died (found stale by the Optuna heartbeat)."""

    def trial_run_id(self, study: str, number: int) -> str:
        """The open run of trial ``number`` ("" if none): for a worker killed before it noted the run's id."""
        return ""

    def end_study(self, status: str, summary: dict[str, float]) -> None:
        pass


class MlflowTracker(Tracker):
    enabled = True

    def __init__(self, uri: str, artifacts: Path | None):
        self.uri, self.artifacts = uri, artifacts
        self._client = None
        self.experiment_id = ""
        self.parent_id = ""
        self.study = ""
        self.storage = ""
        self._staging: dict[str, Path] = {}
        self._pending: dict[str, list] = {}  # run id -> step metrics not written yet
        self._flushed: dict[str, float] = {}  # run id -> clock() of its last write
        self.clock = time.monotonic

    @property
    def client(self):
        if self._client is None:
            for name in ("mlflow", "alembic"):  # table creation logs at INFO on a new store
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            with creation_lock(self.uri):  # opening a database store creates (or migrates) its schema
                self._client = retry_race(lambda: MlflowClient(tracking_uri=db_url(self.uri)))
        return self._client

    def _experiment(self, name: str, tags: dict) -> str:
        # every worker of a study starts here, maybe at the same moment on a fresh store: the store's schema
        # and the experiment's unique name are created by one of them, the others retry and find them
        return retry_race(lambda: self._find_or_create_experiment(name, tags))

    def _find_or_create_experiment(self, name: str, tags: dict) -> str:
        from mlflow.entities import LifecycleStage

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == LifecycleStage.DELETED:
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.artifacts is not None:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            location = f"{self.artifacts.as_uri()}/{re.sub(r'[^A-Za-z0-9._-]', '_', name)}"
        return self.client.create_experiment(name, artifact_location=location, tags=tags)

    def start_study(self, info: StudyInfo) -> None:
        from lora_ablate.rundir import environment

        env = environment()
        self.study, self.storage = info.name, info.storage
        self.experiment_id = self._experiment(info.name, {f"{TAG}space": info.space})
        tags = {f"{TAG}kind": "study", f"{TAG}study": info.name, f"{TAG}space": info.space,
                f"{TAG}model": info.exp.model.name, f"{TAG}model_source": info.model_source,
                f"{TAG}data": info.exp.data.train, f"{TAG}git_sha": env["git_sha"] or "unknown",
                f"{TAG}device": env["device"], f"{TAG}objective": info.objective,
                f"{TAG}direction": info.direction, f"{TAG}optuna_storage": info.storage,
                # export groups by these alone, never by what they determine (r under match_budget)
                f"{TAG}axes": ",".join(info.axes),
                **{f"{TAG}version.{k}": v for k, v in env["packages"].items() if v},
                **{f"{TAG}worker.{k}": v for k, v in worker_id().items()}}
        # one parent run per worker process: its name says which (several may start in the same second)
        run = self.client.create_run(self.experiment_id, tags=tags,
                                     run_name=f"study-{worker_label()}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.parent_id = run.info.run_id

    def log_base(self, report: EvalReport) -> None:
        self._metrics(self.parent_id, 0, report.flat("base/"))
        with tempfile.TemporaryDirectory(prefix="lora_ablate_base_") as tmp:
            _jsonl(Path(tmp) / "base_scores.jsonl", report.examples)
            self.client.log_artifacts(self.parent_id, tmp)

    def start_trial(self, trial: TrialRecord) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, f"{TAG}kind": "trial", f"{TAG}study": self.study,
                f"{TAG}trial_number": str(trial.number), f"{TAG}state": State.RUNNING,
                f"{TAG}config_key": trial.config_key, f"{TAG}optuna_storage": self.storage}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial-{trial.number}")
        run_id = run.info.run_id
        params = trial_params(trial.exp, trial.params) if trial.exp is not None else trial.params
        self._params(run_id, {k: str(v) for k, v in params.items()})
        return run_id

    def staging_dir(self, run_id: str) -> Path | None:
        if run_id not in self._staging:
            self._staging[run_id] = Path(tempfile.mkdtemp(prefix=f"lora_ablate_{run_id[:8]}_"))
        return self._staging[run_id]

    def log_step(self, run_id: str, step: int, values: dict[str, float]) -> None:
        self._pending.setdefault(run_id, []).extend(_as_metrics(step, values))
        last = self._flushed.get(run_id)
        if last is None or self.clock() - last >= FLUSH_SECONDS:
            self._flush(run_id)

    def _flush(self, run_id: str) -> None:
        self._write(run_id, self._pending.pop(run_id, []))
        self._flushed[run_id] = self.clock()

    def finish_trial(self, run_id: str, trial: TrialRecord) -> None:
        from mlflow.entities import RunTag

        staging = self.staging_dir(run_id)
        try:
            self._flush(run_id)
            r = trial.result
            tags = [RunTag(f"{TAG}state", trial.state)]
            if trial.reason:
                tags.append(RunTag(f"{TAG}fail_reason", trial.reason[:5000]))
            self.client.log_batch(run_id, tags=tags)
            metrics = {"wall_s": trial.wall_s}
            if r is not None:
                self._params(run_id, {"trainable_params": str(r.trainable_params)})
                metrics.update({"tokens_per_s": r.tokens_per_s, "train_s": r.train_seconds})
                if r.peak_mem_mb:  # measured on CUDA only
                    metrics["peak_mem_mb"] = r.peak_mem_mb
                if r.final is not None:
                    metrics.update(r.final.flat("final/"))
                    _jsonl(staging / "scores.jsonl", r.final.examples)
                _jsonl(staging / "history.jsonl", [{"kind": "train", **h} for h in r.history]
                       + [{"kind": "eval", **e} for e in r.evals])
            step = trial.exp.train.steps if trial.exp is not None else 0
            self._metrics(run_id, step, metrics)
            if trial.exp is not None:
                (staging / "config.yaml").write_text(yaml.safe_dump(redacted(trial.exp).to_dict(), sort_keys=False))
            if any(staging.iterdir()):
                self.client.log_artifacts(run_id, str(staging))
            self.client.set_terminated(run_id, State(trial.state).run_status)
        finally:
            shutil.rmtree(self._staging.pop(run_id, staging), ignore_errors=True)

    def fail_run(self, run_id: str, reason: str) -> None:
        from mlflow.entities import RunTag

        self._flush(run_id)
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}state", State.FAIL), RunTag(f"{TAG}fail_reason", reason)])
        self.client.set_terminated(run_id, State.FAIL.run_status)

    def trial_run_id(self, study: str, number: int) -> str:
        found = self.client.get_experiment_by_name(study)
        if found is None:
            return ""
        runs = self.client.search_runs([found.experiment_id], f"tags.`{TAG}kind` = 'trial' and "
                                       f"tags.`{TAG}trial_number` = '{number}' and attributes.status = 'RUNNING'")
        return runs[0].info.run_id if runs else ""

    def end_study(self, status: str, summary: dict[str, float]) -> None:
        for run_id in list(self._pending):  # runs that never finished (an interrupted study)
            self._flush(run_id)
        if not self.parent_id:
            return
        self._metrics(self.parent_id, 0, summary)
        self.client.set_terminated(self.parent_id, status)

    def _metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        self._write(run_id, _as_metrics(step, values))

    def _write(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per log_batch call
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def _params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])


def _as_metrics(step: int, values: dict[str, float]) -> list:
    """MLflow Metrics of the numeric ``values`` at ``step``, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def make_tracker(exp: Experiment) -> Tracker:
    if not exp.tracking.enabled:
        return Tracker()
    artifacts = (Path(exp.tracking.artifact_root).expanduser().resolve() if exp.tracking.artifact_root
                 else artifact_root(exp.study.workspace, exp.tracking.uri))
    return MlflowTracker(exp.tracking.uri or mlflow_uri(exp.study.workspace), artifacts)


def _jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)
