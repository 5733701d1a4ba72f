"""Ablation studies: a search space run as a resumable Optuna study of LoRA trials over one loaded base.

The only package that talks to Optuna (``export`` borrows only Optuna's fANOVA, on an in-memory study).
Below it the engine trains ``TrialSpec`` lists and knows nothing of Optuna; tracking is a ``Tracker``
handed in (a no-op one with tracking off).

Scheduling is by params, from what the storage holds. Each trial's grid cell and seed is claimed in the
storage's database (``claims``: a unique key, so any number of workers on any machines train each cell once)
and its trial created RUNNING with those params; TPE (multivariate, constant liar) then draws the sampled
axes, and the other seeds of a sampled configuration are planned with its full params. So, per
(configuration, seed):

- a COMPLETE or PRUNED trial means done: it is never trained again, whatever invocation or worker ran it;
- a WAITING or RUNNING one is left to whoever holds it (another worker, or a retry queued by the heartbeat);
- FAILED only: trained again on the next invocation (``study.retry_failed=false`` makes a failure final).

Pure grids do not use Optuna's GridSampler: it tracks cells by grid id and by the identity of the whole
search space, so it counts a failed cell as visited (never retried), forgets every finished cell when
``--seeds`` changes, and a failed cell retried through ``enqueue_trial`` raises ``KeyError('grid_id')`` in
its ``after_trial`` once one cell is left (optuna 5.0). With every trial's params fixed, a grid never consults the
sampler at all.

Trials are told one by one as they finish; with ``--pack K`` a finished, failed or pruned trial leaves the
pack and the next trial asked takes its slot.

The package, one module a part:
  ``settings``   the objective, name, storage URL, seeds and shared settings of a study; input checks
  ``schedule``   which (configuration, seed) trials the space still needs, from the storage: resume
  ``storage``    the Optuna storage and study (created, or loaded and checked), sampler, pruner
  ``heartbeat``  heartbeats of the trials in flight and the parent run; dead workers' trials failed and queued
                 again, their runs closed (docs/reliability.md)
  ``claims``     which worker creates a planned trial: a claim row per (study, params, attempt)
  ``workers``    a worker's settings from the storage alone (``worker``), and the live workers (``status``)
  ``trials``     one trial between ask and tell: params, config key, tracking and pruning hooks
  ``runner``     the ask/tell loop: packs, refilled slots, each trial told as it finishes
  ``outcomes``   outcomes, the invocation's report, the printed progress and the parent run's summary
  ``status``     every study in a storage with its trials (``status``)
"""

from lora_ablate.study.heartbeat import GRACE_S, HEARTBEAT_S, STALE_RETRIES
from lora_ablate.study.outcomes import StudyReport, TrialOutcome
from lora_ablate.study.runner import StudyRunner, run_study
from lora_ablate.study.schedule import Plan, plan
from lora_ablate.study.settings import (
                                        METRIC_DIRECTIONS,
                                        Objective,
                                        base_config,
                                        check_study,
                                        eval_set_name,
                                        objective_of,
                                        seeds_of,
                                        storage_url,
                                        study_name,
)
from lora_ablate.study.status import StudyStatus, study_status
from lora_ablate.study.storage import open_storage
from lora_ablate.study.trials import config_key

__all__ = ["GRACE_S", "HEARTBEAT_S", "METRIC_DIRECTIONS", "STALE_RETRIES", "Objective", "Plan", "StudyReport",
           "StudyRunner", "StudyStatus", "TrialOutcome", "base_config", "check_study", "config_key",
           "eval_set_name", "objective_of", "open_storage", "plan", "run_study", "seeds_of", "storage_url",
           "study_name", "study_status"]
