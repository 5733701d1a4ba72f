"""Records -> prompts -> token sequences with the prompt masked out of the loss.

Prompt formats live here and nowhere else. A record is normalised to instruction/input/output whether it
came as Alpaca (instruction, input, output) or prompt/completion; a malformed row is an error naming the
file, the row and the field.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ablate.config import DataConfig
from lora_ablate.errors import UserError, choices

IGNORE = -100
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}

ALPACA = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    family: str = ""


@dataclass(frozen=True)
class EvalSet:
    name: str
    examples: tuple[Example, ...]
    description: str = ""
    metrics: tuple[str, ...] = ("exact_match", "rouge_l")  # scored on greedy generations
    headline: str = "exact_match"  # the one number a table shows for this set
    leakage: str = "check"
    role: str = "heldout"  # or "retention": scored for what training forgets (eval.retention)
    generate: bool = True  # scored on generations when eval.generate is on too


# ---------------------------------------------------------------- sources


def load_examples(source: str, fields: dict | None = None, size: int = 0, seed: int = 0,
                  fmt: str = "", hint: str = "data.fields") -> list[Example]:
    """Records from ``builtin:<split>``, ``split:<split>:<part>``, a local file, or ``hf:<dataset id>``; the
    first ``size`` (0 = all). ``hint`` is where a field mapping is given, for the error that asks for one."""
    fields = fields or {}
    if source.startswith("builtin:"):
        from lora_ablate import suite

        split = source.split(":", 1)[1]
        rows = suite.build_split(split, size or 1000, seed)
        return [Example(r["instruction"], r["input"], r["output"], r.get("family", "")) for r in rows]
    if source.startswith("split:"):
        from lora_ablate import splits

        rows, split_fields = splits.split_rows(source, seed, _pool_examples)
        fields, where = fields or split_fields, source
    elif source.startswith("hf:"):
        rows, where = _hub_rows(source[3:]), source
    else:
        rows, where = _file_rows(Path(source)), source
    listed = fields.get("instances", "instances")
    examples = []
    for i, row in enumerate(rows):
        if size and len(examples) >= size:
            break
        if fmt == "self_instruct" or (listed in row and fields.get("output", "output") not in row):
            # the instances shape: one example per instance (format: self_instruct keeps only the first)
            flat = _instance_rows(row, fields, where, i, first_only=fmt == "self_instruct")
            examples += [_to_example(r, {}, f"{where} row {i} instance {j}", hint) for j, r in enumerate(flat)]
        else:
            examples.append(_to_example(row, fields, f"{where} row {i}", hint))
    if not examples:
        raise UserError(f"data source {where!r} has no records")
    return examples[:size] if size else examples


def _pool_examples(split) -> list[tuple[dict, Example | None]]:
    """A split's pool, each row with its example (None: a row the loader refuses, e.g. an empty answer)."""
    out = []
    for i, row in enumerate(_file_rows(split.pool)):
        try:
            out.append((row, _to_example(row, split.fields, f"{split.pool} row {i}")))
        except UserError:
            out.append((row, None))
    return out


def _file_rows(path: Path) -> list[dict]:
    if path.is_dir():
        raise UserError(f"data file {str(path)!r} is a directory, not a record file")
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise UserError(f"data file {str(path)!r} has an unknown format {suffix!r}; "
                        f"use one of: {choices(['.jsonl', '.jsonl.gz', '.json', '.csv', '.parquet'])}")
    _check_content(path, suffix)
    if suffix in (".jsonl", ".gz"):  # datasets reads a line that is an array or a number as a row of its own
        _check_json_lines(path)
    import datasets

    datasets.disable_progress_bars()
    kwargs = _csv_as_text(path) if suffix == ".csv" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log lines would break the one-line error
    try:
        ds = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types for a broken file; one line is what the user needs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"data file {str(path)!r} could not be read: {msg}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return list(ds)


