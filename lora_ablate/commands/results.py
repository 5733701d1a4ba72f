"""``python -m lora_ablate export`` (tables, figures, report) and ``compare`` (is B really better than A?).

Both read a study back from MLflow, so they work for any tracking store, including one shared by
many workers. Heavy imports (pandas, MLflow, matplotlib) happen inside the commands: the CLI imports
this module to build its parser for every command.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_ablate.errors import UserError, choices
from lora_ablate.vocab import format_value, state_word
from lora_ablate.workspace import DEFAULT_WORKSPACE, MLFLOW_DB

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("md", "csv", "tex", "html")
# ppl is exp(nll) per trial: its seed mean is not exp of the nll mean, so listing both invites
# contradictions; ask for it with --metrics when wanted.
DERIVED_METRICS = ("ppl",)
METRIC_ORDER = ("nll", "exact_match", "rouge_l")


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        what = f"format {bad[0]!r}" if bad else f"--format {text!r}"
        raise UserError(f"{what} is not valid; choose a comma-separated subset of: {choices(FORMATS)}")
    return list(dict.fromkeys(formats))


def default_metrics(study) -> list[str]:
    """Every final metric but the derived ones; the objective's set first, the objective leading it
    (it is what the study optimised), then per set: nll, exact match, ROUGE-L, others."""
    ms = [m for m in study.metrics if m.rsplit("/", 1)[-1] not in DERIVED_METRICS]
    first = study.objective.split("/")[0]

    def key(m):
        s, name = m.split("/", 1)
        rank = METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER)
        return (m != study.objective, s != first, s, rank, name)
    return sorted(ms, key=key)


def export(study_name: str, out: Path | None = None, formats: str = ",".join(FORMATS),
           workspace: Path | None = None, tracking_uri: str | None = None, metrics: str | None = None) -> Path:
    """Write tables (``--format``), figures (always, PNG and SVG) and ``summary.json`` into ``out``,
    atomically: ``out`` appears only when everything was written."""
    from lora_ablate.export.plots import render_plots
    from lora_ablate.export.steps_to_loss import steps_to_loss_table
    from lora_ablate.export.tables import build_tables, power_notes
    from lora_ablate.export.tracked import open_study
    from lora_ablate.rundir import RunDir

    fmts = parse_formats(formats)
    study = open_study(study_name, workspace, tracking_uri)
    if study.complete.empty:
        counts = ", ".join(f"{n} {state_word(s)}" for s, n in study.counts().items())
        raise UserError(f"study {study_name!r} has no complete trial ({counts}); nothing to export")
    chosen = ([study.resolve_metric(m.strip()) for m in metrics.split(",") if m.strip()] if metrics
              else default_metrics(study))
    if not chosen:
        raise UserError(f"study {study_name!r}: no final held-out metric to export; available: "
                        f"{choices(study.metrics) or '(none)'}")
    out = Path(out) if out else Path("exports") / f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir(out)
    with run:
        tables = build_tables(study, chosen)
        tables += [t for t in (steps_to_loss_table(study),) if t is not None]
        plots, notes = render_plots(study, chosen, run.path / "plots")
        notes += power_notes(tables)
        write_formats(run.path, fmts, study, tables, plots, notes)
        run.json("summary.json", {
            "study": study.name, "tracking_uri": study.display_uri, "objective": study.objective,
            "direction": study.direction(), "metrics": chosen, "axes": [a.name for a in study.axes],
            "trials": study.counts(), "formats": fmts, "tables": [t.name for t in tables],
            "plots": [p.name for p in plots], "notes": notes})
    print(f"{_count(len(tables), 'table')} and {_count(len(plots), 'figure')} of study {study.name!r} "
          f"written to {out}")
    for n in notes:
        print(f"note: {n}")
    return out


def write_formats(root: Path, fmts: list[str], study, tables, plots, notes: list[str]) -> None:
    """md: report.md (tables, figure links, notes); csv: csv/<table>.csv and csv/trials.csv (every
    trial, failed ones too); tex: tex/<table>.tex and tables.tex (a whole document); html: report.html."""
    from lora_ablate.export.html_report import render_report, report_meta
    from lora_ablate.export.tables import latex_document, to_csv, to_latex, to_markdown

    if "md" in fmts:
        figures = "\n".join(f"### {p.title}\n\n![{p.title}](plots/{p.png.name})\n\n*{p.caption}* "
                            f"([SVG](plots/{p.svg.name}))\n" for p in plots)
        body = "\n".join(to_markdown(t) for t in tables)
        extra = "".join(f"- {n}\n" for n in notes)
        meta = "".join(f"- {k}: {v}\n" for k, v in report_meta(study))
        (root / "report.md").write_text(f"# {study.name}\n\n{meta}\n## Tables\n\n{body}\n## Figures\n\n{figures}"
                                        + (f"\n## Notes\n\n{extra}" if extra else ""))
    if "csv" in fmts:
        (root / "csv").mkdir()
        for t in tables:
            (root / "csv" / f"{t.name}.csv").write_text(to_csv(t))
        study.trials.to_csv(root / "csv" / "trials.csv", index=False)
    if "tex" in fmts:
        (root / "tex").mkdir()
        for t in tables:
            (root / "tex" / f"{t.name}.tex").write_text(to_latex(t))
        (root / "tables.tex").write_text(latex_document(tables, study.name))
    if "html" in fmts:
        (root / "report.html").write_text(render_report(study, tables, plots, notes))


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Comparison:
    metric: str
    label_a: str
    label_b: str
    mean_a: float
    mean_b: float
    delta: float  # b - a
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_examples: int
    pairing: str
    n_boot: int
    seed: int
    token_weighted: bool  # nll: examples weighted by their tokens, as the logged set NLL
    sentence: str
    # what this size could detect (stats.power, 80% power, two-sided 0.05): the least true difference,
    # and the seeds (examples as now) or examples (seeds as now) the observed difference needs
    detectable: float = float("nan")
    seeds_needed: int | None = None
    examples_needed: int | None = None
    p_holm: float | None = None  # Holm-adjusted over the comparisons of one compare command


def _labels(cfg_a: dict, cfg_b: dict) -> tuple[str, str]:
    """``r=64 (targets=q,v)``: what differs first, what is shared in parentheses."""

    def label(cfg):
        diff = [f"{k}={format_value(v)}" for k, v in cfg.items() if cfg_a.get(k) != cfg_b.get(k)]
        same = [f"{k}={format_value(v)}" for k, v in cfg.items() if cfg_a.get(k) == cfg_b.get(k)]
        return ", ".join(diff) + (f" ({', '.join(same)})" if same else "")
    return label(cfg_a), label(cfg_b)


def _configuration(study, selection: str, what: str) -> tuple[pd.DataFrame, dict]:
    from lora_ablate.export.selection import parse_selection, select

    hit = select(study.complete, parse_selection(selection), what)
    names = [a.name for a in study.axes]
    configs = hit[names].drop_duplicates() if names else hit.head(1)[[]]
    if len(configs) > 1:
        listed = "; ".join(", ".join(f"{k}={format_value(v)}" for k, v in row.items())
                           for _, row in configs.iterrows())
        raise UserError(f"{what} {selection!r} matches {len(configs)} configurations ({listed}); "
                        "add parameters to pick one")
    return hit, {k: hit[k].iloc[0] for k in names}


def format_p(p: float, n_boot: int) -> str:
    if p == 0:
        return f"p < {1 / n_boot:g}"
    return f"p = {p:.4f}" if p < 0.001 else f"p = {p:.3f}"


def compare(study_name: str, a: str, b: str, metric: str | None = None, workspace: Path | None = None,
            tracking_uri: str | None = None, n_boot: int = 10_000, seed: int = 0,
            confidence: float = 0.95) -> Comparison:
    """Difference ``b - a`` of a held-out metric with a paired bootstrap CI and p-value, over the
    per-example scores of both configurations' seeds; printed as one plain sentence."""
    return compare_many(study_name, a, [b], metric, workspace, tracking_uri, n_boot, seed, confidence)[0]


