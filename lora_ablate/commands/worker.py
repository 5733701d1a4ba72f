"""``worker``: join an existing study from any machine, and the local pool that ``study --workers N`` starts.

A worker is a whole ``study`` invocation (its own base model, packs, heartbeats and MLflow parent run) whose
settings come from the study's storage. Workers share nothing but the stores: the Optuna storage decides
which worker trains which trial (claims.py), MLflow records them; any number may join or die at any time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lora_ablate.errors import UserError
from lora_ablate.workspace import DEFAULT_WORKSPACE, MLFLOW_DB, OPTUNA_DB, optuna_url


def worker(study: str, storage: str | None = None, workspace: Path | None = None, tracking_uri: str | None = None,
           artifact_root: str | None = None, tracking: bool = True, pack: str | None = None,
           timeout: float | None = None, n_trials: int | None = None, progress: bool = True):
    """Train the study's remaining trials until none is left anywhere (trials other workers hold included:
    if their worker dies, its trials are queued again and this worker takes them)."""
    from lora_ablate.commands.study import _sigterm_as_interrupt, print_report
    from lora_ablate.study import run_study
    from lora_ablate.study.workers import joined_setup
    from lora_ablate.tracking import make_tracker

    ws = str(workspace or DEFAULT_WORKSPACE)
    url = storage or optuna_url(ws)
    if not storage and not Path(url[len("sqlite:///"):]).is_file():
        raise UserError(f"no Optuna storage at {url!r}; pass --storage URL (the study's database)")
    sp, exp = joined_setup(url, study, {"workspace": ws, "pack": pack, "timeout": timeout, "n_trials": n_trials},
                           {"uri": tracking_uri, "artifact_root": artifact_root,
                            "enabled": None if tracking else False})
    with _sigterm_as_interrupt():
        report = run_study(exp, sp, tracker=make_tracker(exp), progress=progress, wait=True)
    print_report(report, exp)
    return report


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES entries (none on a CPU machine)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def pool_env(i: int, n: int, gpus: list[str]) -> dict[str, str]:
    """Worker ``i`` of ``n``: pinned to one GPU (round robin, so N > GPUs shares them), or on a CPU a share
    of the cores (N processes each using every core would only fight)."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def pool(n: int | None, worker_args: list[str]) -> int:
    """Start ``n`` local workers (None: one per visible GPU, or one on a CPU) and wait for all of them. A
    Ctrl-C or SIGTERM is passed on: each worker records its trials in flight as interrupted."""
    gpus = visible_gpus()
    n = n or max(1, len(gpus))
    procs = [subprocess.Popen([sys.executable, "-m", "lora_ablate", "worker", *worker_args], env=pool_env(i, n, gpus))
             for i in range(n)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = []
        for p in procs:
            while True:
                try:
                    codes.append(p.wait())
                    break
                except KeyboardInterrupt:
                    forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    bad = [c for c in codes if c]
    print(f"{n} worker(s) done" + (f"; exit codes {codes}" if bad else ""))
    return 1 if bad else 0


# ----------------------------------------------------------------------------- CLI


def cmd_worker(args) -> int:
    worker(args.study, args.storage, args.workspace, args.tracking_uri, args.artifact_root, not args.no_tracking,
           args.pack, args.timeout, args.n_trials, progress=not args.quiet)
    return 0


def register(sub) -> None:
    w = sub.add_parser("worker", help="join an existing study and train its trials (any machine, one per GPU)",
                       description="Join a study that `python -m lora_ablate study` created: its settings come "
                                   "from the storage. Stops when no trial of the study is left to train or "
                                   "running anywhere.")
    w.add_argument("--study", required=True, help="the study's name (python -m lora_ablate status --storage URL)")
    w.add_argument("--storage", help=f"the study's Optuna RDB URL (default <workspace>/{OPTUNA_DB})")
    w.add_argument("--tracking-uri", help=f"MLflow tracking URI (default <workspace>/{MLFLOW_DB})")
    w.add_argument("--artifact-root", help="folder for new experiments' artifacts (shared by the workers)")
    w.add_argument("--workspace", type=Path, help=f"local folder for default stores (default {DEFAULT_WORKSPACE})")
    w.add_argument("--pack", help="trials per pass over the base: K, or auto (default)")
    w.add_argument("--timeout", type=float, help="start no new trial after S seconds")
    w.add_argument("--n-trials", type=int, help="train at most N trials in this worker")
    w.add_argument("--no-tracking", action="store_true", help="do not record in MLflow")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(fn=cmd_worker)
