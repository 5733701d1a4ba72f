"""export and compare on an MLflow store filled with known values, written per docs/tracking.md."""

import csv
import io
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from scipy import stats

from lora_ablate.cli import main
from lora_ablate.commands.results import compare, export
from lora_ablate.errors import UserError
from lora_ablate.export.axes import detect_axes, log_bins
from lora_ablate.export.selection import canonical_targets, parse_selection, select
from lora_ablate.export.tables import build_tables
from lora_ablate.export.tracked import open_study
from lora_ablate.vocab import format_value

RANKS = (4, 8, 64)
TARGETS = ("q,v", "q,k,v,o")
SEEDS = (0, 1, 2)
SETS = ("heldout_instances", "heldout_tasks")
N_EX = 8
# (r, targets, seed) -> state for the trials that did not complete: the r=64 q,k,v,o cell keeps one seed
NOT_COMPLETE = {(64, "q,k,v,o", 1): ("FAIL", "FAILED", "CUDA out of memory"),
                (64, "q,k,v,o", 2): ("PRUNED", "KILLED", "pruned at step 20")}


# ---------------------------------------------------------------- the store


def _write_trial(client, exp_id, parent_id, number, params, metrics, tags, status, scores=None, tmp=None,
                 nested=True):
    """A trial run nested under its parent (``mlflow.parentRunId``, as tracked before base-model runs) or
    beside it (``lora_ablate.parent_run``, the layout of docs/tracking.md)."""
    from mlflow.entities import Metric, Param

    parent = {"mlflow.parentRunId" if nested else "lora_ablate.parent_run": parent_id}
    run = client.create_run(exp_id, run_name=f"trial-{number}", tags={
        **parent, "lora_ablate.kind": "trial", "lora_ablate.trial_number": str(number),
        "lora_ablate.optuna_storage": "sqlite:///optuna.db", **tags})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, step) for k, v, step in metrics])
    if scores is not None:
        path = tmp / f"{rid}" / "scores.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in scores))
        client.log_artifact(rid, str(path))
    client.set_terminated(rid, status=status)
    return rid


def _example_nll(r, targets, seed, set_name, i):
    """Dyadic per-example NLL: targets q,k,v,o is exactly 1/4 above q,v at the same r, seed and example."""
    base = (3 * i + 5 * SETS.index(set_name) + 7 * seed + (i * seed) % 5) / 64
    by_rank = {4: 0.5, 8: (i % 3) / 16 + seed / 32, 64: (i % 4) / 32}[r]
    return 1.0 + base + by_rank + (0.25 if targets == "q,k,v,o" else 0.0)


