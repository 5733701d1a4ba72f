"""Figures for a study, each written as PNG (fixed pixel size) and SVG.

Figures are built with matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so nothing
depends on a display or on global pyplot state, and each figure is freed when dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_ablate.export.axes import ResultAxis
from lora_ablate.export.stats import param_importances, summarize
from lora_ablate.export.tables import metric_label, retention_sets, shifts, stem
from lora_ablate.export.tracked import Study
from lora_ablate.vocab import format_value

# 8 x 5 inches at 100 dpi: every PNG is 800 x 500 pixels, so a report's layout does not depend on data.
SIZE_IN = (8.0, 5.0)
DPI = 100
MAX_LEGEND = 10


@dataclass
class Plot:
    name: str
    title: str
    caption: str
    png: Path
    svg: Path


def new_figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig: Figure, out_dir: Path, name: str, title: str, caption: str) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    # no bbox_inches="tight": it would change the pixel size from figure to figure
    fig.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
    fig.savefig(svg, format="svg", metadata={"Date": None})  # no timestamp: re-exports diff cleanly
    return Plot(name, title, caption, png, svg)


def _axis(study: Study, name: str) -> ResultAxis | None:
    return next((a for a in study.axes if a.name == name), None)


def _better(study: Study, metric: str) -> str:
    return "lower is better" if study.direction(metric) == "minimize" else "higher is better"


BOUNDED = ("exact_match", "rouge_l")  # scores in [0, 1]: a fixed axis keeps 0.02 from looking like 0.9
SERIES_WORDS = {"train/loss": "training loss (train batches)", "train/lr": "learning rate"}


def series_label(key: str) -> str:
    """``train/loss`` -> ``training loss (train batches)``; ``heldout_instances/nll`` -> its metric label
    (held-out, during training)."""
    if key in SERIES_WORDS:
        return SERIES_WORDS[key]
    return f"{metric_label(key)} (held-out, during training)"


def _y_axis(ax, study: Study, metric: str) -> None:
    ax.set_ylabel(f"{metric_label(metric)} ({_better(study, metric)})")
    if metric.rsplit("/", 1)[-1] in BOUNDED:
        ax.set_ylim(-0.02, 1.02)


def _base_line(ax, study: Study, metric: str) -> None:
    """The base model (no adapter) as a dashed reference: how much the adapters moved it."""
    if metric in study.base:
        ax.axhline(study.base[metric], color="gray", ls="--", lw=1,
                   label=f"base model {study.base[metric]:.3f}")


def small_n(per_point: list[int], n_x: int, x_word: str) -> str:
    """A warning where the figure cannot carry a trend: one trial a point, or fewer than 3 x values."""
    parts = []
    if per_point and max(per_point) < 2:
        parts.append("one trial per point: no interval, a difference may be seed noise")
    if n_x < 3:
        parts.append(f"only {n_x} {x_word}{'s' if n_x != 1 else ''}: too few to read a trend")
    return "; ".join(parts)


def _note(ax, text: str) -> str:
    if text:
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, color="#a33", va="bottom",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    return f" Note: {text}." if text else ""


def rank_plot(study: Study, metric: str, hue: ResultAxis | None, out_dir: Path) -> Plot:
    """Metric against rank on a log2 axis, one line per value of ``hue``, with 95% t-interval bands
    where a point has at least two trials."""
    frame = study.complete
    col = f"final/{metric}"
    fig, (ax,) = new_figure()
    hue_vals = sorted(frame[hue.column].unique(), key=hue.sort_key()) if hue else [None]
    counts = []
    for hv in hue_vals:
        sub = frame if hv is None else frame[frame[hue.column] == hv]
        ranks = sorted(sub["r"].unique())
        s = [summarize(sub.loc[sub["r"] == r, col]) for r in ranks]
        mean = np.array([x.mean for x in s])
        lo = np.array([x.ci_low if x.has_interval else x.mean for x in s])
        hi = np.array([x.ci_high if x.has_interval else x.mean for x in s])
        counts += [x.n for x in s]
        label = "all trials" if hv is None else f"{hue.label} {format_value(hv)}"
        line, = ax.plot(ranks, mean, marker="o", label=label)
        ax.fill_between(ranks, lo, hi, where=[x.has_interval for x in s], color=line.get_color(), alpha=0.2,
                        linewidth=0)
    ranks = sorted(frame["r"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank r (log2 scale)")
    _y_axis(ax, study, metric)
    _base_line(ax, study, metric)
    ax.grid(True, alpha=0.3)
    if len(hue_vals) <= MAX_LEGEND:
        ax.legend(fontsize="small")
    by = f" per {hue.label}" if hue else ""
    title = f"{metric_label(metric)} against rank{by}"
    ax.set_title(title)
    others = [a.label for a in study.axes if a.name not in ("r", hue.name if hue else "")]
    caption = ("Mean over trials with a 95% t-interval band (absent where a point has one trial)."
               + (f" Marginal over {', '.join(others)}." if others else "")
               + (" Dashed: the base model." if metric in study.base else "")
               + _note(ax, small_n(counts, len(ranks), "rank")))
    name = f"rank_{stem(metric)}" + (f"_by_{stem(hue.name)}" if hue else "")
    return save(fig, out_dir, name, title, caption)


def targets_heatmap(study: Study, metric: str, out_dir: Path) -> Plot:
    """Mean metric per target subset (rows) and rank (columns, when rank varies)."""
    frame = study.complete
    col = f"final/{metric}"
    targets = _axis(study, "targets")
    rows = sorted(frame["targets"].unique(), key=targets.sort_key())
    ranks = sorted(frame["r"].unique()) if _axis(study, "r") else [None]
    grid = np.full((len(rows), len(ranks)), np.nan)
    text = [["" for _ in ranks] for _ in rows]
    for i, t in enumerate(rows):
        for j, r in enumerate(ranks):
            sel = frame["targets"] == t if r is None else (frame["targets"] == t) & (frame["r"] == r)
            s = summarize(frame.loc[sel, col])
            if s.n:
                grid[i, j] = s.mean
                text[i][j] = f"{s.mean:.3f}" + (f"\n±{s.std:.3f}" if s.has_interval else "") + f"\nn={s.n}"
    fig, (ax,) = new_figure()
    # brighter is better in both directions, so the eye reads every heatmap the same way
    cmap = "viridis_r" if study.direction(metric) == "minimize" else "viridis"
    bounded = metric.rsplit("/", 1)[-1] in BOUNDED
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto",
                   **({"vmin": 0.0, "vmax": 1.0} if bounded else {}))
    finite = grid[np.isfinite(grid)]
    mid = 0.5 if bounded else (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(rows)):
        for j in range(len(ranks)):
            if text[i][j]:
                bright = grid[i, j] < mid if cmap == "viridis_r" else grid[i, j] > mid
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                        color="black" if bright else "white")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(ranks)), ["all" if r is None else str(r) for r in ranks])
    ax.set_xlabel("rank r" if ranks[0] is not None else "")
    ax.set_ylabel("adapted modules (targets)")
    bar = fig.colorbar(im, ax=ax, label=f"{metric_label(metric)} (brighter is better)")
    if metric in study.base:
        bar.ax.axhline(study.base[metric], color="red", lw=2)
    title = f"{metric_label(metric)} by target subset"
    ax.set_title(title)
    others = [a.label for a in study.axes if a.name not in ("r", "targets")]
    caption = "Mean ± sample std over trials; n per cell."
    if others:
        caption += f" Marginal over {', '.join(others)}."
    if metric in study.base:
        caption += f" Red mark on the colour bar: the base model ({study.base[metric]:.3f})."
    counts = [int(t.rsplit("n=", 1)[1]) for line in text for t in line if t]
    caption += _note(ax, small_n(counts, 3, "cell"))
    return save(fig, out_dir, f"targets_{stem(metric)}", title, caption)


def lr_plot(study: Study, metric: str, out_dir: Path) -> Plot:
    """Learning-rate sensitivity. A sampled lr gets every trial as a point and a quadratic trend in
    log10(lr); a gridded lr gets the mean and 95% t-interval per value over the trials."""
    frame = study.complete
    col = f"final/{metric}"
    axis = _axis(study, "lr")
    fig, (ax,) = new_figure()
    ax.set_xscale("log")
    x, y = frame["lr"].astype(float).to_numpy(), frame[col].astype(float).to_numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    if axis.binned:
        # colour by another axis (e.g. rank) when there is one with few values: it may explain the spread
        hue = next((a for a in study.axes if a.name != "lr" and not a.binned and len(a.values) <= MAX_LEGEND), None)
        groups = ([(f"{hue.label} {format_value(v)}", (frame[hue.column] == v).to_numpy()) for v in hue.values]
                  if hue else [("trial", np.ones(len(frame), bool))])
        for label, sel in groups:
            ax.scatter(x[ok & sel], y[ok & sel], s=18, alpha=0.7, label=label)
        lx = np.log10(x[ok])
        deg = 2 if len(np.unique(lx)) >= 4 else 1
        if len(np.unique(lx)) > deg:
            coef = np.polyfit(lx, y[ok], deg)
            grid = np.linspace(lx.min(), lx.max(), 200)
            ax.plot(10 ** grid, np.polyval(coef, grid), color="black", lw=1.5,
                    label=f"trend (degree-{deg} fit in log10 lr)")
        caption = "Each point is one complete trial; the line is a least-squares polynomial trend in log10(lr)."
    else:
        lrs = sorted(np.unique(x[ok]))
        s = [summarize(y[ok][x[ok] == v]) for v in lrs]
        ax.scatter(x[ok], y[ok], s=12, alpha=0.35, color="gray", label="trial")
        err = np.array([[m.mean - m.ci_low, m.ci_high - m.mean] if m.has_interval else [0, 0] for m in s]).T
        ax.errorbar(lrs, [m.mean for m in s], yerr=err, marker="o", capsize=4, label="mean, 95% t-interval")
        caption = "Mean and 95% t-interval per learning rate over trials (grey: single trials)."
    others = [a.label for a in study.axes if a.name != "lr"]
    if others:
        caption += f" Marginal over {', '.join(others)}."
    ax.set_xlabel("learning rate (log scale)")
    _y_axis(ax, study, metric)
    _base_line(ax, study, metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    per_lr = [int((x[ok] == v).sum()) for v in np.unique(x[ok])]
    caption += _note(ax, small_n([] if axis.binned else per_lr, len(per_lr), "learning rate"))
    title = f"Learning-rate sensitivity: {metric_label(metric)}"
    ax.set_title(title)
    return save(fig, out_dir, f"lr_{stem(metric)}", title, caption)


def config_labels(study: Study) -> dict[str, str]:
    """run_id -> configuration label (all axes, raw values), in axis order (r=4 before r=64)."""
    names = [a.name for a in study.axes]
    keys = [ResultAxis(n, ()).sort_key() for n in names]
    frame = study.complete
    order = sorted(frame.index, key=lambda i: tuple(k(frame.at[i, n]) for k, n in zip(keys, names)))
    return {frame.at[i, "run_id"]: (", ".join(f"{n}={format_value(frame.at[i, n])}" for n in names)
                                    or "all trials") for i in order}


def curves_plot(study: Study, curves: pd.DataFrame, keys: list[str], out_dir: Path) -> Plot:
    """Per configuration, the mean over seeds at each step of each series in ``keys``."""
    labels = config_labels(study)
    curves = curves.assign(config=curves["run_id"].map(labels))
    fig, axs = new_figure(len(keys))
    configs = list(dict.fromkeys(labels.values()))
    for ax, key in zip(axs, keys):
        sub = curves[curves["key"] == key]
        for c in configs:
            mean = sub[sub["config"] == c].groupby("step")["value"].mean()
            # markers keep a short series (a few logged steps) visible at all
            ax.plot(mean.index, mean.to_numpy(), lw=1.2, label=c, marker="o" if len(mean) <= 20 else None,
                    markersize=3)
        if key.endswith("/nll"):
            _base_line(ax, study, key)
        ax.set_xlabel("training step")
        ax.set_ylabel(series_label(key))
        ax.set_title("Training loss" if key == "train/loss" else f"{metric_label(key)} during training",
                     fontsize="medium")
        ax.grid(True, alpha=0.3)
    if len(configs) <= MAX_LEGEND:
        axs[-1].legend(fontsize="x-small")
    note = "" if len(configs) <= MAX_LEGEND else f" ({len(configs)} configurations: legend omitted.)"
    words = ", ".join(series_label(k) for k in keys)
    base = " Dashed: the base model." if any(k in study.base for k in keys) else ""
    return save(fig, out_dir, "curves", "Training curves",
                f"Mean over seeds per step and configuration of {words}.{base}{note}")


def importance_plot(importances: dict[str, float], objective: str, out_dir: Path) -> Plot:
    fig, (ax,) = new_figure()
    names = list(importances)[::-1]  # largest on top
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("fANOVA importance (sums to 1)")
    ax.grid(True, axis="x", alpha=0.3)
    title = f"Parameter importances for {metric_label(objective)}"
    ax.set_title(title)
    shares = ", ".join(f"{k} {v:.2f}" for k, v in importances.items())
    return save(fig, out_dir, "importances", title,
                f"Optuna fANOVA on the complete trials read back from tracking: {shares}. Seed is included, so a "
                "large seed share means the differences are mostly noise.")


def importances(study: Study, metric: str) -> tuple[dict[str, float], str]:
    frame = study.complete
    names = [a.name for a in study.axes] + (["seed"] if "seed" in frame else [])
    return param_importances({n: frame[n].tolist() for n in names}, frame[f"final/{metric}"].to_numpy(),
                             study.direction(metric))


def _mean_ci(x) -> tuple[float, list[float]]:
    """A summary's mean and its error-bar half-widths (none without an interval)."""
    return x.mean, ([x.mean - x.ci_low, x.ci_high - x.mean] if x.has_interval else [0.0, 0.0])


