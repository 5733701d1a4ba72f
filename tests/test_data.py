"""Records from files in every format (with and without a field mapping), malformed rows, prompt
templates, loss masking, truncation and batch padding."""

import json

import pandas as pd
import pytest
import torch

from lora_ablate.config import DataConfig
from lora_ablate.data import (
    IGNORE,
    Encoded,
    Example,
    encode,
    encode_all,
    load_eval_set,
    load_examples,
    load_train,
    prompt_ids,
    render_prompt,
)
from lora_ablate.errors import UserError
from lora_ablate.tiny import tiny_tokenizer

FORMATS = ["jsonl", "json", "csv", "parquet"]


def write_rows(path, rows):
    """Write records in the format named by the file's suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(suffix)
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def as_tuples(examples):
    return [(e.instruction, e.input, e.output) for e in examples]


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("fmt", FORMATS)
def test_alpaca_files(tmp_path, alpaca_rows, fmt):
    path = write_rows(tmp_path / f"train.{fmt}", alpaca_rows)
    got = load_examples(str(path))
    assert as_tuples(got) == [(r["instruction"], r["input"], r["output"]) for r in alpaca_rows]
    assert as_tuples(load_examples(str(path), size=2)) == as_tuples(got)[:2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_alpaca_files_mapped(tmp_path, alpaca_rows, fmt):
    rows = [{"task": r["instruction"], "context": r["input"], "answer": r["output"], "id": i}
            for i, r in enumerate(alpaca_rows)]
    path = write_rows(tmp_path / f"train.{fmt}", rows)
    got = load_examples(str(path), {"instruction": "task", "input": "context", "output": "answer"})
    assert as_tuples(got) == [(r["instruction"], r["input"], r["output"]) for r in alpaca_rows]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_completion_files(tmp_path, alpaca_rows, fmt):
    rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in alpaca_rows]
    path = write_rows(tmp_path / f"train.{fmt}", rows)
    assert as_tuples(load_examples(str(path))) == [(r["prompt"], "", r["completion"]) for r in rows]
    mapped = [{"question": r["prompt"], "answer": r["completion"]} for r in rows]
    path = write_rows(tmp_path / f"mapped.{fmt}", mapped)
    got = load_examples(str(path), {"prompt": "question", "completion": "answer"})
    assert as_tuples(got) == [(r["prompt"], "", r["completion"]) for r in rows]


def test_csv_numeric_answers_stay_text(tmp_path):
    """CSV has no types: an answer column of numbers (or '007') is still text, and an empty input is ''."""
    path = tmp_path / "n.csv"
    path.write_text("instruction,input,output\nAdd the numbers.,1 2,3\nPad the number.,,007\n")
    assert as_tuples(load_examples(str(path))) == [("Add the numbers.", "1 2", "3"), ("Pad the number.", "", "007")]
    bom = tmp_path / "bom.csv"  # as spreadsheets save it
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert as_tuples(load_examples(str(bom))) == as_tuples(load_examples(str(path)))


def test_jsonl_gz(tmp_path, alpaca_rows):
    import gzip

    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in alpaca_rows))
    assert len(load_examples(str(path))) == len(alpaca_rows)


def test_builtin_source_and_load_train():
    got = load_train(DataConfig(train="builtin:train", train_size=12, seed=3))
    assert len(got) == 12 and all(e.output and e.family for e in got)
    assert got == load_train(DataConfig(train="builtin:train", train_size=12, seed=3))
    assert got != load_train(DataConfig(train="builtin:train", train_size=12, seed=4))


def test_eval_sets(tmp_path, alpaca_rows):
    s = load_eval_set("heldout_tasks", 5, 0)
    assert s.name == "heldout_tasks" and len(s.examples) == 5
    path = write_rows(tmp_path / "mine.jsonl", alpaca_rows)
    s = load_eval_set(str(path), 0, 0)
    assert s.name == "mine" and len(s.examples) == len(alpaca_rows)
    with pytest.raises(UserError) as e:
        load_eval_set("heldout_nope", 5, 0)
    assert "heldout_nope" in str(e.value) and "heldout_instances" in str(e.value)


# ----------------------------------------------------------------------------- malformed input


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "json"])
@pytest.mark.parametrize("bad,field,what", [
    ({"instruction": "Reverse the word.", "input": "x"}, "output", "missing"),
    ({"instruction": "Reverse the word.", "input": "x", "output": "   "}, "output", "empty"),
    ({"instruction": "", "input": "x", "output": "y"}, "instruction", "empty"),
])
def test_malformed_rows(tmp_path, alpaca_rows, fmt, bad, field, what):
    rows = alpaca_rows[:2] + [bad] + alpaca_rows[2:]
    path = write_rows(tmp_path / f"bad.{fmt}", rows)
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = one_line(e)
    if fmt == "csv":  # a CSV cannot tell a missing cell from an empty one
        what = "empty"
    assert str(path) in msg and "row 2" in msg and repr(field) in msg and what in msg, msg


@pytest.mark.parametrize("value,typename", [(5, "int"), (["a"], "list"), (1.5, "float"), (True, "bool")])
def test_wrong_type(write_jsonl, alpaca_rows, value, typename):
    rows = alpaca_rows[:1] + [{"instruction": "Count the letters.", "input": "abc", "output": value}]
    path = write_jsonl(rows)
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = one_line(e)
    assert str(path) in msg and "row 1" in msg and "'output'" in msg and typename in msg, msg


def test_wrong_type_in_first_row(write_jsonl):
    path = write_jsonl([{"instruction": "Add.", "output": 3}, {"instruction": "Add.", "output": 4}])
    with pytest.raises(UserError, match=r"row 0: field 'output' must be a string, not int"):
        load_examples(str(path))


def test_malformed_mapped_rows_name_the_files_column(write_jsonl):
    path = write_jsonl([{"question": "What is 2+2?", "answer": "4"}, {"question": "What is 2+3?", "answer": ""}])
    with pytest.raises(UserError) as e:
        load_examples(str(path), {"prompt": "question", "completion": "answer"})
    msg = one_line(e)
    assert "row 1" in msg and "'answer'" in msg and "empty" in msg


def test_empty_prompt_names_prompt_field(write_jsonl):
    path = write_jsonl([{"prompt": "Say hi.", "completion": "hi"}, {"prompt": " ", "completion": "yo"}])
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = one_line(e)
    assert "row 1" in msg and "'prompt'" in msg and "empty" in msg, msg


def test_unrecognised_columns(write_jsonl):
    path = write_jsonl([{"question": "a", "answer": "b"}])
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = one_line(e)
    assert "row 0" in msg and "question" in msg and "data.fields" in msg


def test_invalid_json_line(tmp_path, alpaca_rows, capfd):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(alpaca_rows[0]) + "\n" + json.dumps(alpaca_rows[1]) + "\n{not json\n")
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = one_line(e)
    assert str(path) in msg and "row 2" in msg and "JSON" in msg, msg
    assert "Failed to load JSON" not in capfd.readouterr().err  # the one-line error is the only output


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError) as e:
        load_examples(str(empty))
    assert str(empty) in one_line(e)
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n")
    with pytest.raises(UserError) as e:
        load_examples(str(txt))
    msg = one_line(e)
    assert "'.txt'" in msg and ".jsonl" in msg and ".parquet" in msg


# ----------------------------------------------------------------------------- prompts, masking, truncation


def test_alpaca_template():
    ex = Example("Reverse the word.", "apple", "elppa")
    text = render_prompt(ex, None, "alpaca")
    assert text.startswith("Below is an instruction") and "paired with an input" in text
    assert "### Instruction:\nReverse the word.\n\n### Input:\napple\n\n### Response:\n" in text
    assert text.endswith("### Response:\n")
    no_input = render_prompt(Example("Say yes.", "", "yes"), None, "alpaca")
    assert "### Input" not in no_input and "paired with an input" not in no_input


def _check_masking(tok, ex, template, max_length=512):
    ids, labels = encode(ex, tok, template, max_length)
    p = prompt_ids(ex, tok, template)
    n = len(p)
    assert len(ids) == len(labels)
    assert ids[:n] == p
    assert labels[:n] == [IGNORE] * n, "prompt tokens must be masked"
    assert all(lab != IGNORE for lab in labels[n:]), "output tokens must be labelled"
    assert labels[n:] == ids[n:]
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == ex.output
    return ids, labels


@pytest.mark.parametrize("ex", [Example("Reverse the word.", "apple", "elppa"),
                                Example("Answer with yes or no. Is 3 larger than 2?", "", "yes")])
def test_loss_masking_alpaca(tok, ex):
    _check_masking(tok, ex, "alpaca")


def test_loss_masking_chat_template(tok):
    ex = Example("Reverse the word.", "apple", "elppa")
    text = render_prompt(ex, tok, "chat")
    assert text == "<s>user\nReverse the word.\n\napple</s>\n<s>assistant\n"
    ids, _ = _check_masking(tok, ex, "chat")
    assert ids.count(tok.bos_token_id) == 2  # from the template's text, not added again


def test_chat_template_missing(tok):
    no_chat = tiny_tokenizer()
    no_chat.chat_template = None
    with pytest.raises(UserError, match="data.template=chat"):
        render_prompt(Example("a", "", "b"), no_chat, "chat")


def test_truncation_keeps_output(tok):
    ex = Example("Reverse the word.", " ".join(["apple banana cherry"] * 40), "elppa")
    full_prompt = prompt_ids(ex, tok, "alpaca")
    out = tok(ex.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = encode(ex, tok, "alpaca", 48)
    assert len(ids) == 48 and len(full_prompt) + len(out) > 48
    assert ids[-len(out):] == out and labels[-len(out):] == out  # the whole output and EOS survive
    assert labels[:-len(out)] == [IGNORE] * (48 - len(out))
    assert ids[:-len(out)] == full_prompt[-(48 - len(out)):]  # the prompt's end (response marker) survives
    assert tok.decode(ids[:-len(out)]).endswith("### Response:\n")


def test_truncation_of_a_long_output(tok):
    ex = Example("Write the word in uppercase.", "", " ".join(["apple"] * 80))
    ids, labels = encode(ex, tok, "alpaca", 40)
    assert len(ids) == 40
    n_out = sum(lab != IGNORE for lab in labels)
    assert n_out == 20  # half the budget for the output, the rest for the prompt's end
    assert tok.decode(ids[:20]).endswith("### Response:\n")


@pytest.mark.parametrize("max_length", [1, 2, 3, 7])
def test_truncation_never_exceeds_max_length(tok, max_length):
    ex = Example("Reverse the word.", "apple banana", "elppa ananab")
    ids, labels = encode(ex, tok, "alpaca", max_length)
    assert len(ids) == len(labels) <= max_length
    assert any(lab != IGNORE for lab in labels)


def test_batch_padding(tok):
    examples = [Example("Reverse the word.", "apple", "elppa"),
                Example("Write the word in uppercase.", "river banana cherry apple", "RIVER BANANA CHERRY APPLE"),
                Example("Say yes.", "", "yes")]
    enc = encode_all(examples, tok, "alpaca", 256)
    assert isinstance(enc, Encoded) and len(enc) == 3
    lengths = [len(x) for x in enc.input_ids]
    b = enc.batch([0, 2], tok.pad_token_id)
    width = max(lengths[0], lengths[2])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, width)
    for row, i in enumerate([0, 2]):
        n = lengths[i]
        assert b["input_ids"][row, :n].tolist() == enc.input_ids[i]
        assert b["labels"][row, :n].tolist() == enc.labels[i]
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)  # right-padded
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (b["labels"][row, n:] == IGNORE).all()
    full = enc.batch([0, 1, 2], tok.pad_token_id)
    assert full["input_ids"].shape[1] == max(lengths) > width  # padded per batch, not globally
    assert full["input_ids"].dtype == torch.long
