"""The built-in task suite (lora_ablate.suite) and the local metrics (evals/metrics, lora_ablate.metrics)."""

import calendar
import re
import socket
from collections import Counter

import pytest
import yaml

from lora_ablate import suite
from lora_ablate.errors import UserError


def by_group(group):
    return {f.name for f in suite.families() if f.split_group == group}


# ----------------------------------------------------------------------------- families


def test_families_shape():
    fams = suite.families()
    assert len(fams) >= 14
    assert len({f.name for f in fams}) == len(fams)
    assert by_group("A") and by_group("B")
    assert {f.split_group for f in fams} == {"A", "B"}
    for f in fams:
        assert len(f.phrasings) >= 4, f.name
        assert len(set(f.phrasings)) == len(f.phrasings), f.name
        assert f.description and f.kind
        assert all("{" not in p for p in f.phrasings), "the input goes in its own field"
    assert set(suite.GENERATORS) == {f.name for f in fams}
    # Held-out tasks span several kinds, not one kind of task.
    assert len({f.kind for f in fams if f.split_group == "B"}) >= 4


def test_evals_dir_env_override(tmp_path, monkeypatch):
    assert (suite.evals_dir() / "suite.yaml").is_file()
    monkeypatch.setenv("LORA_ABLATE_EVALS", str(tmp_path))
    assert suite.evals_dir() == tmp_path.resolve()
    with pytest.raises(UserError, match="suite.yaml"):
        suite.families()


def test_set_definitions():
    sets = suite.evals_dir() / "sets"
    for split in suite.SPLITS:
        spec = yaml.safe_load((sets / f"{split}.yaml").read_text())
        assert spec["name"] == split and spec["source"] == f"builtin:{split}"
        assert spec["size"] > 0 and spec["metrics"] == ["exact_match", "rouge_l"]
    user = yaml.safe_load((sets / "self_instruct_user.yaml").read_text())
    assert user["format"] == "self_instruct" and user["source"].endswith("user_oriented_instructions.jsonl")


# ----------------------------------------------------------------------------- splits


def test_unknown_split_lists_valid_ones():
    with pytest.raises(UserError, match="heldout_instances"):
        suite.build_split("validation", 10)


def test_records_shape_and_round_robin():
    fams_a = [f.name for f in suite.families() if f.split_group == "A"]
    recs = suite.build_split("train", 3 * len(fams_a))
    assert [r["family"] for r in recs] == fams_a * 3
    phrasings = {f.name: f.phrasings for f in suite.families()}
    for r in recs:
        assert set(r) == {"instruction", "input", "output", "family"}
        assert r["instruction"] in phrasings[r["family"]]
        assert r["input"] and r["output"] and "\n" not in r["output"] and r["output"] == r["output"].strip()
        assert len(r["output"]) <= 80


def test_deterministic():
    for split in suite.SPLITS:
        assert suite.build_split(split, 60, seed=3) == suite.build_split(split, 60, seed=3)
        assert suite.build_split(split, 60, seed=3) != suite.build_split(split, 60, seed=4)
    assert suite.build_split("train", 40, seed=1) == suite.build_split("train", 200, seed=1)[:40]


def test_heldout_instances_disjoint_from_train():
    train = suite.build_split("train", 5000)
    held = suite.build_split("heldout_instances", 500)
    assert {r["family"] for r in held} == by_group("A")
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in held}
    # Stronger: within a family, no input is shared at all, whatever the phrasing.
    assert not {(r["family"], r["input"]) for r in train} & {(r["family"], r["input"]) for r in held}
    # Held-out instances are mostly distinct, so the eval set is not a few items repeated.
    assert len({(r["family"], r["input"]) for r in held[:200]}) >= 180


def test_heldout_tasks_only_group_b():
    recs = suite.build_split("heldout_tasks", 100)
    assert {r["family"] for r in recs} == by_group("B")
    assert not {r["family"] for r in suite.build_split("train", 500)} & by_group("B")


# ----------------------------------------------------------------------------- answers, checked independently


