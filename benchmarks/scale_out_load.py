"""Load: many workers hammering one PostgreSQL with many tiny trials (issue 13's evidence).

    python benchmarks/scale_out_load.py --out /tmp/scale-load            # 8 workers, 500 trials
    python benchmarks/scale_out_load.py --out /tmp/s --workers 3 --ranks 1 --seeds 3   # 30 trials

A throwaway PostgreSQL (``local_pg.py``) holds both stores: Optuna's storage and MLflow's tracking database,
with MLflow's artifacts in one shared folder. ``study --workers N`` then trains a grid of ``ranks`` x 10
target subsets x ``seeds`` tiny-llama trials (1 step, evaluation cut to 2 held-out examples without
generation), tracking on, with ``$LORA_ABLATE_TIMINGS`` set so that every worker records how long its
claims/asks, tells and MLflow calls took.

Afterwards it checks what the issue asks: every cell exactly once COMPLETE in Optuna and nothing else,
exactly one FINISHED MLflow run per trial with its metrics (its objective equal to Optuna's value), no run
left RUNNING; and prints p50/p95/max per operation, trials/s and the wall time. ``--out`` gets
``load.json``, ``load.md`` and the workers' ``timings/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from local_pg import LocalPostgres, local_postgres  # noqa: E402

TARGETS = ("[q]", "[k]", "[v]", "[o]", "[q, v]", "[q, k]", "[k, v]", "[v, o]", "[q, o]", "[q, k, v, o]")
TINY = ["model.name=tiny-llama", "model.device=cpu", "data.train_size=8", "data.max_length=32", "train.steps=1",
        "train.batch_size=2", "eval.size=2", "eval.batch_size=2", "eval.generate=false",
        "eval.sets=[heldout_instances]", "eval.base=false"]
OPS = ("ask", "suggest", "mlflow_start", "tell", "mlflow_finish")


def space_yaml(ranks: int) -> str:
    return (f"name: load\naxes:\n  lora.r: {{grid: {list(range(1, ranks + 1))}}}\n"
            f"  lora.targets: {{grid: [{', '.join(TARGETS)}]}}\n")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p95 of 500 samples is the 475th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))] if ordered else float("nan")


def timing_stats(folder: Path) -> dict[str, dict]:
    rows = [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines() if line]
    out = {}
    for op in sorted({r["op"] for r in rows}, key=lambda o: OPS.index(o) if o in OPS else len(OPS)):
        s = [r["seconds"] for r in rows if r["op"] == op]
        out[op] = {"n": len(s), "p50_ms": 1e3 * percentile(s, 50), "p95_ms": 1e3 * percentile(s, 95),
                   "max_ms": 1e3 * max(s), "mean_ms": 1e3 * sum(s) / len(s),
                   "workers": len({r["worker"] for r in rows if r["op"] == op})}
    return out


def cell_of(params: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def check_stores(storage: str, tracking: str, name: str, expected: int) -> dict:
    """Exactly once: ``expected`` distinct cells COMPLETE once each in Optuna and nothing else, one FINISHED
    MLflow run per trial with its metrics (its objective equal to Optuna's value), no run RUNNING.
    ``problems`` lists every violation (empty: the run passed)."""
    import optuna
    from mlflow import MlflowClient

    from lora_ablate.stores import db_url
    from lora_ablate.study.storage import open_storage
    from lora_ablate.tracking import OBJECTIVE_METRIC

    problems: list[str] = []
    trials = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    cells = [cell_of(t.params) for t in complete]
    if len(set(cells)) != expected:
        problems.append(f"{len(set(cells))} distinct cells COMPLETE, expected {expected} (lost trials)")
    if len(cells) != len(set(cells)):
        problems.append(f"{len(cells) - len(set(cells))} cell(s) COMPLETE more than once (doubled trials)")
    if set(states) != {"COMPLETE"}:
        problems.append(f"trials not COMPLETE: {({k: v for k, v in states.items() if k != 'COMPLETE'})}")

    client = MlflowClient(db_url(tracking))
    exp_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([exp_id], max_results=50000)
    trial_runs = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial"]
    finished: dict[int, list] = {}
    for r in trial_runs:
        if r.info.status == "FINISHED":
            finished.setdefault(int(r.data.tags["lora_ablate.trial_number"]), []).append(r)
    for t in complete:
        got = finished.get(t.number, [])
        if len(got) != 1:
            problems.append(f"trial {t.number}: {len(got)} FINISHED MLflow runs")
        elif abs(got[0].data.metrics.get(OBJECTIVE_METRIC, float("nan")) - t.value) > 1e-9 \
                or "wall_s" not in got[0].data.metrics:
            problems.append(f"trial {t.number}: its MLflow run lacks its metrics or disagrees with Optuna's value")
    extra = sorted(set(finished) - {t.number for t in complete})
    if extra:
        problems.append(f"FINISHED MLflow runs of trials Optuna does not hold COMPLETE: {extra[:10]}")
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    if running:
        problems.append(f"{len(running)} MLflow run(s) left RUNNING")
    parents = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "study"]
    return {"optuna_states": states, "expected_cells": expected, "distinct_cells_complete": len(set(cells)),
            "mlflow_trial_runs": len(trial_runs), "mlflow_finished_trial_runs": sum(map(len, finished.values())),
            "mlflow_running_runs": len(running), "mlflow_parent_runs": len(parents), "problems": problems,
            "ok": not problems}


def run_load(out: Path, workers: int = 8, ranks: int = 5, seeds: int = 10, fsync: bool = True,
             server: LocalPostgres | None = None, timeout: float = 3600) -> dict:
    """The whole load test on ``server`` (default: a new local one); returns the report (also in ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    if server is None:
        with local_postgres(fsync=fsync, max_connections=max(100, 25 * workers)) as server:
            return run_load(out, workers, ranks, seeds, fsync, server, timeout)
    storage, tracking = server.new_db("optuna"), server.new_db("mlflow")
    timings = out / "timings"
    shutil.rmtree(timings, ignore_errors=True)  # a rerun into the same folder measures only itself
    with tempfile.TemporaryDirectory(prefix="scale-load-") as tmp:
        space = Path(tmp) / "load.yaml"
        space.write_text(space_yaml(ranks))
        cmd = [sys.executable, "-m", "lora_ablate", "study", "--workers", str(workers), "--space", str(space),
               "--seeds", str(seeds), "--workspace", f"{tmp}/ws", "--storage", storage, "--tracking-uri", tracking,
               "--artifact-root", f"{tmp}/artifacts", "--pack", "1", "--quiet", *TINY]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "LORA_ABLATE_TIMINGS": str(timings), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        print("[load] " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False)
        wall = time.perf_counter() - t0
        checks = check_stores(storage, tracking, "load-tiny-llama", ranks * len(TARGETS) * seeds)
        artifacts = sum(1 for p in Path(tmp, "artifacts").rglob("*") if p.is_file())
    if proc.returncode:
        checks["problems"].append(f"study --workers exited {proc.returncode}: {proc.stdout[-1500:]}")
        checks["ok"] = False
    n = checks["distinct_cells_complete"]
    report = {"machine": machine(server), "settings": {"workers": workers, "ranks": ranks, "targets": len(TARGETS),
                                                       "seeds": seeds, "trials": ranks * len(TARGETS) * seeds,
                                                       "overrides": TINY, "fsync": fsync},
              "wall_s": wall, "trials_per_s": n / wall, "checks": checks, "artifact_files": artifacts,
              "timings": timing_stats(timings), "output_tail": proc.stdout[-2000:]}
    (out / "load.json").write_text(json.dumps(report, indent=2))
    (out / "load.md").write_text(markdown(report))
    return report


def machine(server: LocalPostgres) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "postgres": server.version, "python":
            platform.python_version(), **{p: v(p) for p in ("optuna", "mlflow", "sqlalchemy", "psycopg", "torch")}}


def markdown(report: dict) -> str:
    m, s, c = report["machine"], report["settings"], report["checks"]
    lines = [f"{s['workers']} workers, {s['trials']} trials ({s['ranks']} ranks x {s['targets']} target subsets x "
             f"{s['seeds']} seeds; tiny-llama, 1 step, tracking on), PostgreSQL fsync {'on' if s['fsync'] else 'off'}",
             f"machine: {m['cpu']}, {m['cores']} cores; {m['postgres']}; python {m['python']}, optuna {m['optuna']}, "
             f"mlflow {m['mlflow']}, sqlalchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, torch {m['torch']}",
             "",
             "| operation | calls | p50 ms | p95 ms | max ms |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for op, t in report["timings"].items():
        lines.append(f"| {op} | {t['n']} | {t['p50_ms']:.1f} | {t['p95_ms']:.1f} | {t['max_ms']:.1f} |")
    lines += ["", f"wall {report['wall_s']:.0f} s, {report['trials_per_s']:.2f} trials/s; Optuna {c['optuna_states']}, "
              f"MLflow {c['mlflow_finished_trial_runs']} FINISHED trial runs of {c['mlflow_trial_runs']}, "
              f"{c['mlflow_running_runs']} RUNNING, {c['mlflow_parent_runs']} parent runs",
              "exactly once: " + ("yes" if c["ok"] else "NO: " + "; ".join(c["problems"]))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for load.json, load.md, timings/")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--ranks", type=int, default=5, help="ranks 1..N on the grid (x 10 target subsets)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per cell (trials = ranks x 10 x seeds)")
    p.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (faster, not crash-safe)")
    args = p.parse_args(argv)
    report = run_load(args.out, args.workers, args.ranks, args.seeds, fsync=not args.no_fsync)
    print(markdown(report), flush=True)
    print(f"[load] wrote {args.out / 'load.json'} and {args.out / 'load.md'}")
    return 0 if report["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