def learned_forgotten_plot(study: Study, out_dir: Path) -> Plot | None:
    """Per configuration: what it learns (the first held-out set's NLL gain over the base, x) against what
    it forgets (each retention set's NLL rise over the base, y; one panel per set), 95% t-interval bars."""
    learned, forgot, rows = shifts(study)
    if not rows:
        return None
    x_set = learned[0]
    fig, axs = new_figure(len(forgot))
    names = [a.name for a in study.axes]
    for ax, s in zip(axs, forgot):
        for r in rows:
            (x, xerr), (y, yerr) = _mean_ci(r.gained[x_set]), _mean_ci(r.forgot[s])
            label = ", ".join(f"{n}={format_value(v)}" for n, v in zip(names, r.key)) or "all trials"
            ax.errorbar([x], [y], xerr=np.array([xerr]).T, yerr=np.array([yerr]).T, fmt="o", capsize=3,
                        label=label)
        ax.axhline(0, color="gray", ls="--", lw=1)
        ax.axvline(0, color="gray", ls="--", lw=1)
        ax.set_xlabel(f"{x_set} NLL gain over base (learned; more is better)")
        ax.set_ylabel(f"{s} NLL rise over base (forgotten)")
        ax.grid(True, alpha=0.3)
    if len(rows) <= MAX_LEGEND:
        axs[-1].legend(fontsize="x-small")
    title = "Learned vs forgotten"
    fig.suptitle(title)
    note = _note(axs[0], small_n([r.n for r in rows], len(rows), "configuration"))
    return save(fig, out_dir, "learned_forgotten", title,
                f"One point per configuration: mean over seeds with 95% t-interval bars (none for one seed). "
                f"Dashed: the base model (no change). Up and to the right learns more but forgets more; the "
                f"table learned_forgotten has every held-out set.{note}")


