"""One study over many processes: creation races on a fresh store (SQLite, PostgreSQL), cells claimed once
by any number of workers, a worker killed mid-trial, and Optuna and MLflow agreeing trial for trial.

PostgreSQL is a real server from the distribution's package (``apt-get install postgresql``), started on a
loopback port with its data directory in a temporary folder; without its binaries those tests are skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from lora_ablate.stores import db_url, lost_race
from lora_ablate.study.claims import Claims, attempt_of
from lora_ablate.study.storage import open_storage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from local_pg import PostgresUnavailable, local_postgres  # noqa: E402 - the one server helper, shared

GRID12 = "axes:\n  lora.r: {grid: [1, 2, 4]}\n  lora.targets: {grid: [[q], [v], [q, v], [q, k, v, o]]}\n"
TINY = ["model.name=tiny-llama", "data.train_size=8", "data.max_length=32", "train.steps=1", "train.batch_size=2",
        "eval.size=2", "eval.batch_size=2", "eval.generate=false", "eval.sets=[heldout_instances]",
        "eval.base=false"]


@pytest.fixture(scope="module")
def postgres():
    """``postgres(name)`` -> the URL of a new, empty database on a private PostgreSQL server on 127.0.0.1."""
    try:
        with local_postgres(fsync=False, prefer="debian") as server:
            yield server.new_db
    except PostgresUnavailable as e:
        pytest.skip(str(e))


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


# ----------------------------------------------------------------------------- small pieces


def test_postgres_urls_get_the_installed_driver():
    url = db_url("postgresql://u:p@h/db")
    assert url in ("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db")
    assert db_url("postgres://h/db").startswith("postgresql")
    assert db_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert db_url("sqlite:////x/optuna.db") == "sqlite:////x/optuna.db"


def test_lost_races_are_told_from_real_errors():
    import sqlalchemy.exc

    dup = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception('duplicate key value violates "pg_type_typname"'))
    assert lost_race(dup)
    try:
        try:
            raise sqlalchemy.exc.OperationalError("x", {}, Exception("UNIQUE constraint failed: alembic_version"))
        except Exception as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert lost_race(e)
    assert not lost_race(sqlalchemy.exc.OperationalError("x", {}, Exception("connection refused")))


def test_a_claim_is_won_once_and_an_orphaned_claim_is_taken_over(tmp_path, monkeypatch):
    from lora_ablate.study import heartbeat

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    a, b = Claims(storage, "s"), Claims(storage, "s")
    cell = {"r": 1, "seed": 0}
    assert a.claim(cell, 0) and not b.claim(cell, 0)
    assert b.claim(cell, 1) and b.claim({"r": 2, "seed": 0}, 0)
    assert not Claims(storage, "s").claim(cell, 0)
    assert Claims(storage, "other").claim(cell, 0)  # claims are per study
    monkeypatch.setattr(heartbeat, "GRACE_S", 0)
    time.sleep(0.01)
    assert b.claim(cell, 0)  # its worker died before its trial existed: the claim is taken over
    assert attempt_of(cell, []) == 0


def test_check_base_refuses_what_load_base_would_without_loading_weights():
    from lora_ablate.config import ModelConfig
    from lora_ablate.errors import UserError
    from lora_ablate.models import check_base

    check_base(ModelConfig(name="tiny-llama"))
    for cfg, words in [(ModelConfig(name="nobody/no-such-model"), ["'nobody/no-such-model'", "could not be loaded"]),
                       (ModelConfig(name="/no/such/model"), ["'/no/such/model'", "not a known model"]),
                       (ModelConfig(name="/no/such/model.gguf"), ["model.gguf", "does not exist"]),
                       (ModelConfig(name="tiny-llama", quantization="4bit"), ["4bit", "none"])]:
        with pytest.raises(UserError) as e:
            check_base(cfg)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# r=64 is above the rank of tiny-llama's k_proj (32 x 64): only the model's shapes can tell
WIDE = "axes:\n  lora.r: {grid: [2, 64]}\n  lora.targets: {grid: [[q], [k]]}\n"
# q and v without k: not expressible on gpt2's fused c_attn (lora.fused_subset=refuse)
PART_FUSED = "fixed:\n  lora.targets: [q, v]\naxes:\n  lora.r: {grid: [2, 4]}\n"


def _gpt2(folder: Path) -> str:
    """A GPT-2 model folder holding only its config: all the parent reads of a model."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    return str(folder)


