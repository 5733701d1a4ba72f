"""Train/held-out overlap: which held-out examples also occur in the training data, exactly or nearly.

A held-out score means nothing when the adapter was trained on the same prompts, so every ``train`` and
``study`` checks its data before the model loads and refuses to start when a set's overlap is above
``data.max_leakage``. Three kinds are counted per held-out example:

- exact: the normalised prompt (instruction + input), or a reference of at least ``N`` words, equals one
  in the training data;
- near: the Jaccard similarity of normalised word ``N``-grams with a training text is >= ``NEAR``. It is
  measured on the example's content (its input when it has one, else its prompt) and on long references;
  a templated task's shared instruction would otherwise make every instance look like a near-duplicate
  of every other.
- passage: the example's content shares a passage with a training text of another template (``family``:
  T0's template name; T0 renders one passage through many templates): at least ``PASSAGE_MIN`` of their
  content ``N``-grams, and at least ``NEAR`` of the smaller side's, are shared. Jaccard misses these,
  because each template adds its own words; within one template the template's own words would make
  every pair look alike, and a same-template repeat is a near-duplicate anyway. Records without a family
  (plain files) are all of one, so this rule never fires for them.

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
PASSAGE_MIN = 2  # shared n-grams: one shared 8-gram alone is too weak a sign of a passage
KINDS = ("exact", "near", "passage")
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
    content = normalize(ex.input) if ex.input.strip() else prompt  # the same string: normalised once
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
        out = {}
        for k, c in self.shared(grams).items():
            if (j := c / (len(grams) + self.sizes[k] - c)) >= threshold:
                out[k] = j
        return out

    def shared(self, grams: set) -> Counter:
        """How many of ``grams`` each indexed text has (only those with any)."""
        return Counter(k for g in grams & self.grams.keys() for k in self.grams[g])


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
    def passage(self) -> int:
        return sum(r["kind"] == "passage" for r in self.rows)

    def describe(self) -> str:
        return f"{self.exact} exact, {self.near} near-duplicate, {self.passage} sharing a passage"

    @property
    def fraction(self) -> float:
        return len(self.rows) / self.n if self.n else 0.0


def matches(train, heldout, n: int = N, threshold: float = NEAR):
    """Every (held-out index, train index, kind, field, score) match, reading ``train`` once: kind exact,
    near (score: Jaccard) or passage (score: the shared fraction of the smaller side's n-grams)."""
    heldout = list(heldout)
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
        for i, j in refs.near_hits(r, threshold).items():
            yield i, t, "near", "reference", j
        grams = shingles(c, n)
        for i, shared in contents.shared(grams).items():
            size = contents.sizes[i]
            if (j := shared / (len(grams) + size - shared)) >= threshold:
                yield i, t, "near", "prompt", j
            elif (shared >= PASSAGE_MIN and shared / min(len(grams), size) >= threshold
                  and ex.family != heldout[i].family):
                yield i, t, "passage", "prompt", shared / min(len(grams), size)


def leaking_train(train, heldout, kinds=KINDS, n: int = N, threshold: float = NEAR) -> set[int]:
    """The indices of ``train`` whose rows :func:`matches` pairs with a held-out example by one of ``kinds``.

    Every rule compares one pair of texts, never counts over the data, so the check of any subset of the
    rows left (a smaller ``data.train_size`` or ``eval.size``) finds none of those kinds either."""
    return {t for _, t, kind, *_ in matches(train, heldout, n, threshold) if kind in kinds}


def overlap(train, heldout, name: str = "", n: int = N, threshold: float = NEAR) -> SetOverlap:
    """The held-out examples of ``heldout`` that also occur in ``train`` (both iterables of ``Example``), each
    with its strongest match (exact before near before passage; ``score`` is the Jaccard similarity, or for
    a passage the shared fraction of distinctive n-grams)."""
    return overlaps(train, [(name, list(heldout))], n, threshold)[0]


def overlaps(train, sets, n: int = N, threshold: float = NEAR) -> list[SetOverlap]:
    """:func:`overlap` of each ``(name, examples)`` in ``sets``, reading ``train`` once for all of them."""
    held = [(name, k, ex) for name, examples in sets for k, ex in enumerate(examples)]
    found: dict[int, dict] = {}
    for i, t, kind, what, j in matches(train, [ex for *_, ex in held], n, threshold):
        old = found.get(i)
        if old is None or KINDS.index(kind) < KINDS.index(old["kind"]):
            name, k, ex = held[i]
            found[i] = {"set": name, "idx": k, "kind": kind, "field": what, "train_idx": t,
                        "score": round(j, 4), "prompt": ex.instruction[:200]}
    rows = [found[i] for i in sorted(found)]
    return [SetOverlap(name, len(examples), [r for r in rows if r["set"] == name]) for name, examples in sets]


@dataclass
class Leakage:
    sets: list[SetOverlap]

    @property
    def metrics(self) -> dict[str, float]:
        """Flat numbers for a tracker: ``leakage/<set>/{exact,near,passage,fraction}``."""
        return {f"leakage/{name}/{k}": float(v) for name, row in self.summary.items() for k, v in row.items()
                if k != "n"}

    @property
    def summary(self) -> dict[str, dict]:
        return {s.name: {"n": s.n, "exact": s.exact, "near": s.near, "passage": s.passage, "fraction": s.fraction}
                for s in self.sets}

    @property
    def rows(self) -> list[dict]:
        return [r for s in self.sets for r in s.rows]


def check(train, sets, max_leakage: float, echo=print) -> Leakage:
    """Overlap of every set that is meant to be held out; raises above ``max_leakage`` (1 = never)."""
    result = Leakage(overlaps(train, [(s.name, s.examples) for s in sets if s.leakage == "check"]))
    for s in result.sets:
        if not s.rows:
            continue
        echo(f"leakage: {s.name}: {len(s.rows)}/{s.n} held-out examples occur in the training data "
             f"({s.describe()})")
        for r in s.rows[:_SHOWN]:
            echo(f"  {s.name}[{r['idx']}] {r['kind']} {r['field']} = train[{r['train_idx']}]"
                 f" (score {r['score']:.2f}): {r['prompt'][:80]!r}")
        if len(s.rows) > _SHOWN:
            echo(f"  ... {len(s.rows) - _SHOWN} more")
    worst = max(result.sets, key=lambda s: s.fraction, default=None)
    if worst is not None and worst.fraction > max_leakage:
        raise UserError(f"held-out set {worst.name!r}: {worst.fraction:.1%} of its {worst.n} examples occur in the "
                        f"training data ({worst.describe()}), above data.max_leakage="
                        f"{max_leakage:g}; fix the split, or set data.max_leakage=1 to go on")
    return result
