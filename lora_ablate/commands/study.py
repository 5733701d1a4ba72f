"""``study``, ``spaces`` and ``status``: ablation studies from the command line.

Every input check (space, config, objective, storage URL form) happens before the workspace is created,
so a bad command line leaves nothing behind.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lora_ablate.config import Experiment, StudyConfig, load_yaml, parse_override
from lora_ablate.errors import UserError
from lora_ablate.vocab import State, format_value
from lora_ablate.workspace import (
                                   ARTIFACTS,
                                   DEFAULT_WORKSPACE,
                                   MLFLOW_DB,
                                   OPTUNA_DB,
                                   artifact_root,
                                   check_answers,
                                   check_writable,
                                   local_path,
                                   mlflow_uri,
                                   optuna_db,
                                   redact,
)

if TYPE_CHECKING:
    from lora_ablate.spaces import Space
    from lora_ablate.study import StudyReport


def _space_arg(flag: str | None, config: Path | None, overrides: list[str]) -> str:
    """--space, else a study.space override, else the config file's study.space, else the default."""
    if flag:
        return flag
    for text in reversed(overrides):
        section, name, value = parse_override(text)
        if (section, name) == ("study", "space"):
            return str(value)
    raw = load_yaml(config) if config else {}
    return str((raw.get("study") or {}).get("space") or StudyConfig().space)


def study_setup(space: str | None = None, config: Path | None = None, overrides: list[str] = (),
                settings: dict[str, dict] | None = None) -> tuple[Space, Experiment]:
    """(space, base experiment) of a study command line; ``settings`` holds the flags, e.g.
    ``{"study": {"seeds": 3}}`` (None values are left out). Raises UserError; writes nothing."""
    from lora_ablate.spaces import load_space, study_experiment
    from lora_ablate.study import check_study

    overrides = list(overrides)
    name = _space_arg(space, config, overrides)
    sp = load_space(name)
    layers = {"study": {"space": name}}
    for section, values in (settings or {}).items():
        layers.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    exp = study_experiment(sp, config, overrides, layers)
    check_study(exp, sp)
    check_stores(exp)
    return sp, exp


def check_stores(exp: Experiment) -> None:
    """Every folder the study will write and the tracking server it will talk to, before the model loads."""
    ws, uri = exp.study.workspace, exp.tracking.uri
    tracking = exp.tracking.enabled
    if not exp.study.storage or (tracking and artifact_root(ws, uri) is not None):
        check_writable(ws, "study.workspace")
    local = local_path(exp.study.storage) if exp.study.storage.startswith("sqlite:///") else None
    if local is not None:
        check_writable(local.parent, "study.storage")
    if tracking and uri:
        if (local := local_path(uri)) is not None:
            check_writable(local.parent, "tracking.uri")
        check_answers(uri, "tracking.uri")


def study(space: str | None = None, config: Path | None = None, overrides: list[str] = (),
          settings: dict[str, dict] | None = None, progress: bool = True, workers: str | None = None):
    """Check everything, then run or resume the study (the workspace appears only once all checks passed);
    ``workers``: N local worker processes (or auto: one per GPU) train it instead of this one."""
    from lora_ablate.context import check_leakage
    from lora_ablate.study import run_study
    from lora_ablate.tracking import make_tracker

    sp, exp = study_setup(space, config, overrides, settings)
    leak = check_leakage(exp)  # before the workspace exists: a refused study leaves nothing behind
    if workers is not None:
        return _study_pool(sp, exp, workers, progress)
    with _sigterm_as_interrupt():  # run_study loads data and model before it creates a new study
        report = run_study(exp, sp, tracker=(tracker := make_tracker(exp)), progress=progress)
    if getattr(tracker, "parent_id", "") and leak.metrics:  # the study's parent run records leakage/<set>/*
        tracker.log_step(tracker.parent_id, 0, leak.metrics)
    print_report(report, exp)
    return report