def render_plots(study: Study, metrics: list[str], out_dir: Path) -> tuple[list[Plot], list[str]]:
    """Every figure the study's axes support; the notes say what was skipped and why."""
    plots, notes = [], []
    axis_names = {a.name for a in study.axes}
    if "r" in axis_names:
        hues = [_axis(study, n) for n in ("alpha_rule", "targets") if n in axis_names] or [None]
        plots += [rank_plot(study, m, h, out_dir) for m in metrics for h in hues]
    if "targets" in axis_names:
        plots += [targets_heatmap(study, m, out_dir) for m in metrics]
    if "lr" in axis_names:
        plots += [lr_plot(study, m, out_dir) for m in metrics]
    objective_set = study.objective.split("/")[0]
    curves = study.curves(study.complete["run_id"], ["train/loss", f"{objective_set}/nll"])
    keys = [k for k in ("train/loss", f"{objective_set}/nll") if (curves["key"] == k).any()]
    if keys:
        plots.append(curves_plot(study, curves, keys, out_dir))
    else:
        notes.append("Training curves skipped: no complete trial logged train/loss by step.")
    forgetting = learned_forgotten_plot(study, out_dir)
    if forgetting is not None:
        plots.append(forgetting)
    elif retention_sets(study):
        notes.append("Learned vs forgotten skipped: the study logged no base-model NLL for its retention and "
                     "held-out sets (eval.base=false).")
    objective = study.objective if study.objective in study.metrics else metrics[0]
    imp, why = importances(study, objective)
    if imp:
        plots.append(importance_plot(imp, objective, out_dir))
    else:
        notes.append(f"Parameter importances skipped: {why}.")
    return plots, notes
