"""``python tests/fault_worker.py POINT N study ...``: ``python -m lora_ablate study ...`` that SIGKILLs itself
the N-th time it reaches POINT; the fault tests' dying worker (a real process, killed without a word). POINT
``stall:<point>`` hangs there instead, alive and beating: a slow live worker. POINT ``oom``: a step of a pack
of more than N trials that has already taken a step raises CUDA's out-of-memory error, as on a GPU that
another process has filled meanwhile."""

from __future__ import annotations

import os
import signal
import sys
import time


def _dies_on(owner, name: str, n: int, stall: bool) -> None:
    real = getattr(owner, name)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if stall:
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, dying)


def _oom_above(n: int) -> None:
    import torch

    from lora_ablate.packed.pack import Pack

    real = Pack.step

    def step(pack):
        if len(pack.slots) > n and max(s.done for s in pack.slots) >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(pack)

    Pack.step = step


def main() -> int:
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    stall = point.startswith("stall:")
    point = point.removeprefix("stall:")
    from mlflow import MlflowClient

    from lora_ablate.cli import main as cli
    from lora_ablate.evaluation import Evaluator
    from lora_ablate.study.trials import Hooks

    if point == "oom":
        _oom_above(n)
        return cli(argv)
    owner, name = {"train": (Hooks, "on_train_log"),  # mid-training
                   "final_eval": (Evaluator, "run"),  # a trial's final held-out evaluation
                   "artifacts": (MlflowClient, "log_artifacts"),  # MLflow has the metrics; Optuna not told yet
                   "terminate": (MlflowClient, "set_terminated"),  # Optuna told; the run not ended yet
                   }[point]
    _dies_on(owner, name, n, stall)
    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
