"""Held-out splits of a real record pool, defined as data: ``evals/splits/<name>.yaml``.

A split groups the pool's rows by a field (e.g. a T0 template name) mapped to a task by a rule: the
longest listed prefix it equals or starts with followed by ``_`` (``prefixes``), or a regex whose first
group (else whole match) is the task (``pattern``). Whole tasks go to ``heldout_tasks``; the other tasks'
rows, shuffled, give ``heldout_instances`` first and ``train`` from the rest, so the held-out sets do not
depend on how much of train a run uses. ``dedupe`` then drops the train rows that repeat a held-out
example (of either part) by the leakage check's own rules (``leakage.leaking_train``): ``exact``, ``near`` (exact or
near-duplicate, the default) or ``passage`` (also a passage shared through another template), so that
the check before a run finds nothing of that kind.

Used as a source: ``data.train=split:t0_by_source:train``, ``eval.sets=[split:t0_by_source:heldout_tasks]``.
Deterministic for (the split file, ``data.seed``): the run's config names both, so the run records it.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lora_ablate.errors import UserError, choices
from lora_ablate.leakage import leaking_train

PARTS = ("train", "heldout_instances", "heldout_tasks")
DEDUPE = {"none": (), "exact": ("exact",), "near": ("exact", "near"), "passage": ("exact", "near", "passage")}


@dataclass(frozen=True)
class Split:
    name: str
    pool: Path
    field_items: tuple[tuple[str, str], ...]  # the field mapping, as items so that a Split can key a cache
    group_by: str
    prefixes: tuple[str, ...] = ()
    pattern: str = ""
    heldout_tasks: tuple[str, ...] | int = 4
    sizes: tuple[tuple[str, int], ...] = ()  # (part, rows); train: all rows left unless given
    seed: int = 0
    dedupe: str = "near"
    description: str = ""

    @property
    def fields(self) -> dict:
        return dict(self.field_items)

    def size(self, part: str) -> int:
        return dict(self.sizes).get(part, 0)

    def group_of(self, value: str) -> str:
        """The task a row belongs to; a value no rule matches is an error, so new data is never mis-grouped
        (a longest common prefix would merge wiki_qa, wiki_bio and wiki_hop)."""
        if self.pattern:
            m = re.search(self.pattern, value)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        else:
            hits = [p for p in self.prefixes if value == p or value.startswith(p + "_")]
            if hits:
                return max(hits, key=len)
        raise UserError(f"split {self.name!r}: {self.group_by}={value!r} matches no task rule; add its task to "
                        f"the split's {'pattern' if self.pattern else 'prefixes'}")


def splits_dir() -> Path:
    from lora_ablate.suite import evals_dir

    return evals_dir() / "splits"


def split_names() -> list[str]:
    return sorted(p.stem for p in splits_dir().glob("*.yaml"))


def load_split(ref: str) -> Split:
    """A split by name (``evals/splits/<name>.yaml``) or by the path of its YAML file."""
    from lora_ablate.config import read_mapping
    from lora_ablate.suite import evals_dir

    path = splits_dir() / f"{ref}.yaml"
    path = path if path.is_file() else Path(ref)
    if not path.is_file():
        raise UserError(f"unknown split {ref!r}; choose one of: {choices(split_names()) or '(none)'}, or a split "
                        "YAML file")
    raw = read_mapping(path, "split file", "a mapping (pool, group_by, prefixes or pattern, ...)")
    env = raw.get("pool_env")
    pool = os.environ.get(env) if env and os.environ.get(env) else str(raw.get("pool") or "")
    if not pool:
        raise UserError(f"split file {str(path)!r} names no pool")
    pool_path = Path(os.path.expandvars(pool)).expanduser()
    if not pool_path.is_absolute():
        pool_path = evals_dir().parent / pool_path  # like evals/sets: relative to the repository root
    held = raw.get("heldout_tasks", 4)
    if not raw.get("group_by") or bool(raw.get("prefixes")) == bool(raw.get("pattern")):
        raise UserError(f"split file {str(path)!r} needs group_by and exactly one of prefixes, pattern")
    sizes = raw.get("sizes") or {}
    bad = sorted(set(sizes) - set(PARTS))
    if bad:
        raise UserError(f"split file {str(path)!r}: sizes has unknown part(s) {bad}; parts: {choices(PARTS)}")
    dedupe = str(raw.get("dedupe", "near"))
    if dedupe not in DEDUPE:
        raise UserError(f"split file {str(path)!r}: dedupe={dedupe!r}; choose one of: {choices(DEDUPE)}")
    fields = tuple(sorted((str(k), str(v)) for k, v in (raw.get("fields") or {}).items()))
    return Split(name=str(raw.get("name") or path.stem), pool=pool_path.resolve(), field_items=fields,
                 group_by=str(raw["group_by"]), prefixes=tuple(str(p) for p in raw.get("prefixes") or ()),
                 pattern=str(raw.get("pattern") or ""),
                 heldout_tasks=int(held) if isinstance(held, int) else tuple(str(h) for h in held),
                 sizes=tuple((k, int(v)) for k, v in sizes.items()), seed=int(raw.get("seed", 0)), dedupe=dedupe,
                 description=" ".join(str(raw.get("description", "")).split()))


def pick_heldout(split: Split, tasks: list[str], rng: random.Random) -> list[str]:
    if isinstance(split.heldout_tasks, int):
        if not 0 < split.heldout_tasks < len(tasks):
            raise UserError(f"split {split.name!r}: heldout_tasks={split.heldout_tasks} of {len(tasks)} tasks")
        return sorted(rng.sample(tasks, split.heldout_tasks))
    unknown = sorted(set(split.heldout_tasks) - set(tasks))
    if unknown:
        raise UserError(f"split {split.name!r}: heldout_tasks {unknown} not in the pool; tasks: {choices(tasks)}")
    return sorted(split.heldout_tasks)


_PARTITIONS: dict[tuple, dict] = {}  # (split, seed) -> parts: the pool is read once a process


def partition(split: Split, seed: int, read) -> dict[str, list[dict]]:
    """``{part: rows}`` plus ``"_info"`` (one row: held-out tasks, rows dropped as duplicates).

    ``read(split)`` gives the pool as ``[(row, Example or None when the loader would refuse the row)]``;
    the data layer passes it in, so this module stays below it.
    """
    if (split, seed) not in _PARTITIONS:
        _PARTITIONS[(split, seed)] = _partition(split, seed, read(split))
    return _PARTITIONS[(split, seed)]


def _partition(split: Split, seed: int, pool: list) -> dict[str, list[dict]]:
    rows = [row for row, _ in pool]
    examples = {i: e for i, (_, e) in enumerate(pool) if e is not None}
    by_task: dict[str, list[int]] = {}
    for i in examples:
        by_task.setdefault(split.group_of(str(rows[i].get(split.group_by) or "")), []).append(i)
    rng = random.Random(f"split:{split.name}:{split.seed}:{seed}")
    held = pick_heldout(split, sorted(by_task), rng)
    trained = [i for t in sorted(by_task) if t not in held for i in by_task[t]]
    tasks = [i for t in held for i in by_task[t]]
    rng.shuffle(trained)
    rng.shuffle(tasks)
    n_inst = split.size("heldout_instances") or 200
    instances, rest = trained[:n_inst], trained[n_inst:]
    tasks = tasks[:split.size("heldout_tasks") or 200]
    kinds = DEDUPE[split.dedupe]
    held_out = [examples[i] for i in instances + tasks]
    leaked = leaking_train([examples[i] for i in rest], held_out, kinds) if kinds else set()
    train = [i for k, i in enumerate(rest) if k not in leaked]
    n_train = split.size("train")
    parts = {"train": train[:n_train] if n_train else train, "heldout_instances": instances, "heldout_tasks": tasks}
    out = {p: [rows[i] for i in idx] for p, idx in parts.items()}
    out["_info"] = [{"heldout_tasks": held, "dedupe": split.dedupe, "dropped_duplicates": len(leaked),
                     **{f"{p}_rows": len(idx) for p, idx in parts.items()}}]
    return out


def split_rows(source: str, seed: int, read) -> tuple[list[dict], dict]:
    """The rows and field mapping of ``split:<split>:<part>`` (``read`` as for :func:`partition`)."""
    body = source[len("split:"):]
    ref, _, part = body.rpartition(":")
    if not ref or part not in PARTS:
        raise UserError(f"data source {source!r} is not valid; write split:<split>:<part> with part one of: "
                        f"{choices(PARTS)}")
    split = load_split(ref)
    return partition(split, seed, read)[part], split.fields
