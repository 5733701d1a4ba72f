"""3 workers sharing one GPU against one worker with the same total pack, on PostgreSQL (issue 13's evidence).

    # GPU host (no Debian PostgreSQL there: `pip install pgserver` provides the server)
    python benchmarks/scale_out_gpu.py --data benchmarks/data/t0-study --out $OUT/scale-gpu   # < 6 min, H200
    # CPU smoke: tiny-llama, a small data folder prepared from the T0 pool, a few steps
    python benchmarks/scale_out_gpu.py --smoke --out /tmp/scale-gpu-smoke

The real-data rank study of ``benchmarks/study.py`` (same ``--data`` layout: train.jsonl,
heldout_instances.jsonl, heldout_tasks.jsonl; the same study command line) at ``--steps`` (100), run twice
on one throwaway PostgreSQL server (``local_pg.py``: Debian's binaries, else the pgserver wheel), each run
with fresh Optuna and MLflow databases and its own artifact folder:

- ``one``: ``study --workers 1 --pack K`` (K = ``--pack``, default 21: the whole 7 ranks x 3 seeds at once);
- ``shared``: ``study --workers 3 --pack K/3``: three processes on the same GPU, each its own base, packs,
  CUDA graphs and compiled blocks, sharing the study through PostgreSQL only.

On one card this measures the overhead of splitting a study over processes, not a speed-up. Reported side
by side: trials/hour (wall and steady, i.e. between the first trial's start and the last one's end), the
phases read back from MLflow (startup to each worker's parent run, trials, training, evaluation and
tracking, shutdown), the stores' latencies (``$LORA_ABLATE_TIMINGS``), and the exactly-once check of
``scale_out_load.py`` (Optuna and MLflow agree trial for trial). ``--out`` gets ``scale_gpu.json`` and
``scale_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import study as bench_study  # noqa: E402 - benchmarks/study.py: its data layout and study command
from local_pg import LocalPostgres, local_postgres  # noqa: E402
from scale_out_load import check_stores, timing_stats  # noqa: E402


def run_one(label: str, args, server: LocalPostgres, workers: int, pack: int, work: Path) -> dict:
    storage, tracking = server.new_db(f"optuna_{label}"), server.new_db(f"mlflow_{label}")
    name = f"{args.study_name}-{label}"
    study_args = argparse.Namespace(**{**vars(args), "pack": str(pack), "study_name": name})
    cmd = bench_study.study_command(study_args, args.data, work / f"ws-{label}")
    cmd += ["--workers", str(workers), "--storage", storage, "--tracking-uri", tracking,
            "--artifact-root", str(work / f"artifacts-{label}")]
    timings = args.out / f"timings-{label}"
    env = {**os.environ, "LORA_ABLATE_TIMINGS": str(timings),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    print(f"[scale-gpu] {label}: " + " ".join(cmd), flush=True)
    log = args.out / f"{label}.log"
    t_epoch, t0 = time.time(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work, env=env, check=False)
    wall = time.perf_counter() - t0
    tail = log.read_text()[-3000:]
    if proc.returncode:
        raise RuntimeError(f"{label}: study exited {proc.returncode}: {tail[-800:]}")
    checks = check_stores(storage, tracking, name, args.expected)
    out = {"workers": workers, "pack": pack, "wall_s": wall, "checks": checks,
           **phases(tracking, name, t_epoch, wall), "timings": timing_stats(timings)}
    out["trials_per_hour"] = 3600 * checks["distinct_cells_complete"] / wall
    steady = out["phases"]["trials_s"]
    out["trials_per_hour_steady"] = 3600 * checks["distinct_cells_complete"] / steady if steady else None
    return out


def phases(tracking: str, name: str, t_start: float, wall: float) -> dict:
    """The runs' phases from MLflow (its times are ms since the epoch on this host's clock): when each worker's
    parent run started (interpreter, imports, data, model load), the trials' span, the training in it (the
    union of each trial's [start, start + train_s]: a pack trains its trials at once), the rest of it
    (evaluation, tracking, the stores), and the shutdown after the last trial."""
    from mlflow import MlflowClient

    from lora_ablate.stores import db_url

    client = MlflowClient(db_url(tracking))
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=10000)
    s = lambda ms: ms / 1000 - t_start  # noqa: E731
    parents = [s(r.info.start_time) for r in runs if r.data.tags.get("lora_ablate.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial" and r.info.status == "FINISHED"]
    first, last = min(s(r.info.start_time) for r in trials), max(s(r.info.end_time) for r in trials)
    training, end = 0.0, None
    for a, b in sorted((s(r.info.start_time), s(r.info.start_time) + r.data.metrics.get("train_s", 0))
                       for r in trials):
        if end is None or a > end:
            training, end = training + (b - a), b
        elif b > end:
            training, end = training + (b - end), b
    return {"phases": {"first_worker_ready_s": min(parents), "last_worker_ready_s": max(parents),
                       "first_trial_start_s": first, "trials_s": last - first, "training_s": training,
                       "evaluation_tracking_s": (last - first) - training, "shutdown_s": wall - last},
            "train_s_per_trial_mean": sum(r.data.metrics.get("train_s", 0) for r in trials) / len(trials),
            "tokens_per_s_per_trial_mean": sum(r.data.metrics.get("tokens_per_s", 0) for r in trials) / len(trials)}


def table_rows(r: dict) -> list[tuple[str, str]]:
    """One run's column of the side-by-side table."""
    c = r["checks"]
    return [("workers x pack", f"{r['workers']} x {r['pack']}"), ("wall s", f"{r['wall_s']:.1f}"),
            ("trials/hour (wall)", f"{r['trials_per_hour']:.0f}"),
            ("trials/hour (first trial start to last end)", f"{r['trials_per_hour_steady'] or 0:.0f}"),
            *[(k, f"{v:.1f}") for k, v in r["phases"].items()],
            ("train_s per trial (mean)", f"{r['train_s_per_trial_mean']:.1f}"),
            ("tokens/s per trial (mean)", f"{r['tokens_per_s_per_trial_mean']:,.0f}"),
            *[(f"{op} p95 ms", f"{r['timings'][op]['p95_ms']:.0f}" if op in r["timings"] else "-")
              for op in ("ask", "tell", "mlflow_start", "mlflow_finish")],
            ("Optuna and MLflow agree, each cell once", "yes" if c["ok"] else "NO: " + "; ".join(c["problems"]))]