def _check_content(path: Path, suffix: str) -> None:
    """An empty or binary file, named as such: ``datasets`` reports them as StopIteration or "an error
    occurred while generating the dataset"."""
    import gzip

    where = f"data file {str(path)!r}"
    if suffix == ".parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise UserError(f"{where} is not a Parquet file (it does not start with PAR1)")
        return
    try:
        with (gzip.open if suffix == ".gz" else open)(path, "rb") as f:
            head = f.read(1 << 16)
    except (OSError, EOFError):
        raise UserError(f"{where} is not a gzip file; compress JSON lines with gzip, or drop the .gz") from None
    if not head.strip():
        raise UserError(f"{where} is empty: it holds no records")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not a character cut at the sample's end
            raise UserError(f"{where} is not UTF-8 text (binary byte at offset {e.start}); "
                            "records must be UTF-8 JSON lines, JSON or CSV") from None
        text = ""
    if "\x00" in text:
        raise UserError(f"{where} is not text (it holds NUL bytes); records must be UTF-8 JSON lines, JSON or CSV")


def _csv_as_text(path: Path) -> dict:
    """CSV has no types: read every column as text ('007' stays '007', an empty cell is '')."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # pandas drops a byte-order mark too
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not header or len(set(header)) != len(header):
        return {}
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}),
            "keep_default_na": False}


def _check_json_lines(path: Path) -> None:
    """Name the first row of a JSONL file that is not a JSON object."""
    import gzip
    import json

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            row = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ok = isinstance(json.loads(line), dict)
                except ValueError as e:
                    raise UserError(f"{path} row {row} (line {lineno}): not valid JSON: {e.msg}") from None
                if not ok:
                    raise UserError(f"{path} row {row} (line {lineno}): not a JSON object")
                row += 1
    except (OSError, UnicodeDecodeError):
        return


def _hub_rows(dataset_id: str) -> list[dict]:
    import logging

    import datasets

    # without a network the hub client logs every retry; the one-line error below says what matters
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return list(datasets.load_dataset(dataset_id, split="train"))
    except Exception as e:
        raise UserError(f"hub dataset {dataset_id!r} could not be loaded: {str(e).splitlines()[0]}") from None
    finally:
        hub_log.setLevel(level)


def _instance_rows(row: dict, fields: dict, where: str, i: int, first_only: bool) -> list[dict]:
    col = fields.get("instances", "instances")
    instances = row.get(col)
    if not isinstance(instances, list) or not instances or not all(isinstance(x, dict) for x in instances):
        raise UserError(f"{where} row {i}: field {col!r} must be a non-empty list of {{input, output}}")
    instruction = row.get(fields.get("instruction", "instruction"))
    family = str(row.get("family", row.get("name", row.get("template", ""))) or "")
    return [{"instruction": instruction, "input": x.get("input") or "", "output": x.get("output"), "family": family}
            for x in (instances[:1] if first_only else instances)]


def _to_example(row: dict, fields: dict, at: str, hint: str = "data.fields") -> Example:
    def get(name: str, required: bool):
        col = fields.get(name, name)
        if name in fields and col not in row:
            # a mapping names a column on purpose: one that is not there is a typo, even for the optional input
            raise UserError(f"{at}: {hint} maps {name} to {col!r}, which is not a column "
                            f"(columns: {choices(sorted(row))})")
        if col not in row or row[col] is None:
            if required:
                raise UserError(f"{at}: field {col!r} is missing (columns: {choices(sorted(row))})")
            return ""
        value = row[col]
        if not isinstance(value, str):
            raise UserError(f"{at}: field {col!r} must be a string, not {type(value).__name__}")
        return value

    alpaca = fields.get("instruction", "instruction") in row or "instruction" in fields
    if alpaca:
        instruction, inp, output = get("instruction", True), get("input", False), get("output", True)
    else:
        if fields.get("prompt", "prompt") not in row:
            raise UserError(f"{at}: has neither instruction/output nor prompt/completion fields "
                            f"(columns: {choices(sorted(row))}); map them with {hint}")
        inp = get("input", False) if "input" in fields else ""
        instruction, output = get("prompt", True), get("completion", True)
    if not instruction.strip():
        key = "instruction" if alpaca else "prompt"
        raise UserError(f"{at}: field {fields.get(key, key)!r} is empty")
    if not output.strip():
        key = "output" if alpaca else "completion"
        raise UserError(f"{at}: field {fields.get(key, key)!r} is empty")
    return Example(instruction, inp, output, str(row.get("family", row.get("template", "")) or ""))


# ---------------------------------------------------------------- held-out sets (YAML data under evals/sets)

DEFAULT_METRICS = ("exact_match", "rouge_l")
LEAKAGE = ("check", "expected")  # expected: the set is training data on purpose (evals/sets/train.yaml)


def eval_set_names() -> list[str]:
    from lora_ablate.suite import evals_dir

    return sorted(p.stem for p in (evals_dir() / "sets").glob("*.yaml"))


def set_spec(entry, fields: dict | None = None) -> dict:
    """What an ``eval.sets`` entry means: ``{name, source, fields, format, size, metrics, headline, ...}``.

    A set file (``evals/sets/<name>.yaml`` or a path ending in .yaml) brings its own mapping and resolves a
    relative source against the repository root; a bare record file or an inline mapping without ``fields``
    is read with ``fields`` (data.fields), since a held-out file usually has the training file's columns.
    """
    from lora_ablate.config import read_mapping
    from lora_ablate.suite import evals_dir, set_name

    if isinstance(entry, dict):
        spec = {k: v for k, v in entry.items() if k != "path"}
        spec["source"] = str(entry.get("path") or entry.get("source"))
        spec.setdefault("fields", fields)
        where = "eval.sets entry"
    else:
        named = evals_dir() / "sets" / f"{entry}.yaml"
        spec_file = named if named.is_file() else Path(entry) if entry.lower().endswith((".yaml", ".yml")) else None
        if spec_file is not None:
            if not spec_file.is_file():
                raise UserError(f"held-out set file {entry!r} does not exist")
            spec = read_mapping(spec_file, "held-out set file", "a mapping (source, fields, metrics, ...)")
            if not spec.get("source"):
                raise UserError(f"held-out set file {str(spec_file)!r} has no source")
            source = os.path.expandvars(str(spec["source"]))
            if not source.startswith(("builtin:", "hf:", "split:")) and not Path(source).is_absolute():
                source = str((evals_dir().parent / source).resolve())
                if not Path(source).exists():  # a file outside the clone: say how to get it, not just "missing"
                    how = spec.get("provide") or f"put the file there or drop {entry} from eval.sets"
                    raise UserError(f"held-out set {entry!r} reads {source}, which is missing: {how}")
            spec["source"] = source
            where = f"held-out set file {str(spec_file)!r}"
        elif entry.startswith(("builtin:", "split:")):
            spec = {"source": entry, "size": 200 if entry.startswith("builtin:") else 0}
            where = f"eval.sets entry {entry!r}"
        elif Path(entry).suffix.lower() in FILE_FORMATS or Path(entry).exists():
            spec, where = {"source": entry, "fields": fields}, f"eval.sets entry {entry!r}"
        else:
            raise UserError(f"unknown held-out set {entry!r}; choose one of: {choices(eval_set_names())}, "
                            "a set .yaml file, or a record file")
    spec["name"] = set_name(entry)
    spec["where"] = where
    _check_spec(spec)
    return spec


def _check_spec(spec: dict) -> None:
    from lora_ablate.metrics import available_metrics

    where = spec["where"]
    metrics = spec.get("metrics") or list(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in available_metrics()]
    if unknown:
        raise UserError(f"{where}: unknown metric {unknown[0]!r}; choose from: {choices(available_metrics())}")
    spec["metrics"] = tuple(metrics)
    headline = spec.get("headline") or metrics[0]
    if headline not in (*metrics, "nll", "ppl"):
        raise UserError(f"{where}: headline {headline!r} is not one of its metrics ({choices([*metrics, 'nll'])})")
    spec["headline"] = headline
    if spec.get("leakage", "check") not in LEAKAGE:
        raise UserError(f"{where}: leakage={spec['leakage']!r}; choose one of: {choices(LEAKAGE)}")
    if not isinstance(spec.get("generate", True), bool):
        raise UserError(f"{where}: generate={spec['generate']!r} is not valid; write true or false")


def load_eval_set(name, size: int, seed: int, fields: dict | None = None, role: str = "heldout") -> EvalSet:
    """A held-out set from an ``eval.sets`` entry (see :func:`set_spec`); ``size`` 0 = the set's own size.
    A retention set is scored by NLL unless its spec says ``generate: true``: what it measures is how
    much likelier the base's kind of text stays, and generation would cost most of its evaluation."""
    spec = set_spec(name, fields)
    hint = "data.fields" if fields and spec.get("fields") is fields else "fields: in its eval.sets entry or set file"
    examples = load_examples(spec["source"], spec.get("fields"), size or int(spec.get("size") or 0), seed,
                             spec.get("format", ""), hint)
    generate = bool(spec.get("generate", role != "retention"))
    # a set scored without generations has only NLL to lead with
    headline = spec["headline"] if generate or spec["headline"] in ("nll", "ppl") else "nll"
    return EvalSet(spec["name"], tuple(examples), spec.get("description", ""), spec["metrics"], headline,
                   spec.get("leakage", "check"), role, generate)


