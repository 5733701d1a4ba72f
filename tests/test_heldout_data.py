"""Record shapes and field mappings for training and for every kind of eval.sets entry; split definitions;
the leakage check and its refusal; the normalised-match metric."""

import gzip
import json
from pathlib import Path

import pytest

from lora_ablate.config import DataConfig, EvalConfig, build_experiment
from lora_ablate.data import Example, load_eval_set, load_eval_sets, load_examples
from lora_ablate.errors import UserError
from lora_ablate.study.settings import eval_set_name

REPO = Path(__file__).resolve().parent.parent
T0_POOL = REPO.parent / "shared" / "data" / "t0_pool.jsonl.gz"


def jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


PC = [{"p": f"question {i}", "c": f"answer {i}"} for i in range(4)]


def test_instances_shape_trains_one_example_per_instance(tmp_path):
    path = jsonl(tmp_path / "tasks.jsonl", [
        {"instruction": "Add.", "instances": [{"input": "1, 2", "output": "3"}, {"input": "", "output": "x"}]},
        {"instruction": "Echo.", "instances": [{"input": "hi", "output": "hi"}]}])
    got = load_examples(path)
    assert [(e.instruction, e.input, e.output) for e in got] == [("Add.", "1, 2", "3"), ("Add.", "", "x"),
                                                                ("Echo.", "hi", "hi")]
    assert len(load_examples(path, size=2)) == 2
    # format: self_instruct (the shipped user-oriented set) keeps its first instance only
    assert len(load_examples(path, fmt="self_instruct")) == 2


def test_jsonl_gz_and_prompt_completion_mapping(tmp_path):
    path = jsonl(tmp_path / "pool.jsonl.gz", PC, gz=True)
    got = load_examples(path, {"prompt": "p", "completion": "c"})
    assert (got[1].instruction, got[1].input, got[1].output) == ("question 1", "", "answer 1")


