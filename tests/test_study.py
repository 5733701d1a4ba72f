"""Studies on tiny-llama: grids with seeds, resume after an interrupt or a dead worker, failed trials,
sampled and mixed spaces, pruning, packs whose freed slots take the next trial, memory across trials, and
the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import optuna
import pytest
import torch
from mlflow import MlflowClient

from lora_ablate import reference
from lora_ablate import study as study_mod
from lora_ablate.cli import main
from lora_ablate.context import build_context
from lora_ablate.errors import UserError
from lora_ablate.evaluation import Evaluator
from lora_ablate.spaces import parse_space
from lora_ablate.study import heartbeat, open_storage, run_study, storage_url, study_name
from lora_ablate.tracking import make_tracker
from lora_ablate.vocab import RUN_STATUS
from lora_ablate.workspace import mlflow_uri

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"train_size": 32, "max_length": 64},
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 1},
    "eval": {"sets": ["heldout_instances"], "size": 4, "batch_size": 4, "generate": False, "base": False},
    "tracking": {"enabled": False},
}
RANK3 = parse_space({"axes": {"lora.r": {"grid": [1, 2, 4]}}}, "rank3")


@pytest.fixture(scope="module")
def experiment(study_exp):
    """``experiment(space, tmp_path, **sections)``: a study of BASE with its workspace in ``tmp_path / "ws"``."""
    return lambda space, tmp_path, **sections: study_exp(BASE, space, tmp_path / "ws", **sections)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, experiment):
    """One worker's base, data and evaluator for the whole module (the settings of BASE)."""
    return build_context(experiment(RANK3, tmp_path_factory.mktemp("ctx")))


@pytest.fixture
def trained(monkeypatch):
    """The TrialSpecs the reference trainer trained, in order: what the study actually trained."""
    seen = []
    real = reference.train_one

    def counting(base, spec, *args, **kwargs):
        seen.append(spec)
        return real(base, spec, *args, **kwargs)

    monkeypatch.setattr(reference, "train_one", counting)
    return seen


def run(exp, space, ctx, **kwargs):
    return run_study(exp, space, context=ctx, progress=False, **kwargs)


def trials_of(exp, space):
    storage = open_storage(storage_url(exp))
    return optuna.load_study(study_name=study_name(exp, space), storage=storage).get_trials()


def cells(specs):
    return sorted((s.lora.r, s.train.seed) for s in specs)


# ----------------------------------------------------------------------------- grids and resume