def compare_many(study_name: str, a: str, bs: list[str] | None, metric: str | None = None,
                 workspace: Path | None = None, tracking_uri: str | None = None, n_boot: int = 10_000,
                 seed: int = 0, confidence: float = 0.95) -> list[Comparison]:
    """:func:`compare` of ``a`` with each of ``bs`` (None: every other configuration of the study), with
    Holm-adjusted p-values when there is more than one: among many pairs some p < 0.05 by chance alone."""
    from lora_ablate.export.stats import holm
    from lora_ablate.export.tracked import open_study

    if n_boot < 100:
        raise UserError(f"--n-boot {n_boot} is too few for a 95% interval; use at least 100 (default 10000)")
    study = open_study(study_name, workspace, tracking_uri)
    m = study.resolve_metric(metric)
    rows_a, cfg_a = _configuration(study, a, "--a")
    if bs is None:
        bs = _others(study, rows_a)
    out = [_compare_pair(study, m, rows_a, cfg_a, a, b, n_boot, seed, confidence) for b in bs]
    if len(out) > 1:
        for c, adjusted in zip(out, holm([c.p_value for c in out])):
            c.p_holm = adjusted
    return out


def _others(study, rows_a) -> list[str]:
    """A selection for every configuration but ``rows_a``'s, by all its axes' values."""
    names = [a.name for a in study.axes]
    rest = study.complete[~study.complete["run_id"].isin(rows_a["run_id"])]
    configs = rest[names].drop_duplicates() if names else rest.head(0)[[]]
    if configs.empty:
        raise UserError(f"study {study.name!r} has no other configuration to compare with --a")
    return [",".join(f"{k}={format_value(v)}" for k, v in row.items()) for _, row in configs.iterrows()]