def test_mapping_to_a_missing_column_is_an_error_even_for_input(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o", "context": "c"}])
    assert load_examples(path, {"input": "context"})[0].input == "c"
    with pytest.raises(UserError, match=r"data.fields maps input to 'contxt', which is not a column"):
        load_examples(path, {"input": "contxt"})


def test_record_file_eval_set_uses_data_fields(tmp_path):
    path = jsonl(tmp_path / "held.jsonl", PC)
    s = load_eval_set(path, 0, 0, {"prompt": "p", "completion": "c"})
    assert s.name == "held" and len(s.examples) == 4
    with pytest.raises(UserError, match="fields: in its eval.sets entry"):
        load_eval_set(path, 0, 0)


def test_inline_eval_set_entry_with_its_own_mapping(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl.gz", PC, gz=True)
    exp = build_experiment({}, [f"eval.sets=[{{path: {path}, fields: {{prompt: p, completion: c}}, "
                                "metrics: [squad_match, rouge_l], headline: rouge_l}]"])
    (s,) = load_eval_sets(exp.eval, exp.data)
    assert s.name == "qa" and s.headline == "rouge_l" and s.metrics == ("squad_match", "rouge_l")
    assert eval_set_name(exp.eval.sets[0]) == "qa"
    assert exp.to_dict()["eval"]["sets"][0]["fields"] == {"prompt": "p", "completion": "c"}
    with pytest.raises(UserError, match="unknown key"):
        EvalConfig(sets=({"path": path, "feilds": {}},))
    with pytest.raises(UserError, match="headline"):
        load_eval_set({"path": path, "fields": {"prompt": "p", "completion": "c"}, "headline": "bleu"}, 0, 0)


def test_set_yaml_path_is_a_set_file(tmp_path):
    rec = jsonl(tmp_path / "r.jsonl", PC)
    spec = tmp_path / "myset.yaml"
    spec.write_text(f"name: myset\nsource: {rec}\nfields: {{prompt: p, completion: c}}\nmetrics: [exact_match]\n")
    s = load_eval_set(str(spec), 2, 0)
    assert s.name == "myset" and len(s.examples) == 2 and s.metrics == ("exact_match",)
    assert eval_set_name(str(spec)) == "myset"


def test_squad_match_metric_agrees_with_the_leakage_normalisation():
    from lora_ablate.leakage import normalize
    from lora_ablate.metrics import score

    preds, refs = ["The Eiffel  Tower!", "an apple", "Paris"], ["eiffel tower", "Apple.", "London"]
    assert score("squad_match", preds, refs) == (pytest.approx(2 / 3), [1.0, 1.0, 0.0])
    assert normalize("  The Eiffel, Tower!! ") == "eiffel tower"


# ----------------------------------------------------------------------------- leakage


def ex(instruction, inp="", out="x"):
    return Example(instruction, inp, out)


def test_overlap_exact_and_near():
    from lora_ablate.leakage import overlap

    long = "the quick brown fox jumps over the lazy dog near the river bank today"
    train = [ex("Summarise.", long), ex("What is 2+2?", "", "4"), ex("Other.", "completely different words here")]
    held = [ex("summarise!", long),                          # exact after normalisation
            ex("Rewrite.", long.replace("today", "tonight")),  # near: most 8-grams shared
            ex("What is 3+3?", "", "6"),                      # short, different
            ex("Reverse the letters of the given word.", "pebble")]
    got = overlap(train, held, "h")
    assert [(r["idx"], r["kind"], r["train_idx"]) for r in got.rows] == [(0, "exact", 0), (1, "near", 0)]
    assert got.rows[1]["score"] >= 0.5 and (got.exact, got.near, got.fraction) == (1, 1, 0.5)


def test_builtin_splits_do_not_leak():
    from lora_ablate.data import load_examples
    from lora_ablate.leakage import overlap

    train = load_examples("builtin:train", size=400)
    for split in ("heldout_instances", "heldout_tasks"):
        assert overlap(train, load_examples(f"builtin:{split}", size=100)).rows == []


def test_check_refuses_above_max_leakage(tmp_path):
    from lora_ablate.context import check_leakage

    rows = [{"instruction": f"Tell me about item number {i} in the list", "output": f"It is {i}"} for i in range(20)]
    path = jsonl(tmp_path / "rows.jsonl", rows)
    exp = build_experiment({}, [f"data.train={path}", "data.train_size=0", f"eval.sets=[{path}, heldout_tasks]",
                                "eval.size=8"])
    with pytest.raises(UserError, match=r"held-out set 'rows': 100.0% of its 8 examples .* data.max_leakage=1"):
        check_leakage(exp, echo=lambda line: None)
    lines = []
    leak = check_leakage(build_experiment(exp.to_dict(), ["data.max_leakage=1"]), echo=lines.append)
    assert leak.summary["rows"] == {"n": 8, "exact": 8, "near": 0, "passage": 0, "fraction": 1.0}
    assert leak.summary["heldout_tasks"]["fraction"] == 0 and leak.metrics["leakage/rows/exact"] == 8.0
    assert lines[0].startswith("leakage: rows: 8/8") and len(leak.rows) == 8
    with pytest.raises(UserError, match="max_leakage"):
        DataConfig(max_leakage=2)


def test_train_refuses_a_leaking_run_before_writing(tmp_path, capsys):
    from lora_ablate.cli import main

    path = jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(8)])
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "model.name=tiny-llama", f"data.train={path}", f"eval.sets=[{path}]"])
    assert rc != 0 and not out.exists()
    assert "held-out set 'rows': 100.0%" in capsys.readouterr().err


# ----------------------------------------------------------------------------- splits


def split_file(tmp_path, pool, **extra):
    lines = [f"name: demo\npool: {pool}\nfields: {{prompt: prompt, completion: completion}}\ngroup_by: template\n"
             "prefixes: [alpha, beta, beta_x, gamma, delta]\nheldout_tasks: [gamma]\n"
             "sizes: {heldout_instances: 6, heldout_tasks: 5}\n"] + [f"{k}: {v}\n" for k, v in extra.items()]
    path = tmp_path / "demo.yaml"
    path.write_text("".join(lines))
    return str(path)


def pool_rows():
    rows = []
    for k, t in enumerate(("alpha_a", "beta_b", "beta_x_c", "gamma_g", "delta_d")):
        # numbered per template: no two templates share a passage (the passage rule has its own test)
        rows += [{"template": t, "prompt": f"{t} prompt number {100 * k + i} with some words in it for {t}",
                  "completion": f"{t}-{i}"} for i in range(12)]
    return rows


