"""Faults tried as a user would: real ``study`` processes SIGKILLed at the worst moments, then the same
command once more; a copied workspace resumed; stores that cannot be written. What each test proves is
listed in docs/reliability.md."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from mlflow import MlflowClient

from lora_ablate.cli import main
from lora_ablate.workspace import mlflow_uri, relocate

HERE = Path(__file__).resolve().parent
STUDY = "three-tiny-llama"
CELLS = {(r, 0) for r in (1, 2, 4)}
# fast heartbeats: a dead worker is known after 3 s instead of 30
ENV = {**os.environ, "LORA_ABLATE_HEARTBEAT_S": "1", "LORA_ABLATE_GRACE_S": "3",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}


def study_args(ws: Path, space: Path) -> list[str]:
    return ["study", "--workspace", str(ws), "--space", str(space), "--quiet", "model.name=tiny-llama",
            "data.train_size=32", "data.max_length=64", "train.steps=2", "train.batch_size=4", "train.log_every=1",
            "eval.size=4", "eval.generate=false", "eval.sets=[heldout_instances]", "eval.base=false"]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text("axes:\n  lora.r: {grid: [1, 2, 4]}\n")
    return path


def run_cli(args: list[str], point: str = "", n: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(HERE / "fault_worker.py"), point, str(n)] if point else \
        [sys.executable, "-m", "lora_ablate"]
    return subprocess.run(cmd + args, env=ENV, capture_output=True, text=True, timeout=300)


def trials(ws: Path) -> list:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{ws / 'optuna.db'}").get_trials()


def running_trial(ws: Path) -> bool:
    try:
        return (ws / "optuna.db").exists() and any(t.state.name == "RUNNING" for t in trials(ws))
    except KeyError:  # the storage is there, the study not yet
        return False
    except sqlalchemy.exc.SQLAlchemyError:  # polled while the worker creates the schema: this poll lost the race
        return False


def assert_consistent(ws: Path, cells: set = CELLS) -> None:
    """What the stores promise once an invocation has finished (docs/reliability.md)."""
    ts = trials(ws)
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert sorted((t.params["r"], t.params["seed"]) for t in done) == sorted(cells)  # none missing, none doubled
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]
    client = MlflowClient(tracking_uri=mlflow_uri(ws))
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial" and r.info.status == "FINISHED"]
    assert sorted(r.info.run_id for r in finished) == sorted(t.user_attrs["mlflow_run_id"] for t in done)
    for t in done:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.metrics["final/heldout_instances/nll"] == pytest.approx(t.value)
        assert run.data.tags["lora_ablate.state"] == "COMPLETE"
    for t in ts:
        if t.state.name == "FAIL":
            assert t.user_attrs["fail_reason"]
            if t.user_attrs.get("mlflow_run_id"):
                run = client.get_run(t.user_attrs["mlflow_run_id"])
                assert run.info.status == "FAILED"
                assert run.data.tags["lora_ablate.fail_reason"] == t.user_attrs["fail_reason"]


@pytest.mark.parametrize("point, n", [
    ("train", 3),  # the second trial's first step
    ("final_eval", 2),  # the second trial's final evaluation
    ("artifacts", 2),  # the second trial's MLflow writes, before Optuna is told
    ("terminate", 2),  # after Optuna was told the second trial, before its run ended
    ("terminate", 3),  # the same on the last cell: the rerun has nothing to train but what the kill left
])
def test_sigkill_then_one_rerun_finishes_the_grid(tmp_path, space, point, n):
    ws = tmp_path / "ws"
    killed = run_cli(study_args(ws, space), point, n)
    assert killed.returncode == -9, killed.stderr[-2000:]
    rerun = run_cli(study_args(ws, space))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "still to run" not in rerun.stdout and "RUNNING elsewhere" not in rerun.stdout, rerun.stdout
    assert_consistent(ws)
    client = MlflowClient(tracking_uri=mlflow_uri(ws))
    parents = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id],
                                 filter_string="tags.`lora_ablate.kind` = 'study'")
    statuses = [r.info.status for r in parents]  # the rerun opens a parent run only if it trains
    assert statuses.count("KILLED") == 1 and set(statuses) <= {"FINISHED", "KILLED"}


def test_a_pack_out_of_gpu_memory_is_trained_again_in_halves_and_no_trial_fails(tmp_path, space):
    """Packs of 4 on a GPU that holds only 2 trials once training is under way (another process took the
    rest): the pack of 4 is abandoned at its second step and its trials are trained again in two packs of 2;
    nothing fails, and MLflow has each step of each trial once."""
    ws = tmp_path / "ws"
    proc = run_cli([*study_args(ws, space), "--seeds", "2", "--pack", "4"], "oom", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "ran out of GPU memory" in line]
    assert warnings == ["WARNING lora_ablate.packed.train: pack of 4 ran out of GPU memory at step 2; "
                        "training its 4 trials again in packs of 2"], proc.stderr[-2000:]
    cells = {(r, seed) for r in (1, 2, 4) for seed in (0, 1)}
    assert_consistent(ws, cells)
    assert sorted(t.state.name for t in trials(ws)) == ["COMPLETE"] * len(cells)  # none FAIL
    client = MlflowClient(tracking_uri=mlflow_uri(ws))
    for t in trials(ws):
        history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "train/loss")
        assert sorted(m.step for m in history) == [1, 2], (t.number, history)


def test_a_live_workers_runs_are_left_alone(tmp_path, space):
    """A second worker on the same study: closing dead invocations' runs must not touch a live one's, and
    its trial in flight is left to it."""
    ws = tmp_path / "ws"
    slow = subprocess.Popen([sys.executable, str(HERE / "fault_worker.py"), "stall:train", "1",
                             *study_args(ws, space)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not running_trial(ws):
            time.sleep(0.5)
        time.sleep(5)  # longer than GRACE_S: only its beats keep it alive now
        other = run_cli(study_args(ws, space))
        assert other.returncode == 0, other.stderr[-2000:]
        assert "1 trial(s) RUNNING elsewhere" in other.stdout, other.stdout
        client = MlflowClient(tracking_uri=mlflow_uri(ws))
        runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id])
        running = sorted(r.data.tags["lora_ablate.kind"] for r in runs if r.info.status == "RUNNING")
        assert running == ["study", "trial"]  # the slow worker's, untouched
        assert sorted(t.state.name for t in trials(ws)) == ["COMPLETE", "COMPLETE", "RUNNING"]
    finally:
        slow.kill()
        slow.wait(timeout=60)


def test_a_copied_workspace_resumes_into_itself(tmp_path, space):
    ws, copy = tmp_path / "ws", tmp_path / "elsewhere" / "ws"
    assert main([*study_args(ws, space), "--n-trials", "2"]) == 0
    shutil.copytree(ws, copy)

    def tree(root):
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    before = tree(ws)
    assert main(study_args(copy, space)) == 0
    assert tree(ws) == before  # nothing written to the original
    assert_consistent(copy)
    client = MlflowClient(tracking_uri=mlflow_uri(copy))
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id],
                              filter_string="tags.`lora_ablate.kind` = 'trial'")
    assert len(runs) == 3
    for r in runs:
        assert r.info.artifact_uri.startswith(copy.resolve().as_uri() + "/")
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"adapter", "config.yaml", "scores.jsonl"}
    shutil.rmtree(ws)  # the export reads the copy alone
    assert main(["export", "--workspace", str(copy), "--study", STUDY, "--out", str(tmp_path / "out")]) == 0


def test_a_store_another_process_has_only_just_created_is_not_relocated(tmp_path):
    """A second worker on a fresh workspace can open the database file before the first has created MLflow's
    tables in it: relocating reads nothing and writes nothing then, instead of failing on the missing table."""
    import sqlite3

    db = tmp_path / "ws" / "mlflow.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    assert relocate(db, tmp_path / "ws" / "artifacts") == 0
    assert db.stat().st_size == 0


def test_a_read_only_store_is_one_line_and_leaves_the_study_resumable(tmp_path, space, capsys):
    """Simulated with SQLite's read-only mode (tests run as root, where chmod does not stop a write)."""
    ws = tmp_path / "ws"
    assert main([*study_args(ws, space), "--n-trials", "1"]) == 0
    capsys.readouterr()
    ro = f"sqlite:///file:{ws.resolve() / 'optuna.db'}?mode=ro&uri=true"
    assert main([*study_args(ws, space), "--storage", ro]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the study's stores (readonly database)") and err.count("\n") == 1, err
    assert [t.state.name for t in trials(ws)] == ["COMPLETE"]
    assert main(study_args(ws, space)) == 0
    assert_consistent(ws)


def test_a_full_disk_is_one_line_and_leaves_the_study_resumable(tmp_path, space, capsys, monkeypatch):
    """ENOSPC simulated on MLflow's artifact writes of the second trial (a real full filesystem needs a
    mount, which the tests cannot make)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    real, calls = LocalArtifactRepository.log_artifacts, []

    def full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    ws = tmp_path / "ws"
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", full)
    assert main(study_args(ws, space)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the study's stores (No space left on device)"), err
    assert err.count("\n") == 1, err
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", real)
    monkeypatch.setenv("LORA_ABLATE_GRACE_S", "3")
    from lora_ablate.study import heartbeat
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 1)
    monkeypatch.setattr(heartbeat, "GRACE_S", 3)
    assert main(study_args(ws, space)) == 0
    assert_consistent(ws)
