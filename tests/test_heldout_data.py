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