def _example_em(r, seed, i):
    """Exact match: every example at r=64, the first at r=8, about a third at r=4."""
    return float((i + seed) % 3 == 0 or i < r // 8)


def build_rank_study(client, tmp):
    exp_id = client.create_experiment("rank-demo", artifact_location=(tmp / "artifacts" / "rank-demo").as_uri())
    parent = client.create_run(exp_id, run_name="study-20250101-000000", tags={
        "lora_ablate.kind": "study", "lora_ablate.study": "rank-demo", "lora_ablate.space": "rank",
        "lora_ablate.model": "tiny-llama", "lora_ablate.data": "suite", "lora_ablate.git_sha": "abc123",
        "lora_ablate.device": "cpu", "lora_ablate.objective": "heldout_instances/nll",
        "lora_ablate.direction": "minimize"}).info.run_id
    rng = np.random.default_rng(123)
    values, runs = {}, {}
    number = 0
    for r in RANKS:
        for targets in TARGETS:
            for seed in SEEDS:
                params = {"r": r, "alpha": float(r), "alpha_rule": "rank", "scaling": 1.0, "lr": 0.001,
                          "targets": targets, "seed": seed, "steps": 20,
                          "trainable_params": r * 1000 * len(targets.split(",")),
                          "cfg.train.seed": seed, "cfg.lora.r": r, "cfg.lora.dropout": 0.0}
                curve = [("train/loss", 3.0 - 0.1 * s / 10 - 0.01 * r ** 0.5, s) for s in (0, 10, 20)]
                curve += [("heldout_instances/nll", 2.5 - 0.05 * s / 10, s) for s in (10, 20)]
                key = (r, targets, seed)
                state, status, reason = NOT_COMPLETE.get(key, ("COMPLETE", "FINISHED", ""))
                tags = {"lora_ablate.state": state, "lora_ablate.config_key": f"cfg-{r}-{targets}"}
                if state != "COMPLETE":
                    tags["lora_ablate.fail_reason"] = reason
                    _write_trial(client, exp_id, parent, number, params, curve[:2], tags, status)
                    number += 1
                    continue
                final = {"heldout_instances/nll": 2.0 - 0.1 * math.log2(r) + rng.normal(0, 0.05),
                         "heldout_instances/exact_match": 0.1 * math.log2(r) / 6 + rng.uniform(0, 0.05),
                         "heldout_tasks/nll": 2.4 + rng.normal(0, 0.05),
                         "heldout_tasks/exact_match": rng.uniform(0, 0.1),
                         "heldout_instances/ppl": 7.0, "heldout_instances/n": N_EX, "heldout_tasks/n": N_EX}
                values[key] = {**final, "wall_s": 10.0 + r / 8 + seed, "trainable_params": params["trainable_params"]}
                metrics = curve + [(f"final/{k}", v, 0) for k, v in final.items()]
                metrics += [("wall_s", values[key]["wall_s"], 0), ("tokens_per_s", 1000.0, 0),
                            ("peak_mem_mb", 512.0, 0), ("train_s", 8.0, 0)]
                scores = [{"set": s, "idx": i, "family": "f", "nll": _example_nll(r, targets, seed, s, i),
                           "tokens": 5, "exact_match": _example_em(r, seed, i), "rouge_l": 0.5,
                           "prediction": "x"} for s in SETS for i in range(N_EX)]
                runs[key] = _write_trial(client, exp_id, parent, number, params, metrics, tags, status, scores, tmp)
                number += 1
    client.set_terminated(parent, status="FINISHED")
    return values, runs


def build_lr_study(client, tmp):
    """A sampled space: lr log-uniform, r from two values, one seed; no parent objective tags."""
    exp_id = client.create_experiment("lr-sampled", artifact_location=(tmp / "artifacts" / "lr-sampled").as_uri())
    parent = client.create_run(exp_id, tags={"lora_ablate.kind": "study"}).info.run_id
    rng = np.random.default_rng(9)
    lrs = 10 ** rng.uniform(-5, -2, size=12)
    for n, lr in enumerate(lrs):
        r = (4, 16)[n % 2]
        nll = 2.0 + 0.2 * (math.log10(lr) + 3.5) ** 2 - 0.01 * r
        _write_trial(client, exp_id, parent, n, {"r": r, "alpha": 16.0, "alpha_rule": "free", "lr": lr,
                                                 "targets": "q,v", "seed": 0, "trainable_params": 100 * r},
                     [("final/heldout_instances/nll", nll, 0), ("final/heldout_instances/n", N_EX, 0),
                      ("train/loss", 3.0, 0), ("train/loss", 2.0, 10), ("wall_s", 5.0, 0)],
                     {"lora_ablate.state": "COMPLETE"}, "FINISHED")
    return lrs


def build_small_studies(client, tmp):
    """"single": one configuration, two seeds and a failure; "all-failed": nothing completed."""
    for name, states in (("single", ("COMPLETE", "COMPLETE", "FAIL")), ("all-failed", ("FAIL", "FAIL"))):
        exp_id = client.create_experiment(name, artifact_location=(tmp / "artifacts" / name).as_uri())
        parent = client.create_run(exp_id, tags={"lora_ablate.kind": "study"}).info.run_id
        for n, state in enumerate(states):
            metrics = [("final/heldout_instances/nll", 1.5 + n / 4, 0)] if state == "COMPLETE" else []
            _write_trial(client, exp_id, parent, n, {"r": 8, "targets": "q,v", "lr": 1e-3, "seed": n}, metrics,
                         {"lora_ablate.state": state}, "FINISHED" if state == "COMPLETE" else "FAILED")


# r per targets subset at the budget of r 8 on q: q and o are both d x d, so both get r 8
BUDGET_R = {"q": 8, "o": 8, "q,o": 4}


def build_budget_study(client, tmp, name, parent_tags):
    """A matched-budget study: targets its one axis, r derived from them, 2 seeds. A parent run per entry of
    ``parent_tags`` (its extra tags, oldest first; one without lora_ablate.axes was tracked before the tag)."""
    exp_id = client.create_experiment(name, artifact_location=(tmp / "artifacts" / name).as_uri())
    parents = [client.create_run(exp_id, start_time=1000 + i, tags={"lora_ablate.kind": "study", **tags}).info.run_id
               for i, tags in enumerate(parent_tags)]
    for n, (targets, seed) in enumerate((t, s) for t in BUDGET_R for s in (0, 1)):
        nll = 2.0 - 0.25 * len(targets.split(",")) + 0.01 * seed
        _write_trial(client, exp_id, parents[0], n, {"r": BUDGET_R[targets], "targets": targets, "seed": seed,
                                                     "lr": 2e-3, "trainable_params": 4096},
                     [("final/heldout_instances/nll", nll, 0), ("train/loss", 3.0, 1)],
                     {"lora_ablate.state": "COMPLETE"}, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    values, runs = build_rank_study(client, tmp)
    lrs = build_lr_study(client, tmp)
    build_small_studies(client, tmp)
    return {"uri": uri, "values": values, "runs": runs, "lrs": lrs, "tmp": tmp}


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "rank-demo"
    export("rank-demo", out, "md,csv,tex,html", tracking_uri=store["uri"])
    return out


def _independent(values, keys, metric):
    x = np.array([values[k][metric] for k in keys])
    if len(x) == 1:
        return len(x), x.mean(), math.nan, math.nan, math.nan
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=np.std(x, ddof=1) / math.sqrt(len(x)))
    return len(x), x.mean(), np.std(x, ddof=1), lo, hi


def _csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _close(text, expected):
    if math.isnan(expected):
        return text == ""
    return float(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- reading


def test_reader_builds_a_typed_trial_frame(store):
    study = open_study("rank-demo", tracking_uri=store["uri"])
    t = study.trials
    assert len(t) == 18 and t["trial_number"].tolist() == list(range(18))
    assert study.counts() == {"COMPLETE": 16, "FAIL": 1, "PRUNED": 1}
    assert t["r"].dtype.kind == "i" and t["lr"].dtype.kind == "f"
    # alpha follows r under the rank rule and dropout never varies: neither is an axis
    assert [a.name for a in study.axes] == ["r", "targets"]
    assert study.objective == "heldout_instances/nll" and study.direction() == "minimize"
    assert study.direction("heldout_instances/exact_match") == "maximize"
    assert "heldout_instances/n" not in study.metrics and "heldout_tasks/exact_match" in study.metrics
    assert set(t.loc[t["state"] == "FAIL", "fail_reason"]) == {"CUDA out of memory"}


def test_sampled_lr_is_binned_on_a_log_scale(store):
    study = open_study("lr-sampled", tracking_uri=store["uri"])
    lr = next(a for a in study.axes if a.name == "lr")
    assert lr.binned
    # every trial lands in the bin whose edges (10^(j/k)) enclose it
    for value, label in zip(study.complete["lr"], study.complete[lr.column]):
        lo, hi = (float(x) for x in label.split("–"))
        assert lo * (1 - 1e-2) <= value <= hi * (1 + 1e-2)
    assert study.objective == "heldout_instances/nll"  # untagged parent: the documented default


def test_a_value_copied_from_a_table_selects_its_trial(store):
    study = open_study("lr-sampled", tracking_uri=store["uri"])
    for lr in store["lrs"][:4]:
        hit = select(study.complete, parse_selection(f"lr={format_value(lr)}"))
        assert hit["lr"].tolist() == [pytest.approx(lr, rel=1e-12)]


def test_axes_skip_what_other_axes_determine():
    import pandas as pd

    rows = [{"r": r, "alpha": float(r), "targets": "q,v", "seed": s, "dropout": d, "cfg.lora.dropout": d,
             "cfg.train.seed": s, "cfg.train.warmup": 0.06, "scaling": 1.0, "trainable_params": 10 * r,
             "final/heldout_instances/nll": 1.0}
            for r in (4, 8) for d in (0.0, 0.1) for s in (0, 1)]
    # alpha follows r, cfg.lora.dropout repeats the space's dropout param, seed repeats, warmup is fixed
    assert [a.name for a in detect_axes(pd.DataFrame(rows))] == ["r", "dropout"]


def test_recorded_axes_are_the_only_axes():
    import pandas as pd

    rows = [{"r": r, "targets": "q,v", "dropout": d, "seed": s, "final/heldout_instances/nll": 1.0}
            for r in (4, 8) for d in (0.0, 0.1) for s in (0, 1)]
    frame = pd.DataFrame(rows)
    # table order whatever the tag's order; a recorded axis that does not vary (targets) or was never
    # logged (lr) has no table; dropout and seed vary but are not recorded axes
    assert [a.name for a in detect_axes(frame, ["dropout", "targets", "r", "lr"])] == ["r", "dropout"]
    assert [a.name for a in detect_axes(frame, ["r"])] == ["r"]
    assert [a.name for a in detect_axes(frame)] == ["r", "dropout"]  # untagged: whatever varies


def test_a_matched_budget_study_gets_tables_of_its_recorded_axes_only(tmp_path):
    """r follows from the targets: a "by rank r" table would pool q and o (both r 8) as one row."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    # the newer parent is a resume that built no trial, so it recorded no axes: the older one's tag holds
    build_budget_study(client, tmp_path, "budget", [{"lora_ablate.axes": "targets"}, {}])
    build_budget_study(client, tmp_path, "budget-untagged", [{}])

    study = open_study("budget", tracking_uri=uri)
    assert study.recorded_axes == ["targets"] and [a.name for a in study.axes] == ["targets"]
    out = export("budget", tmp_path / "budget", "md,csv", tracking_uri=uri)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["axes"] == ["targets"] and summary["tables"] == ["axis_targets"]
    report = (out / "report.md").read_text()
    assert "budget: by targets" in report and "by rank r" not in report
    assert not any(p.startswith("rank_") for p in summary["plots"])
    rows = _csv(out / "csv" / "axis_targets.csv")
    assert [(r["targets"], r["n"]) for r in rows] == [("q", "2"), ("o", "2"), ("q,o", "2")]

    # tracked before the tag: every param that varies is an axis, as before
    legacy = open_study("budget-untagged", tracking_uri=uri)
    assert legacy.recorded_axes is None and [a.name for a in legacy.axes] == ["r", "targets"]
    out = export("budget-untagged", tmp_path / "untagged", "csv", tracking_uri=uri)
    assert json.loads((out / "summary.json").read_text())["tables"][:2] == ["axis_r", "axis_targets"]
    assert [(r["r"], r["n"]) for r in _csv(out / "csv" / "axis_r.csv")] == [("4", "2"), ("8", "4")]


def test_a_column_where_every_row_ties_has_no_best(store):
    study = open_study("rank-demo", tracking_uri=store["uri"])
    tables = build_tables(study, ["heldout_instances/ppl", "heldout_instances/nll"])
    for t in tables[:3]:  # axis and configuration tables
        assert not any("ppl" in b for b in t.data["best"]) and t.data["best"].str.contains("nll").any()


def test_reports_do_not_carry_tracking_passwords():
    from lora_ablate.export.tracked import Study

    study = Study("s", "postgresql://me:secret@db:5432/mlflow", "1", {}, None)
    assert study.display_uri == "postgresql://me:***@db:5432/mlflow"


def test_log_bins_use_whole_decade_fractions():
    # 3 decades give 3 whole-decade bins, fewer than 4, so half decades: edges at 10^(j/2)
    labels, order = log_bins([1e-5, 2e-5, 1e-4, 5e-4, 1e-3, 9e-3])
    assert labels == ["1.0e-05–3.2e-05", "1.0e-05–3.2e-05", "1.0e-04–3.2e-04", "3.2e-04–1.0e-03",
                      "1.0e-03–3.2e-03", "3.2e-03–1.0e-02"]
    assert order == list(dict.fromkeys(labels))  # only bins that hold a value, in lr order


def test_targets_and_selections_accept_both_forms():
    assert canonical_targets("qv") == canonical_targets("v,q") == "q,v"
    assert canonical_targets("qkvomlp") == "q,k,v,o,mlp"
    assert parse_selection("r=8,targets=q,v") == {"r": "8", "targets": "q,v"}
    assert parse_selection("targets=qv, r=8") == {"targets": "qv", "r": "8"}
    assert parse_selection("r=64 seed=0") == {"r": "64", "seed": "0"}
    assert parse_selection("targets=q v r=8") == {"targets": "q v", "r": "8"}  # canonical_targets reads q v
    with pytest.raises(UserError, match="roles from"):
        canonical_targets("qx")


# ---------------------------------------------------------------- numbers


def test_axis_table_pools_every_trial_of_a_rank(store, exported):
    rows = {int(row["r"]): row for row in _csv(exported / "csv" / "axis_r.csv")}
    for r in RANKS:
        keys = [k for k in store["values"] if k[0] == r]
        for metric in ("heldout_instances/nll", "heldout_tasks/exact_match"):
            n, mean, std, lo, hi = _independent(store["values"], keys, metric)
            row = rows[r]
            assert int(row["n"]) == n == int(row[f"{metric} n"])
            for col, want in (("mean", mean), ("std", std), ("ci_low", lo), ("ci_high", hi)):
                assert _close(row[f"{metric} {col}"], want), (r, metric, col)
    assert int(rows[64]["n"]) == 4  # 6 trials, one failed and one pruned
    # wall time is a resource of a shared machine, not a result: its own table, by configuration
    assert "wall_s_mean" not in rows[64]
    for row in _csv(exported / "csv" / "resources.csv"):
        keys = [k for k in store["values"] if k[:2] == (int(row["r"]), row["targets"])]
        assert float(row["wall_s_mean"]) == pytest.approx(np.mean([store["values"][k]["wall_s"] for k in keys]))


def test_configuration_table_and_single_seed_cell(store, exported):
    rows = {(int(r["r"]), r["targets"]): r for r in _csv(exported / "csv" / "configurations.csv")}
    assert len(rows) == 6
    for (r, targets), row in rows.items():
        keys = [k for k in store["values"] if k[:2] == (r, targets)]
        n, mean, std, lo, hi = _independent(store["values"], keys, "heldout_instances/nll")
        assert int(row["n"]) == n
        assert [_close(row[f"heldout_instances/nll {c}"], v) for c, v in
                (("mean", mean), ("std", std), ("ci_low", lo), ("ci_high", hi))] == [True] * 4
    one = rows[(64, "q,k,v,o")]
    assert one["n"] == "1" and one["heldout_instances/nll std"] == "" and one["heldout_instances/nll ci_low"] == ""
    md = (exported / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| 64 | q,k,v,o | 1 |"))
    assert "±" not in line and "[" not in line


def test_best_cell_is_marked(store, exported):
    rows = _csv(exported / "csv" / "configurations.csv")
    means = {(row["r"], row["targets"]): float(row["heldout_instances/nll mean"]) for row in rows}
    best = min(means, key=means.get)
    marked = [(row["r"], row["targets"]) for row in rows if "heldout_instances/nll" in row["best"].split(";")]
    assert marked == [best]
    em = {(row["r"], row["targets"]): float(row["heldout_instances/exact_match mean"]) for row in rows}
    marked = [(row["r"], row["targets"]) for row in rows if "heldout_instances/exact_match" in row["best"].split(";")]
    assert marked == [max(em, key=em.get)]  # a score: higher is better
    md = (exported / "report.md").read_text()
    assert f"**{means[best]:.3f}" in md


def test_pivot_of_crossed_axes(store, exported):
    rows = _csv(exported / "csv" / "pivot_r_x_targets_heldout_instances_nll.csv")
    assert len(rows) == 6
    for row in rows:
        keys = [k for k in store["values"] if k[:2] == (int(row["r"]), row["targets"])]
        n, mean, *_ = _independent(store["values"], keys, "heldout_instances/nll")
        assert int(row["n"]) == n and _close(row["mean"], mean)
    assert sum(row["best"] == "True" for row in rows) == 1


def test_failed_and_pruned_are_counted_in_the_footnote(exported):
    md = (exported / "report.md").read_text()
    assert "1 failed, 1 pruned of 18 trials" in md
    assert "CUDA out of memory" in md
    summary = json.loads((exported / "summary.json").read_text())
    assert summary["trials"] == {"COMPLETE": 16, "FAIL": 1, "PRUNED": 1}
    assert "heldout_instances/ppl" not in summary["metrics"]  # derived from nll: opt-in only
    assert summary["metrics"][0] == "heldout_instances/nll"  # the objective leads


# ---------------------------------------------------------------- formats


def test_every_csv_parses_with_a_consistent_width(exported):
    files = sorted((exported / "csv").glob("*.csv"))
    assert {"axis_r.csv", "axis_targets.csv", "configurations.csv", "trials.csv"} <= {f.name for f in files}
    for f in files:
        rows = list(csv.reader(io.StringIO(f.read_text())))
        assert len(rows) >= 2 and len({len(r) for r in rows}) == 1, f.name
    trials = _csv(exported / "csv" / "trials.csv")
    assert len(trials) == 18 and {t["state"] for t in trials} == {"COMPLETE", "FAIL", "PRUNED"}


def _check_tabular(text):
    assert text.count("\\begin{tabular}") == text.count("\\end{tabular}") >= 1
    for m in re.finditer(r"\\begin\{tabular\}\{([lcr]+)\}(.*?)\\end\{tabular\}", text, re.S):
        ncols = len(m.group(1))
        rows = [ln for ln in m.group(2).splitlines() if ln.strip().endswith("\\\\")]
        assert rows
        for row in rows:
            assert len(re.findall(r"(?<!\\)&", row)) == ncols - 1, row
    assert text.count("{") - text.count("\\{") == text.count("}") - text.count("\\}")
    assert "\\usepackage" not in text


def test_latex_is_plain_tabular(exported):
    files = sorted((exported / "tex").glob("*.tex"))
    assert len(files) >= 4
    for f in files:
        _check_tabular(f.read_text())
    doc = (exported / "tables.tex").read_text()
    _check_tabular(doc)
    assert doc.startswith("\\documentclass{article}") and doc.rstrip().endswith("\\end{document}")
    assert "$\\pm$" in doc and "±" not in doc


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_document_compiles(exported, tmp_path):
    """Where a TeX installation exists, the exported document compiles with no extra packages."""
    doc = tmp_path / "tables.tex"
    doc.write_text((exported / "tables.tex").read_text())
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (tmp_path / "tables.pdf").stat().st_size > 0


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.stack, self.unbalanced = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in ("meta", "img", "br", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.unbalanced += 1


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_report_is_self_contained(exported):
    import base64

    text = (exported / "report.html").read_text()
    p = _Resources()
    p.feed(text)
    p.close()
    assert p.unbalanced == 0 and not p.stack
    assert "script" not in p.tags and "link" not in p.tags and "url(" not in text
    external = [u for u in p.urls if not (u.startswith("#") or u.startswith("data:image/png;base64,"))]
    assert external == []
    images = [u for u in p.urls if u.startswith("data:")]
    summary = json.loads((exported / "summary.json").read_text())
    assert len(images) == len(summary["plots"]) and p.tags.count("table") == len(summary["tables"])
    assert all(_png_size(base64.b64decode(u.split(",", 1)[1])) == (800, 500) for u in images)


def test_plots_are_png_of_fixed_size_and_svg(exported):
    summary = json.loads((exported / "summary.json").read_text())
    names = set(summary["plots"])
    assert {"rank_heldout_instances_nll_by_targets", "targets_heldout_instances_nll", "curves",
            "importances"} <= names
    for name in names:
        assert _png_size((exported / "plots" / f"{name}.png").read_bytes()) == (800, 500)
        svg = (exported / "plots" / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and svg.rstrip().endswith("</svg>")


def test_sampled_study_exports_lr_sensitivity(store, tmp_path):
    out = tmp_path / "lr"
    export("lr-sampled", out, "md", tracking_uri=store["uri"])
    summary = json.loads((out / "summary.json").read_text())
    assert "lr_heldout_instances_nll" in summary["plots"] and "axis_lr" in summary["tables"]
    assert not (out / "csv").exists() and not (out / "report.html").exists()  # only what was asked
    assert "log-scale bins" in (out / "report.md").read_text()


def test_single_configuration_study(store, tmp_path):
    out = tmp_path / "single"
    export("single", out, "csv,md", tracking_uri=store["uri"])
    rows = _csv(out / "csv" / "configurations.csv")
    assert len(rows) == 1 and rows[0]["n"] == "2"
    assert _close(rows[0]["heldout_instances/nll mean"], 1.625)
    assert _close(rows[0]["heldout_instances/nll std"], np.std([1.5, 1.75], ddof=1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["axes"] == [] and summary["tables"] == ["configurations"]
    assert any("at least 3 complete trials" in n for n in summary["notes"])
    assert "1 failed of 3 trials" in (out / "report.md").read_text()


def test_export_is_atomic(store, tmp_path, monkeypatch):
    import lora_ablate.export.plots as plots

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "render_plots", broken)
    with pytest.raises(RuntimeError):
        export("rank-demo", tmp_path / "out", "md", tracking_uri=store["uri"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- compare


def _matrix(store, r, targets, set_name, metric="nll"):
    seeds = [s for s in SEEDS if (r, targets, s) in store["values"]]
    if metric == "nll":
        return np.array([[_example_nll(r, targets, s, set_name, i) for i in range(N_EX)] for s in seeds])
    return np.array([[_example_em(r, s, i) for i in range(N_EX)] for s in seeds])


def test_compare_matches_an_independent_bootstrap(store):
    c = compare("rank-demo", "r=8,targets=qv", "r=64,targets=q,v", tracking_uri=store["uri"], n_boot=2000, seed=4)
    a, b = _matrix(store, 8, "q,v", "heldout_instances"), _matrix(store, 64, "q,v", "heldout_instances")
    d = b - a
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 3, size=(2000, 3))
    cols = rng.integers(0, N_EX, size=(2000, N_EX))
    deltas = np.array([d[np.ix_(rows[k], cols[k])].mean() for k in range(2000)])
    assert c.delta == pytest.approx(d.mean(), abs=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    assert c.p_value == pytest.approx(min(1, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))))
    assert (c.n_seeds, c.n_examples) == (3, N_EX)
    assert c.sentence.startswith("r=64 (targets=q,v) scores ")
    assert "than r=8 (targets=q,v) on heldout_instances" in c.sentence
    assert "3 seeds x 8 examples" in c.sentence


def test_compare_constant_shift_and_one_seed_side(store):
    c = compare("rank-demo", "r=8,targets=q,v", "r=8,targets=q,k,v,o", tracking_uri=store["uri"], n_boot=1000)
    assert (c.delta, c.ci_low, c.ci_high, c.p_value) == (0.25, 0.25, 0.25, 0.0)
    assert c.sentence == ("targets=q,k,v,o (r=8) scores 0.250 higher NLL than targets=q,v (r=8) on "
                          "heldout_instances (95% CI 0.250 to 0.250, p < 0.001, 3 seeds x 8 examples).")
    # r=64 q,k,v,o kept only seed 0: pairing uses the one common seed
    c = compare("rank-demo", "r=64,targets=qv", "r=64,targets=qkvo", tracking_uri=store["uri"], n_boot=500,
                metric="heldout_tasks/nll")
    assert c.n_seeds == 1 and c.delta == 0.25 and "1 seed x 8 examples" in c.sentence


def test_compare_scores_say_lower_with_the_interval_flipped(store):
    c = compare("rank-demo", "r=64,targets=q,v", "r=4,targets=q,v", metric="heldout_instances/exact_match",
                tracking_uri=store["uri"], n_boot=1000)
    a = _matrix(store, 64, "q,v", "heldout_instances", "em")
    b = _matrix(store, 4, "q,v", "heldout_instances", "em")
    assert c.delta == pytest.approx((b - a).mean())
    assert c.delta < 0 and f"scores {-c.delta:.3f} lower exact match than r=64" in c.sentence
    assert f"CI {-c.ci_high:.3f} to {-c.ci_low:.3f}" in c.sentence


def test_compare_cli_prints_the_sentence(store, capsys):
    assert main(["compare", "--study", "rank-demo", "--tracking-uri", store["uri"], "--a", "r=8,targets=qv",
                 "--b", "r=8,targets=qkvo", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("targets=q,k,v,o (r=8) scores 0.250 higher NLL")


# ---------------------------------------------------------------- errors


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_unknown_study_lists_the_studies(store, tmp_path, capsys):
    err = _error(capsys, ["export", "--study", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path / "x")])
    assert "'nope'" in err and "all-failed, lr-sampled, rank-demo, single" in err
    assert not (tmp_path / "x").exists()


def test_study_without_complete_trials(store, tmp_path, capsys):
    err = _error(capsys, ["export", "--study", "all-failed", "--tracking-uri", store["uri"], "--out",
                          str(tmp_path / "x")])
    assert "no complete trial (2 failed)" in err and not (tmp_path / "x").exists()


def test_missing_store_is_not_created(tmp_path, capsys):
    err = _error(capsys, ["export", "--study", "s", "--workspace", str(tmp_path / "ws")])
    assert "no MLflow store" in err and not (tmp_path / "ws").exists()


def test_unknown_metric_lists_the_available(store, tmp_path, capsys):
    err = _error(capsys, ["export", "--study", "rank-demo", "--tracking-uri", store["uri"], "--out",
                          str(tmp_path / "x"), "--metrics", "heldout_instances/bleu"])
    assert "'heldout_instances/bleu'" in err and "heldout_instances/exact_match" in err
    err = _error(capsys, ["compare", "--study", "rank-demo", "--tracking-uri", store["uri"], "--a", "r=8",
                          "--b", "r=64", "--metric", "bleu"])
    assert "available:" in err


def test_bad_format_lists_the_valid(store, tmp_path, capsys):
    err = _error(capsys, ["export", "--study", "rank-demo", "--tracking-uri", store["uri"], "--out",
                          str(tmp_path / "x"), "--format", "md,pdf"])
    assert "md, csv, tex, html" in err and "format 'pdf' is not valid" in err


def test_unknown_parameter_lists_the_trial_params_not_every_config_key(store, capsys):
    err = _error(capsys, ["compare", "--study", "rank-demo", "--tracking-uri", store["uri"], "--a", "foo=1",
                          "--b", "r=8"])
    assert ("--a: unknown parameter 'foo'; choose from: r, alpha, alpha_rule, scaling, lr, targets, seed, steps, "
            "trainable_params, or any cfg.<section>.<key> of the resolved config") in err
    assert "cfg.lora.r" not in err
    # the cfg.* keys the message mentions are accepted
    study = open_study("rank-demo", tracking_uri=store["uri"])
    assert len(select(study.complete, parse_selection("cfg.lora.dropout=0,r=8,targets=qv"))) == 3


def test_selections_that_match_nothing_or_too_much(store, capsys):
    base = ["compare", "--study", "rank-demo", "--tracking-uri", store["uri"]]
    err = _error(capsys, base + ["--a", "r=5,targets=qv", "--b", "r=64,targets=qv"])
    assert "r in {4, 8, 64}" in err and "targets in {q,v, q,k,v,o}" in err
    err = _error(capsys, base + ["--a", "r=8", "--b", "r=64,targets=qv"])
    assert "matches 2 configurations" in err
    err = _error(capsys, base + ["--a", "rank=8", "--b", "r=64"])
    assert "unknown parameter 'rank'" in err
    err = _error(capsys, base + ["--a", "r=8,targets=qv", "--b", "targets=q,v,r=8"])
    assert "same configuration" in err
    err = _error(capsys, base + ["--a", "r=8,targets=qv", "--b", "r=64,targets=qv", "--metric",
                                 "heldout_instances/ppl"])
    assert "no per-example 'ppl'" in err and "exact_match" in err


def test_export_and_the_shared_vocabulary_import_no_torch():
    # export runs on a laptop without a GPU stack; only a study needs torch
    code = ("import sys, lora_ablate.cli, lora_ablate.commands.results, lora_ablate.commands.ui, "
            "lora_ablate.export.tracked, lora_ablate.export.selection, lora_ablate.export.tables, "
            "lora_ablate.export.plots, lora_ablate.export.html_report, lora_ablate.tracking, "
            "lora_ablate.vocab, lora_ablate.workspace; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- one number, one meaning


def build_weighted_study(client, tmp, name="weighted", nested=True):
    """Ranks 16 and 64, 2 seeds, examples of 1 to 6 tokens; each final NLL is its scores' token-weighted
    mean, as the evaluation logs it. ``nested``: the layout before base-model runs (trials nested under the
    parent, which holds the base model's metrics as ``base/*`` and the config as ``cfg.*`` params); else
    docs/tracking.md's (a ``base model`` run, trials beside the parent, the config in a tag)."""
    from mlflow.entities import Metric

    exp_id = client.create_experiment(name, artifact_location=(tmp / "artifacts" / name).as_uri())
    parent = client.create_run(exp_id, tags={"lora_ablate.kind": "study", "lora_ablate.axes": "r",
                                             "lora_ablate.objective": "heldout_instances/nll"}).info.run_id
    base = {"heldout_instances/nll": 2.5, "heldout_instances/exact_match": 0.0}
    if nested:
        client.log_batch(parent, metrics=[Metric(f"base/{k}", v, 0, 0) for k, v in base.items()])
    else:
        run = client.create_run(exp_id, run_name="base model", tags={
            "lora_ablate.kind": "base", "lora_ablate.parent_run": parent}).info.run_id
        client.log_batch(run, metrics=[Metric(f"final/{k}", v, 0, 0) for k, v in base.items()])
    tokens = np.arange(1, 7)
    number = 0
    for r in (16, 64):
        for seed in (0, 1):
            # short examples are hard for r=16: its unweighted mean is far from the weighted one
            nll = np.where(tokens < 3, 3.0, 0.5) + (0.1 if r == 16 else 0.2) + 0.01 * seed
            scores = [{"set": "heldout_instances", "idx": i, "nll": float(nll[i]), "tokens": int(tokens[i]),
                       "exact_match": float(i % 2)} for i in range(len(tokens))]
            final = {"final/heldout_instances/nll": float((nll * tokens).sum() / tokens.sum()),
                     "final/heldout_instances/exact_match": 0.5, "final/heldout_instances/n": len(tokens)}
            params = {"r": r, "targets": "q,v", "seed": seed, "lr": 1e-3}
            config = {"lora.r": str(r), "lora.dropout": "0.05", "train.seed": str(seed)}
            if nested:
                params |= {"alpha": float(r), "trainable_params": 100 * r, **{f"cfg.{k}": v for k, v in config.items()}}
                tags = {}
            else:
                final["trainable_params"] = 100 * r
                tags = {"lora_ablate.alpha": str(float(r)), "lora_ablate.config": json.dumps(config)}
            _write_trial(client, exp_id, parent, number, params, [(k, v, 0) for k, v in final.items()],
                         {"lora_ablate.state": "COMPLETE", **tags}, "FINISHED", scores, tmp, nested=nested)
            number += 1


@pytest.mark.parametrize("nested", [True, False], ids=["nested-under-parent", "base-run"])
def test_both_run_layouts_read_back_alike(tmp_path, nested):
    """A study tracked before base-model runs (trials nested, base/* on the parent, config as cfg.* params)
    exports as one tracked now: the base row, the config columns, alpha and trainable params."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    build_weighted_study(MlflowClient(tracking_uri=uri), tmp_path, nested=nested)
    study = open_study("weighted", tracking_uri=uri)
    assert study.base == {"heldout_instances/nll": 2.5, "heldout_instances/exact_match": 0.0}
    t = study.trials.sort_values(["r", "seed"])
    assert list(t["r"]) == [16, 16, 64, 64] and list(t["cfg.lora.r"]) == [16, 16, 64, 64]
    assert list(t["cfg.lora.dropout"]) == [0.05] * 4 and list(t["alpha"]) == [16.0, 16.0, 64.0, 64.0]
    assert list(t["trainable_params"]) == [1600, 1600, 6400, 6400]
    assert len(select(study.complete, {"cfg.train.seed": "1"})) == 2
    out = export("weighted", tmp_path / "out", "md,csv", tracking_uri=uri)
    (row,) = [row for row in _csv(out / "csv" / "axis_r.csv") if row["r"] == "base model"]
    assert float(row["heldout_instances/nll mean"]) == 2.5


def test_compare_headline_is_the_table_cell(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    build_weighted_study(MlflowClient(tracking_uri=uri), tmp_path)
    out = export("weighted", tmp_path / "out", "md,csv", tracking_uri=uri)
    rows = {row["r"]: row for row in _csv(out / "csv" / "axis_r.csv")}
    c = compare("weighted", "r=16", "r=64", tracking_uri=uri, n_boot=500)
    assert c.token_weighted
    assert c.mean_a == pytest.approx(float(rows["16"]["heldout_instances/nll mean"]), abs=1e-12)
    assert c.mean_b == pytest.approx(float(rows["64"]["heldout_instances/nll mean"]), abs=1e-12)
    assert c.delta == pytest.approx(c.mean_b - c.mean_a, abs=1e-12)
    assert main(["compare", "--study", "weighted", "--tracking-uri", uri, "--a", "r=16", "--b", "r=64",
                 "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    cell = next(ln for ln in md.splitlines() if ln.startswith("| 16 |")).split("|")[4].strip("* ")
    assert cell.split()[0] == f"{c.mean_a:.3f}" and f"mean {c.mean_a:.4f} (r=16)" in printed


def test_tables_lead_with_the_base_model_and_mark_ties(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    build_weighted_study(MlflowClient(tracking_uri=uri), tmp_path)
    study = open_study("weighted", tracking_uri=uri)
    assert study.base == {"heldout_instances/nll": 2.5, "heldout_instances/exact_match": 0.0}
    t = build_tables(study, ["heldout_instances/nll", "heldout_instances/exact_match"])[0]
    assert t.cells[0][:4] == ["base model", "–", "0", "2.500"] and "base model" in t.caption
    assert t.data.iloc[0]["r"] == "base model"
    # exact match is 0.5 for both ranks: a tie, so no best; r=16 beats r=64 on NLL by 0.1 in every seed
    # and example, so the interval of the difference excludes 0 and r=64 carries no mark
    assert (1, 4) not in t.bold and (2, 4) not in t.bold and (1, 3) in t.bold
    assert not any("†" in c for row in t.cells for c in row)


def test_a_difference_inside_the_interval_is_marked():
    import pandas as pd

    from lora_ablate.export.tables import near_best
    from lora_ablate.export.tracked import Study

    rng = np.random.default_rng(0)
    rows = []
    for g, shift in enumerate((0.0, 0.001, 1.0)):
        noise = rng.normal(0, 0.5, size=20)
        rows += [{"set": "s", "idx": i, "nll": 2 + shift + noise[i], "tokens": 3, "run_id": f"g{g}", "seed": 0}
                 for i in range(20)]
    study = Study("s", "", "1", {}, pd.DataFrame())
    study.__dict__["example_scores"] = pd.DataFrame(rows)  # the cached property, without a store
    groups = [pd.DataFrame({"run_id": [f"g{g}"]}) for g in range(3)]
    assert near_best(study, groups, {0}, "s/nll") == {1}


def test_footnote_groups_failures_by_reason_and_says_which_were_trained_again():
    """A pack that ran out of memory fails its 12 trials with one long message: the footnote names it once
    (shortened) with the trials' numbers as ranges, lists a small group with its settings, and counts the
    failures whose configuration and seed completed later (a resumed study trained them again)."""
    from types import SimpleNamespace

    import pandas as pd

    from lora_ablate.export.tables import MAX_REASON_CHARS, exclusions

    oom = "CUDA out of memory. Tried to allocate 114.00 MiB. " + "GPU 0 has a total capacity of 139.80 GiB " * 8
    rows = [{"trial_number": n, "state": "FAIL", "fail_reason": oom, "config_key": f"c{n % 6}", "r": 4,
             "seed": n // 6} for n in range(12)]
    rows += [{"trial_number": 12 + n, "state": "COMPLETE", "fail_reason": None, "config_key": f"c{n % 6}", "r": 4,
              "seed": n // 6} for n in range(10)]  # 10 of the 12 failed cells trained again
    rows += [{"trial_number": 30, "state": "PRUNED", "fail_reason": "pruned at step 20", "config_key": "c9",
              "r": 64, "seed": 0}]
    study = SimpleNamespace(trials=pd.DataFrame(rows), axes=[SimpleNamespace(name="r")])
    note = exclusions(study)
    assert note.count("CUDA out of memory") == 1 and oom not in note
    assert f"12 failed ({oom[:MAX_REASON_CHARS - 1].rstrip()}…): trials 0-11" in note
    assert "1 pruned (pruned at step 20): trial 30 (r=64, seed=0)" in note
    assert "12 failed, 1 pruned of 23 trials" in note
    assert "10 of them were trained again later and completed" in note