def _compare_pair(study, m: str, rows_a, cfg_a: dict, a: str, b: str, n_boot: int, seed: int,
                  confidence: float) -> Comparison:
    from lora_ablate.export.paired import differences, pair_scores
    from lora_ablate.export.stats import paired_bootstrap, power, weighted_mean
    from lora_ablate.export.tables import ALPHA, METRIC_WORDS, POWER

    set_name, name = m.split("/", 1)
    rows_b, cfg_b = _configuration(study, b, "--b")
    if set(rows_a["run_id"]) == set(rows_b["run_id"]):
        raise UserError(f"--a {a!r} and --b {b!r} select the same configuration; nothing to compare")
    done = study.complete
    seeds = dict(zip(done["run_id"], done["seed"] if "seed" in done else [0] * len(done)))
    scores = study.scores(list(rows_a["run_id"]) + list(rows_b["run_id"]))
    scores["seed"] = scores["run_id"].map(seeds)
    side_a = scores[scores["run_id"].isin(rows_a["run_id"])]
    side_b = scores[scores["run_id"].isin(rows_b["run_id"])]
    p = pair_scores(side_a, side_b, set_name, name)
    res = paired_bootstrap(p.a, p.b, n_boot=n_boot, seed=seed, confidence=confidence, weights=p.weights)
    label_a, label_b = _labels(cfg_a, cfg_b)
    words = METRIC_WORDS.get(name, name.replace("_", " "))
    if res.delta == 0:
        lo, hi = res.ci_low, res.ci_high
        head = f"{label_b} scores the same {words} as {label_a}"
    else:
        higher = res.delta > 0
        # state the interval in the sentence's own direction ("0.03 lower (CI 0.01 to 0.05)")
        lo, hi = (res.ci_low, res.ci_high) if higher else (-res.ci_high, -res.ci_low)
        head = f"{label_b} scores {abs(res.delta):.3f} {'higher' if higher else 'lower'} {words} than {label_a}"
    size = (f"{res.n_seeds} seed{'s' if res.n_seeds != 1 else ''} x {res.n_examples} examples" if p.common
            else f"{res.n_examples} examples, seeds unpaired")
    sentence = (f"{head} on {set_name} ({round(100 * confidence)}% CI {lo:.3f} to {hi:.3f}, "
                f"{format_p(res.p_value, n_boot)}, {size}).")
    # the means are the tables' cells (seed means of the set metric) when every seed and example pairs
    c = Comparison(m, label_a, label_b, weighted_mean(p.a, p.weights), weighted_mean(p.b, p.weights),
                   res.delta, res.ci_low, res.ci_high, res.p_value, res.n_seeds, res.n_examples, p.pairing,
                   n_boot, seed, p.weights is not None, sentence)
    if res.n_examples > 1:  # variance components need two examples
        pw = power(differences(p), power=POWER, alpha=ALPHA)
        c.detectable, c.seeds_needed, c.examples_needed = pw.mde, pw.seeds_needed, pw.examples_needed
    return c


