"""The local pool of ``worker`` processes that ``study --workers N`` starts: one per GPU, pinned, or N sharing
a GPU or the CPU. Not a scheduler: the workers share the study through its stores alone (see worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


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
