"""The read side of tracking: an MLflow study (docs/tracking.md) -> a tidy pandas frame of trials.

This is the only module of ``export`` that talks to MLflow, and it only reads, so export works the
same on a laptop's SQLite store and on a tracking server many workers wrote to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from lora_ablate.config import ALPHA_RULES, ROLES, StudyConfig
from lora_ablate.errors import UserError, choices
from lora_ablate.tracking import default_uri, redact

DEFAULT_WORKSPACE = Path(StudyConfig().workspace)
DEFAULT_OBJECTIVE = "heldout_instances/nll"

# MLflow stores params as strings; these are the documented trial params and their types.
PARAM_TYPES = {"r": int, "alpha": float, "alpha_rule": str, "scaling": float, "lr": float, "targets": str,
               "seed": int, "steps": int, "trainable_params": int}
SCALARS = ("tokens_per_s", "peak_mem_mb", "train_s", "wall_s")
# The parent run's tag naming the space's axes (their Optuna params, comma-separated): only these are
# grouped by, so r derived from targets under match_budget is no axis although it varies.
AXES_TAG = "lora_ablate.axes"
# The ablation axes of the issue, in table order. In a study tracked before AXES_TAG existed, each is an
# axis whenever it varies, even when it follows from another (r derived from targets under a budget).
PRIMARY_AXES = ("r", "alpha_rule", "targets", "lr")
# Consequences of other params, and seed, the repeat axis: never axes.
NOT_AXES = ("seed", "scaling", "trainable_params")
# Other config fields a search space may vary (dropout, weight decay, ...) appear as a top-level param
# under their Optuna name and again as cfg.*; the cfg.* copies of the documented params are skipped.
EXTRA_AXIS_SECTIONS = ("cfg.lora.", "cfg.train.")
CFG_MIRRORS = {"cfg.lora.r", "cfg.lora.alpha", "cfg.lora.alpha_rule", "cfg.lora.targets", "cfg.train.lr",
               "cfg.train.seed", "cfg.train.steps"}
# More distinct values than this on a float axis means it was sampled, not gridded: bin it.
CONTINUOUS_ABOVE = 6
LOWER_IS_BETTER = ("nll", "ppl", "loss")
# Columns of the trials frame that are not params.
NON_PARAM_COLUMNS = ("run_id", "trial_number", "state", "fail_reason", "config_key", "parent_run_id")
# MLflow run status -> trial state, for trial runs that lack the lora_ablate.state tag.
STATUS_STATE = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "PRUNED"}


def resolve_uri(workspace: str | Path | None = None, tracking_uri: str | None = None) -> str:
    """``--tracking-uri`` wins; otherwise the workspace's SQLite store. A local store that does not
    exist is an error here, because MLflow would silently create an empty one."""
    if tracking_uri:
        uri = tracking_uri
    else:
        uri = default_uri(workspace or DEFAULT_WORKSPACE)
    local = None
    if uri.startswith("sqlite:///"):
        local = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file:"):
        local = Path(urlparse(uri).path)
    elif "://" not in uri:
        local = Path(uri)
    if local is not None and not local.exists():
        raise UserError(f"no MLflow store at {str(local)!r}; pass the study's --workspace or --tracking-uri")
    return uri


def metric_direction(metric: str) -> str:
    """Losses go down, scores go up."""
    return "minimize" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "maximize"


def canonical_targets(text: str) -> str:
    """``qv``, ``q,v``, ``v,q`` and ``q v`` -> ``q,v`` (the tracking form: roles in q,k,v,o,mlp order)."""
    s = "".join(str(text).replace(",", " ").split())
    roles, i = [], 0
    while i < len(s):
        role = next((r for r in sorted(ROLES, key=len, reverse=True) if s.startswith(r, i)), None)
        if role is None:
            raise UserError(f"targets={text!r} is not valid; write roles from: {choices(ROLES)} (e.g. qv or q,v)")
        roles.append(role)
        i += len(role)
    return ",".join(r for r in ROLES if r in roles)


def _coerce(value: str, typ=None):
    if value is None:
        return None
    if typ is str:
        return value
    for t in ((typ,) if typ else (int, float)):
        try:
            return t(float(value)) if t is int and "." in value else t(value)
        except (TypeError, ValueError):
            pass
    return value


def _sort_key(name: str):
    if name == "targets":
        def key(v):
            roles = str(v).split(",")
            return (len(roles), [ROLES.index(r) if r in ROLES else len(ROLES) for r in roles], str(v))
        return key
    if name == "alpha_rule":
        return lambda v: (ALPHA_RULES.index(v) if v in ALPHA_RULES else len(ALPHA_RULES), str(v))
    return lambda v: (0, v, "") if isinstance(v, (int, float, np.number)) else (1, 0, str(v))


def format_value(v) -> str:
    """Display form; four significant digits is what a sampled learning rate needs to be told apart
    (and what :func:`select` accepts back)."""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class Axis:
    """One ablation axis. ``column`` holds the value to group by: the param itself, or for a sampled
    float axis its log-scale bin label (``values`` are then the bin labels in order)."""

    name: str
    values: tuple
    binned: bool = False

    @property
    def column(self) -> str:
        return f"{self.name} bin" if self.binned else self.name

    @property
    def label(self) -> str:
        short = self.name.rsplit(".", 1)[-1]
        return {"r": "rank r", "alpha_rule": "alpha rule", "lr": "learning rate"}.get(short, short)

    def sort_key(self):
        if self.binned:
            return lambda v: self.values.index(v)
        return _sort_key(self.name)


def log_bins(values) -> tuple[list[str], list[str]]:
    """Bin positive values on a log scale: ``(label per value, labels in order)``.

    Edges sit at 10^(j/k) for the smallest k in (1, 2, 4, 10) bins per decade that gives at least 4
    bins, so bins are comparable across studies and a decade is never split unevenly.
    """
    x = np.log10(np.asarray(values, dtype=float))
    for k in (1, 2, 4, 10):
        lo, hi = math.floor(x.min() * k + 1e-9), math.ceil(x.max() * k - 1e-9)
        hi = max(hi, lo + 1)
        if hi - lo >= 4 or k == 10:
            break
    edges = [10 ** (j / k) for j in range(lo, hi + 1)]
    names = [f"{a:.1e}–{b:.1e}" for a, b in zip(edges, edges[1:])]
    idx = np.clip(np.floor(x * k - lo + 1e-9).astype(int), 0, len(names) - 1)
    used = sorted(set(idx.tolist()))
    return [names[i] for i in idx], [names[i] for i in used]


def linear_bins(values, n: int = 5) -> tuple[list[str], list[str]]:
    x = np.asarray(values, dtype=float)
    edges = np.linspace(x.min(), x.max(), n + 1)
    names = [f"{a:.3g}–{b:.3g}" for a, b in zip(edges, edges[1:])]
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n - 1)
    used = sorted(set(idx.tolist()))
    return [names[i] for i in idx], [names[i] for i in used]


def _by_name(names) -> list[str]:
    """Axes after the primary ones: alpha and steps first, then by name."""
    return sorted(names, key=lambda c: (c not in ("alpha", "steps"), c))


def _axis_of(complete: pd.DataFrame, name: str) -> Axis:
    """The axis of param ``name``, its values in order; a float param sampled over many values is binned."""
    col = complete[name].dropna()
    distinct = sorted(col.unique().tolist(), key=_sort_key(name))
    is_float = pd.api.types.is_float_dtype(col) and not all(float(v).is_integer() for v in distinct)
    if is_float and len(distinct) > CONTINUOUS_ABOVE:
        labels = log_bins(distinct)[1] if min(distinct) > 0 else linear_bins(distinct)[1]
        return Axis(name, tuple(labels), binned=True)
    return Axis(name, tuple(distinct))


def detect_axes(complete: pd.DataFrame, recorded: list[str] | None = None) -> list[Axis]:
    """The axes to group ``complete`` trials by, in table order (the primary axes, then alpha, steps, the
    rest by name). ``recorded``: the space's axes as the study recorded them; each is an axis when it
    varies among the complete trials. Without (a study tracked before the tag), every param that varies:
    the primary axes, then other params (alpha, steps, a space's extra Optuna params, cfg.lora.* and
    cfg.train.*), each skipped when the axes already chosen determine it (``alpha`` under the rank rule
    is ``r`` again; ``cfg.lora.dropout`` repeats a ``dropout`` axis)."""
    if recorded is not None:
        names = [c for c in PRIMARY_AXES if c in recorded] + _by_name(c for c in recorded if c not in PRIMARY_AXES)
        return [_axis_of(complete, c) for c in names if c in complete and complete[c].dropna().nunique() >= 2]
    params = [c for c in complete.columns
              if c not in NON_PARAM_COLUMNS and not c.startswith("final/") and c not in SCALARS]
    primary = [c for c in PRIMARY_AXES if c in complete]
    top = [c for c in params if not c.startswith("cfg.") and c not in PRIMARY_AXES + NOT_AXES]
    others = _by_name(top)
    others += sorted(c for c in params if c.startswith(EXTRA_AXIS_SECTIONS) and c not in CFG_MIRRORS)
    chosen: list[str] = []
    axes: list[Axis] = []
    for c in primary + others:
        col = complete[c].dropna()
        if col.nunique() < 2:
            continue
        if c not in PRIMARY_AXES and chosen and \
                complete.groupby(chosen, dropna=False)[c].nunique(dropna=False).max() <= 1:
            continue
        chosen.append(c)
        axes.append(_axis_of(complete, c))
    return axes


def config_key(params: dict) -> str:
    """Fallback for trial runs without the ``lora_ablate.config_key`` tag: a hash of the top-level
    params except seed (trainable_params and scaling follow from the others)."""
    keep = {k: params[k] for k in sorted(params) if k in PARAM_TYPES and k not in ("seed", "trainable_params")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    _client: object = field(repr=False, default=None)

    @property
    def display_uri(self) -> str:
        return redact(self.uri)

    @cached_property
    def complete(self) -> pd.DataFrame:
        """Complete trials, with a ``<axis> bin`` column for each binned axis."""
        df = self.trials[self.trials["state"] == "COMPLETE"].copy()
        for axis in self.axes:
            if axis.binned:
                vals = df[axis.name].astype(float)
                df[axis.column] = (log_bins(vals) if (vals > 0).all() else linear_bins(vals))[0]
        return df

    @cached_property
    def axes(self) -> list[Axis]:
        return detect_axes(self.trials[self.trials["state"] == "COMPLETE"], self.recorded_axes)

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
        done = self.trials[self.trials["state"] == "COMPLETE"]
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
        rows = [(rid, key, m.step, m.value) for rid in run_ids for key in keys
                for m in self._client.get_metric_history(rid, key)]
        return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])

    def scores(self, run_ids) -> pd.DataFrame:
        """Per-example rows of each run's ``scores.jsonl``, with ``run_id`` added."""
        # one progress bar per tiny file would bury the answer on stderr; a user's own setting wins
        quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
        if quiet:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            return self._download_scores(run_ids)
        finally:
            if quiet:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)

    def _download_scores(self, run_ids) -> pd.DataFrame:
        frames = []
        with tempfile.TemporaryDirectory(prefix="lora_ablate_scores_") as tmp:
            for rid in run_ids:
                dst = Path(tmp) / rid
                dst.mkdir()
                try:
                    path = self._client.download_artifacts(rid, "scores.jsonl", str(dst))
                except Exception as e:  # MLflow raises its own and OSError types, by store
                    raise UserError(f"run {rid} of study {self.name!r} has no readable scores.jsonl "
                                    f"artifact ({type(e).__name__})") from e
                df = pd.read_json(path, lines=True)
                if "phase" in df:  # a train-command scores file also holds the base model's rows
                    df = df[df["phase"] == "final"]
                frames.append(df.assign(run_id=rid))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _all(fetch):
    items, token = [], None
    while True:
        page = fetch(token)
        items += list(page)
        token = page.token
        if not token:
            return items