def _refused_by_parent(tmp_path: Path, flags: list[str], overrides: list[str], named: list[str]) -> None:
    """``study --workers 2 FLAGS ... OVERRIDES`` exits 2 with one ``error:`` line naming ``named``, before the
    study exists and before any worker starts."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.run([sys.executable, "-m", "lora_ablate", "study", "--workers", "2", "--workspace",
                           str(tmp_path / "ws"), "--storage", storage, "--quiet", *flags, *TINY, *overrides],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith("error:") and all(n in lines[0] for n in named), lines
    assert "worker(s) done" not in proc.stdout  # no worker was started
    assert not (tmp_path / "optuna.db").exists() or optuna.study.get_all_study_names(open_storage(storage)) == []


@pytest.mark.parametrize("bad, named", [("model.name=nobody/no-such-model", "nobody/no-such-model"),
                                        ("data.train=/nonexistent/train.jsonl", "/nonexistent/train.jsonl")])
def test_bad_input_with_workers_fails_once_in_the_parent_and_leaves_no_study(tmp_path, bad, named):
    """Checked before the study exists and before any worker starts: one line, exit 2, no empty study."""
    _refused_by_parent(tmp_path, [], [bad], [named])


def test_a_rank_above_a_target_module_with_workers_fails_in_the_parent(tmp_path):
    (tmp_path / "wide.yaml").write_text(WIDE)
    _refused_by_parent(tmp_path, ["--space", str(tmp_path / "wide.yaml")], [],
                       ["lora.r=64", "self_attn.k_proj", "32x64", "lora.r <= 32"])


def test_targets_the_architecture_cannot_take_with_workers_fail_in_the_parent(tmp_path):
    (tmp_path / "part.yaml").write_text(PART_FUSED)
    _refused_by_parent(tmp_path, ["--space", str(tmp_path / "part.yaml")], [f"model.name={_gpt2(tmp_path / 'gpt2')}"],
                       ["gpt2 fuses q, k and v", "[q, v]"])


def test_the_skeleton_check_takes_part_of_a_fused_matrix_where_lora_fused_subset_allows_it(tmp_path):
    """lora.fused_subset=rows trains q and v alone on gpt2's c_attn: the parent must not refuse what the
    trainers accept."""
    from lora_ablate.config import ModelConfig
    from lora_ablate.errors import UserError
    from lora_ablate.models import check_base
    from lora_ablate.targets import check_targets

    skeleton = check_base(ModelConfig(name=_gpt2(tmp_path / "gpt2")))
    with pytest.raises(UserError, match="gpt2 fuses q, k and v"):
        check_targets(skeleton, [("q", "v")], 4)
    check_targets(skeleton, [("q", "v")], 4, "rows")
    with pytest.raises(UserError, match="lora.r=64 is above"):  # c_attn is 96 x 32
        check_targets(skeleton, [("q", "v")], 64, "rows")


def test_the_skeleton_check_answers_as_the_loaded_model_in_well_under_a_second():
    """The parent's check reads names and shapes off a meta-device skeleton: the same refusal, word for word,
    as the check on the loaded model, and none of the weights' cost."""
    import peft.tuners.tuners_utils  # noqa: F401 - imports are the interpreter's cost, paid by any command
    import transformers.models.llama.modeling_llama  # noqa: F401

    from lora_ablate.config import ModelConfig
    from lora_ablate.errors import UserError
    from lora_ablate.models import check_base, load_base
    from lora_ablate.targets import check_targets

    t0 = time.perf_counter()
    skeleton = check_base(ModelConfig(name="tiny-llama"))
    check_targets(skeleton, [("q", "k", "v", "o"), ("mlp",)], 32)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed
    assert all(p.is_meta for p in skeleton.parameters())
    refusals = []
    for model in (skeleton, load_base(ModelConfig(name="tiny-llama")).model):
        with pytest.raises(UserError) as e:
            check_targets(model, [("q",), ("k",)], 64)
        refusals.append(str(e.value))
    assert refusals[0] == refusals[1] and "k_proj" in refusals[0], refusals