def test_grid_with_seeds_runs_every_cell_once_and_resumes_to_nothing(tmp_path, ctx, trained, experiment):
    exp = experiment(RANK3, tmp_path, study={"seeds": 2})
    report = run(exp, RANK3, ctx)
    assert cells(trained) == [(1, 0), (1, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    # seed-major order: every rank with the first seed before any second seed
    assert [s.train.seed for s in trained] == [0, 0, 0, 1, 1, 1]
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 6
    assert report.remaining == 0 and report.counts == {"COMPLETE": 6}
    trials = trials_of(exp, RANK3)
    assert sorted((t.params["r"], t.params["seed"]) for t in trials) == cells(trained)
    assert all(math.isfinite(t.value) and t.user_attrs["config_key"] for t in trials)
    # the seeds of one configuration share its config key, different ranks do not
    keys = {(t.params["r"], t.params["seed"]): t.user_attrs["config_key"] for t in trials}
    assert keys[(1, 0)] == keys[(1, 1)] != keys[(2, 0)]
    assert report.best["value"] == min(t.value for t in trials)

    trained.clear()
    again = run(exp, RANK3, ctx)
    assert trained == [] and again.outcomes == [] and again.remaining == 0


def test_more_seeds_later_trains_only_the_new_seed(tmp_path, ctx, trained, experiment):
    run(experiment(RANK3, tmp_path), RANK3, ctx)
    assert cells(trained) == [(1, 0), (2, 0), (4, 0)]
    trained.clear()
    run(experiment(RANK3, tmp_path, study={"seeds": 2}), RANK3, ctx)
    assert cells(trained) == [(1, 1), (2, 1), (4, 1)]


def test_interrupt_after_two_trials_then_resume_trains_only_the_rest(tmp_path, ctx, trained, monkeypatch, experiment):
    exp = experiment(RANK3, tmp_path, study={"seeds": 2})
    counting = reference.train_one

    def interrupted(base, spec, *args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third trial
        return counting(base, spec, *args, **kwargs)

    monkeypatch.setattr(reference, "train_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(exp, RANK3, ctx)
    first = cells(trained)
    states = sorted(t.state.name for t in trials_of(exp, RANK3))
    assert len(first) == 2 and states == ["COMPLETE", "COMPLETE", "FAIL"]
    failed = next(t for t in trials_of(exp, RANK3) if t.state.name == "FAIL")
    assert "interrupted" in failed.user_attrs["fail_reason"]

    monkeypatch.setattr(reference, "train_one", counting)
    trained.clear()
    report = run(exp, RANK3, ctx)
    assert len(trained) == 4 and not set(cells(trained)) & set(first)
    assert set(cells(trained)) | set(first) == {(r, s) for r in (1, 2, 4) for s in (0, 1)}
    assert report.remaining == 0 and report.counts == {"COMPLETE": 6, "FAIL": 1}


def test_stale_trial_of_a_dead_worker_is_failed_and_trained_again(tmp_path, ctx, trained, monkeypatch, experiment):
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 1)
    monkeypatch.setattr(heartbeat, "GRACE_S", 1)
    exp = experiment(RANK3, tmp_path, study={"n_trials": 1})
    run(exp, RANK3, ctx)
    assert cells(trained) == [(1, 0)]
    # a worker takes r=2 and dies without a word: its trial stays RUNNING, its heartbeat stops
    storage = open_storage(storage_url(exp))
    dead = optuna.load_study(study_name=study_name(exp, RANK3), storage=storage)
    dead.enqueue_trial({"r": 2, "seed": 0})
    trial = dead.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.2)

    trained.clear()
    report = run(experiment(RANK3, tmp_path), RANK3, ctx)
    assert cells(trained) == [(2, 0), (4, 0)]
    by_number = {t.number: t for t in trials_of(exp, RANK3)}
    assert by_number[trial.number].state.name == "FAIL"
    assert report.counts == {"COMPLETE": 3, "FAIL": 1}


# ----------------------------------------------------------------------------- failures


def test_nan_trial_is_recorded_failed_and_the_study_goes_on(tmp_path, ctx, trained, monkeypatch, nan_rank,
                                                            experiment):
    counting = nan_rank(reference, 2)
    exp = experiment(RANK3, tmp_path)
    report = run(exp, RANK3, ctx)
    states = {o.params["r"]: o.state for o in report.outcomes}
    assert states == {1: "COMPLETE", 2: "FAIL", 4: "COMPLETE"}
    failed = next(o for o in report.outcomes if o.state == "FAIL")
    assert "nan" in failed.reason
    trial = next(t for t in trials_of(exp, RANK3) if t.state.name == "FAIL")
    assert trial.params == {"r": 2, "seed": 0} and "nan" in trial.user_attrs["fail_reason"]
    assert not any("lora" in n for n, _ in ctx.base.model.named_modules())

    # retry_failed=false: a failure is final, nothing is left to run
    trained.clear()
    final = run(experiment(RANK3, tmp_path, study={"retry_failed": False}), RANK3, ctx)
    assert trained == [] and final.remaining == 0
    # by default the failed cell is trained again on resume (and succeeds without the poison)
    monkeypatch.setattr(reference, "train_one", counting)
    retried = run(exp, RANK3, ctx)
    assert cells(trained) == [(2, 0)] and [o.state for o in retried.outcomes] == ["COMPLETE"]


def test_an_exception_in_a_trial_fails_it_and_the_study_goes_on(tmp_path, ctx, monkeypatch, experiment):
    real = reference.train_one

    def broken(base, spec, *args, **kwargs):
        if spec.lora.r == 4:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(base, spec, *args, **kwargs)

    monkeypatch.setattr(reference, "train_one", broken)
    report = run(experiment(RANK3, tmp_path), RANK3, ctx)
    assert [o.state for o in report.outcomes] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert report.outcomes[-1].reason == "RuntimeError: CUDA error: device-side assert triggered"


def test_a_trial_enqueued_with_invalid_params_fails_alone(tmp_path, ctx, trained, experiment):
    exp = experiment(RANK3, tmp_path, study={"n_trials": 1})
    run(exp, RANK3, ctx)
    study = optuna.load_study(study_name=study_name(exp, RANK3), storage=open_storage(storage_url(exp)))
    study.enqueue_trial({"r": 0, "seed": 0})  # by hand, outside the space
    trained.clear()
    report = run(experiment(RANK3, tmp_path), RANK3, ctx)
    assert report.outcomes[0].state == "FAIL"
    assert report.outcomes[0].reason.startswith("invalid trial params {'r': 0, 'seed': 0}: ")
    assert cells(trained) == [(2, 0), (4, 0)] and report.remaining == 0


# ----------------------------------------------------------------------------- sampled and mixed spaces


def test_sampled_space_repeats_each_configuration_per_seed(tmp_path, ctx, trained, experiment):
    space = parse_space({"axes": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}, "samples": 3,
                         "startup_trials": 2}, "lr3")
    exp = experiment(space, tmp_path, study={"seeds": 2})
    report = run(exp, space, ctx)
    assert len(trained) == 6 and report.remaining == 0
    by_lr = {}
    for s in trained:
        by_lr.setdefault(s.train.lr, []).append(s.train.seed)
    assert len(by_lr) == 3 and all(sorted(v) == [0, 1] for v in by_lr.values())
    assert all(1e-4 <= lr <= 1e-2 for lr in by_lr)

    trained.clear()
    assert run(exp, space, ctx).outcomes == [] and trained == []
    # --n-trials on a finished sampled space: new configurations, each with all its seeds
    run(experiment(space, tmp_path, study={"seeds": 2, "n_trials": 2}), space, ctx)
    assert len(trained) == 2 and trained[0].train.lr == trained[1].train.lr not in by_lr
    assert sorted(s.train.seed for s in trained) == [0, 1]


def test_mixed_space_samples_inside_every_grid_cell(tmp_path, ctx, trained, experiment):
    space = parse_space({"axes": {"lora.r": {"grid": [1, 4]}, "train.lr": {"log_uniform": [1e-4, 1e-2]}},
                         "samples": 2, "startup_trials": 1}, "rank_lr")
    report = run(experiment(space, tmp_path), space, ctx)
    assert report.remaining == 0 and len(trained) == 4
    per_rank = {}
    for s in trained:
        per_rank.setdefault(s.lora.r, set()).add(s.train.lr)
    assert {r: len(lrs) for r, lrs in per_rank.items()} == {1: 2, 4: 2}


def test_pruning_stops_a_trial_that_lags_the_median(tmp_path, ctx, experiment):
    space = parse_space({"axes": {"train.lr": {"grid": [3e-2, 2e-2, 1e-2, 1e-9]}}}, "prune")
    exp = experiment(space, tmp_path, train={"steps": 4}, eval={"every": 1}, study={"pruner": "median"})
    every_step = Evaluator(ctx.evaluator.sets, ctx.base.tokenizer, exp.data, exp.eval)
    report = run(exp, space, dataclasses.replace(ctx, evaluator=every_step))
    states = {o.params["lr"]: o.state for o in report.outcomes}
    assert states == {3e-2: "COMPLETE", 2e-2: "COMPLETE", 1e-2: "COMPLETE", 1e-9: "PRUNED"}
    pruned = next(o for o in report.outcomes if o.state == "PRUNED")
    assert pruned.reason.startswith("pruned at step ") and pruned.result.evals


# ----------------------------------------------------------------------------- packs: a freed slot takes the next trial


def number(spec) -> int | None:
    return int(spec.name.rsplit("#", 1)[1]) if spec is not None else None  # "r=2 seed=0 #1"


@pytest.fixture
def packed_calls(monkeypatch):
    """Every call of the packed trainer: its first specs and, in order, what its callbacks saw: ("result",
    number, status) as a trial leaves the pack, ("join", number) for the spec a refill handed back (None:
    nothing more, the pack shrinks)."""
    from lora_ablate.packed import PackedTrainer

    calls = []
    real = PackedTrainer.train

    def spy(self, specs, on_result=None, refill=None):
        call = {"specs": list(specs), "joined": [], "events": []}
        calls.append(call)

        def result(r):
            call["events"].append(("result", number(r.spec), r.status))
            on_result(r)

        def next_spec():
            spec = refill()
            call["events"].append(("join", number(spec)))
            call["joined"] += [spec] if spec is not None else []
            return spec

        return real(self, specs, on_result=result, refill=next_spec)

    monkeypatch.setattr(PackedTrainer, "train", spy)
    return calls


@pytest.fixture
def told(monkeypatch):
    """The numbers of the trials told to Optuna, in order."""
    seen = []
    real = optuna.Study.tell

    def tell(self, trial, *args, **kwargs):
        seen.append(trial.number)
        return real(self, trial, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "tell", tell)
    return seen


def test_packs_of_trials_go_to_the_packed_engine(tmp_path, ctx, packed_calls, experiment):
    report = run(experiment(RANK3, tmp_path, study={"pack": "2"}), RANK3, ctx)
    # one pack: r=1 and r=2 start together, r=4 takes a slot they free
    assert len(packed_calls) == 1
    assert [s.lora.r for s in packed_calls[0]["specs"]] == [1, 2]
    assert [s.lora.r for s in packed_calls[0]["joined"]] == [4]
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 3
    assert len({o.value for o in report.outcomes}) == 3


def test_a_freed_slot_is_not_refilled_beyond_n_trials(tmp_path, ctx, packed_calls, experiment):
    exp = experiment(RANK3, tmp_path, study={"pack": "2", "seeds": 2, "n_trials": 3})
    report = run(exp, RANK3, ctx)
    assert [s.lora.r for s in packed_calls[0]["specs"]] == [1, 2]
    assert [(s.lora.r, s.train.seed) for s in packed_calls[0]["joined"]] == [(4, 0)]
    assert len(packed_calls) == 1 and len(report.outcomes) == 3 and report.remaining == 3


# lr 1e38 without clipping: the first update overflows, the training loss is NaN by step 2
DIVERGE = parse_space({"fixed": {"train.max_grad_norm": 0.0}, "axes": {"train.lr": {"grid": [3e-3, 1e38, 2e-3]}}},
                      "diverge")


def test_a_diverging_trial_leaves_the_pack_and_the_next_trial_takes_its_slot(tmp_path, ctx, packed_calls, told,
                                                                            experiment):
    exp = experiment(DIVERGE, tmp_path, study={"pack": "2", "seeds": 2}, tracking={"enabled": True})
    tracker = make_tracker(exp)
    logged = []
    finish = tracker.finish_trial
    tracker.finish_trial = lambda run_id, record: (logged.append(record.number), finish(run_id, record))[1]
    report = run(exp, DIVERGE, ctx, tracker=tracker)

    # one pack ran the whole study, never more than two trials at once: trial 1 diverged while trial 0
    # trained on, trial 2 took its slot at once; each later slot went to the next (lr, seed) cell in order
    assert len(packed_calls) == 1 and [number(s) for s in packed_calls[0]["specs"]] == [0, 1]
    assert packed_calls[0]["events"] == [
        ("result", 1, "failed"), ("join", 2), ("result", 0, "ok"), ("join", 3), ("result", 2, "ok"), ("join", 4),
        ("result", 3, "ok"), ("join", 5), ("result", 4, "failed"), ("join", None), ("result", 5, "ok"),
        ("join", None)]
    assert [(o.number, o.state) for o in report.outcomes] == [
        (1, "FAIL"), (0, "COMPLETE"), (2, "COMPLETE"), (3, "COMPLETE"), (4, "FAIL"), (5, "COMPLETE")]
    assert all("training loss became nan" in o.reason for o in report.outcomes if o.state == "FAIL")
    # every cell ran once; the divergent one failed with each seed (the next invocation retries it)
    trials = trials_of(exp, DIVERGE)
    assert sorted((t.params["lr"], t.params["seed"], t.state.name) for t in trials) == sorted(
        (lr, seed, "FAIL" if lr == 1e38 else "COMPLETE") for lr in (3e-3, 1e38, 2e-3) for seed in (0, 1))
    assert report.counts == {"COMPLETE": 4, "FAIL": 2} and report.remaining == 2

    # told to Optuna and logged to MLflow exactly once each, as each trial finished
    assert told == logged == [1, 0, 2, 3, 4, 5]
    client = MlflowClient(tracking_uri=mlflow_uri(exp.study.workspace))
    runs = client.search_runs([client.get_experiment_by_name(report.name).experiment_id],
                              "tags.`lora_ablate.kind` = 'trial'")
    assert sorted(int(r.data.tags["lora_ablate.trial_number"]) for r in runs) == list(range(6))
    states = {t.number: t.state.name for t in trials}
    for r in runs:
        n = int(r.data.tags["lora_ablate.trial_number"])
        assert r.data.tags["lora_ablate.state"] == states[n] and r.info.status == RUN_STATUS[states[n]]
        assert r.info.run_id == next(t.user_attrs["mlflow_run_id"] for t in trials if t.number == n)


def test_a_pruned_trial_leaves_the_pack_and_the_next_trial_takes_its_slot(tmp_path, ctx, packed_calls, told,
                                                                         experiment):
    space = parse_space({"axes": {"train.lr": {"grid": [3e-2, 2e-2, 1e-2, 5e-3, 1e-9, 4e-2, 2.5e-2]}}}, "prune7")
    exp = experiment(space, tmp_path, train={"steps": 4}, eval={"every": 1},
                     study={"pruner": "median", "pack": "2"})
    every_step = Evaluator(ctx.evaluator.sets, ctx.base.tokenizer, exp.data, exp.eval)
    report = run(exp, space, dataclasses.replace(ctx, evaluator=every_step))
    # four trials complete (the median pruner's startup), then lr=1e-9 lags the median and is pruned while
    # trial 5 trains on: trial 6 takes its slot at once
    assert len(packed_calls) == 1 and packed_calls[0]["events"] == [
        ("result", 0, "ok"), ("result", 1, "ok"), ("join", 2), ("join", 3), ("result", 2, "ok"), ("result", 3, "ok"),
        ("join", 4), ("join", 5), ("result", 4, "pruned"), ("join", 6), ("result", 5, "ok"), ("join", None),
        ("result", 6, "ok"), ("join", None)]
    states = {o.params["lr"]: o.state for o in report.outcomes}
    assert states == {lr: "PRUNED" if lr == 1e-9 else "COMPLETE" for lr in space.axes[0].values}
    assert told == [0, 1, 2, 3, 4, 5, 6] and report.remaining == 0


# ----------------------------------------------------------------------------- one worker, many trials


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_and_base_are_unchanged_across_trials(tmp_path, ctx, experiment):
    space = parse_space({"axes": {"lora.r": {"grid": list(range(1, 11))}}}, "rank10")
    exp = experiment(space, tmp_path, tracking={"enabled": True})
    model = ctx.base.model
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    n_modules = len(list(model.modules()))
    seen = []

    def check(outcome):
        m = ctx.base.model
        assert m is model, "the base model object was replaced"
        assert len(list(m.modules())) == n_modules, "modules left behind by the trial"
        params = dict(m.named_parameters())
        assert params.keys() == before.keys()
        for n, (ptr, value) in before.items():
            assert params[n].data_ptr() == ptr and torch.equal(params[n], value), n
            assert not params[n].requires_grad
        seen.append(rss_mb())

    report = run(exp, space, ctx, tracker=make_tracker(exp), on_trial=check)
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 10 and len(seen) == 10
    # trial 1 warms allocator and caches up; from trial 2 on nothing may accumulate
    assert seen[-1] - seen[1] < 30, f"RSS grew across trials: {[round(x) for x in seen]}"


# ----------------------------------------------------------------------------- checks and the command line


def test_resuming_with_other_settings_is_refused(tmp_path, ctx, experiment):
    run(experiment(RANK3, tmp_path, study={"n_trials": 1}), RANK3, ctx)
    with pytest.raises(UserError, match=r"was run with train\.steps=3 \(now 4\): use --study-name NEW"):
        run(experiment(RANK3, tmp_path, train={"steps": 4}), RANK3, ctx)
    with pytest.raises(UserError, match="optimises heldout_instances/nll"):
        run(experiment(RANK3, tmp_path, study={"objective": "heldout_instances/ppl", "direction": "maximize"}),
            RANK3, ctx)


def test_a_study_recorded_before_a_setting_existed_resumes_with_its_default(tmp_path, ctx, experiment):
    """A study created before eval.retention existed has no such key in its record: it ran with the default
    (no retention set), so resuming with the default is the same study and anything else is refused."""
    import optuna

    exp = experiment(RANK3, tmp_path, study={"n_trials": 1})
    report = run(exp, RANK3, ctx)
    study = optuna.load_study(study_name=report.name, storage=f"sqlite:///{exp.study.workspace}/optuna.db")
    older = {k: v for k, v in study.user_attrs["base_config"].items() if k != "eval.retention"}
    study.set_user_attr("base_config", older)
    run(experiment(RANK3, tmp_path, study={"n_trials": 1}), RANK3, ctx)  # resumes
    with pytest.raises(UserError, match=r"was run with eval\.retention=None \(now 'heldout_tasks'\)"):
        run(experiment(RANK3, tmp_path, eval={"retention": ["heldout_tasks"]}), RANK3, ctx)


@pytest.mark.parametrize("study, message", [
    ({"pruner": "median"}, "prunes on intermediate held-out loss; set eval.every=N"),
    ({"objective": "heldout_tasks/nll"}, "'heldout_tasks' is not a held-out set of this experiment"),
    ({"objective": "heldout_instances/exact_match"}, "scores generations, but eval.generate=false"),
    ({"objective": "heldout_instances/bleu"}, "unknown metric 'bleu'; choose one of: nll, ppl"),
])
def test_bad_study_settings(tmp_path, study, message, experiment):
    with pytest.raises(UserError, match=message):
        study_mod.check_study(experiment(RANK3, tmp_path, study=study), RANK3)


def cli_args(ws, space_file):
    return ["--workspace", str(ws), "--space", str(space_file), "--quiet", "model.name=tiny-llama",
            "data.train_size=32", "data.max_length=64", "train.steps=2", "train.batch_size=4", "eval.size=4",
            "eval.generate=false", "eval.sets=[heldout_instances]", "eval.base=false"]


def test_cli_study_without_tracking_then_status(tmp_path, capsys):
    space_file = tmp_path / "two.yaml"
    space_file.write_text("axes:\n  lora.r: {grid: [1, 2]}\n")
    ws = tmp_path / "ws"
    assert main(["study", "--no-tracking", "--seeds", "2", *cli_args(ws, space_file)]) == 0
    out = capsys.readouterr().out
    assert "study two-tiny-llama: this run 4 trial(s) (4 complete)" in out
    assert sorted(p.name for p in ws.iterdir()) == ["optuna.db"]  # --no-tracking: no MLflow store

    assert main(["status", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "study two-tiny-llama  space two  objective heldout_instances/nll (minimize)  4 trials: 4 COMPLETE" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert sorted((int(r[3]), int(r[4])) for r in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r[1] == "COMPLETE" for r in rows)

    assert main(["status", "--workspace", str(ws), "--study", "nope"]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    ws = tmp_path / "ws"
    space_file = tmp_path / "two.yaml"
    space_file.write_text("axes:\n  lora.r: {grid: [1, 2]}\n")
    for extra in (["--pruner", "median"], ["--objective", "nope/nll"], ["--seeds", "0"], ["lora.r=4"],
                  ["--storage", "optuna.db"], [f"data.train={tmp_path / 'missing.jsonl'}"]):
        assert main(["study", *cli_args(ws, space_file), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert main(["status", "--workspace", str(ws)]) == 2
    assert "no Optuna storage" in capsys.readouterr().err
    assert not ws.exists()


def test_cli_bad_input_in_an_existing_workspace_leaves_no_study(tmp_path, capsys, write_jsonl, alpaca_rows):
    """A new --study-name whose data or model is bad: the error, and neither an empty Optuna study nor an
    MLflow experiment of that name behind it; the workspace's other study stays as it was."""
    ws = tmp_path / "ws"
    space_file = tmp_path / "two.yaml"
    space_file.write_text("axes:\n  lora.r: {grid: [1, 2]}\n")
    assert main(["study", "--n-trials", "1", *cli_args(ws, space_file)]) == 0
    capsys.readouterr()
    url = f"sqlite:///{ws.resolve() / 'optuna.db'}"

    def snapshot():
        return [(t.number, t.state, t.params, t.value) for t in optuna.load_study(study_name="two-tiny-llama",
                                                                                   storage=url).trials]

    before = snapshot()
    malformed = write_jsonl(alpaca_rows[:2] + [{"instruction": "Reverse the word.", "input": "x", "output": ""}],
                            "malformed.jsonl")
    for extra in ([f"data.train={malformed}"], [f"data.train={tmp_path / 'missing.jsonl'}"],
                  ["model.name=nowhere-model"]):
        assert main(["study", "--study-name", "new-name", *cli_args(ws, space_file), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert optuna.study.get_all_study_names(url) == ["two-tiny-llama"]
    assert snapshot() == before
    assert MlflowClient(tracking_uri=mlflow_uri(ws)).get_experiment_by_name("new-name") is None


def test_a_study_whose_first_run_failed_on_its_input_resumes_with_the_fixed_input(tmp_path, ctx, experiment):
    """A typo in a data path must not leave a study name that refuses the corrected command."""
    run(experiment(RANK3, tmp_path, study={"n_trials": 1}), RANK3, ctx)  # the workspace exists now
    other = {"name": "typo"}
    with pytest.raises(UserError, match="does not exist"):
        run_study(experiment(RANK3, tmp_path, study=other, data={"train": str(tmp_path / "missing.jsonl")}),
                  RANK3, progress=False)
    report = run(experiment(RANK3, tmp_path, study={**other, "n_trials": 1}), RANK3, ctx)
    assert [o.state for o in report.outcomes] == ["COMPLETE"]


def test_sigterm_ends_a_study_like_ctrl_c():
    import signal

    from lora_ablate.commands.study import _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives before this ends
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_first_trial_prints_an_estimate_of_the_time_left(capsys):
    from lora_ablate.study.outcomes import Progress, TrialOutcome, remaining_line
    from lora_ablate.study.settings import Objective

    assert remaining_line(120.0, 1, 6) == "estimated time left: about 10 min for 5 more trials (2 min a trial so far)"
    assert remaining_line(5.0, 1, 1) == ""
    now = iter([0.0, 30.0, 60.0])
    bar = Progress("s", 3, Objective("heldout_instances", "nll", "minimize"), True, clock=lambda: next(now))
    for n in range(2):
        bar.told(TrialOutcome(n, {"r": 4}, "COMPLETE", 1.5), 1.5)
    bar.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("estimated time left") == 1 and "about 60 s for 2 more trials" in text