def list_studies(client) -> list[str]:
    exps = _all(lambda tok: client.search_experiments(max_results=1000, page_token=tok))
    return sorted(e.name for e in exps if e.name != "Default")


def open_study(name: str, workspace=None, tracking_uri: str | None = None) -> Study:
    from mlflow import MlflowClient

    uri = resolve_uri(workspace, tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise UserError(f"unknown study {name!r} in {redact(uri)}; studies there: "
                        f"{choices(list_studies(client)) or '(none)'}")
    runs = _all(lambda tok: client.search_runs([exp.experiment_id], max_results=1000, page_token=tok))
    parents = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial"
              or ("lora_ablate.kind" not in r.data.tags and "mlflow.parentRunId" in r.data.tags)]
    if not trials:
        raise UserError(f"study {name!r} has no trial runs in {redact(uri)}")
    # Several study invocations (resumes, workers) each log a parent; the newest one speaks for the
    # study, since a resume may change the objective.
    newest = sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True)
    tags = dict(newest[0].data.tags) if newest else {}
    # parents recorded before the axes tag existed have none: the newest that has it speaks
    axes = next((r.data.tags[AXES_TAG] for r in newest if AXES_TAG in r.data.tags), None)
    if axes is not None:
        tags[AXES_TAG] = axes
    return Study(name, uri, exp.experiment_id, tags, _frame(trials), client)


