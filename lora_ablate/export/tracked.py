"""A study as tracking recorded it (docs/tracking.md): its trials as a tidy pandas frame, the axes to group
them by, its metrics and objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd

from lora_ablate.errors import UserError, choices
from lora_ablate.export.axes import ResultAxis, bin_labels, detect_axes
from lora_ablate.export.runs import AXES_TAG, RunStore, trials_frame
from lora_ablate.tracking import BASE_KIND
from lora_ablate.vocab import State, metric_direction
from lora_ablate.workspace import redact

DEFAULT_OBJECTIVE = "heldout_instances/nll"
# The base model's metrics: ``final/...`` of a ``base model`` run; ``base/...`` of the parent run in a study
# tracked before base runs existed (docs/tracking.md).
BASE_PREFIXES = {BASE_KIND: "final/", "study": "base/"}


@dataclass
class Study:
    """One study as tracking recorded it. ``trials`` has one row per trial run: ``run_id``,
    ``trial_number``, ``state`` (COMPLETE, FAIL, PRUNED, or RUNNING for a worker still busy or
    killed), ``fail_reason``, ``config_key``, the params (typed), ``final/<set>/<metric>`` and the
    scalar metrics (tokens_per_s, peak_mem_mb, train_s, wall_s)."""

    name: str
    uri: str
    experiment_id: str
    tags: dict
    trials: pd.DataFrame
    _store: RunStore | None = field(repr=False, default=None)
    # the base model's held-out metrics ``{"<set>/<metric>": value}`` as its newest evaluation logged them
    base: dict = field(default_factory=dict)

    @property
    def display_uri(self) -> str:
        return redact(self.uri)

    @cached_property
    def complete(self) -> pd.DataFrame:
        """Complete trials, with a ``<axis> bin`` column for each binned axis."""
        df = self.trials[self.trials["state"] == State.COMPLETE].copy()
        for axis in self.axes:
            if axis.binned:
                df[axis.column] = bin_labels(df[axis.name])
        return df

    @cached_property
    def axes(self) -> list[ResultAxis]:
        return detect_axes(self.trials[self.trials["state"] == State.COMPLETE], self.recorded_axes)

    @property
    def recorded_axes(self) -> list[str] | None:
        """The space's axes as the study recorded them (``lora_ablate.axes``: Optuna param names, seed
        not among them); None for a study tracked before the tag, whose axes are what varies."""
        tag = self.tags.get(AXES_TAG)
        return [n for n in (tag or "").split(",") if n] or None

    def counts(self) -> dict[str, int]:
        return {s: int(n) for s, n in self.trials["state"].value_counts().items()}

    @property
    def metrics(self) -> list[str]:
        """``<set>/<metric>`` for every final held-out metric some complete trial logged (``n``, the
        example count, is not a metric)."""
        done = self.trials[self.trials["state"] == State.COMPLETE]
        keys = [c[len("final/"):] for c in done.columns if c.startswith("final/") and done[c].notna().any()]
        return [k for k in keys if not k.endswith("/n")]

    @property
    def objective(self) -> str:
        obj = self.tags.get("lora_ablate.objective") or DEFAULT_OBJECTIVE
        return obj[len("final/"):] if obj.startswith("final/") else obj

    def direction(self, metric: str | None = None) -> str:
        metric = metric or self.objective
        tagged = self.tags.get("lora_ablate.direction")
        if metric == self.objective and tagged in ("minimize", "maximize"):
            return tagged
        return metric_direction(metric)

    def resolve_metric(self, text: str | None) -> str:
        """``<set>/<metric>`` or ``final/<set>/<metric>`` -> ``<set>/<metric>``; default the objective."""
        m = text or self.objective
        m = m[len("final/"):] if m.startswith("final/") else m
        if m not in self.metrics:
            raise UserError(f"unknown metric {m!r} for study {self.name!r}; available: "
                            f"{choices(self.metrics) or '(no complete trial logged final metrics)'}")
        return m

    def curves(self, run_ids, keys) -> pd.DataFrame:
        """Step series (``train/loss``, ``<set>/nll``, ...) as rows ``run_id, key, step, value``."""
        return self._store.curves(run_ids, keys)

    def scores(self, run_ids) -> pd.DataFrame:
        """Per-example rows of each run's ``scores.jsonl``, with ``run_id`` added."""
        return self._store.scores(run_ids, self.name)

    @cached_property
    def example_scores(self) -> pd.DataFrame | None:
        """Every complete trial's per-example rows with its ``seed``; None when some run has none to read
        (a store written by hand, or artifacts gone), since a comparison over part of a group would mislead."""
        done = self.complete
        if self._store is None or done.empty:
            return None
        try:
            scores = self.scores(list(done["run_id"]))
        except UserError:
            return None
        seeds = dict(zip(done["run_id"], done["seed"] if "seed" in done else [0] * len(done)))
        return scores.assign(seed=scores["run_id"].map(seeds))


def open_study(name: str, workspace=None, tracking_uri: str | None = None) -> Study:
    """The study ``name`` of the workspace's store, or of ``tracking_uri`` (which wins)."""
    store = RunStore(workspace, tracking_uri)
    experiment_id = store.experiment_id(name)
    if experiment_id is None:
        raise UserError(f"unknown study {name!r} in {redact(store.uri)}; studies there: "
                        f"{choices(store.study_names()) or '(none)'}")
    runs = store.runs(experiment_id)
    parents = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial"
              or ("lora_ablate.kind" not in r.data.tags and "mlflow.parentRunId" in r.data.tags)]
    if not trials:
        raise UserError(f"study {name!r} has no trial runs in {redact(store.uri)}")
    # Several study invocations (resumes, workers) each log a parent; the newest one speaks for the
    # study, since a resume may change the objective.
    newest = sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True)
    tags = dict(newest[0].data.tags) if newest else {}
    # parents recorded before the axes tag existed have none: the newest that has it speaks
    axes = next((r.data.tags[AXES_TAG] for r in newest if AXES_TAG in r.data.tags), None)
    if axes is not None:
        tags[AXES_TAG] = axes
    return Study(name, store.uri, experiment_id, tags, trials_frame(trials), store, base_metrics(runs))


def base_metrics(runs) -> dict:
    """The base model's metrics of the newest run that holds them, of either layout: a resume that skipped
    the base evaluation logs none, and an older invocation's may be a parent run's ``base/*``."""
    found = []
    for r in runs:
        prefix = BASE_PREFIXES.get(r.data.tags.get("lora_ablate.kind", ""))
        metrics = {k[len(prefix):]: v for k, v in r.data.metrics.items() if prefix and k.startswith(prefix)}
        if metrics:
            found.append((r.info.start_time or 0, metrics))
    return max(found, key=lambda x: x[0])[1] if found else {}
