"""MLflow tracking of studies, by the schema in docs/tracking.md: one experiment per study, one parent run
per ``study`` invocation, one ``base model`` run per base evaluation and one run per trial beside them.

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
from typing import TYPE_CHECKING, Callable

import yaml

from lora_ablate.config import Experiment
from lora_ablate.stores import creation_lock, db_url, retry_race, worker_id, worker_label
from lora_ablate.vocab import SEED_PARAM, State, format_value
from lora_ablate.workspace import artifact_root, mlflow_uri, redact, relocate

if TYPE_CHECKING:  # annotations only: reading a store (export, status) must not import torch
    from lora_ablate.evaluation import EvalReport
    from lora_ablate.trial import TrialResult

TAG = "lora_ablate."
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
# Step metrics of a run are written at most this often (and whenever the run ends): with one store
# transaction per trial per log step, a pack of 21 trials trained at 86 ms a step through the CLI on an H200
# with the sqlite store, 52.5 ms with these batches.
FLUSH_SECONDS = 10.0
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, none here); this value is
# the "Machine learning" kind of its UI, which opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The objective's value under one name in every study, so the UI's charts and a runs-table column can
# open on it whatever the study optimises (the tag lora_ablate.objective says which metric it is).
OBJECTIVE_METRIC = "objective"
# Trial and base runs point at their invocation's parent run with this tag rather than mlflow.parentRunId:
# the UI folds nested runs under a collapsed parent, so its charts would open on the parent's metrics alone.
PARENT_TAG = f"{TAG}parent_run"
# The whole resolved config of a trial, as JSON of ``<section>.<key>`` -> text, in one tag: as ~60 params
# it buried the axes in the UI's param lists (sorted by name) and repeated them under a second name.
CONFIG_TAG = f"{TAG}config"
# Values a trial's settings determine (``alpha`` handed to peft is r under the rank rule): tags, not params,
# so the UI's "params that differ" are the axes and the seed, each once.
DERIVED_TAGS = ("alpha", "scaling")
BASE_KIND, BASE_RUN_NAME = "base", "base model"  # lora_ablate.kind and name of a base-model run


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
    space_file: str = ""  # the space's YAML file, when it was read from one
    space_description: str = ""


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
    # the study's tell: called by finish_trial once the run holds everything and before it is marked ended,
    # so a process killed in between leaves a run that the next invocation can close from Optuna's state
    commit: Callable[[], None] | None = None


def run_name(params: dict, axes: tuple[str, ...], number: int) -> str:
    """``r=8 seed=0``, ``targets=q,v r=8 seed=1``: what tells a trial from its study's others, as the
    runs table lists them; ``trial-<n>`` when the study recorded no axes."""
    shown = [k for k in axes if k in params] + [k for k in (SEED_PARAM,) if k in params and k not in axes]
    return " ".join(f"{k}={format_value(params[k])}" for k in shown) or f"trial-{number}"


def trial_params(exp: Experiment, params: dict, axes: tuple[str, ...] = ()) -> dict[str, str]:
    """What a trial varies and a few headline settings, each under one name: the study's axes, the
    resolved ``r``, ``alpha_rule``, ``targets``, ``lr``, ``steps`` and ``seed``, then any other Optuna param
    (a space may vary dropout, warmup, ...). The rest of the config is in :func:`trial_tags`."""
    lora, train = exp.lora, exp.train
    out = {k: params[k] for k in axes if k in params}
    out |= {"r": lora.r, "alpha_rule": lora.alpha_rule, "targets": ",".join(lora.targets), "lr": train.lr,
            "steps": train.steps, "seed": train.seed}
    out.update({k: v for k, v in params.items() if k not in out})
    return {k: str(v) for k, v in out.items()}


def trial_tags(exp: Experiment) -> dict[str, str]:
    """The trial's derived values (``alpha`` handed to peft, ``scaling``) and its whole resolved config
    (passwords masked) as one JSON tag."""
    flat = {k: str(v) for k, v in redacted(exp).flat().items()}
    return {f"{TAG}alpha": str(exp.lora.lora_alpha), f"{TAG}scaling": str(exp.lora.scaling),
            CONFIG_TAG: json.dumps(flat)}


def redacted(exp: Experiment) -> Experiment:
    """``exp`` with the passwords of its store URLs masked: what a run records (params, config.yaml)."""
    from lora_ablate.config import replace

    return replace(exp, study={"storage": redact(exp.study.storage)}, tracking={"uri": redact(exp.tracking.uri)})


class Tracker:
    """Tracking switched off: every call is a no-op, so a study runs the same without MLflow."""

    enabled = False
    parent_id = ""

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
        """Record the trial's end, then ``trial.commit()``, then mark its run ended."""
        if trial.commit is not None:
            trial.commit()

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close the run of a trial whose worker died (found stale by the Optuna heartbeat)."""

    def trial_run_id(self, study: str, number: int) -> str:
        """The open run of trial ``number`` ("" if none): for a worker killed before it noted the run's id."""
        return ""

    def running_parents(self, study: str) -> dict[str, float]:
        """Run id -> start time (unix s) of the study's RUNNING parent runs other than this invocation's."""
        return {}

    def close_dead(self, study: str, finished: dict[str, tuple[str, str]], dead: set[str]) -> None:
        """Close what dead invocations left RUNNING: a trial run whose trial is ``finished`` (run id ->
        (state, reason), as Optuna holds them) as Optuna says; any other trial run of a ``dead`` parent run as
        failed; the ``dead`` parent runs themselves as KILLED."""

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
        self.axes: tuple[str, ...] = ()
        self.objective = ""
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

            # opening a database store creates (or migrates) its schema; relocating reads that schema, so
            # it waits for the process creating it too
            with creation_lock(self.uri):
                if self.uri.startswith("sqlite:///"):
                    db = Path(self.uri[len("sqlite:///"):])
                    if self.artifacts is not None and db.parent.resolve() == self.artifacts.parent.resolve():
                        relocate(db, self.artifacts)  # the workspace's own store: it moves with the workspace
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
            for k, v in EXPERIMENT_KIND.items():  # a study tracked before the tag existed gets it too
                if found.tags.get(k) != v:
                    self.client.set_experiment_tag(found.experiment_id, k, v)
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
        self.axes = info.axes
        self.objective = info.objective
        self.experiment_id = self._experiment(info.name, {f"{TAG}space": info.space, **EXPERIMENT_KIND})
        tags = {f"{TAG}kind": "study", f"{TAG}study": info.name, f"{TAG}space": info.space,
                f"{TAG}model": info.exp.model.name, f"{TAG}model_source": info.model_source,
                f"{TAG}data": info.exp.data.train, f"{TAG}git_sha": env["git_sha"] or "unknown",
                f"{TAG}device": env["device"], f"{TAG}objective": info.objective,
                f"{TAG}direction": info.direction, f"{TAG}optuna_storage": info.storage,
                f"{TAG}space_file": info.space_file, f"{TAG}space_description": info.space_description,
                # export groups by these alone, never by what they determine (r under match_budget)
                f"{TAG}axes": ",".join(info.axes),
                **{f"{TAG}version.{k}": v for k, v in env["packages"].items() if v},
                **{f"{TAG}worker.{k}": v for k, v in worker_id().items()}}
        # one parent run per worker process: its name says which (several may start in the same second)
        run = self.client.create_run(self.experiment_id, tags=tags,
                                     run_name=f"study-{worker_label()}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.parent_id = run.info.run_id

    def log_base(self, report: EvalReport) -> None:
        """The base model's evaluation as a run of its own, its metrics under the trials' names
        (``final/<set>/<metric>``, ``objective``), so every chart of a trial metric shows it as one more bar."""
        tags = {f"{TAG}kind": BASE_KIND, f"{TAG}study": self.study, PARENT_TAG: self.parent_id}
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=BASE_RUN_NAME).info.run_id
        metrics = report.flat("final/")
        if self.objective in report.flat():
            metrics[OBJECTIVE_METRIC] = report.flat()[self.objective]
        self._metrics(run_id, 0, metrics)
        with tempfile.TemporaryDirectory(prefix="lora_ablate_base_") as tmp:
            _jsonl(Path(tmp) / "scores.jsonl", report.examples)
            self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, "FINISHED")

    def start_trial(self, trial: TrialRecord) -> str:
        tags = {PARENT_TAG: self.parent_id, f"{TAG}kind": "trial", f"{TAG}study": self.study,
                f"{TAG}trial_number": str(trial.number), f"{TAG}state": State.RUNNING,
                f"{TAG}config_key": trial.config_key, f"{TAG}optuna_storage": self.storage,
                **(trial_tags(trial.exp) if trial.exp is not None else {})}
        run = self.client.create_run(self.experiment_id, tags=tags,
                                     run_name=run_name(trial.params, self.axes, trial.number))
        run_id = run.info.run_id
        params = trial_params(trial.exp, trial.params, self.axes) if trial.exp is not None else trial.params
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
                # a metric, not a param: it follows from r and targets, and as a param it would take a
                # slot of the compare view's "params that differ"
                metrics.update({"trainable_params": r.trainable_params, "tokens_per_s": r.tokens_per_s,
                                "train_s": r.train_seconds})
                if r.peak_mem_mb:  # measured on CUDA only
                    metrics["peak_mem_mb"] = r.peak_mem_mb
                if r.final is not None:
                    metrics.update(r.final.flat("final/"))
                    if self.objective in r.final.flat():
                        metrics[OBJECTIVE_METRIC] = r.final.flat()[self.objective]
                    _jsonl(staging / "scores.jsonl", r.final.examples)
                _jsonl(staging / "history.jsonl", [{"kind": "train", **h} for h in r.history]
                       + [{"kind": "eval", **e} for e in r.evals])
            # at step 0, as the base model's: the UI charts a metric any run logged at a later step as a line
            # over steps (every trial a dot at the last one), and one logged at step 0 as a bar per run
            self._metrics(run_id, 0, metrics)
            if trial.exp is not None:
                (staging / "config.yaml").write_text(yaml.safe_dump(redacted(trial.exp).to_dict(), sort_keys=False))
            if any(staging.iterdir()):
                self.client.log_artifacts(run_id, str(staging))
        finally:
            shutil.rmtree(self._staging.pop(run_id, staging), ignore_errors=True)
        if trial.commit is not None:
            trial.commit()
        self.client.set_terminated(run_id, State(trial.state).run_status)

    def fail_run(self, run_id: str, reason: str) -> None:
        from mlflow.entities import RunTag

        self._flush(run_id)
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}state", State.FAIL), RunTag(f"{TAG}fail_reason", reason)])
        self.client.set_terminated(run_id, State.FAIL.run_status)

    def _running(self, study: str, kind: str) -> list:
        found = self.client.get_experiment_by_name(study)
        if found is None:
            return []
        return self.client.search_runs([found.experiment_id], max_results=50000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{TAG}kind` = '{kind}'"))

    def running_parents(self, study: str) -> dict[str, float]:
        return {r.info.run_id: r.info.start_time / 1000 for r in self._running(study, "study")
                if r.info.run_id != self.parent_id}

    def close_dead(self, study: str, finished: dict[str, tuple[str, str]], dead: set[str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        for r in self._running(study, "trial"):
            # a trial run of a study tracked before PARENT_TAG is nested under its parent instead
            run_id = r.info.run_id
            parent = r.data.tags.get(PARENT_TAG) or r.data.tags.get(MLFLOW_PARENT_RUN_ID, "")
            if run_id in finished:
                state, reason = finished[run_id]
            elif parent in dead:
                state, reason = State.FAIL, f"its invocation (parent run {parent}) stopped before the trial ended"
            else:
                continue  # a live worker's
            tags = [RunTag(f"{TAG}state", state)] + ([RunTag(f"{TAG}fail_reason", reason[:5000])] if reason else [])
            self.client.log_batch(run_id, tags=tags)
            self.client.set_terminated(run_id, State(state).run_status)
        for run_id in dead:
            self.client.set_tag(run_id, f"{TAG}fail_reason", "the invocation stopped without ending its run "
                                "(killed, or its machine went down); closed by a later one")
            self.client.set_terminated(run_id, "KILLED")

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