def _nums(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _iso(text):
    months = {m.lower(): i for i, m in enumerate(calendar.month_name) if m}
    months.update({m.lower(): i for i, m in enumerate(calendar.month_abbr) if m})
    word = re.search(r"[A-Za-z]+", text).group().lower()
    day, year = sorted(_nums(text))  # the year is always the larger number
    return f"{year:04d}-{months[word]:02d}-{day:02d}"


CHECKS = {
    "reverse_word": lambda i: "".join(reversed(i)),
    "uppercase": str.upper,
    "count_vowels": lambda i: str(len(re.findall("[aeiou]", i))),
    "sort_numbers": lambda i: ", ".join(map(str, sorted(_nums(i)))),
    "max_number": lambda i: str(max(_nums(i))),
    "dedupe_list": lambda i: ", ".join(w for k, w in enumerate(i.split(", ")) if w not in i.split(", ")[:k]),
    "add_numbers": lambda i: str(sum(_nums(i))),
    "join_words": lambda i: re.search(r'"(.*)"', i).group(1).join(re.search(r"words: (.*);", i).group(1).split(", ")),
    "iso_date": _iso,
    "extract_email": lambda i: re.search(r"[\w.]+@\w+(?:\.\w+)+", i).group(),
    "sentiment": lambda i: "positive" if set(re.findall(r"\w+", i.lower())) & set(suite.POSITIVE) else "negative",
    "reverse_list": lambda i: ", ".join(i.split(", ")[::-1]),
    "multiply_numbers": lambda i: str(_nums(i)[0] * _nums(i)[1]),
    "title_case": lambda i: " ".join(w.capitalize() for w in i.split()),
    "extract_number": lambda i: str(_nums(i)[0]),
    "is_palindrome": lambda i: "yes" if i == i[::-1] else "no",
}


def test_every_answer_matches_an_independent_computation():
    assert set(CHECKS) == set(suite.GENERATORS)
    recs = suite.build_split("train", 600, seed=7) + suite.build_split("heldout_tasks", 300, seed=7)
    for r in recs:
        assert CHECKS[r["family"]](r["input"]) == r["output"], r


def test_classification_labels_are_balanced():
    recs = suite.build_split("train", 2200) + suite.build_split("heldout_tasks", 1000)
    for family, labels in (("sentiment", {"positive", "negative"}), ("is_palindrome", {"yes", "no"})):
        counts = Counter(r["output"] for r in recs if r["family"] == family)
        assert set(counts) == labels
        assert min(counts.values()) > 0.35 * sum(counts.values())


# ----------------------------------------------------------------------------- metrics


@pytest.fixture
def offline(monkeypatch):
    """Hub marked offline and any socket connection refused, so a metric that needs the network fails."""
    from lora_ablate.metrics import load_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access during a metric test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    load_metric.cache_clear()
    yield
    load_metric.cache_clear()


def test_exact_match_values(offline):
    from lora_ablate.metrics import score

    mean, scores = score(
        "exact_match",
        ['"2021-03-05".', "  A   b ", "abc", "85", "'yes'", ""],
        ["2021-03-05", "A b", "ABC", "85", "yes", ""],
    )
    assert scores == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # case-sensitive: "abc" != "ABC"
    assert mean == pytest.approx(5 / 6)


def test_rouge_l_values(offline):
    from lora_ablate.metrics import score

    mean, scores = score(
        "rouge_l",
        ["a c d", "", "x", "The cat, sat!", "a b c d"],
        ["a b c d", "", "", "the CAT sat", "a c d"],
    )
    f = 2 * 1.0 * 0.75 / 1.75
    assert scores == pytest.approx([f, 1.0, 0.0, 1.0, f])
    assert mean == pytest.approx(sum(scores) / 5)
    assert score("rouge_l", [], []) == (0.0, [])


def test_metric_loads_offline_through_evaluate(offline):
    from lora_ablate.metrics import load_metric

    result = load_metric("exact_match").compute(predictions=["x", "y"], references=["x", "z"])
    assert result == {"exact_match": 0.5, "exact_match_scores": [1.0, 0.0]}
    assert load_metric("exact_match") is load_metric("exact_match")


def test_unknown_metric_lists_available():
    from lora_ablate.metrics import load_metric, score

    with pytest.raises(UserError, match="exact_match, rouge_l"):
        load_metric("bleu")
    with pytest.raises(UserError, match="2 predictions"):
        score("exact_match", ["a", "b"], ["a"])