def cmd_export(args) -> int:
    export(args.study, args.out, args.format, args.workspace, args.tracking_uri, args.metrics)
    return 0


def cmd_compare(args) -> int:
    if bool(args.b) == args.all:
        raise UserError("compare needs --b CONFIG (one or more) or --all (every other configuration), not "
                        + ("both" if args.all else "neither"))
    comparisons = compare_many(args.study, args.a, None if args.all else args.b, args.metric, args.workspace,
                               args.tracking_uri, args.n_boot, args.seed)
    if args.json:
        for c in comparisons:
            print(c.sentence)
        print(json.dumps([asdict(c) for c in comparisons] if len(comparisons) > 1 else asdict(comparisons[0]),
                         indent=2))
        return 0
    for c in comparisons:
        print(c.sentence)
        print(f"  {c.metric}: mean {c.mean_a:.4f} ({c.label_a}) vs {c.mean_b:.4f} ({c.label_b}); "
              f"difference b - a = {c.delta:+.4f}, CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]")
        weighting = ("; examples weighted by their tokens, as in the logged set NLL" if c.token_weighted
                     else "; examples weighted equally (no token counts in scores.jsonl)"
                     if c.metric.endswith("/nll") else "")
        print(f"  {c.pairing}; {c.n_examples} examples; paired bootstrap over seeds and examples, "
              f"{c.n_boot} replicates, rng seed {c.seed}{weighting}")
        print(f"  {power_sentence(c)}")
    if len(comparisons) > 1:
        print(f"Holm correction over {len(comparisons)} comparisons (family-wise error held at 0.05):")
        for c in comparisons:
            verdict = "differs" if c.p_holm <= 0.05 else "not told apart"
            print(f"  {c.label_b}: p = {c.p_value:.4f} raw, {c.p_holm:.4f} Holm-adjusted ({verdict})")
    return 0


def power_sentence(c: Comparison) -> str:
    """What this comparison's size could detect, and what its observed difference would need."""
    import math

    if math.isnan(c.detectable):
        return "power: not estimated (one example)"
    noise = "within noise (the interval holds 0)" if c.ci_low <= 0 <= c.ci_high else "outside noise"
    from lora_ablate.export.stats import needed_text

    return (f"power: {noise}; at {c.n_seeds} seeds x {c.n_examples} examples a difference of "
            f"{c.detectable:.4f} is found 80% of the time (two-sided 0.05); detecting {abs(c.delta):.4f}: "
            f"{needed_text(c.seeds_needed, 'seeds', str(c.n_examples) + ' examples')}, or "
            f"{needed_text(c.examples_needed, 'examples', str(c.n_seeds) + ' seeds')}")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name (the MLflow experiment)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workspace", type=Path,
                       help=f"workspace folder holding {MLFLOW_DB} (default ./{DEFAULT_WORKSPACE})")
    where.add_argument("--tracking-uri", help="any MLflow tracking URI (e.g. a shared server) instead of the workspace")


def register(subparsers) -> None:
    e = subparsers.add_parser("export", help="tables, figures and an HTML report of a study, read from MLflow")
    _store_args(e)
    e.add_argument("--format", default=",".join(FORMATS), help=f"comma-separated subset of: {choices(FORMATS)}")
    e.add_argument("--out", type=Path, help="folder to create (default exports/<study>-<time>)")
    e.add_argument("--metrics", help="comma-separated <set>/<metric> (default: every final metric except ppl)")
    e.set_defaults(fn=cmd_export)

    c = subparsers.add_parser("compare", help="difference of two configurations with a paired bootstrap CI")
    _store_args(c)
    c.add_argument("--a", required=True, help='baseline, as param filters: "r=8,targets=qv"')
    c.add_argument("--b", action="append", help='contender, as param filters: "r=64,targets=qv"; repeat it to '
                   "compare --a with several (Holm-adjusted p-values are printed too)")
    c.add_argument("--all", action="store_true", help="compare --a with every other configuration (Holm-adjusted)")
    c.add_argument("--metric", help="<set>/<metric> (default: the study's objective)")
    c.add_argument("--n-boot", type=int, default=10_000, help="bootstrap replicates (default 10000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's random stream (default 0)")
    c.add_argument("--json", action="store_true", help="also print the result as JSON")
    c.set_defaults(fn=cmd_compare)
