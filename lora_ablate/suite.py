"""Built-in suite of verifiable instruction tasks: families from ``evals/suite.yaml`` + generators here.

Every generator maps a ``random.Random`` to ``(input, output)`` where the output is the one exact,
short, single-line answer, so a prediction can be checked by exact match.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_ablate.errors import UserError, choices

SPLITS = ("train", "heldout_instances", "heldout_tasks")
GROUPS = ("A", "B")
HELDOUT_BUCKETS = 5  # 1 in 5 inputs of each A family is reserved for heldout_instances
_MAX_DRAWS = 100  # draws spent looking for an input not yet used in the split before allowing a repeat


def evals_dir() -> Path:
    """The ``evals/`` folder (suite, set definitions, metrics); ``$LORA_ABLATE_EVALS`` overrides it.

    Resolved from the checkout because the project is used from a checkout or an editable install.
    """
    override = os.environ.get("LORA_ABLATE_EVALS")
    return Path(override).expanduser().resolve() if override else Path(__file__).resolve().parent.parent / "evals"


def set_name(entry) -> str:
    """The name an ``eval.sets`` entry reports its metrics under: a set file's stem, the part of a
    ``builtin:``/``split:`` source, an inline mapping's ``name`` (else its file's stem)."""
    if isinstance(entry, dict):
        return str(entry.get("name") or set_name(str(entry.get("path") or entry.get("source") or "")))
    if entry.startswith(("builtin:", "split:")):
        return entry.rsplit(":", 1)[1]
    if (evals_dir() / "sets" / f"{entry}.yaml").is_file():
        return entry
    name = Path(entry).name
    return Path(name[:-3]).stem if name.lower().endswith(".gz") else Path(name).stem


@dataclass(frozen=True)
class Family:
    name: str
    split_group: str  # "A": trained on; "B": held-out task, never trained on
    description: str
    phrasings: tuple[str, ...]
    kind: str = ""  # string, list, arithmetic, formatting, extraction or classification


# ----------------------------------------------------------------------------- word lists

WORDS = """
apple river garden window planet candle forest bridge market silver pencil rocket basket
dragon island jacket ladder mirror number orange parrot pillow quarter rabbit saddle summer
teapot tunnel valley wallet winter yellow anchor banana butter camera carpet castle cheese
circle cookie copper dinner doctor engine farmer finger flower friend ginger guitar hammer
helmet hunter kettle kitten lemon letter lizard magnet meadow monkey muffin napkin needle
office pepper pirate pocket potato puzzle rainbow ribbon saucer shadow shovel singer spider
spring statue stone sugar tablet tiger tomato turtle violin walnut weather whistle wizard
zebra cloud ocean desert mountain harbor lantern marble feather blanket compass diamond
eagle falcon glacier honey igloo jungle koala meteor nectar oyster pebble quill sparrow
thunder umbrella velvet willow orchard canyon breeze ember frost grove hollow prairie
""".split()

# Short words keep list-shaped inputs readable.
ITEMS = """
red blue green cat dog fish oak pine rose tea milk salt rice corn bean fig pear plum
lime kiwi sun moon star rain snow wind hill lake road door book pen cup hat box
""".split()

PALINDROMES = """
level radar civic kayak refer rotor madam noon racecar stats tenet deed peep solos sagas
redder reviver rotator deified repaper minim kook toot sees gig nun pip tot eye ewe wow pop
""".split()

POSITIVE = """excellent wonderful delightful great comfortable friendly charming reliable superb
pleasant impressive fantastic""".split()
NEGATIVE = """terrible awful disappointing dreadful uncomfortable rude boring unreliable poor
noisy flimsy mediocre""".split()
REVIEWED = "hotel restaurant phone movie book laptop cafe chair jacket game concert museum".split()
REVIEW_TEMPLATES = (
    "The {item} was {a} and {b}.",
    "I found the {item} {a}, and honestly quite {b}.",
    "This {item} is {a}. The whole experience felt {b}.",
    "Overall the {item} was {a}, and I would even call it {b}.",
    "{A} {item}, {b} from start to finish.",
)

FIRST_NAMES = "anna ben carla david elena frank grace hugo iris jonas kira liam maya noah olga paul".split()
LAST_NAMES = "smith garcia chen novak silva kim brown meyer rossi dubois".split()
DOMAINS = "example.com mail.org company.net school.edu shop.io post.co.uk".split()
EMAIL_TEMPLATES = (
    "Please send the invoice to {x} by Friday.",
    "You can reach our support team at {x}.",
    "For questions, write to {x} and we will reply within a day.",
    "My new address is {x}, so please update your contacts.",
    "Contact {x} if the package has not arrived.",
    "The organiser, reachable at {x}, will confirm your seat.",
)
NUMBER_TEMPLATES = (
    "The parcel weighs {n} grams.",
    "We planted {n} trees along the river last spring.",
    "The train leaves in {n} minutes from platform three.",
    "Our team answered {n} emails on Monday.",
    "There were {n} people waiting outside the museum.",
    "She has read {n} pages of the novel so far.",
)
SEPARATORS = ("-", "_", "/", "+", "|", ":", "*")


# ----------------------------------------------------------------------------- generators


def _join(items) -> str:
    return ", ".join(str(i) for i in items)


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(4, 7))]


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _reverse_word(rng):
    w = rng.choice(WORDS)
    return w, w[::-1]


def _uppercase(rng):
    p = _phrase(rng, 2, 4)
    return p, p.upper()


def _count_vowels(rng):
    p = _phrase(rng, 1, 2)
    return p, str(sum(c in "aeiou" for c in p))


def _sort_numbers(rng):
    xs = _numbers(rng)
    return _join(xs), _join(sorted(xs))


def _max_number(rng):
    xs = _numbers(rng)
    return _join(xs), str(max(xs))


def _dedupe_list(rng):
    distinct = rng.sample(ITEMS, rng.randint(3, 5))
    # More items than distinct words guarantees at least one repeat.
    items = distinct + [rng.choice(distinct) for _ in range(rng.randint(len(distinct) + 1, 8) - len(distinct))]
    rng.shuffle(items)
    return _join(items), _join(dict.fromkeys(items))


def _add_numbers(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a}, {b}", str(a + b)


def _join_words(rng):
    words = rng.sample(ITEMS, rng.randint(3, 5))
    sep = rng.choice(SEPARATORS)
    return f'words: {_join(words)}; separator: "{sep}"', sep.join(words)


def _iso_date(rng):
    y, m = rng.randint(1990, 2030), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    month, mon = calendar.month_name[m], calendar.month_abbr[m]
    text = rng.choice((f"{month} {d}, {y}", f"{d} {month} {y}", f"{mon} {d}, {y}", f"{d} {mon} {y}"))
    return text, f"{y:04d}-{m:02d}-{d:02d}"


def _extract_email(rng):
    first, last, domain = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(DOMAINS)
    local = rng.choice((f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first[0]}{last}"))
    email = f"{local}@{domain}"
    return rng.choice(EMAIL_TEMPLATES).format(x=email), email


def _sentiment(rng):
    label = rng.choice(("positive", "negative"))
    a, b = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    text = rng.choice(REVIEW_TEMPLATES).format(item=rng.choice(REVIEWED), a=a, b=b, A=a.capitalize())
    return text, label


def _reverse_list(rng):
    items = rng.sample(ITEMS, rng.randint(3, 6))
    return _join(items), _join(reversed(items))


def _multiply_numbers(rng):
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    return f"{a}, {b}", str(a * b)


def _title_case(rng):
    p = _phrase(rng, 2, 5)
    # Not str.title(): spell out the rule the description promises.
    return p, " ".join(w[:1].upper() + w[1:] for w in p.split(" "))


def _extract_number(rng):
    n = rng.randint(2, 9999)
    return rng.choice(NUMBER_TEMPLATES).format(n=n), str(n)


def _is_palindrome(rng):
    # Half of each label are real words; the other half are mirrored words (rocket -> rockettekcor)
    # and mirrors with one letter changed, so that shape alone does not give the answer and the
    # label stays balanced even when a split runs out of real palindromes.
    yes = rng.random() < 0.5
    if rng.random() < 0.5:
        return (rng.choice(PALINDROMES), "yes") if yes else (rng.choice(WORDS), "no")
    w = rng.choice(WORDS)
    mirror = w + w[-2::-1] if rng.random() < 0.5 else w + w[::-1]
    if not yes:
        i = rng.randrange(len(w) - 1)  # in the first half, so its mirror image stays unchanged
        mirror = mirror[:i] + rng.choice([c for c in "aeioulnrst" if c != mirror[i]]) + mirror[i + 1 :]
    return mirror, "yes" if yes else "no"


GENERATORS = {
    "reverse_word": _reverse_word,
    "uppercase": _uppercase,
    "count_vowels": _count_vowels,
    "sort_numbers": _sort_numbers,
    "max_number": _max_number,
    "dedupe_list": _dedupe_list,
    "add_numbers": _add_numbers,
    "join_words": _join_words,
    "iso_date": _iso_date,
    "extract_email": _extract_email,
    "sentiment": _sentiment,
    "reverse_list": _reverse_list,
    "multiply_numbers": _multiply_numbers,
    "title_case": _title_case,
    "extract_number": _extract_number,
    "is_palindrome": _is_palindrome,
}


# ----------------------------------------------------------------------------- families and splits


@functools.lru_cache(maxsize=None)
def _load_families(path: Path) -> tuple[Family, ...]:
    if not path.is_file():
        raise UserError(f"suite file {path} not found (set LORA_ABLATE_EVALS to the evals folder)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    fams = []
    for entry in raw.get("families") or []:
        fam = Family(
            name=str(entry["name"]),
            split_group=str(entry["split_group"]),
            description=" ".join(str(entry.get("description", "")).split()),
            phrasings=tuple(str(p) for p in entry.get("phrasings") or ()),
            kind=str(entry.get("kind", "")),
        )
        if fam.name not in GENERATORS:
            raise UserError(f"{path}: family {fam.name!r} has no generator; known: {choices(GENERATORS)}")
        if fam.split_group not in GROUPS:
            raise UserError(f"{path}: family {fam.name!r} split_group={fam.split_group!r}; choose one of: A, B")
        if not fam.phrasings:
            raise UserError(f"{path}: family {fam.name!r} has no phrasings")
        fams.append(fam)
    for group in GROUPS:
        if not any(f.split_group == group for f in fams):
            raise UserError(f"{path}: no family in split_group {group}")
    return tuple(fams)


def families() -> list[Family]:
    """All families, in suite-file order."""
    return list(_load_families(evals_dir() / "suite.yaml"))


def is_heldout_instance(family: str, input: str) -> bool:
    """Stable hash partition of each A family's inputs: True -> reserved for heldout_instances.

    Partitioning inputs (not records) keeps heldout_instances disjoint from a train split of any size.
    """
    digest = hashlib.sha256(f"{family}\0{input}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def _draw(family: str, split: str, rng: random.Random, seen: set) -> tuple[str, str]:
    gen = GENERATORS[family]
    want_heldout = split == "heldout_instances"
    repeat = None
    for _ in range(_MAX_DRAWS):
        inp, out = gen(rng)
        if split != "heldout_tasks" and is_heldout_instance(family, inp) != want_heldout:
            continue
        if (family, inp) not in seen:
            seen.add((family, inp))
            return inp, out
        repeat = repeat or (inp, out)
    if repeat is None:  # every draw fell on the other side of the partition: a generator with a tiny input space
        raise RuntimeError(f"family {family!r}: no input for split {split!r} in {_MAX_DRAWS} draws")
    return repeat  # the family's inputs on this side are used up; repeats are fine then


def build_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` records ``{"instruction", "input", "output", "family"}``, deterministic for ``(split, n, seed)``.

    train and heldout_instances use group A on opposite sides of :func:`is_heldout_instance`;
    heldout_tasks uses group B. Families go round-robin, so every prefix is balanced (and a
    shorter split is a prefix of a longer one with the same seed).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {choices(SPLITS)}")
    if n < 0:
        raise UserError(f"split size n={n} is not valid; it must be >= 0")
    group = "B" if split == "heldout_tasks" else "A"
    fams = [f for f in families() if f.split_group == group]
    rng = random.Random(f"{seed}:{split}")  # str seeds are hashed with SHA-512, unlike salted hash()
    seen: set = set()
    records = []
    for i in range(n):
        fam = fams[i % len(fams)]
        inp, out = _draw(fam.name, split, rng, seen)
        records.append({"instruction": rng.choice(fam.phrasings), "input": inp, "output": out, "family": fam.name})
    return records
