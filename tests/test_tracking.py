"""MLflow records of a study, by docs/tracking.md: one parent run per invocation, a base-model run and a run
per trial beside it with the documented params, metrics, tags and artifacts; failed and stale trials; the
``ui`` server."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from lora_ablate import reference
from lora_ablate.commands.results import export
from lora_ablate.commands.ui import open_ui
from lora_ablate.context import build_context
from lora_ablate.spaces import parse_space
from lora_ablate.study import heartbeat, open_storage, run_study, storage_url, study_name
from lora_ablate.tracking import StudyInfo, TrialRecord, make_tracker, trial_params
from lora_ablate.workspace import mlflow_uri, redact

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"train_size": 32, "max_length": 64},
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 1},
    "eval": {"sets": ["heldout_instances"], "size": 4, "batch_size": 4, "max_new_tokens": 4},
}
RANK3 = parse_space({"axes": {"lora.r": {"grid": [1, 2, 4]}}}, "rank3")
# targets_budget in small: on tiny-llama q and o (both d x d) get r 4, q and o together r 2
BUDGET3 = parse_space({"axes": {"lora.targets": {"grid": [["q"], ["o"], ["q", "o"]]}},
                       "match_budget": {"reference": {"targets": ["q"], "r": 4}}}, "budget3")
DOC_PARAMS = {"r", "alpha_rule", "lr", "targets", "seed", "steps"}
FINAL = {f"final/heldout_instances/{m}" for m in ("nll", "ppl", "exact_match", "rouge_l", "n")}


@pytest.fixture(scope="module")
def experiment(study_exp):
    """``experiment(space, ws, **sections)``: a study of BASE with its workspace in ``ws``."""
    return lambda space, ws, **sections: study_exp(BASE, space, ws, **sections)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, experiment):
    return build_context(experiment(RANK3, tmp_path_factory.mktemp("ctx")))


@pytest.fixture(scope="module")
def rank_study(tmp_path_factory, ctx, experiment):
    """A 3 ranks x 2 seeds study, tracked in a fresh workspace: (experiment, report, client)."""
    ws = tmp_path_factory.mktemp("tracked") / "ws"
    exp = experiment(RANK3, ws, study={"seeds": 2})
    report = run_study(exp, RANK3, tracker=make_tracker(exp), context=ctx, progress=False)
    return exp, report, MlflowClient(tracking_uri=mlflow_uri(ws))


def runs_of(client, name, kind=None):
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    if kind is not None:
        return [r for r in runs if r.data.tags.get("lora_ablate.kind") == kind]
    parents = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial"]
    return experiment, parents, trials


def artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_one_parent_a_base_run_and_a_run_per_trial_beside_it(rank_study):
    exp, report, client = rank_study
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 6
    experiment_, parents, trials = runs_of(client, report.name)
    assert experiment_.artifact_location.startswith((Path(exp.study.workspace).resolve() / "artifacts").as_uri())
    assert len(parents) == 1 and len(trials) == 6
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("study-")
    tags = parent.data.tags
    assert tags["lora_ablate.space"] == "rank3" and tags["lora_ablate.study"] == report.name
    assert tags["lora_ablate.model"] == "tiny-llama" and tags["lora_ablate.data"] == "builtin:train"
    assert tags["lora_ablate.objective"] == "heldout_instances/nll" and tags["lora_ablate.direction"] == "minimize"
    assert tags["lora_ablate.git_sha"] and tags["lora_ablate.device"] == "cpu"
    for package in ("torch", "transformers", "peft", "optuna", "mlflow"):
        assert tags[f"lora_ablate.version.{package}"], package
    assert parent.data.metrics["trials/complete"] == 6 and "trials/best_value" in parent.data.metrics
    # no metric of the parent sorts before final/: the UI's charts open on the first section by name
    assert not any(k.startswith("base/") or k < "final/" for k in parent.data.metrics)

    # the base model is a run of its own, under the trials' metric names, so each chart shows it as a bar
    (base,) = runs_of(client, report.name, "base")
    assert base.info.run_name == "base model" and base.info.status == "FINISHED"
    assert base.data.tags["lora_ablate.parent_run"] == parent.info.run_id and not base.data.params
    assert FINAL <= base.data.metrics.keys()
    assert base.data.metrics["objective"] == base.data.metrics["final/heldout_instances/nll"]
    assert base.data.metrics["objective"] == pytest.approx(report.base["heldout_instances/nll"])
    assert artifacts(client, base.info.run_id) == {"scores.jsonl"}

    # not nested: the UI would fold the trials under a collapsed parent and chart the parent alone
    assert not any("mlflow.parentRunId" in r.data.tags for r in trials + [base])
    assert {r.data.tags["lora_ablate.parent_run"] for r in trials} == {parent.info.run_id}
    # named by what differs between them (the axis, then the seed), not by a trial number
    assert sorted(r.info.run_name for r in trials) == sorted(f"r={o.params['r']} seed={o.params['seed']}"
                                                              for o in report.outcomes)
    # MLflow 3 opens a tagged experiment on its runs, not on the GenAI traces view
    assert experiment_.tags["mlflow.experimentKind"] == "custom_model_development"
    for r in trials:
        assert r.data.metrics["objective"] == r.data.metrics["final/heldout_instances/nll"]
    study = optuna.load_study(study_name=report.name, storage=open_storage(storage_url(exp)))
    assert study.metric_names == ["heldout_instances/nll"]


def test_trial_runs_hold_the_documented_params_metrics_tags_and_artifacts(rank_study):
    exp, report, client = rank_study
    _, _, runs = runs_of(client, report.name)
    optuna_trials = {t.number: t for t in optuna.load_study(
        study_name=report.name, storage=open_storage(storage_url(exp))).get_trials()}
    cfg_keys = set(exp.flat())
    seen = set()
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        number = int(tags["lora_ablate.trial_number"])
        trial = optuna_trials[number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # and back
        assert tags["lora_ablate.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert tags["lora_ablate.config_key"] == trial.user_attrs["config_key"]
        assert tags["lora_ablate.study"] == report.name and tags["lora_ablate.optuna_storage"].startswith("sqlite:")
        # the axes, the seed and a few headline settings, each value under one name
        assert set(params) == DOC_PARAMS
        assert int(params["r"]) == trial.params["r"] and int(params["seed"]) == trial.params["seed"]
        assert params["targets"] == "q,v" and params["alpha_rule"] == "rank"
        # what the settings determine, and the whole config, are tags
        assert tags["lora_ablate.alpha"] == str(float(trial.params["r"])) and float(tags["lora_ablate.scaling"]) == 1.0
        config = json.loads(tags["lora_ablate.config"])
        assert set(config) == cfg_keys and config["lora.r"] == params["r"] and config["train.seed"] == params["seed"]
        seen.add((int(params["r"]), int(params["seed"])))

        assert FINAL | {"train/loss", "train/lr", "tokens_per_s", "train_s", "wall_s"} <= metrics.keys()
        assert metrics["trainable_params"] > 0
        assert metrics["final/heldout_instances/nll"] == pytest.approx(trial.value)
        assert trial.user_attrs["final/heldout_instances/nll"] == pytest.approx(trial.value)
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2, 3]

        files = artifacts(client, run.info.run_id)
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "scores.jsonl",
                "config.yaml", "history.jsonl"} <= files
        local = Path(client.download_artifacts(run.info.run_id, "", None))
        config = yaml.safe_load((local / "config.yaml").read_text())
        assert config["lora"]["r"] == trial.params["r"] and config["train"]["seed"] == trial.params["seed"]
        rows = [json.loads(line) for line in (local / "scores.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and {"set", "idx", "family", "nll", "tokens", "exact_match", "rouge_l",
                                   "prediction"} <= rows[0].keys()
        history = [json.loads(line) for line in (local / "history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history if h["kind"] == "train"] == [1, 2, 3]
        adapter = json.loads((local / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == trial.params["r"]
    assert seen == {(r, s) for r in (1, 2, 4) for s in (0, 1)}


def test_step_metrics_are_buffered_and_all_written_when_the_run_ends(tmp_path):
    """A run's step metrics reach the store at most every FLUSH_SECONDS (the first at once), and every point
    is there once the run ends, however it ends."""
    from lora_ablate import tracking

    tracker = tracking.MlflowTracker(mlflow_uri(tmp_path), tmp_path / "artifacts")
    now = [100.0]
    tracker.clock = lambda: now[0]
    experiment_id = tracker.client.create_experiment("buffered")
    run_id = tracker.client.create_run(experiment_id).info.run_id

    def steps():
        return sorted(m.step for m in tracker.client.get_metric_history(run_id, "train/loss"))

    tracker.log_step(run_id, 1, {"train/loss": 3.0})
    tracker.log_step(run_id, 2, {"train/loss": 2.0, "train/lr": 1e-3})
    assert steps() == [1]
    now[0] += tracking.FLUSH_SECONDS
    tracker.log_step(run_id, 3, {"train/loss": 1.0})
    assert steps() == [1, 2, 3]
    tracker.log_step(run_id, 4, {"train/loss": 0.5})
    assert steps() == [1, 2, 3]
    tracker.fail_run(run_id, "stopped")
    assert steps() == [1, 2, 3, 4]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "train/lr")] == [2]


def test_trial_params_are_stable_and_redact_secrets(make_exp):
    from lora_ablate.tracking import trial_tags

    exp = make_exp(lora={"r": 4, "alpha_rule": "free", "alpha": 8.0, "targets": ["v", "q"]},
                   study={"storage": "postgresql://me:hunter2@db/optuna"})
    params = trial_params(exp, {"r": 4, "seed": 0, "dropout": 0.1})
    assert params["r"] == "4" and params["targets"] == "q,v" and params["dropout"] == "0.1"
    assert not any(k.startswith("cfg.") or k in ("alpha", "scaling") for k in params)
    tags = trial_tags(exp)
    assert tags["lora_ablate.alpha"] == "8.0" and tags["lora_ablate.scaling"] == "2.0"
    assert json.loads(tags["lora_ablate.config"])["study.storage"] == "postgresql://me:***@db/optuna"
    assert "hunter2" not in json.dumps(params) + json.dumps(tags)
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_trial_runs_lead_with_the_study_axes(make_exp):
    from lora_ablate.tracking import run_name

    exp = make_exp(lora={"r": 4, "dropout": 0.1})
    params = trial_params(exp, {"r": 4, "seed": 0, "dropout": 0.1}, axes=("dropout", "r"))
    assert list(params) == ["dropout", "r", "alpha_rule", "targets", "lr", "steps", "seed"]
    assert run_name({"targets": "q,v", "r": 8, "seed": 1}, ("targets", "r"), 3) == "targets=q,v r=8 seed=1"
    assert run_name({"seed": 0}, (), 5) == "seed=0" and run_name({}, (), 5) == "trial-5"


def test_a_trial_config_artifact_keeps_no_store_password(make_exp, tmp_path):
    """config.yaml next to the adapter is the resolved config with the store URLs' passwords masked, as in
    the params."""
    from lora_ablate import tracking

    exp = make_exp(study={"storage": "postgresql://me:hunter2@db/optuna"},
                   tracking={"uri": "http://me:hunter2@mlflow:5000"})
    tracker = tracking.MlflowTracker(mlflow_uri(tmp_path), tmp_path / "artifacts")
    # artifacts under tmp_path: without a location MLflow writes ./mlruns into the current directory
    experiment_id = tracker.client.create_experiment("secrets", (tmp_path / "artifacts").as_uri())
    run_id = tracker.client.create_run(experiment_id).info.run_id
    tracker.finish_trial(run_id, TrialRecord(0, {"r": 8, "seed": 0}, exp, state="COMPLETE"))
    config = Path(tracker.client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "hunter2" not in config
    assert yaml.safe_load(config)["study"]["storage"] == "postgresql://me:***@db/optuna"
    assert yaml.safe_load(config)["tracking"]["uri"] == "http://me:***@mlflow:5000"


def _exported(name, workspace, out) -> tuple[dict, str]:
    """(summary.json, report.md) of ``export`` of study ``name``."""
    export(name, out, "md", workspace=workspace)
    return json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


def test_the_space_axes_are_recorded_and_export_groups_by_them_alone(rank_study, ctx, experiment, tmp_path):
    """A matched-budget study varies targets and derives r: r varies in the data, but a "by rank r" table
    would pool q and o (both r 4) as one row. A rank study keeps its "by rank r" table."""
    exp, report, client = rank_study
    _, parents, _ = runs_of(client, report.name)
    assert parents[0].data.tags["lora_ablate.axes"] == "r"
    summary, md = _exported(report.name, exp.study.workspace, tmp_path / "rank")
    # resources (throughput, time) have their own table since wall time left the results; power: best vs runner-up
    assert summary["axes"] == ["r"] and summary["tables"] == ["axis_r", "power", "resources"]
    # the base row is read back from the base-model run; the meta lines name the space and its axes
    base_row = next(ln for ln in md.splitlines() if ln.startswith("| base model |"))
    assert f"{report.base['heldout_instances/nll']:.3f}" in base_row
    assert "- space: rank3\n" in md and "- axes: rank r\n" in md

    ws = tmp_path / "budget"
    budget_exp = experiment(BUDGET3, ws, eval={"generate": False, "base": False})
    budget = run_study(budget_exp, BUDGET3, tracker=make_tracker(budget_exp), context=ctx, progress=False)
    assert [o.state for o in budget.outcomes] == ["COMPLETE"] * 3
    _, parents, trials = runs_of(MlflowClient(tracking_uri=mlflow_uri(ws)), budget.name)
    assert parents[0].data.tags["lora_ablate.axes"] == "targets"
    assert sorted((t.data.params["targets"], t.data.params["r"]) for t in trials) == [
        ("o", "4"), ("q", "4"), ("q,o", "2")]
    summary, md = _exported(budget.name, ws, tmp_path / "budget-export")
    assert summary["axes"] == ["targets"] and summary["tables"] == ["axis_targets", "power", "resources"]
    assert f"{budget.name}: by targets" in md and "by rank r" not in md
    assert not any(p.startswith("rank_") for p in summary["plots"])


def test_failed_and_stale_trials_are_failed_runs_with_their_reason(tmp_path, ctx, monkeypatch, nan_rank,
                                                                   experiment):
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 1)
    monkeypatch.setattr(heartbeat, "GRACE_S", 1)
    space = parse_space({"axes": {"lora.r": {"grid": [1, 2, 4]}}}, "fails")
    ws = tmp_path / "ws"
    exp = experiment(space, ws, eval={"generate": False, "base": False}, study={"n_trials": 2})
    real = nan_rank(reference, 2)
    report = run_study(exp, space, tracker=make_tracker(exp), context=ctx, progress=False)
    assert [o.state for o in report.outcomes] == ["COMPLETE", "FAIL"]
    client = MlflowClient(tracking_uri=mlflow_uri(ws))
    failed = client.get_run(report.outcomes[1].run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["lora_ablate.state"] == "FAIL"
    assert "nan" in failed.data.tags["lora_ablate.fail_reason"]
    files = artifacts(client, failed.info.run_id)
    assert "config.yaml" in files and "history.jsonl" in files and not any(f.startswith("adapter") for f in files)

    # a worker dies inside r=4 with its MLflow run open; the next invocation closes that run as failed
    storage = open_storage(storage_url(exp))
    dead_study = optuna.load_study(study_name=study_name(exp, space), storage=storage)
    dead_study.enqueue_trial({"r": 4, "seed": 0})
    dead = dead_study.ask()
    tracker = make_tracker(exp)
    tracker.start_study(StudyInfo(report.name, "fails", "heldout_instances/nll", "minimize", "x", exp))
    dead_run = tracker.start_trial(TrialRecord(dead.number, {"r": 4, "seed": 0}, exp))
    dead.set_user_attr("mlflow_run_id", dead_run)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.2)
    monkeypatch.setattr(reference, "train_one", real)
    report = run_study(experiment(space, ws, eval={"generate": False, "base": False}), space,
                       tracker=make_tracker(exp), context=ctx, progress=False)
    stale = client.get_run(dead_run)
    assert stale.info.status == "FAILED" and "no heartbeat" in stale.data.tags["lora_ablate.fail_reason"]
    assert sorted((o.params["r"], o.state) for o in report.outcomes) == [(2, "COMPLETE"), (4, "COMPLETE")]


def test_ui_serves_the_study_over_the_mlflow_rest_api(rank_study):
    exp, report, _ = rank_study
    with open_ui(Path(exp.study.workspace)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=100") as r:
            experiments = {e["name"]: e for e in json.load(r)["experiments"]}
        assert report.name in experiments
        body = json.dumps({"experiment_ids": [experiments[report.name]["experiment_id"]]}).encode()
        req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            runs = json.load(r)["runs"]
        kinds = sorted(next(t["value"] for t in run["data"]["tags"] if t["key"] == "lora_ablate.kind")
                       for run in runs)
        assert kinds == ["base", "study"] + ["trial"] * 6
    assert server.process.poll() is not None, "the UI server outlived its context"


def test_ui_command_stops_its_server_on_sigterm(monkeypatch):
    """`kill <pid>` of `python -m lora_ablate ui` must not leave the mlflow server running, orphaned."""
    import os
    import signal
    import types

    from lora_ablate.commands import ui as ui_cmd

    polls, stopped, seen = [], [], []

    def poll():
        polls.append(1)
        if len(polls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return None if len(polls) < 3 else 0

    server = types.SimpleNamespace(url="http://127.0.0.1:1", process=types.SimpleNamespace(poll=poll),
                                   stop=lambda: stopped.append(1))
    monkeypatch.setattr(ui_cmd, "open_ui", lambda *a: server)
    monkeypatch.setattr(ui_cmd.time, "sleep", lambda s: None)
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(1))  # without the fix: survive, keep polling
    try:
        assert ui_cmd.cmd_ui(types.SimpleNamespace(workspace=Path("ws"), host="127.0.0.1", port=0)) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == [1] and len(polls) == 1 and not seen
