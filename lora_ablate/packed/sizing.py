"""How many trials go in a pack: measured from free GPU memory with probe packs, or a fixed few on a CPU."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lora_ablate.data import Encoded
from lora_ablate.models import LoadedModel
from lora_ablate.packed.train import train_packed
from lora_ablate.trial import TrialSpec

MAX_PACK = 32  # measured on an H200: aggregate tokens/s flattens between 16 and 32 (docs/benchmarks.md)
CPU_PACK = 4  # auto on a CPU: time, not memory, is the limit there, and gains flatten after a few trials


def auto_pack_size(base: LoadedModel, specs_example: TrialSpec | Sequence[TrialSpec], data: Encoded, *,
                   limit: int = MAX_PACK, headroom: float = 0.6) -> int:
    """How many trials like ``specs_example`` fit on the GPU together, measured rather than guessed.

    One training step of a probe pack of 1 and of 3 copies of the most demanding trial (largest rank,
    all targets, largest batch, on the longest training examples) gives the memory per trial and the
    fixed part; the pack is then as large as the free memory (times ``headroom``) allows, at most
    ``limit``. The headroom is generous because the probe cannot see allocator fragmentation: at 0.9
    an H200 ran out of memory with 20 GiB reserved but unallocated. Evaluation is grouped so that it never holds more rows than a training step. On a CPU
    there is no memory to size from and packing gains little beyond a few trials: ``CPU_PACK``.
    """
    specs = [specs_example] if isinstance(specs_example, TrialSpec) else list(specs_example)
    if base.device.type != "cuda":
        return max(1, min(limit, CPU_PACK))
    probe = _probe_spec(specs)
    rows = _longest(data, probe.train.batch_size)
    peaks = {k: _probe_peak(base, probe, rows, k) for k in (1, 3)}
    per_trial = (peaks[3] - peaks[1]) / 2
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(base.device)
    return fit_pack(free * headroom, peaks[1] - per_trial, per_trial, limit)


def fit_pack(budget: float, fixed: float, per_trial: float, limit: int) -> int:
    """The largest K in [1, limit] with fixed + K * per_trial <= budget (bytes)."""
    if per_trial <= 0:
        return limit
    return max(1, min(limit, int((budget - max(0.0, fixed)) // per_trial)))


def _probe_spec(specs: list[TrialSpec]) -> TrialSpec:
    first = specs[0]
    targets = tuple({t for s in specs for t in s.lora.targets})
    lora = dataclasses.replace(first.lora, r=max(s.lora.r for s in specs), targets=targets,
                               dropout=max(s.lora.dropout for s in specs))
    train = dataclasses.replace(first.train, steps=1, log_every=1, grad_accum=1,
                                batch_size=max(s.train.batch_size for s in specs),
                                gradient_checkpointing=all(s.train.gradient_checkpointing for s in specs))
    return TrialSpec(lora, train, name="probe")


def _longest(data: Encoded, n: int) -> Encoded:
    idx = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))[:n]
    return Encoded([data.input_ids[i] for i in idx], [data.labels[i] for i in idx])


def _probe_peak(base: LoadedModel, spec: TrialSpec, data: Encoded, k: int) -> int:
    """Peak bytes one step of a pack of ``k`` copies of ``spec`` adds to what is allocated now."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(base.device)
    torch.cuda.reset_peak_memory_stats(base.device)
    train_packed(base, [spec] * k, data, None, progress=False)
    return torch.cuda.max_memory_allocated(base.device) - before