def _study_pool(sp: Space, exp: Experiment, workers: str, progress: bool) -> int:
    """Create the study (so that its settings are in the storage), then let N ``worker`` processes train it.
    Config, space, stores, data and eval sets were checked by the caller; the model, and the space's targets
    and ranks on it, are checked here on the model's skeleton (each worker loads its own weights), so bad
    input fails once, here, before the study exists, not in every worker after it was created empty."""
    from lora_ablate.commands.pool import pool
    from lora_ablate.models import check_base
    from lora_ablate.study import objective_of, storage_url
    from lora_ablate.study.storage import load_or_create
    from lora_ablate.targets import check_targets

    if workers != "auto" and not (workers.isdigit() and int(workers) > 0):
        raise UserError(f"--workers {workers!r}: give a number of processes, or auto (one per visible GPU)")
    if exp.study.n_trials:
        raise UserError("--n-trials counts one process's trials; with --workers use --timeout, or let the "
                        "workers finish what the space needs")
    # the subsets and the largest rank the single-process study checks (StudyRunner._context), so both
    # refuse the same spaces
    check_targets(check_base(exp.model), sp.target_sets() or [exp.lora.targets], sp.largest_rank(exp),
                  exp.lora.fused_subset)
    study, _ = load_or_create(exp, sp, objective_of(exp))
    args = ["--study", study.study_name, "--storage", storage_url(exp), "--workspace", exp.study.workspace]
    if not exp.tracking.enabled:
        args.append("--no-tracking")
    else:
        args += ["--tracking-uri", exp.tracking.uri or mlflow_uri(exp.study.workspace)]
        if exp.tracking.artifact_root:
            args += ["--artifact-root", exp.tracking.artifact_root]
    if exp.study.pack != "auto":
        args += ["--pack", str(exp.study.pack)]
    if exp.study.timeout:
        args += ["--timeout", str(exp.study.timeout)]
    if not progress:
        args.append("--quiet")
    return pool(None if workers == "auto" else int(workers), args)