def test_a_worker_joining_a_study_its_model_cannot_train_refuses_before_training(tmp_path):
    """A study created without the check (an older lora_ablate, or another model at creation): ``worker``
    runs the same check before its first trial, and the study gets no trial."""
    from lora_ablate.commands.study import study_setup
    from lora_ablate.study.settings import objective_of
    from lora_ablate.study.storage import load_or_create

    storage, ws = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "ws"
    (tmp_path / "wide.yaml").write_text(WIDE)
    sp, exp = study_setup(str(tmp_path / "wide.yaml"), None, TINY,
                          {"study": {"workspace": str(ws), "storage": storage}, "tracking": {"enabled": False}})
    name = load_or_create(exp, sp, objective_of(exp))[0].study_name
    proc = subprocess.run([sys.executable, "-m", "lora_ablate", "worker", "--study", name, "--storage", storage,
                           "--workspace", str(ws), "--no-tracking", "--quiet"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith("error:") and "lora.r=64" in lines[0] and "k_proj" in lines[0], lines
    assert optuna.load_study(study_name=name, storage=open_storage(storage)).trials == []


# ----------------------------------------------------------------------------- creation races

CREATE = r"""
import sys, time
from pathlib import Path
from lora_ablate.commands.study import study_setup
from lora_ablate.study.settings import objective_of
from lora_ablate.study.storage import load_or_create
from lora_ablate.tracking import StudyInfo, make_tracker

ws, storage, tracking, barrier, i = sys.argv[1:]
sp, exp = study_setup("rank", None, ["model.name=tiny-llama"],
                      {"study": {"workspace": ws, "storage": storage or None}, "tracking": {"uri": tracking or None}})
Path(barrier, f"ready{i}").touch()
while not Path(barrier, "go").exists():
    time.sleep(0.002)
study, _ = load_or_create(exp, sp, objective_of(exp))
tracker = make_tracker(exp)
tracker.start_study(StudyInfo(study.study_name, sp.name, "o", "minimize", storage, exp))
print("joined", study.study_name, tracker.experiment_id, tracker.parent_id)
"""


def start_together(argv_of, n: int, barrier: Path, timeout: float = 120) -> list[subprocess.Popen]:
    """``n`` processes released at the same moment once all of them have imported everything."""
    barrier.mkdir()
    procs = [subprocess.Popen(argv_of(i), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    deadline = time.monotonic() + timeout
    while len(list(barrier.glob("ready*"))) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (barrier / "go").touch()
    return procs


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_processes_starting_one_study_together_on_a_fresh_store_all_join_it(tmp_path, store, request):
    if store == "postgresql":
        pg = request.getfixturevalue("postgres")
        storage, tracking = pg("optuna"), pg("mlflow")
    else:
        storage = tracking = ""
    ws = tmp_path / "ws"
    n = 4
    procs = start_together(lambda i: [sys.executable, "-c", CREATE, str(ws), storage, tracking,
                                      str(tmp_path / "barrier"), str(i)], n, tmp_path / "barrier")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(o[-3000:] for o in outs)
    joined = [line.split() for o in outs for line in o.splitlines() if line.startswith("joined")]
    assert len(joined) == n and len({j[2] for j in joined}) == 1 and len({j[3] for j in joined}) == n

    url = storage or f"sqlite:///{ws / 'optuna.db'}"
    assert optuna.study.get_all_study_names(open_storage(url)) == ["rank-tiny-llama"]
    attrs = optuna.load_study(study_name="rank-tiny-llama", storage=open_storage(url)).user_attrs
    assert attrs["space"] == "rank" and attrs["experiment"]["model"]["name"] == "tiny-llama"
    client = MlflowClient(db_url(tracking or f"sqlite:///{ws / 'mlflow.db'}"))
    exp_id = client.get_experiment_by_name("rank-tiny-llama").experiment_id
    parents = client.search_runs([exp_id])
    names = [r.info.run_name for r in parents]
    assert len(names) == n and len(set(names)) == n, names  # one parent run per process, each named apart
    assert all(r.data.tags["lora_ablate.worker.pid"] in r.info.run_name for r in parents)


# ----------------------------------------------------------------------------- a pool of workers


def _running(storage, name: str):
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if "worker" in t.user_attrs]


def test_four_workers_on_postgres_train_a_grid_once_while_one_is_killed_mid_trial(tmp_path, postgres):
    """12 cells x 2 seeds over 4 worker processes; one is SIGKILLed while it trains. Its trial is failed by its
    heartbeat, queued again and trained by another worker; every cell is trained to completion exactly once
    and every COMPLETE trial has exactly one FINISHED MLflow run."""
    storage_url, tracking = postgres("optuna"), postgres("mlflow")
    space = tmp_path / "grid12.yaml"
    space.write_text(GRID12)
    ws = tmp_path / "ws"
    t0 = time.monotonic()
    pool = subprocess.Popen([sys.executable, "-m", "lora_ablate", "study", "--workers", "4", "--space", str(space),
                             "--seeds", "2", "--workspace", str(ws), "--storage", storage_url, "--tracking-uri",
                             tracking, "--quiet", *TINY], cwd=tmp_path,
                            env=env(LORA_ABLATE_HEARTBEAT_S="1", LORA_ABLATE_GRACE_S="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    name = "grid12-tiny-llama"
    storage = open_storage(storage_url)
    killed = None
    try:
        while killed is None and pool.poll() is None:
            try:
                running = _running(storage, name)
            except KeyError:  # the study is not created yet
                running = []
            if running:
                victim = max(running, key=lambda t: t.datetime_start)  # the newest: mid-trial for a while
                os.kill(int(victim.user_attrs["worker"]["pid"]), signal.SIGKILL)
                killed = victim.number
            time.sleep(0.05)
        out = pool.communicate(timeout=240)[0]
    finally:
        if pool.poll() is None:
            pool.kill()
    elapsed = time.monotonic() - t0
    assert killed is not None, out[-3000:]
    assert pool.returncode != 0 and "exit codes" in out, out[-3000:]  # the killed worker's code is reported

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    by_state: dict[str, list] = {}
    for t in trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert set(by_state) <= {"COMPLETE", "FAIL"}, {k: len(v) for k, v in by_state.items()}
    done = sorted((t.params["r"], t.params["targets"], t.params["seed"]) for t in by_state["COMPLETE"])
    assert len(done) == 24 and len(set(done)) == 24  # the whole grid, no cell twice
    assert [t.number for t in by_state["FAIL"]] == [killed]  # killed while it trained: nothing else failed
    retried = trials[killed]
    # the cell it was created for; killed before or between its suggest calls, its params are partial or none
    cell = {**retried.params, **retried.system_attrs.get("fixed_params", {})}
    assert (cell["r"], cell["targets"], cell["seed"]) in done

    client = MlflowClient(db_url(tracking))
    exp_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([exp_id], "tags.`lora_ablate.kind` = 'trial'", max_results=1000)
    finished: dict[int, int] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            n = int(r.data.tags["lora_ablate.trial_number"])
            finished[n] = finished.get(n, 0) + 1
    assert finished == {t.number: 1 for t in by_state["COMPLETE"]}
    assert [r.info.status for r in runs if int(r.data.tags["lora_ablate.trial_number"]) == killed] in (
        ["FAILED"], [])  # closed by the worker that found it stale (or killed before its run was opened)
    parents = client.search_runs([exp_id], "tags.`lora_ablate.kind` = 'study'")
    assert len(parents) == 4 and len({r.info.run_name for r in parents}) == 4
    assert elapsed < 240


# ----------------------------------------------------------------------------- the load benchmark's harness


def test_the_load_benchmark_finds_every_cell_once_and_records_the_stores_latencies(tmp_path, postgres):
    """benchmarks/scale_out_load.py's core on a small grid (3 workers, 30 trials): its exactly-once check
    passes, and every worker wrote its timings."""
    import scale_out_load

    class Server:  # the module's server: the load test's databases go next to the other tests'
        version = "test"
        new_db = staticmethod(postgres)

    report = scale_out_load.run_load(tmp_path / "out", workers=3, ranks=1, seeds=3, server=Server(), timeout=300)
    checks = report["checks"]
    assert checks["ok"], checks["problems"]
    assert checks["optuna_states"] == {"COMPLETE": 30} and checks["mlflow_finished_trial_runs"] == 30
    assert checks["mlflow_parent_runs"] == 3 and checks["mlflow_running_runs"] == 0
    t = report["timings"]
    assert t["tell"]["n"] == 30 and t["mlflow_start"]["n"] == 30 and t["ask"]["n"] >= 30
    assert t["tell"]["workers"] == 3 and 0 < t["tell"]["p50_ms"] <= t["tell"]["p95_ms"] <= t["tell"]["max_ms"]
    assert (tmp_path / "out" / "load.md").read_text().count("|") > 10


def test_the_load_check_reports_lost_and_doubled_cells_and_missing_runs(tmp_path):
    import scale_out_load
    from optuna.distributions import IntDistribution

    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    for _ in range(2):  # the same cell twice, and the second expected cell never trained
        study.add_trial(optuna.trial.create_trial(params={"r": 1}, distributions={"r": IntDistribution(1, 2)},
                                                  value=1.0))
    MlflowClient(tracking).create_experiment("s")
    checks = scale_out_load.check_stores(storage, tracking, "s", expected=2)
    problems = " | ".join(checks["problems"])
    assert not checks["ok"]
    assert "1 distinct cells COMPLETE, expected 2" in problems and "1 cell(s) COMPLETE more than once" in problems
    assert "trial 0: 0 FINISHED MLflow runs" in problems and "trial 1: 0 FINISHED MLflow runs" in problems
