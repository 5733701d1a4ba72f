"""Scheduling and resume: which (configuration, seed) trials the space still needs, read from the trials
the storage holds. By params, never by trial number, so any invocation or worker may have run a trial.

Per (configuration, seed), by precedence: a DONE trial (COMPLETE, PRUNED) beats a BUSY one (WAITING,
RUNNING: left to whoever holds it) beats one that failed in this invocation (SETTLED: retried by the next
invocation, not in a loop by this one) beats an older failure (FAILED: trained again unless
``study.retry_failed=false``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lora_ablate.spaces import Space

FAILED, SETTLED, BUSY, DONE = "failed", "settled", "busy", "done"
PRECEDENCE = (FAILED, SETTLED, BUSY, DONE)


def params_of(t) -> dict:
    """Params of a trial, including the ones only enqueued so far (a WAITING trial has no params yet)."""
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def key_of(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class Plan:
    todo: list[dict]  # params to enqueue, in order: full (cell x seed, a retry, a known config's other seed)
    #                   or partial (a grid cell and the first seed: TPE samples the rest)
    remaining: int  # trials the space still needs, counting every seed of configurations not yet sampled
    extra: dict | None  # a new sample beyond the space's budget (None for a pure grid)
    counts: dict


def plan(space: Space, seeds: list[int], trials, retry_failed: bool, settled: frozenset[int] = frozenset()) -> Plan:
    """What the space still needs, given the study's ``trials``; ``settled``: numbers of trials that failed in
    this invocation."""
    from optuna.trial import TrialState

    names = [a.name for a in space.axes]
    grid_names = [a.name for a in space.grid_axes]
    cells = space.cells()
    cell_keys = [key_of(c) for c in cells]
    status: dict[tuple[str, int], str] = {}
    configs: dict[str, dict[str, dict]] = {k: {} for k in cell_keys}  # cell -> config key -> config
    partial_busy = {k: 0 for k in cell_keys}
    counts: dict[str, int] = {}
    if space.kind == "grid":
        for c, k in zip(cells, cell_keys):
            configs[k][k] = c
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        p = params_of(t)
        cell = key_of({n: p.get(n) for n in grid_names})
        if cell not in configs or "seed" not in p:
            continue  # a cell this version of the space no longer has
        state = (DONE if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                 else BUSY if t.state in (TrialState.WAITING, TrialState.RUNNING)
                 else SETTLED if t.number in settled else FAILED)
        if not all(n in p for n in names):
            partial_busy[cell] += state == BUSY  # a new sample whose sampled axes are not drawn yet
            continue
        config = {n: p[n] for n in names}
        ck = key_of(config)
        configs[cell].setdefault(ck, config)
        prev = status.get((ck, p["seed"]))
        if prev is None or PRECEDENCE.index(state) > PRECEDENCE.index(prev):
            status[(ck, p["seed"])] = state

    todo, partial_siblings = [], 0
    for seed in seeds:  # seed-major: a timeout or interrupt leaves the first seed complete across the grid
        for cell in cell_keys:
            for ck, config in configs[cell].items():
                s = status.get((ck, seed))
                if s is None or (s == FAILED and retry_failed):
                    todo.append({**config, "seed": seed})
    new: list[dict] = []
    if space.kind != "grid":
        missing = {k: space.samples - len(configs[k]) - partial_busy[k] for k in cell_keys}
        for i in range(max(missing.values(), default=0)):  # round-robin over cells
            new += [{**c, "seed": seeds[0]} for c, k in zip(cells, cell_keys) if missing[k] > i]
        partial_siblings = sum(partial_busy.values()) * (len(seeds) - 1)
    extra = None
    if space.kind != "grid":
        fewest = min(zip(cells, cell_keys), key=lambda ck: len(configs[ck[1]]) + partial_busy[ck[1]])[0]
        extra = {**fewest, "seed": seeds[0]}
    # WAITING trials (a stale trial queued again, an enqueue whose worker died) are asked first
    remaining = len(todo) + len(new) * len(seeds) + partial_siblings + counts.get("WAITING", 0)
    return Plan(todo + new, remaining, extra, counts)