@contextmanager
def _sigterm_as_interrupt():
    """A scheduler's SIGTERM (preemption, `kill`) ends a study like Ctrl-C: the trials in flight are recorded
    as failed at once, instead of staying RUNNING until the heartbeat's grace period has passed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_report(report: StudyReport, exp: Experiment) -> None:
    from lora_ablate.study import GRACE_S

    ran = report.outcomes
    states = {}
    for o in ran:
        states[o.state] = states.get(o.state, 0) + 1
    this = ", ".join(f"{n} {s.lower()}" for s, n in states.items())
    whole = ", ".join(f"{n} {s.lower()}" for s, n in sorted(report.counts.items())) or "no trials"
    if ran:
        print(f"study {report.name}: this run {len(ran)} trial(s) ({this}); in all {whole}")
    else:
        print(f"study {report.name}: nothing to run; in all {whole}")
    if report.remaining:
        print(f"  {report.remaining} trial(s) still to run: run the same command again to resume")
    running = report.counts.get(State.RUNNING, 0)
    if running:
        print(f"  {running} trial(s) RUNNING elsewhere; a dead worker's trials fail after {GRACE_S} s without "
              "heartbeat and are trained again by the next run")
    if report.best:
        params = " ".join(f"{k}={format_value(v)}" for k, v in report.best["params"].items())
        print(f"  best: trial {report.best['number']} [{params}] {report.objective.name}={report.best['value']:.4f}")
    if report.objective.name in report.base:
        print(f"  base model: {report.objective.name}={report.base[report.objective.name]:.4f}")
    print(f"  optuna: {report.storage}   (optuna-dashboard {report.storage})")
    if exp.tracking.enabled:
        uri = redact(exp.tracking.uri or mlflow_uri(exp.study.workspace))
        hint = f"python -m lora_ablate ui --workspace {exp.study.workspace}" if not exp.tracking.uri else uri
        print(f"  mlflow: {uri}   ({hint})")


def list_spaces() -> list:
    """Every shipped space, printed one per line: name, kind, trials per seed, description."""
    from lora_ablate.spaces import load_space, space_names

    out = []
    for name in space_names():
        try:
            sp = load_space(name)
        except UserError as e:
            print(f"{name:<16} invalid: {e}")
            continue
        out.append(sp)
        kind = {"grid": "grid", "sampled": "TPE", "mixed": "grid+TPE"}[sp.kind]
        print(f"{name:<16} {kind:<9} {sp.configurations():>4} per seed  {sp.description}")
        print(f"{'':<16} {sp.describe()}")
    return out


def _storage_for_status(workspace: Path, storage: str | None) -> str:
    if storage:
        return storage
    db = optuna_db(workspace)
    if not db.is_file():
        raise UserError(f"no Optuna storage at {str(db)!r}; run `python -m lora_ablate study` first, "
                        "or pass --workspace DIR / --storage URL")
    return f"sqlite:///{db}"


def status(workspace: Path = Path(DEFAULT_WORKSPACE), storage: str | None = None,
           study: str | None = None) -> list:
    """Print each study's trials: number, state, params, value (and why a trial failed)."""
    from lora_ablate.study import study_status

    studies = study_status(_storage_for_status(workspace, storage), study)
    if not studies:
        print("no studies")
    for s in studies:
        counts = {}
        for t in s.trials:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        print(f"study {s.name}  space {s.space or '?'}  objective {s.objective or '?'} ({s.direction})  "
              f"{len(s.trials)} trials: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        for w in s.workers:  # from the trials RUNNING now and their heartbeats
            beat = f"{w.last_beat:.0f} s ago" if w.last_beat is not None else "none yet"
            print(f"  worker {w.worker}: {len(w.running)} trial(s) in flight "
                  f"({', '.join(map(str, w.running))}), last heartbeat {beat}")
        names = list(dict.fromkeys(k for t in s.trials for k in t["params"]))
        header = f"{'trial':>6}  {'state':<9}{'value':>10}" + "".join(f"  {n:>10}" for n in names)
        print(header)
        for t in s.trials:
            value = f"{t['value']:.4f}" if t["value"] is not None else "-"
            cells = "".join(f"  {format_value(t['params'].get(n, '-')):>10}" for n in names)
            reason = f"  {t['reason']}" if t["reason"] else ""
            print(f"{t['number']:>6}  {t['state']:<9}{value:>10}{cells}{reason}")
    return studies


# ----------------------------------------------------------------------------- CLI


def _settings(args) -> dict[str, dict]:
    return {
        "study": {"seeds": args.seeds, "n_trials": args.n_trials, "timeout": args.timeout,
                  "workspace": str(args.workspace) if args.workspace else None, "storage": args.storage,
                  "name": args.study_name, "objective": args.objective, "pruner": args.pruner, "pack": args.pack},
        "tracking": {"uri": args.tracking_uri, "enabled": False if args.no_tracking else None,
                     "artifact_root": args.artifact_root},
    }


def cmd_study(args) -> int:
    out = study(args.space, args.config, args.overrides, _settings(args), progress=not args.quiet,
                workers=args.workers)
    return out if isinstance(out, int) else 0


def cmd_spaces(args) -> int:
    list_spaces()
    return 0


def cmd_status(args) -> int:
    status(args.workspace, args.storage, args.study)
    return 0


def register(sub) -> None:
    default_ws = Path(DEFAULT_WORKSPACE)
    s = sub.add_parser("study", help="run or resume an ablation study (Optuna) and record it (MLflow)",
                       description="Run or resume the study of a search space. The same command again resumes "
                                   "it: finished trials are never trained again.")
    s.add_argument("--space", help="search space: a name (python -m lora_ablate spaces) or a YAML file; default rank")
    s.add_argument("--config", type=Path, help="experiment YAML; its settings win over the space's fixed ones")
    s.add_argument("--seeds", type=int, help="repeat every configuration with N seeds (default 1)")
    s.add_argument("--n-trials", type=int, help="trials to run now (default: all the space still needs)")
    s.add_argument("--timeout", type=float, help="start no new trial after S seconds")
    s.add_argument("--workspace", type=Path,
                   help=f"folder of {OPTUNA_DB}, {MLFLOW_DB}, {ARTIFACTS}/ (default {default_ws})")
    s.add_argument("--storage", help=f"Optuna RDB URL instead of <workspace>/{OPTUNA_DB}")
    s.add_argument("--tracking-uri", help=f"MLflow tracking URI instead of <workspace>/{MLFLOW_DB}")
    s.add_argument("--study-name", help="study name (default <space>-<model>)")
    s.add_argument("--objective", help="held-out metric to optimise, <set>/<metric> (default heldout_instances/nll)")
    s.add_argument("--pruner", help="prune on intermediate held-out loss: none, median, hyperband (needs eval.every)")
    s.add_argument("--pack", help="trials per pass over the base: K, or auto (default: what fits on a GPU; 1 on a CPU)")
    s.add_argument("--artifact-root", help=f"folder for the study's artifacts (default <workspace>/{ARTIFACTS}/)")
    s.add_argument("--workers", help="train with N local worker processes (auto: one per visible GPU); more "
                                     "machines join with `python -m lora_ablate worker`")
    s.add_argument("--no-tracking", action="store_true", help="do not record in MLflow")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")
    s.set_defaults(fn=cmd_study)

    sp = sub.add_parser("spaces", help="list the search spaces")
    sp.set_defaults(fn=cmd_spaces)

    st = sub.add_parser("status", help="print each study's trials (state, params, value)")
    st.add_argument("--study", help="only this study")
    st.add_argument("--workspace", type=Path, default=default_ws, help=f"study workspace (default {default_ws})")
    st.add_argument("--storage", help=f"Optuna RDB URL instead of <workspace>/{OPTUNA_DB}")
    st.set_defaults(fn=cmd_status)
