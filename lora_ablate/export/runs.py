"""The MLflow side of export: the tracking schema of docs/tracking.md as export reads it, and the store
read through ``MlflowClient`` (experiments, runs, metric histories, artifacts).

The only module of ``export`` that talks to MLflow, and it only reads, so export works the same on a
laptop's SQLite store and on a tracking server many workers wrote to.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from lora_ablate.config import coerce
from lora_ablate.errors import UserError
from lora_ablate.tracking import CONFIG_TAG, DERIVED_TAGS, PARENT_TAG, TAG
from lora_ablate.vocab import SEED_PARAM, State, config_hash, targets_text
from lora_ablate.workspace import existing_tracking_uri

# MLflow stores params as strings; these are the documented trial params and their types.
PARAM_TYPES = {"r": int, "alpha": float, "alpha_rule": str, "scaling": float, "lr": float, "targets": str,
               "seed": int, "steps": int, "trainable_params": int}
SCALARS = ("tokens_per_s", "peak_mem_mb", "train_s", "wall_s")
# The parent run's tag naming the space's axes (their Optuna params, comma-separated): only these are
# grouped by, so r derived from targets under match_budget is no axis although it varies.
AXES_TAG = "lora_ablate.axes"
# Columns of the trials frame that are not params.
NON_PARAM_COLUMNS = ("run_id", "trial_number", "state", "fail_reason", "config_key", "parent_run_id")
PAGE = 1000  # runs or experiments per search request


def _typed(value: str | None, typ=None):
    """An MLflow param as its documented type; an undocumented one as int, float or its text."""
    if value is None:
        return None
    for t in (typ,) if typ else (int, float):
        try:
            return coerce("param", value, t)
        except UserError:
            pass
    return value


def fallback_key(params: dict) -> str:
    """The config key of a trial run without the ``lora_ablate.config_key`` tag: a hash of the top-level
    params except seed (trainable_params and scaling follow from the others)."""
    return config_hash({k: params[k] for k in sorted(params)
                        if k in PARAM_TYPES and k not in (SEED_PARAM, "trainable_params")})


def run_params(tags: dict, params: dict, metrics: dict) -> dict:
    """A trial run's params, typed, as one layout: ``cfg.<section>.<key>``, ``alpha``, ``scaling`` and
    ``trainable_params`` are params of a run tracked before they moved to tags and metrics, and read back
    from there for a newer one."""
    raw = dict(params)
    for k, v in json.loads(tags.get(CONFIG_TAG) or "{}").items():
        raw.setdefault(f"cfg.{k}", v)
    for k in DERIVED_TAGS:
        if f"{TAG}{k}" in tags:
            raw.setdefault(k, tags[f"{TAG}{k}"])
    if "trainable_params" in metrics:
        raw.setdefault("trainable_params", str(int(metrics["trainable_params"])))
    return {k: _typed(v, PARAM_TYPES.get(k)) for k, v in raw.items()}


def trials_frame(runs) -> pd.DataFrame:
    """One row per trial run: ids, state, params (typed), final and scalar metrics; in trial order."""
    rows = []
    for r in runs:
        t, p, m = r.data.tags, r.data.params, r.data.metrics
        params = run_params(t, p, m)
        if "targets" in params and params["targets"] is not None:
            params["targets"] = targets_text(str(params["targets"]).split(","))
        rows.append({
            "run_id": r.info.run_id,
            "trial_number": _typed(t.get("lora_ablate.trial_number", ""), int),
            "state": t.get("lora_ablate.state") or State.of_run(r.info.status).value,
            "fail_reason": t.get("lora_ablate.fail_reason", ""),
            "config_key": t.get("lora_ablate.config_key") or fallback_key(params),
            "parent_run_id": t.get(PARENT_TAG) or t.get("mlflow.parentRunId", ""),
            **params,
            **{k: v for k, v in m.items() if k.startswith("final/") or k in SCALARS},
        })
    df = pd.DataFrame(rows)
    df["trial_number"] = pd.to_numeric(df["trial_number"], errors="coerce").astype("Int64")
    return df.sort_values(["trial_number", "run_id"], na_position="last").reset_index(drop=True)


class RunStore:
    """One tracking store, read only."""

    def __init__(self, workspace=None, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.uri = existing_tracking_uri(workspace, tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        # (run, key) -> [(step, value)]: the curves plot and the steps-to-loss table read the same histories,
        # one request per run and key against a tracking server
        self._histories: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def study_names(self) -> list[str]:
        from mlflow.utils import get_results_from_paginated_fn

        exps = get_results_from_paginated_fn(
            lambda n, token: self.client.search_experiments(max_results=n, page_token=token), PAGE)
        return sorted(e.name for e in exps if e.name != "Default")

    def experiment_id(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None

    def runs(self, experiment_id: str) -> list:
        from mlflow.utils import get_results_from_paginated_fn

        return get_results_from_paginated_fn(
            lambda n, token: self.client.search_runs([experiment_id], max_results=n, page_token=token), PAGE)

    def curves(self, run_ids, keys) -> pd.DataFrame:
        """Step series (``train/loss``, ``<set>/nll``, ...) as rows ``run_id, key, step, value``."""
        rows = [(rid, key, step, value) for rid in run_ids for key in keys for step, value in self._history(rid, key)]
        return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])

    def _history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        if (run_id, key) not in self._histories:
            self._histories[run_id, key] = [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
        return self._histories[run_id, key]

    def scores(self, run_ids, study: str) -> pd.DataFrame:
        """Per-example rows of each run's ``scores.jsonl``, with ``run_id`` added."""
        # one progress bar per tiny file would bury the answer on stderr; a user's own setting wins
        quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
        if quiet:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            return self._download_scores(run_ids, study)
        finally:
            if quiet:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)

    def _download_scores(self, run_ids, study: str) -> pd.DataFrame:
        frames = []
        with tempfile.TemporaryDirectory(prefix="lora_ablate_scores_") as tmp:
            for rid in run_ids:
                dst = Path(tmp) / rid
                dst.mkdir()
                try:
                    path = self.client.download_artifacts(rid, "scores.jsonl", str(dst))
                except Exception as e:  # MLflow raises its own and OSError types, by store
                    raise UserError(f"run {rid} of study {study!r} has no readable scores.jsonl "
                                    f"artifact ({type(e).__name__})") from e
                df = pd.read_json(path, lines=True)
                if "phase" in df:  # a train-command scores file also holds the base model's rows
                    df = df[df["phase"] == "final"]
                frames.append(df.assign(run_id=rid))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