def test_split_by_longest_prefix(tmp_path):
    from lora_ablate.splits import load_split, partition

    spec = split_file(tmp_path, jsonl(tmp_path / "pool.jsonl.gz", pool_rows(), gz=True))
    split = load_split(spec)
    assert split.group_of("beta_x_c") == "beta_x" and split.group_of("beta_b") == "beta"
    with pytest.raises(UserError, match="matches no task rule"):
        split.group_of("omega_z")
    parts = {p: load_examples(f"split:{spec}:{p}") for p in ("train", "heldout_instances", "heldout_tasks")}
    assert len(parts["heldout_instances"]) == 6 and len(parts["heldout_tasks"]) == 5
    assert {e.family for e in parts["heldout_tasks"]} == {"gamma_g"}
    assert "gamma_g" not in {e.family for e in parts["train"] + parts["heldout_instances"]}
    held = {e.instruction for e in parts["heldout_instances"]}
    assert not held & {e.instruction for e in parts["train"]}
    assert partition(split, 0, None) is partition(load_split(spec), 0, None)  # read once a process
    assert load_examples(f"split:{spec}:heldout_instances", seed=1) != parts["heldout_instances"]
    exp = build_experiment({}, [f"data.train=split:{spec}:train", "data.train_size=0",
                                f"eval.sets=[split:{spec}:heldout_instances, split:{spec}:heldout_tasks]"])
    assert [eval_set_name(s) for s in exp.eval.sets] == ["heldout_instances", "heldout_tasks"]
    from lora_ablate.context import check_leakage
    assert all(s["fraction"] == 0 for s in check_leakage(exp).summary.values())


def test_split_by_pattern(tmp_path):
    from lora_ablate.splits import load_split

    spec = split_file(tmp_path, jsonl(tmp_path / "pool.jsonl", pool_rows()))
    text = Path(spec).read_text().replace("prefixes: [alpha, beta, beta_x, gamma, delta]", "pattern: '^([a-z]+)_'")
    Path(spec).write_text(text)
    assert load_split(spec).group_of("beta_x_c") == "beta"
    with pytest.raises(UserError, match="split:<split>:<part>"):
        load_examples(f"split:{spec}:dev")


WORDS = ("amber bishop canyon delta ember falcon garnet harbor island jungle kettle lantern meadow nectar "
         "orchid pebble quartz raven saddle timber umber velvet willow yonder zephyr").split()


def passage_pool():
    """T0's shape: each passage rendered through three templates of its source (their own words around
    it), and once more through the first with another question (a near-duplicate), so instances of a
    trained source share passages with its other rows; gamma is held out."""
    import random

    rng = random.Random(7)
    rows = []
    for source in ("alpha", "beta", "gamma"):
        for j in range(10):
            passage = " ".join(rng.choice(WORDS) for _ in range(30))
            rows += [{"template": f"{source}_ask", "completion": f"{source} {j} topic", "passage": f"{source}{j}",
                      "prompt": f"Read the following short text carefully, then say what it is mainly about: "
                                f"{passage}\nWhat is it about?"},
                     {"template": f"{source}_title", "completion": f"{source} {j} title", "passage": f"{source}{j}",
                      "prompt": f"Give the passage below a short title.\n\n{passage}\n\nWhich title suits it?"},
                     {"template": f"{source}_yesno", "completion": "yes" if j % 2 else "no",
                      "passage": f"{source}{j}",
                      "prompt": f"{passage}\nFrom the text above, is that statement true? Answer yes or no please."},
                     # a near-duplicate: the ask template again, one word of its question changed
                     {"template": f"{source}_ask", "completion": f"{source} {j} gist", "passage": f"{source}{j}",
                      "prompt": f"Read the following short text carefully, then say what it is mainly about: "
                                f"{passage}\nWhat is it on?"}]
    return rows


