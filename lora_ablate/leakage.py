"""Train/held-out overlap: which held-out examples also occur in the training data, exactly or nearly.

A held-out score means nothing when the adapter was trained on the same prompts, so every ``train`` and
``study`` checks its data before the model loads and refuses to start when a set's overlap is above
``data.max_leakage``. Two kinds are counted per held-out example:

- exact: the normalised prompt (instruction + input), or a reference of at least ``N`` words, equals one
  in the training data;
- near: the Jaccard similarity of normalised word ``N``-grams with a training text is >= ``NEAR``. It is
  measured on the example's content (its input when it has one, else its prompt) and on long references;
  a templated task's shared instruction would otherwise make every instance look like a near-duplicate
  of every other.

The held-out side is small, so it is the side that is indexed (exact form and n-gram -> example ids); the
training data is streamed once, each text costing one pass over its n-grams.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

from lora_ablate.errors import UserError

N = 8
NEAR = 0.5
_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SHOWN = 10  # examples printed per set; all of them go to the run's leakage.jsonl


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def shingles(norm: str, n: int = N) -> set[tuple[str, ...]]:
    words = norm.split()
    return set(zip(*(words[k:] for k in range(n)))) if len(words) >= n else set()


def _texts(ex, n: int) -> tuple[str, str, str]:
    """(exact prompt key, near-duplicate content, reference key or '' when too short to say anything)."""
    prompt = normalize(f"{ex.instruction} {ex.input}")
    content = normalize(ex.input) if ex.input.strip() else prompt
    ref = normalize(ex.output)
    return prompt, content, ref if len(ref.split()) >= n else ""


class Index:
    """Texts by exact form and by n-gram, for one-pass lookup of another text's exact and near matches."""

    def __init__(self, n: int = N):
        self.n = n
        self.exact: dict[str, list[int]] = {}
        self.grams: dict[tuple, list[int]] = {}
        self.sizes: dict[int, int] = {}

    def add(self, key: int, norm: str, exact: bool = True) -> None:
        if not norm:
            return
        if exact:
            self.exact.setdefault(norm, []).append(key)
        grams = shingles(norm, self.n)
        if grams:
            self.sizes[key] = len(grams)
            for g in grams:
                self.grams.setdefault(g, []).append(key)

    def exact_hits(self, norm: str) -> list[int]:
        return self.exact.get(norm, []) if norm else []

    def near_hits(self, norm: str, threshold: float = NEAR) -> dict[int, float]:
        grams = shingles(norm, self.n)
        if not grams:
            return {}
        counts = Counter(k for g in grams for k in self.grams.get(g, ()))
        out = {}
        for k, c in counts.items():
            j = c / (len(grams) + self.sizes[k] - c)
            if j >= threshold:
                out[k] = j
        return out


@dataclass
class SetOverlap:
    name: str
    n: int
    rows: list[dict] = field(default_factory=list)  # one per leaked held-out example: its first match

    @property
    def exact(self) -> int:
        return sum(r["kind"] == "exact" for r in self.rows)

    @property
    def near(self) -> int:
        return sum(r["kind"] == "near" for r in self.rows)

    @property
    def fraction(self) -> float:
        return len(self.rows) / self.n if self.n else 0.0


def matches(train, heldout, n: int = N, threshold: float = NEAR):
    """Every (held-out index, train index, kind, field, jaccard) match, streaming ``train`` once."""
    prompts, contents, refs = Index(n), Index(n), Index(n)
    for i, ex in enumerate(heldout):
        p, c, r = _texts(ex, n)
        prompts.add(i, p)
        contents.add(i, c, exact=False)
        refs.add(i, r)
    for t, ex in enumerate(train):
        p, c, r = _texts(ex, n)
        for i in prompts.exact_hits(p):
            yield i, t, "exact", "prompt", 1.0
        for i in refs.exact_hits(r):
            yield i, t, "exact", "reference", 1.0
        for i, j in contents.near_hits(c, threshold).items():
            yield i, t, "near", "prompt", j
        for i, j in refs.near_hits(r, threshold).items():
            yield i, t, "near", "reference", j


def overlap(train, heldout, name: str = "", n: int = N, threshold: float = NEAR) -> SetOverlap:
    """The held-out examples of ``heldout`` that also occur in ``train`` (both iterables of ``Example``), each
    with its first match (an exact one if there is any)."""
    heldout = list(heldout)
    found: dict[int, dict] = {}
    for i, t, kind, what, j in matches(train, heldout, n, threshold):
        old = found.get(i)
        if old is None or (old["kind"] == "near" and kind == "exact"):
            found[i] = {"set": name, "idx": i, "kind": kind, "field": what, "train_idx": t,
                        "jaccard": round(j, 4), "prompt": heldout[i].instruction[:200]}
    return SetOverlap(name, len(heldout), [found[i] for i in sorted(found)])


@dataclass
class Leakage:
    sets: list[SetOverlap]

    @property
    def metrics(self) -> dict[str, float]:
        """Flat numbers for a tracker: ``leakage/<set>/{exact,near,fraction}``."""
        out = {}
        for s in self.sets:
            out.update({f"leakage/{s.name}/exact": float(s.exact), f"leakage/{s.name}/near": float(s.near),
                        f"leakage/{s.name}/fraction": s.fraction})
        return out

    @property
    def summary(self) -> dict[str, dict]:
        return {s.name: {"n": s.n, "exact": s.exact, "near": s.near, "fraction": s.fraction} for s in self.sets}

    @property
    def rows(self) -> list[dict]:
        return [r for s in self.sets for r in s.rows]


def check(train, sets, max_leakage: float, echo=print) -> Leakage:
    """Overlap of every set that is meant to be held out; raises above ``max_leakage`` (1 = never)."""
    result = Leakage([overlap(train, s.examples, s.name) for s in sets if s.leakage == "check"])
    for s in result.sets:
        if not s.rows:
            continue
        echo(f"leakage: {s.name}: {len(s.rows)}/{s.n} held-out examples occur in the training data "
             f"({s.exact} exact, {s.near} near-duplicate)")
        for r in s.rows[:_SHOWN]:
            echo(f"  {s.name}[{r['idx']}] {r['kind']} {r['field']} = train[{r['train_idx']}]"
                 f" (jaccard {r['jaccard']:.2f}): {r['prompt'][:80]!r}")
        if len(s.rows) > _SHOWN:
            echo(f"  ... {len(s.rows) - _SHOWN} more")
    worst = max(result.sets, key=lambda s: s.fraction, default=None)
    if worst is not None and worst.fraction > max_leakage:
        raise UserError(f"held-out set {worst.name!r}: {worst.fraction:.1%} of its {worst.n} examples occur in the "
                        f"training data ({worst.exact} exact, {worst.near} near-duplicate), above data.max_leakage="
                        f"{max_leakage:g}; fix the split, or set data.max_leakage=1 to go on")
    return result
