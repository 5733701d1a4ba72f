"""``worker``: join an existing study from any machine (``pool`` starts several for ``study --workers N``).

A worker is a whole ``study`` invocation (its own base model, packs, heartbeats and MLflow parent run) whose
settings come from the study's storage. Workers share nothing but the stores: the Optuna storage decides
which worker trains which trial (claims.py), MLflow records them; any number may join or die at any time.
"""

from __future__ import annotations

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
