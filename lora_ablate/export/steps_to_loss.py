"""Steps to a training loss: how fast each configuration gets somewhere, not only where it ends.

"B = 0 makes LoRA slow to start" is a claim about the early curve, which the final metrics cannot show.
Each complete trial's logged ``train/loss`` is smoothed by a running mean over ``WINDOW`` logged points
(a batch of 8 is noisy); the loss levels are the mean over configurations of the smoothed loss at
``FRACTIONS`` of training, so every level is reached by a typical configuration and the table reads "how
many steps to get as far as the average configuration did by 10% / 30% / the end". A trial that never gets
there counts as not reached and is reported as such, not averaged as its last step.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lora_ablate.export.stats import Summary, summarize
from lora_ablate.export.tables import Table, _sorted, exclusions, raw_axes, summarize_groups
from lora_ablate.export.tracked import Study
from lora_ablate.vocab import format_value

KEY = "train/loss"
WINDOW = 5
FRACTIONS = (0.1, 0.3, 1.0)


def smoothed(steps: np.ndarray, values: np.ndarray, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Trailing running mean (only past points: a level counts as reached when the trial got there)."""
    order = np.argsort(steps)
    steps, values = steps[order], values[order].astype(float)
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return steps, (csum[idx] - csum[lo]) / (idx - lo)


def first_step_at(steps: np.ndarray, loss: np.ndarray, level: float) -> float:
    hit = np.nonzero(loss <= level)[0]
    return float(steps[hit[0]]) if len(hit) else math.nan


def _at_fraction(steps: np.ndarray, loss: np.ndarray, frac: float) -> float:
    target = steps[0] + frac * (steps[-1] - steps[0])
    return float(loss[np.searchsorted(steps, target, side="left").clip(0, len(loss) - 1)])


def fmt_steps(s: Summary) -> str:
    """Steps to one decimal (a mean over seeds of whole steps): ``mean ± std [lo, hi]``."""
    if not s.has_interval:
        return f"{s.mean:.0f}"
    return f"{s.mean:.1f} ± {s.std:.1f} [{s.ci_low:.1f}, {s.ci_high:.1f}]"


def steps_to_loss_table(study: Study) -> Table | None:
    """One row per configuration: mean [95% CI] over seeds of the first step its smoothed training loss
    reaches each level, and how many seeds never did; ``None`` when no trial logged enough of a curve."""
    frame = study.complete
    if frame.empty:
        return None
    curves = study.curves(frame["run_id"], [KEY])
    curves = curves[curves["key"] == KEY]
    series = {}
    for run_id, g in curves.groupby("run_id"):
        if len(g) >= 2 * WINDOW:
            series[run_id] = smoothed(g["step"].to_numpy(), g["value"].to_numpy())
    if not series:
        return None
    axes = raw_axes(study)
    frame = frame[frame["run_id"].isin(series)]
    groups = _sorted(summarize_groups(frame, [a.column for a in axes], []), axes)
    levels = []
    for frac in FRACTIONS:
        per_group = [np.mean([_at_fraction(*series[r], frac) for r in row["frame"]["run_id"]]) for _, row in groups]
        levels.append(float(np.mean(per_group)))
    header = [a.label for a in axes] + ["n"] + [f"steps to loss {lv:.3f} ({int(f * 100)}%)"
                                                for lv, f in zip(levels, FRACTIONS)]
    cells, data = [], []
    for key, row in groups:
        reached = [[first_step_at(*series[r], lv) for r in row["frame"]["run_id"]] for lv in levels]
        texts, rec = [], {**{a.column: v for a, v in zip(axes, key)}, "n": row["n"]}
        for lv, steps in zip(levels, reached):
            got = [s for s in steps if not math.isnan(s)]
            missing = len(steps) - len(got)
            s = summarize(got)
            text = fmt_steps(s) if got else "not reached"
            texts.append(text + (f" ({missing} of {len(steps)} not reached)" if got and missing else ""))
            rec.update({f"loss {lv:.4f} steps mean": s.mean, f"loss {lv:.4f} ci_low": s.ci_low,
                        f"loss {lv:.4f} ci_high": s.ci_high, f"loss {lv:.4f} not_reached": missing})
        cells.append([format_value(v) for v in key] + [str(row["n"])] + texts)
        data.append(rec)
    caption = (f"First optimizer step at which the training loss, smoothed over {WINDOW} logged points, reaches "
               "each level; a level is the mean over configurations of the smoothed loss at that fraction of "
               "training. Mean ± std [95% t-interval] over seeds; fewer steps is faster.")
    return Table("steps_to_loss", f"{study.name}: steps to a training loss", caption, header, cells,
                 pd.DataFrame(data), exclusions(study), set(), ["l"] * len(axes) + ["r"] * (1 + len(levels)))
