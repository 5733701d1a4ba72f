"""The axes of a tracked study's results: which params to group complete trials by, in table order, and
log-scale bins for a float axis that was sampled rather than gridded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lora_ablate.config import ALPHA_RULES
from lora_ablate.export.runs import NON_PARAM_COLUMNS, SCALARS
from lora_ablate.vocab import DERIVED_PARAMS, SEED_PARAM, role_order

# The ablation axes of the issue, in table order. In a study tracked before AXES_TAG existed, each is an
# axis whenever it varies, even when it follows from another (r derived from targets under a budget).
PRIMARY_AXES = ("r", "alpha_rule", "targets", "lr")
# The repeat axis and the params that follow from others: never axes.
NEVER_AXES = (SEED_PARAM, *DERIVED_PARAMS)
# Other config fields a search space may vary (dropout, weight decay, ...) appear as a top-level param
# under their Optuna name and again as cfg.*; the cfg.* copies of the documented params are skipped.
EXTRA_AXIS_SECTIONS = ("cfg.lora.", "cfg.train.")
CFG_MIRRORS = {"cfg.lora.r", "cfg.lora.alpha", "cfg.lora.alpha_rule", "cfg.lora.targets", "cfg.train.lr",
               "cfg.train.seed", "cfg.train.steps"}
# More distinct values than this on a float axis means it was sampled, not gridded: bin it.
CONTINUOUS_ABOVE = 6


def sort_key(name: str):
    """How the values of param ``name`` are ordered in tables: targets by role, alpha rules as declared,
    numbers before text."""
    if name == "targets":
        return role_order
    if name == "alpha_rule":
        return lambda v: (ALPHA_RULES.index(v) if v in ALPHA_RULES else len(ALPHA_RULES), str(v))
    return lambda v: (0, v, "") if isinstance(v, (int, float, np.number)) else (1, 0, str(v))


@dataclass(frozen=True)
class ResultAxis:
    """One ablation axis of the results. ``column`` holds the value to group by: the param itself, or for a
    sampled float axis its log-scale bin label (``values`` are then the bin labels in order)."""

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
        return sort_key(self.name)


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


def bin_labels(values) -> list[str]:
    """The bin of each value: log-scale when all are positive."""
    values = pd.Series(values, dtype=float)
    return (log_bins(values) if (values > 0).all() else linear_bins(values))[0]


def _by_name(names) -> list[str]:
    """Axes after the primary ones: alpha and steps first, then by name."""
    return sorted(names, key=lambda c: (c not in ("alpha", "steps"), c))


def _axis_of(complete: pd.DataFrame, name: str) -> ResultAxis:
    """The axis of param ``name``, its values in order; a float param sampled over many values is binned."""
    col = complete[name].dropna()
    distinct = sorted(col.unique().tolist(), key=sort_key(name))
    is_float = pd.api.types.is_float_dtype(col) and not all(float(v).is_integer() for v in distinct)
    if is_float and len(distinct) > CONTINUOUS_ABOVE:
        labels = log_bins(distinct)[1] if min(distinct) > 0 else linear_bins(distinct)[1]
        return ResultAxis(name, tuple(labels), binned=True)
    return ResultAxis(name, tuple(distinct))


def detect_axes(complete: pd.DataFrame, recorded: list[str] | None = None) -> list[ResultAxis]:
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
    top = [c for c in params if not c.startswith("cfg.") and c not in PRIMARY_AXES + NEVER_AXES]
    others = _by_name(top)
    others += sorted(c for c in params if c.startswith(EXTRA_AXIS_SECTIONS) and c not in CFG_MIRRORS)
    chosen: list[str] = []
    axes: list[ResultAxis] = []
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