def load_eval_sets(ev, data: DataConfig) -> list[EvalSet]:
    """The held-out sets of ``eval.sets`` then the retention sets of ``eval.retention``."""
    sets = [load_eval_set(entry, ev.size, data.seed, data.fields) for entry in ev.sets]
    sets += [load_eval_set(entry, ev.size, data.seed, data.fields, "retention") for entry in ev.retention]
    names = [s.name for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"held-out set name(s) {twice} appear twice in eval.sets and eval.retention; a set's "
                        "metrics are recorded under its name, so name each once")
    return sets


# ---------------------------------------------------------------- prompts and tokens


def render_prompt(ex: Example, tokenizer, template: str) -> str:
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template=chat but this tokenizer has no chat template; use data.template=alpaca")
        content = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    if ex.input:
        return ALPACA.format(ctx=", paired with an input that provides further context",
                             instruction=ex.instruction, input_block=f"### Input:\n{ex.input}\n\n")
    return ALPACA.format(ctx="", instruction=ex.instruction, input_block="")


def prompt_ids(ex: Example, tokenizer, template: str) -> list[int]:
    # a chat template already carries its special tokens in the text
    return tokenizer(render_prompt(ex, tokenizer, template), add_special_tokens=template != "chat")["input_ids"]


def encode(ex: Example, tokenizer, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens labelled IGNORE, the output and EOS labelled with themselves.

    Sequences longer than ``max_length`` lose prompt tokens from the left first (the instruction's end
    and the response marker stay), then output tokens from the right.
    """
    p = prompt_ids(ex, tokenizer, template)
    o = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    o = o[: max(1, max_length // 2)] if len(p) + len(o) > max_length and len(o) > max_length // 2 else o
    p = p[len(p) - (max_length - len(o)):] if len(p) + len(o) > max_length else p
    return p + o, [IGNORE] * len(p) + o


@dataclass
class Encoded:
    """A pre-tokenised set: one list of ids and labels per example."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self):
        return len(self.input_ids)

    @functools.cached_property
    def label_counts(self) -> list[int]:
        """Label tokens after the next-token shift per example (see ``trial.label_tokens``)."""
        return [sum(1 for t in labels[1:] if t != IGNORE) for labels in self.labels]

    def batch(self, idx, pad_id: int, device=None) -> dict[str, torch.Tensor]:
        """Right-padded batch of the examples at ``idx``, padded to the longest of them."""
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            labels[row, :n] = torch.tensor(self.labels[i])
            mask[row, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def encode_all(examples, tokenizer, template: str, max_length: int) -> Encoded:
    pairs = [encode(ex, tokenizer, template, max_length) for ex in examples]
    return Encoded([p[0] for p in pairs], [p[1] for p in pairs])


def load_train(cfg: DataConfig) -> list[Example]:
    return load_examples(cfg.train, cfg.fields, cfg.train_size, cfg.seed)