def test_passage_dedupe_keeps_held_out_passages_out_of_train(tmp_path):
    from lora_ablate.context import check_leakage
    from lora_ablate.splits import _partition, load_split

    pool = jsonl(tmp_path / "pool.jsonl", passage_pool())
    spec = tmp_path / "p.yaml"
    base = (f"name: p\npool: {pool}\nfields: {{prompt: prompt, completion: completion}}\ngroup_by: template\n"
            "pattern: '^([a-z]+)_'\nheldout_tasks: [gamma]\nsizes: {heldout_instances: 8, heldout_tasks: 6}\n")

    def parts(dedupe, seed=0):
        spec.write_text(base + f"dedupe: {dedupe}\n")
        read = [(r, load_examples(pool)[i]) for i, r in enumerate(passage_pool())]
        return _partition(load_split(str(spec)), seed, read)

    def crossing(p):
        held = {r["passage"] for r in p["heldout_instances"] + p["heldout_tasks"]}
        return [r for r in p["train"] if r["passage"] in held]

    def twins(p):  # train rows of a held-out row's passage and template: near-duplicates of it
        held = {(r["passage"], r["template"]) for r in p["heldout_instances"] + p["heldout_tasks"]}
        return [r for r in p["train"] if (r["passage"], r["template"]) in held]

    assert twins(parts("none")) and crossing(parts("none"))  # the pool has both kinds of leak
    near = parts("near")
    assert twins(near) == [] and crossing(near)  # near-duplicates go; passages through other templates stay
    clean = parts("passage")
    assert crossing(clean) == [] and clean["_info"][0]["dropped_duplicates"] > 0
    assert len(clean["heldout_instances"]) == 8 and {r["template"][:5] for r in clean["heldout_tasks"]} == {"gamma"}
    assert parts("passage") == clean and parts("passage", seed=1) != clean  # deterministic from the seed
    exp = build_experiment({}, [f"data.train=split:{spec}:train", "data.train_size=0",
                                f"eval.sets=[split:{spec}:heldout_instances, split:{spec}:heldout_tasks]"])
    assert all(s["fraction"] == 0 for s in check_leakage(exp, echo=lambda line: None).summary.values())
    spec.write_text(base + "dedupe: near\n")
    leak = check_leakage(build_experiment(exp.to_dict(), ["data.max_leakage=1"]), echo=lambda line: None)
    assert leak.summary["heldout_instances"]["passage"] > 0  # the check sees what near-dedupe leaves
    spec.write_text(base + "dedupe: fuzzy\n")
    with pytest.raises(UserError, match=r"dedupe='fuzzy'; choose one of: none, exact, near, passage"):
        load_split(str(spec))


def test_passage_rule_needs_another_template():
    from lora_ablate.leakage import overlap

    passage = " ".join(WORDS[:30])
    ask = f"Read the following short text carefully, then say what it is mainly about: {passage} What is it about?"
    title = f"Give the passage below a short title. {passage} Which title suits it?"
    got = overlap([Example(title, "", "y", "a_title")], [Example(ask, "", "x", "a_ask")]).rows
    assert [r["kind"] for r in got] == ["passage"] and 0.5 <= got[0]["score"] <= 1
    # one template (or no template names at all): its own words would make any two instances look alike
    assert overlap([Example(title, "", "y", "a_ask")], [Example(ask, "", "x", "a_ask")]).rows == []
    assert overlap([Example(title, "", "y")], [Example(ask, "", "x")]).rows == []


@pytest.mark.skipif(not T0_POOL.is_file(), reason="the shared T0 pool is not here")
def test_shipped_t0_split_is_clean():
    from lora_ablate.data import _pool_examples
    from lora_ablate.splits import load_split, partition

    parts = partition(load_split("t0_by_source"), 0, _pool_examples)
    info = parts["_info"][0]
    assert info["heldout_instances_rows"] == 200 and info["heldout_tasks_rows"] == 200
    assert len(info["heldout_tasks"]) == 4 and info["train_rows"] > 40000


@pytest.mark.slow  # two partitions of the 55k pool and their checks: ~20 s on an idle 2-core machine
@pytest.mark.skipif(not T0_POOL.is_file(), reason="the shared T0 pool is not here")
def test_shipped_t0_clean_split_shares_no_passage():
    from lora_ablate.data import _pool_examples
    from lora_ablate.leakage import overlaps
    from lora_ablate.splits import load_split, partition

    dirty = partition(load_split("t0_by_source"), 0, _pool_examples)
    clean = partition(load_split("t0_clean"), 0, _pool_examples)
    assert clean["_info"][0]["heldout_tasks"] == dirty["_info"][0]["heldout_tasks"]
    examples = {n: load_examples(f"split:{n}:{p}") for n in ("t0_by_source", "t0_clean") for p in ("train",)}
    held = lambda n: [(p, load_examples(f"split:{n}:{p}")) for p in ("heldout_instances", "heldout_tasks")]
    assert [s.fraction for s in overlaps(examples["t0_clean"], held("t0_clean"))] == [0, 0]
    assert overlaps(examples["t0_by_source"], held("t0_by_source"))[0].passage > 40  # what t0_clean removes


def test_train_records_leakage_and_headline(tmp_path):
    from lora_ablate.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--quiet", "model.name=tiny-llama", "data.train_size=16",
               "data.max_length=64", "train.steps=1", "train.batch_size=4", "eval.size=4", "eval.generate=false",
               "eval.base=false", "eval.sets=[heldout_tasks, train]", "lora.r=2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["leakage"]["heldout_tasks"] == {"n": 4, "exact": 0, "near": 0, "passage": 0, "fraction": 0.0}
    assert "train" not in m["leakage"]  # leakage: expected, the set is training data on purpose
    assert m["headline"] == {"heldout_tasks": "exact_match", "train": "exact_match"}