def markdown(report: dict) -> str:
    runs = {k: table_rows(report[k]) for k in ("one", "shared") if k in report and "error" not in report[k]}
    m, st = report.get("machine", {}), report["settings"]
    lines = [f"{m.get('device')}; {m.get('postgres')}; torch {m.get('torch')}, optuna {m.get('optuna')}, mlflow "
             f"{m.get('mlflow')}; rank study, {st['trials']} trials, {st['steps']} steps",
             "", "| | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for i, (label, _) in enumerate(next(iter(runs.values()), [])):
        lines.append(f"| {label} | " + " | ".join(col[i][1] for col in runs.values()) + " |")
    lines += [f"{k} failed: {report[k]['error']}" for k in ("one", "shared") if "error" in report.get(k, {})]
    return "\n".join(lines) + "\n"


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a prepared data folder (benchmarks/study.py --data-out)")
    p.add_argument("--out", type=Path, default=Path("/tmp/scale-gpu"), help="folder for scale_gpu.json/.md, logs")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=3, help="workers sharing the GPU in the second run")
    p.add_argument("--pack", type=int, default=21, help="the one worker's pack K; each shared worker packs K/workers")
    p.add_argument("--space", default="rank")
    p.add_argument("--study-name", default="scale")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--server", choices=("auto", "debian", "pgserver"), default="auto",
                   help="PostgreSQL from the distribution's binaries or the pgserver wheel (auto: the first found)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny-llama, 2 ranks, a few steps")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed through to the study")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = 7
    if args.smoke:  # as benchmarks/study.py --smoke: 2 ranks of the rank space, tiny data, a few steps
        args.steps, args.eval_size, args.max_new_tokens, args.max_length = 2, 4, 4, 128
        args.pack = args.pack if args.pack != 21 else 6
        ranks = 2
        space = args.out / "rank_smoke.yaml"
        text = (ROOT / "experiments" / "spaces" / f"{args.space}.yaml").read_text()
        space.write_text(text.replace("{grid: [1, 2, 4, 8, 16, 32, 64]}", "{grid: [2, 8]}"))
        args.space = str(space)
        args.overrides = ["model.name=tiny-llama", "model.device=cpu", *args.overrides]
        if not args.data:
            args.data = args.out / "data"
            bench_study.prepare(bench_study.POOL, args.data, 0, 64, 8, None, 4)
    if not args.data:
        raise SystemExit("give --data DIR (a folder prepared by benchmarks/study.py --data-out), or --smoke")
    if args.pack % args.workers:
        raise SystemExit(f"--pack {args.pack} does not split evenly over --workers {args.workers}")
    args.expected = ranks * args.seeds
    report: dict = {"settings": {k: getattr(args, k) for k in ("steps", "seeds", "workers", "pack", "space",
                                                               "eval_size", "max_new_tokens", "overrides")}}
    report["settings"]["trials"] = args.expected

    def save():
        (args.out / "scale_gpu.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "scale_gpu.md").write_text(markdown(report))

    # fills the dequantized-GGUF cache once, so that neither run pays the one-off conversion
    prime = [sys.executable, "-c", "import sys; from lora_ablate.config import build_experiment; from lora_ablate."
             "models import load_base; load_base(build_experiment({}, sys.argv[1:]).model)",
             *[o for o in args.overrides if o.startswith("model.")]]
    subprocess.run(prime, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    with local_postgres(prefer=args.server) as server, tempfile.TemporaryDirectory(prefix="scale-gpu-") as tmp:
        report["machine"] = {**bench_study.versions(), "postgres": server.version}
        for label, workers, pack in (("one", 1, args.pack), ("shared", args.workers, args.pack // args.workers)):
            try:
                report[label] = run_one(label, args, server, workers, pack, Path(tmp))
            except Exception as e:  # noqa: BLE001 - the report says what failed; the other run still runs
                traceback.print_exc()
                report[label] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:800]}"}
            save()
    print(markdown(report), flush=True)
    print(f"[scale-gpu] wrote {args.out / 'scale_gpu.json'} and {args.out / 'scale_gpu.md'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
