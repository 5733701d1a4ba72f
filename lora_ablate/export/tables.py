"""Result tables: per-axis (marginal), per-configuration and two-axis pivots, rendered as Markdown,
CSV, LaTeX and HTML.

A :class:`Table` keeps two views of the same numbers: display cells for the human formats and a
numeric frame for CSV, so nobody has to parse "0.412 ± 0.010" back into numbers.
"""

from __future__ import annotations

import html
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lora_ablate.export.axes import ResultAxis
from lora_ablate.export.stats import Summary, needed_text, summarize
from lora_ablate.export.tracked import Study
from lora_ablate.vocab import State, format_value, state_word

METRIC_WORDS = {"nll": "NLL", "ppl": "perplexity", "exact_match": "exact match", "rouge_l": "ROUGE-L"}
MAX_LISTED_EXCLUSIONS = 10
MAX_REASON_CHARS = 120  # a footnote names the reason; the full message is in trials.csv and MLflow
NEAR_MARK = "†"  # within the paired-bootstrap interval of the best
NEAR_BOOT = 2000  # replicates per near-best check: a 95% interval's ends to about ±0.005 in probability
BASE_LABEL = "base model"


@dataclass
class Table:
    name: str  # file stem
    title: str
    caption: str
    header: list[str]
    cells: list[list[str]]
    data: pd.DataFrame  # the numbers behind the cells, one column per quantity (CSV)
    footnote: str = ""
    bold: set = field(default_factory=set)  # (row, column) of best cells
    align: list[str] = field(default_factory=list)  # "l" or "r" per column


def metric_label(metric: str) -> str:
    """``heldout_instances/exact_match`` -> ``heldout_instances exact match``."""
    s, m = metric.split("/", 1)
    return f"{s} {METRIC_WORDS.get(m, m)}"


def fmt_num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3f}"


def fmt_summary(s: Summary) -> str:
    """``mean ± std [lo, hi]``; one trial shows its value only (no spread to report)."""
    if s.n == 0:
        return "–"
    if not s.has_interval:
        return fmt_num(s.mean)
    return f"{fmt_num(s.mean)} ± {fmt_num(s.std)} [{fmt_num(s.ci_low)}, {fmt_num(s.ci_high)}]"


def fmt_params(lo, hi) -> str:
    if pd.isna(lo):
        return "–"
    return f"{int(lo):,}" if lo == hi else f"{int(lo):,}–{int(hi):,}"