def _frame(runs) -> pd.DataFrame:
    rows = []
    for r in runs:
        t, p, m = r.data.tags, r.data.params, r.data.metrics
        params = {k: _coerce(v, PARAM_TYPES.get(k)) for k, v in p.items()}
        if "targets" in params and params["targets"] is not None:
            params["targets"] = ",".join(x for x in ROLES if x in str(params["targets"]).split(","))
        row = {
            "run_id": r.info.run_id,
            "trial_number": _coerce(t.get("lora_ablate.trial_number", ""), int),
            "state": t.get("lora_ablate.state") or STATUS_STATE.get(r.info.status, "RUNNING"),
            "fail_reason": t.get("lora_ablate.fail_reason", ""),
            "config_key": t.get("lora_ablate.config_key") or config_key(params),
            "parent_run_id": t.get("mlflow.parentRunId", ""),
            **params,
            **{k: v for k, v in m.items() if k.startswith("final/") or k in SCALARS},
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    df["trial_number"] = pd.to_numeric(df["trial_number"], errors="coerce").astype("Int64")
    return df.sort_values(["trial_number", "run_id"], na_position="last").reset_index(drop=True)


def parse_selection(text: str) -> dict[str, str]:
    """``"r=8,targets=q,v"`` (or ``"r=8 targets=qv"``) -> ``{"r": "8", "targets": "q,v"}``: a piece without ``=``
    continues the previous value, so the tracking form of targets needs no quoting."""
    out: dict[str, str] = {}
    last = None
    # pairs are separated by commas or by spaces ("r=64 seed=0"); "targets=q v" keeps its space
    for piece in (p.strip() for p in re.split(r",|\s+(?=[\w.]+\s*=)", str(text).strip())):
        if not piece:
            continue
        if "=" in piece:
            key, value = (s.strip() for s in piece.split("=", 1))
            if not key:
                raise UserError(f"selection {text!r} is not valid; write key=value pairs, e.g. r=8,targets=qv")
            out[key] = value
            last = key
        elif last is not None:
            out[last] += "," + piece
        else:
            raise UserError(f"selection {text!r} is not valid; write key=value pairs, e.g. r=8,targets=qv")
    if not out:
        raise UserError(f"selection {text!r} is empty; write key=value pairs, e.g. r=8,targets=qv")
    return out


def _param_names(frame: pd.DataFrame) -> list[str]:
    """The trial params a selection names: the documented ones, then a space's other Optuna params. Not the
    ``cfg.*`` copy of the resolved config: its ~60 keys would bury the few a user filters on."""
    names = [c for c in frame.columns if c not in NON_PARAM_COLUMNS and c not in SCALARS
             and not str(c).startswith(("final/", "cfg.")) and not str(c).endswith(" bin")]
    order = list(PARAM_TYPES)
    return sorted(names, key=lambda c: (order.index(c) if c in order else len(order), c))


def select(frame: pd.DataFrame, selection: dict[str, str], what: str = "selection") -> pd.DataFrame:
    """Rows of ``frame`` whose params equal every ``selection`` value (numbers compared as numbers,
    targets in canonical form). No match is an error that lists the values present."""
    mask = pd.Series(True, index=frame.index)
    for key, raw in selection.items():
        if key not in frame or key in ("run_id", "state"):
            cfg = ", or any cfg.<section>.<key> of the resolved config" if any(
                str(c).startswith("cfg.") for c in frame.columns) else ""
            raise UserError(f"{what}: unknown parameter {key!r}; choose from: {choices(_param_names(frame))}{cfg}")
        col = frame[key]
        if key == "targets":
            mask &= col == canonical_targets(raw)
        elif pd.api.types.is_numeric_dtype(col):
            try:
                value = float(raw)
            except ValueError:
                raise UserError(f"{what}: {key}={raw!r} is not a number") from None
            values = col.astype(float)
            exact = np.isclose(values, value, rtol=1e-9, atol=0)
            # a value copied from a table has 4 significant digits (format_value)
            mask &= exact if exact.any() else np.isclose(values, value, rtol=5e-4, atol=0)
        else:
            mask &= col.astype(str) == raw
    hit = frame[mask]
    if hit.empty:
        def values(k):
            return ", ".join(format_value(v) for v in sorted(frame[k].dropna().unique(), key=_sort_key(k)))
        present = "; ".join(f"{k} in {{{values(k)}}}" for k in selection)
        raise UserError(f"{what} {','.join(f'{k}={v}' for k, v in selection.items())} matches no complete "
                        f"trial; present: {present}")
    return hit