def _best(means: list[float], direction: str) -> set[int]:
    """Rows whose mean, as printed, equals the best one's (every row of a tie within rounding); none
    unless the printed means differ at all, since marking every row of an all-zero exact-match column,
    or a lone row, claims a winner where there is no contest."""
    finite = [(i, fmt_num(m)) for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    if len({t for _, t in finite}) < 2:
        return set()
    pick = min if direction == "minimize" else max
    target = fmt_num(pick(m for m in means if m is not None and not math.isnan(m)))
    return {i for i, t in finite if t == target}


def near_best(study: Study, groups: list[pd.DataFrame], best: set[int], metric: str) -> set[int]:
    """Groups (not best) whose paired-bootstrap 95% interval of the difference from the best group
    holds 0: the data cannot tell them from the best. Empty when the study has no per-example scores
    of ``metric`` (ppl, or runs without scores.jsonl)."""
    from lora_ablate.errors import UserError
    from lora_ablate.export.paired import PER_EXAMPLE, pair_scores
    from lora_ablate.export.stats import paired_bootstrap

    set_name, name = metric.split("/", 1)
    scores = study.example_scores if best and name in PER_EXAMPLE else None
    if scores is None:
        return set()
    ref = scores[scores["run_id"].isin(groups[min(best)]["run_id"])]
    out = set()
    for i, g in enumerate(groups):
        if i in best:
            continue
        try:
            p = pair_scores(ref, scores[scores["run_id"].isin(g["run_id"])], set_name, name)
        except UserError:
            continue
        res = paired_bootstrap(p.a, p.b, n_boot=NEAR_BOOT, weights=p.weights)
        if res.ci_low <= 0 <= res.ci_high:
            out.add(i)
    return out


def _mark(text: str) -> str:
    return f"{text} {NEAR_MARK}"


def summarize_groups(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> list[tuple[tuple, dict]]:
    """``[(key, {"n", "params", "frame", metric: Summary})]`` per group of complete trials."""
    groups = frame.groupby(by, sort=False, dropna=False) if by else [((), frame)]
    out = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = {"n": len(g), "frame": g,
               "params": (g["trainable_params"].min(), g["trainable_params"].max())
               if "trainable_params" in g else (np.nan, np.nan)}
        for m in metrics:
            col = f"final/{m}"
            row[m] = summarize(g[col]) if col in g else summarize([])
        out.append((key, row))
    return out


def _sorted(groups, axes: list[ResultAxis]):
    keys = [a.sort_key() for a in axes]
    return sorted(groups, key=lambda kr: tuple(k(v) for k, v in zip(keys, kr[0])))


def exclusions(study: Study) -> str:
    """One footnote for every table: which trials are not in any mean, and why. Trials that failed for one
    reason are one entry (a pack that ran out of memory fails all its trials with the same long message), and
    a failed trial whose configuration and seed completed later (a resumed study trains it again) says so."""
    t = study.trials
    bad = t[t["state"] != State.COMPLETE]
    if bad.empty:
        return f"All {len(t)} trials completed; n counts the complete trials in each cell."
    counts = ", ".join(f"{n} {state_word(s)}" for s, n in bad["state"].value_counts().items())
    names = [a.name for a in study.axes] + (["seed"] if "seed" in t else [])
    entries = []
    reasons = bad["fail_reason"].fillna("") if "fail_reason" in bad else pd.Series("", index=bad.index)
    for (state, reason), group in bad.groupby([bad["state"], reasons.map(_short_reason)], sort=False):
        numbers = sorted(int(n) for n in group["trial_number"].dropna())
        if len(group) <= MAX_LISTED_EXCLUSIONS // 2:  # few: each with its settings
            who = "; ".join(f"trial {_number(r)} ({', '.join(_settings(r, names))})" for _, r in group.iterrows())
        else:
            who = f"trials {_ranges(numbers)}"
        entries.append(f"{len(group)} {state_word(state)}{f' ({reason})' if reason else ''}: {who}")
    text = "; ".join(entries[:MAX_LISTED_EXCLUSIONS])
    if len(entries) > MAX_LISTED_EXCLUSIONS:
        text += f"; and {len(entries) - MAX_LISTED_EXCLUSIONS} more reasons"
    retried = trained_again(study)
    again = (f" {retried} of them were trained again later and completed, so their cells are complete."
             if retried else "")
    return (f"n counts the complete trials in each cell. Excluded from every mean: {counts} of {len(t)} "
            f"trials — {text}.{again}")


def _short_reason(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1].rstrip() + "…"


def _number(row) -> str:
    return "?" if pd.isna(row["trial_number"]) else str(int(row["trial_number"]))


def _settings(row, names: list[str]) -> list[str]:
    return [f"{k}={format_value(row[k])}" for k in names if k in row and not pd.isna(row[k])]


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> '0-3, 7, 9-10'."""
    runs = []
    for _, run in itertools.groupby(enumerate(numbers), key=lambda ix: ix[1] - ix[0]):
        run = [n for _, n in run]
        runs.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(runs)


def trained_again(study: Study) -> int:
    """Trials not complete whose configuration and seed have a complete trial too (a resumed study trained
    them again)."""
    t = study.trials
    bad = t[t["state"] != State.COMPLETE]
    keys = [k for k in ("config_key", "seed") if k in t]
    if "config_key" not in keys:
        return 0
    done = set(map(tuple, t.loc[t["state"] == State.COMPLETE, keys].astype(str).values))
    return sum(tuple(k) in done for k in bad[keys].astype(str).values)


def _legend(study: Study, metrics: list[str], marked: bool) -> str:
    dirs = "; ".join(f"{metric_label(m)}: {'lower' if study.direction(m) == 'minimize' else 'higher'} is better"
                     for m in metrics)
    near = (f" {NEAR_MARK}: the paired-bootstrap 95% interval of its difference from the best holds 0 (not "
            "told apart from the best)." if marked else "")
    return (f"Cells: mean ± sample std [95% t-interval of the mean] over trials; a cell with one trial shows "
            f"its value only. Bold: best mean per column as printed, every one on a tie ({dirs}).{near}"
            + _base_note(study, metrics))


def _base_note(study: Study, metrics: list[str]) -> str:
    if not any(m in study.base for m in metrics):
        return ""
    return f" The {BASE_LABEL} row: no adapter, evaluated once per study (the reference the rows improve on)."


def group_table(study: Study, frame: pd.DataFrame, axes: list[ResultAxis], metrics: list[str], name: str,
                title: str, caption: str) -> Table:
    groups = _sorted(summarize_groups(frame, [a.column for a in axes], metrics), axes)
    header = [a.label for a in axes] + ["n", "trainable params"] + [metric_label(m) for m in metrics]
    first = len(axes) + 2
    cells, data, bold = [], [], set()
    # a reference row first: what the adapters improve on
    top = 1 if any(m in study.base for m in metrics) else 0
    if top:
        # without an axis column the label takes the n column's place
        label = [BASE_LABEL] + ["–"] * (len(axes) - 1) + ["–"] if axes else [BASE_LABEL]
        cells.append(label + ["0"] + [fmt_num(study.base.get(m, math.nan)) for m in metrics])
        rec = {a.column: (BASE_LABEL if j == 0 else None) for j, a in enumerate(axes)}
        rec.update({"n": 0, "trainable_params_min": 0, "trainable_params_max": 0})
        rec.update({f"{m} mean": study.base.get(m, math.nan) for m in metrics})
        data.append(rec)
    best_of = {m: _best([row[m].mean for _, row in groups], study.direction(m)) for m in metrics}
    near_of = {m: near_best(study, [row["frame"] for _, row in groups], best_of[m], m) for m in metrics}
    for i, (key, row) in enumerate(groups):
        cells.append([format_value(v) for v in key] + [str(row["n"]), fmt_params(*row["params"])]
                     + [_mark(fmt_summary(row[m])) if i in near_of[m] else fmt_summary(row[m]) for m in metrics])
        rec = {a.column: v for a, v in zip(axes, key)}
        rec.update({"n": row["n"], "trainable_params_min": row["params"][0],
                    "trainable_params_max": row["params"][1]})
        for m in metrics:
            s = row[m]
            rec.update({f"{m} mean": s.mean, f"{m} std": s.std, f"{m} ci_low": s.ci_low,
                        f"{m} ci_high": s.ci_high, f"{m} n": s.n})
        rec["best"] = ";".join(m for m in metrics if i in best_of[m])
        rec["near_best"] = ";".join(m for m in metrics if i in near_of[m])
        data.append(rec)
    for j, m in enumerate(metrics):
        bold |= {(i + top, first + j) for i in best_of[m]}
    marked = any(near_of.values())
    return Table(name, title, f"{caption} {_legend(study, metrics, marked)}", header, cells,
                 pd.DataFrame(data), exclusions(study), bold, ["l"] * len(axes) + ["r"] * (2 + len(metrics)))


def raw_axes(study: Study) -> list[ResultAxis]:
    """The study's axes with sampled ones unbinned: a configuration is the values that were trained."""
    return [ResultAxis(a.name, (), False) if a.binned else a for a in study.axes]


RESOURCES = (("tokens_per_s", "train tokens/s", "{:,.0f}"), ("train_s", "train s", "{:,.1f}"),
             ("wall_s", "wall s", "{:,.1f}"), ("peak_mem_mb", "peak memory MB", "{:,.0f}"))


def resource_table(study: Study) -> Table | None:
    """Throughput, time and memory per configuration, apart from the results: on a shared machine they
    measure the machine's load as much as the configuration, and next to a metric they read as its cause."""
    frame = study.complete
    have = [r for r in RESOURCES if r[0] in frame and frame[r[0]].notna().any()]
    if not have:
        return None
    axes = raw_axes(study)
    groups = _sorted(summarize_groups(frame, [a.column for a in axes], []), axes)
    cells, data = [], []
    for key, row in groups:
        g = row["frame"]
        means = {col: g[col].mean() for col, _, _ in have}
        cells.append([format_value(v) for v in key] + [str(row["n"])]
                     + ["–" if pd.isna(means[c]) else f.format(means[c]) for c, _, f in have])
        data.append({**{a.column: v for a, v in zip(axes, key)}, "n": row["n"],
                     **{f"{c}_mean": means[c] for c, _, _ in have}})
    return Table("resources", f"{study.name}: resources", "Mean per configuration over its complete trials. "
                 "Measured on whatever else the machine ran at the time, so a difference here is no result.",
                 [a.label for a in axes] + ["n"] + [label for _, label, _ in have], cells, pd.DataFrame(data),
                 "", set(), ["l"] * len(axes) + ["r"] * (1 + len(have)))


def axis_tables(study: Study, metrics: list[str]) -> list[Table]:
    frame, axes = study.complete, study.axes
    tables = []
    for axis in axes:
        others = [a.label for a in axes if a is not axis]
        pooled = (f"Marginal over {', '.join(others)}: each row pools every complete trial with that "
                  f"{axis.label}, whatever the other axes, so n counts trials, not seeds of one configuration."
                  if others else "Each row is one configuration over its seeds.")
        if axis.binned:
            pooled += f" {axis.label.capitalize()} was sampled; rows are log-scale bins."
        tables.append(group_table(study, frame, [axis], metrics, f"axis_{stem(axis.name)}",
                                  f"{study.name}: by {axis.label}", pooled))
    return tables


def config_table(study: Study, metrics: list[str]) -> Table:
    axes = raw_axes(study)
    caption = ("Every configuration (all axes fixed) over its seeds." if axes
               else "The study has a single configuration; the row is over its seeds.")
    return group_table(study, study.complete, axes, metrics, "configurations",
                       f"{study.name}: configurations", caption)


def crossed(frame: pd.DataFrame, a: ResultAxis, b: ResultAxis) -> bool:
    """Two axes were crossed when they co-occur in more combinations than either has values; nested
    or confounded axes (each value of one with a single value of the other) are not pivoted."""
    combos = frame[[a.column, b.column]].drop_duplicates()
    return len(combos) > max(frame[a.column].nunique(), frame[b.column].nunique())


def pivot_table(study: Study, rows: ResultAxis, cols: ResultAxis, metric: str) -> Table:
    frame = study.complete
    others = [a.label for a in study.axes if a not in (rows, cols)]
    by = dict(summarize_groups(frame, [rows.column, cols.column], [metric]))
    row_vals = sorted({k[0] for k in by}, key=rows.sort_key())
    col_vals = sorted({k[1] for k in by}, key=cols.sort_key())
    cells, data, means, where, frames = [], [], [], [], []
    for i, rv in enumerate(row_vals):
        line = [format_value(rv)]
        for j, cv in enumerate(col_vals):
            hit = by.get((rv, cv))
            if hit is None:
                line.append("–")
                continue
            s = hit[metric]
            line.append(f"{fmt_summary(s)} (n={s.n})")
            frames.append(hit["frame"])
            data.append({rows.column: rv, cols.column: cv, "n": s.n, "mean": s.mean, "std": s.std,
                         "ci_low": s.ci_low, "ci_high": s.ci_high})
            means.append(s.mean)
            where.append((i, j + 1))
        cells.append(line)
    best = _best(means, study.direction(metric))
    near = near_best(study, frames, best, metric)
    for k, rec in enumerate(data):
        rec["best"] = k in best
        rec["near_best"] = k in near
        if k in near:
            i, j = where[k]
            cells[i][j] = _mark(cells[i][j])
    marginal = f" Marginal over {', '.join(others)}." if others else ""
    base = (f" {BASE_LABEL.capitalize()} (no adapter): {fmt_num(study.base[metric])}."
            if metric in study.base else "")
    near_text = (f" {NEAR_MARK}: the paired-bootstrap 95% interval of its difference from the best holds 0."
                 if near else "")
    caption = (f"{metric_label(metric)} by {rows.label} (rows) and {cols.label} (columns).{marginal} "
               f"Cells: mean ± sample std [95% t-interval] over trials (n); one trial shows its value only. "
               f"Bold: best as printed, every one on a tie "
               f"({'lower' if study.direction(metric) == 'minimize' else 'higher'} is better).{near_text}{base}")
    return Table(f"pivot_{stem(rows.name)}_x_{stem(cols.name)}_{stem(metric)}",
                 f"{study.name}: {metric_label(metric)}, {rows.label} × {cols.label}", caption,
                 [f"{rows.label} \\ {cols.label}"] + [format_value(v) for v in col_vals], cells,
                 pd.DataFrame(data), exclusions(study), {where[k] for k in best},
                 ["l"] + ["r"] * len(col_vals))


def pivot_tables(study: Study, metrics: list[str]) -> list[Table]:
    frame = study.complete
    out = []
    for a, b in itertools.combinations(study.axes, 2):
        if crossed(frame, a, b):
            out += [pivot_table(study, a, b, m) for m in metrics]
    return out


POWER, ALPHA = 0.8, 0.05  # the power analysis: an effect detected 80% of the time by a two-sided 5% test


def power_rows(study: Study, metrics: list[str]) -> list[dict]:
    """Per metric with per-example scores: the best configuration against the runner-up by mean, their
    paired bootstrap (is the difference within noise?) and what the study could detect (``stats.power``)."""
    from lora_ablate.errors import UserError
    from lora_ablate.export.paired import PER_EXAMPLE, differences, pair_scores
    from lora_ablate.export.stats import paired_bootstrap, power

    scores = study.example_scores
    axes = raw_axes(study)
    if scores is None or not axes:
        return []
    out = []
    for m in metrics:
        set_name, name = m.split("/", 1)
        groups = [(k, r) for k, r in summarize_groups(study.complete, [a.column for a in axes], [m])
                  if not math.isnan(r[m].mean)]
        if name not in PER_EXAMPLE or len(groups) < 2:
            continue
        groups.sort(key=lambda kr: kr[1][m].mean, reverse=study.direction(m) == "maximize")
        (k_best, best), (k_next, runner) = groups[:2]
        try:
            p = pair_scores(scores[scores["run_id"].isin(best["frame"]["run_id"])],
                            scores[scores["run_id"].isin(runner["frame"]["run_id"])], set_name, name)
        except UserError:
            continue
        boot = paired_bootstrap(p.a, p.b, n_boot=NEAR_BOOT, weights=p.weights)
        pw = power(differences(p), power=POWER, alpha=ALPHA)
        label = lambda key: ", ".join(f"{a.name}={format_value(v)}" for a, v in zip(axes, key))  # noqa: E731
        out.append({"metric": m, "best": label(k_best), "runner_up": label(k_next), "delta": boot.delta,
                    "ci_low": boot.ci_low, "ci_high": boot.ci_high, "p": boot.p_value,
                    "within_noise": boot.ci_low <= 0 <= boot.ci_high, "mde": pw.mde, "se": pw.se,
                    "seeds": boot.n_seeds, "examples": boot.n_examples, "seeds_needed": pw.seeds_needed,
                    "examples_needed": pw.examples_needed, "seed_var": pw.parts.seed,
                    "example_var": pw.parts.example, "residual_var": pw.parts.residual, "pairing": p.pairing})
    return out


def power_table(study: Study, metrics: list[str]) -> Table | None:
    rows = power_rows(study, metrics)
    if not rows:
        return None
    need = lambda n: "unreachable" if n is None else str(n)  # noqa: E731
    cells = [[metric_label(r["metric"]), r["best"], r["runner_up"], f"{r['delta']:+.4f}",
              f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]", f"{r['p']:.3f}", "yes" if r["within_noise"] else "no",
              f"{r['mde']:.4f}", f"{r['seeds']} x {r['examples']}", need(r["seeds_needed"]),
              need(r["examples_needed"])] for r in rows]
    caption = (f"Is the best configuration told apart from the runner-up, and what could this study detect? "
               f"Difference: runner-up - best, paired bootstrap over seeds and examples ({NEAR_BOOT} replicates; "
               f"95% interval and two-sided p); within noise: the interval holds 0. Detectable: the least true "
               f"difference a two-sided {ALPHA:g}-level test finds with {POWER:.0%} power at this size, "
               f"(z_0.975 + z_0.8) x SE; seeds needed (examples as now) and examples needed (seeds as now) to "
               f"detect the observed difference; unreachable: the other source of noise alone is too large. "
               f"SE^2 = seed/S + example/E + residual/(S E) from the two-way ANOVA variance components of the "
               f"paired differences (docs/statistics.md); a normal approximation, optimistic for few seeds.")
    return Table("power", f"{study.name}: power", caption,
                 ["metric", "best", "runner-up", "difference", "95% CI", "p", "within noise",
                  f"detectable ({POWER:.0%} power)", "seeds x examples", "seeds needed", "examples needed"],
                 cells, pd.DataFrame(rows), exclusions(study), set(), ["l"] * 3 + ["r"] * 8)


def power_notes(tables: list[Table]) -> list[str]:
    """One sentence per row of the power table, for the export's notes."""
    table = next((t for t in tables if t.name == "power"), None)
    if table is None:
        return []
    out = []
    for r in table.data.to_dict("records"):
        verdict = ("within noise: the data cannot tell them apart" if r["within_noise"]
                   else "outside noise")
        out.append(f"Power, {r['metric']}: best {r['best']} vs runner-up {r['runner_up']} differ by "
                   f"{r['delta']:+.4f} ({verdict}). At {r['seeds']} seeds x {r['examples']} examples the least "
                   f"difference found {POWER:.0%} of the time is {r['mde']:.4f}; detecting {abs(r['delta']):.4f}: "
                   f"{needed_text(r['seeds_needed'], 'seeds', str(r['examples']) + ' examples')}, or "
                   f"{needed_text(r['examples_needed'], 'examples', str(r['seeds']) + ' seeds')} "
                   "(method: docs/statistics.md).")
    return out


RETENTION_PARAM = "cfg.eval.retention"  # the trials' recorded eval.retention (comma-joined entries)


def retention_sets(study: Study) -> list[str]:
    """The sets some complete trial scored as retention sets (``eval.retention``), by the names their
    metrics are logged under."""
    from lora_ablate.suite import set_name

    frame = study.complete
    if RETENTION_PARAM not in frame:
        return []
    names = {set_name(e.strip()) for v in frame[RETENTION_PARAM].dropna() for e in str(v).split(",") if e.strip()}
    return [n for n in dict.fromkeys(m.split("/")[0] for m in study.metrics) if n in names]


@dataclass
class Shift:
    """Per configuration: the seeds' NLL change from the base model on each set, signed so that more is the
    word's direction (held-out: gain = base - adapter; retention: forgetting = adapter - base)."""

    key: tuple
    n: int
    gained: dict[str, Summary]
    forgot: dict[str, Summary]


def shifts(study: Study) -> tuple[list[str], list[str], list[Shift]]:
    """(held-out sets, retention sets, one :class:`Shift` per configuration) for the sets whose base NLL
    the study logged; empty when it has no retention set or no base evaluation."""
    kept = retention_sets(study)
    forgot = [s for s in kept if f"{s}/nll" in study.base]
    first = study.objective.split("/")[0]
    learned = sorted((m.split("/")[0] for m in study.metrics if m.endswith("/nll") and m.split("/")[0] not in kept
                      and m in study.base), key=lambda s: (s != first, s))
    if not forgot or not learned:
        return learned, forgot, []
    axes = raw_axes(study)
    out = []
    for key, row in _sorted(summarize_groups(study.complete, [a.column for a in axes], []), axes):
        g = row["frame"]
        out.append(Shift(key, row["n"],
                         {s: summarize(study.base[f"{s}/nll"] - g[f"final/{s}/nll"]) for s in learned},
                         {s: summarize(g[f"final/{s}/nll"] - study.base[f"{s}/nll"]) for s in forgot}))
    return learned, forgot, out


def learned_forgotten_table(study: Study) -> Table | None:
    """What each configuration learns (held-out NLL gain over the base) next to what it forgets (retention
    NLL rise over the base), with 95% t-intervals over seeds."""
    learned, forgot, rows = shifts(study)
    if not rows:
        return None
    axes = raw_axes(study)
    header = ([a.label for a in axes] + ["n"] + [f"{s} NLL gain over base" for s in learned]
              + [f"{s} NLL rise over base (forgetting)" for s in forgot])
    cells, data = [], []
    for r in rows:
        cells.append([format_value(v) for v in r.key] + [str(r.n)]
                     + [fmt_summary(r.gained[s]) for s in learned] + [fmt_summary(r.forgot[s]) for s in forgot])
        rec = {**{a.column: v for a, v in zip(axes, r.key)}, "n": r.n}
        for word, sets, got in (("gain", learned, r.gained), ("forgetting", forgot, r.forgot)):
            for s in sets:
                x = got[s]
                rec.update({f"{s}/nll {word} mean": x.mean, f"{s}/nll {word} ci_low": x.ci_low,
                            f"{s}/nll {word} ci_high": x.ci_high})
        data.append(rec)
    base = ", ".join(f"{s} {fmt_num(study.base[f'{s}/nll'])}" for s in learned + forgot)
    caption = ("What each configuration learns and what it forgets, side by side: the held-out sets' NLL gain "
               "over the base model (base - adapter; more is better) and the retention sets' NLL rise over it "
               "(adapter - base; more is more forgetting, below 0 the adapter fits that text better than the "
               "base). Cells: mean ± sample std [95% t-interval of the mean] over seeds; one seed shows its "
               f"value only. Base model NLL: {base}.")
    return Table("learned_forgotten", f"{study.name}: learned vs forgotten", caption, header, cells,
                 pd.DataFrame(data), exclusions(study), set(), ["l"] * len(axes) + ["r"] * (1 + len(learned + forgot)))


def build_tables(study: Study, metrics: list[str]) -> list[Table]:
    tables = axis_tables(study, metrics)
    if len(study.axes) != 1:  # with one axis the configuration table would repeat the axis table
        tables.append(config_table(study, metrics))
    extra = [t for t in (power_table(study, metrics), learned_forgotten_table(study), resource_table(study))
             if t is not None]
    return tables + pivot_tables(study, metrics) + extra


def stem(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


# ---------------------------------------------------------------- rendering


def to_markdown(t: Table, level: int = 3) -> str:
    def cell(i, j, text):
        text = text.replace("|", "\\|")
        return f"**{text}**" if (i, j) in t.bold else text

    lines = [f"{'#' * level} {t.title}", "", t.caption, "",
             "| " + " | ".join(h.replace("|", "\\|") for h in t.header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in t.align) + " |"]
    lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |" for i, row in enumerate(t.cells)]
    if t.footnote:
        lines += ["", f"*{t.footnote}*"]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    return t.data.to_csv(index=False)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "–": "--", "—": "---", "×": r"$\times$", NEAR_MARK: r"$^\dagger$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in str(text))


def to_latex(t: Table) -> str:
    """A ``table`` float around a plain ``tabular`` (no booktabs or other packages)."""
    def cell(i, j, text):
        text = tex_escape(text)
        return f"\\textbf{{{text}}}" if (i, j) in t.bold else text

    lines = [f"% {tex_escape(t.title)}", "\\begin{table}[ht]", "\\centering",
             f"\\caption{{{tex_escape(t.title)}. {tex_escape(t.caption)}}}",
             f"\\begin{{tabular}}{{{''.join(t.align)}}}", "\\hline",
             " & ".join(tex_escape(h) for h in t.header) + " \\\\", "\\hline"]
    # "{}" first: a row that began with "[" would be read as the optional argument of the previous \\
    lines += ["{}" + " & ".join(cell(i, j, c) for j, c in enumerate(row)) + " \\\\" for i, row in enumerate(t.cells)]
    lines += ["\\hline", "\\end{tabular}"]
    if t.footnote:
        lines += ["", f"\\smallskip\\footnotesize {tex_escape(t.footnote)}"]
    lines += ["\\end{table}"]
    return "\n".join(lines) + "\n"


def latex_document(tables: list[Table], title: str) -> str:
    """All tables in one document that compiles with plain ``pdflatex`` (article class, no packages)."""
    body = "\n\\clearpage\n".join(to_latex(t) for t in tables)
    return ("\\documentclass{article}\n\\begin{document}\n"
            f"\\section*{{{tex_escape(title)}}}\n{body}\\end{{document}}\n")


def to_html(t: Table) -> str:
    def cell(i, j, text, tag="td"):
        text = html.escape(text)
        cls = ' class="num"' if t.align[j] == "r" else ""
        return f"<{tag}{cls}>{'<strong>' + text + '</strong>' if (i, j) in t.bold else text}</{tag}>"

    head = "".join(cell(-1, j, h, "th") for j, h in enumerate(t.header))
    body = "\n".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(row)) + "</tr>"
                     for i, row in enumerate(t.cells))
    note = f'\n<p class="note">{html.escape(t.footnote)}</p>' if t.footnote else ""
    return (f'<section class="table" id="{html.escape(t.name)}">\n<h3>{html.escape(t.title)}</h3>\n'
            f'<p class="caption">{html.escape(t.caption)}</p>\n'
            f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>{note}\n</section>\n")
