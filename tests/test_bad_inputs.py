"""Bad input, tried as a user would, through the real CLI: every case exits 2 with ONE ``error:`` line that
names the bad value (and the choices, where there are some), no traceback, and nothing written: no output
folder, no workspace, no new study or run in an existing workspace. Then a study with planted passwords:
no output, file, param or tag holds them.

Almost every case fails before a model loads; the few that need one use tiny-llama.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ablate.cli import main

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-pw-41x"
# small and cheap everywhere; tracking off unless a case turns it on
TINY = ["model.name=tiny-llama", "data.train_size=16", "data.max_length=64", "train.steps=1", "train.batch_size=4",
        "eval.size=4", "eval.generate=false", "eval.base=false", "eval.sets=[heldout_instances]"]
TRAIN = ["train", "--out", "{tmp}/out", "--quiet", *TINY, "tracking.enabled=false"]
STUDY = ["study", "--workspace", "{tmp}/ws", "--space", "{space}", "--quiet", *TINY]
ON_WS = ["--workspace", "{ws}", "--study", "{study}"]
ROWS = [{"instruction": "Reverse the word.", "input": "apple", "output": "elppa"}] * 4

# (id, argv, substrings the error line must hold)
CASES = [
    # ---- config: every section, wrong types, out of range, unknown keys and choices
    ("model.dtype", [*TRAIN, "model.dtype=float8"], ["float8", "float32, bfloat16"]),
    ("model.quantization", [*TRAIN, "model.quantization=2bit"], ["2bit", "8bit, 4bit"]),
    ("model.device", [*TRAIN, "model.device=tpu"], ["tpu", "cuda:N"]),
    ("model.name empty", [*TRAIN, "model.name="], ["model.name", "tiny-llama"]),
    ("model.name missing path", [*TRAIN, "model.name={tmp}/no-model"], ["no-model"]),
    ("model unknown key", [*TRAIN, "model.bogus=1"], ["model.bogus", "dtype"]),
    ("data.template", [*TRAIN, "data.template=llama"], ["llama", "alpaca, chat"]),
    ("data.max_length 0", [*TRAIN, "data.max_length=0"], ["data.max_length=0", "> 0"]),
    ("data.max_length text", [*TRAIN, "data.max_length=abc"], ["'abc'", "integer"]),
    ("data.train_size neg", [*TRAIN, "data.train_size=-1"], ["data.train_size=-1"]),
    ("data.fields key", [*TRAIN, "data.fields={{foo: bar}}"], ["foo", "instruction"]),
    ("data.fields type", [*TRAIN, "data.fields=3"], ["data.fields=3", "mapping"]),
    ("data.seed float", [*TRAIN, "data.seed=1.5"], ["1.5", "integer"]),
    ("lora.r 0", [*TRAIN, "lora.r=0"], ["lora.r=0", "positive"]),
    ("lora.r text", [*TRAIN, "lora.r=abc"], ["'abc'", "integer"]),
    ("lora.r bool", [*TRAIN, "lora.r=true"], ["True", "integer"]),
    ("lora.alpha_rule", [*TRAIN, "lora.alpha_rule=sqrt"], ["sqrt", "rank, free, rslora"]),
    ("lora.alpha", [*TRAIN, "lora.alpha=-1"], ["lora.alpha=-1.0"]),
    ("lora.dropout", [*TRAIN, "lora.dropout=1.5"], ["1.5", "[0, 1)"]),
    ("lora.targets empty", [*TRAIN, "lora.targets=[]"], ["lora.targets", "q, k, v, o"]),
    ("lora.targets unknown", [*TRAIN, "lora.targets=[q,z]"], ["'z'", "q, k, v, o"]),
    ("lora.targets repeat", [*TRAIN, "lora.targets=[q,q]"], ["['q', 'q']", "repeats"]),
    ("lora.init", [*TRAIN, "lora.init=xavier"], ["xavier", "default, gaussian, pissa, olora, loftq"]),
    ("lora.init loftq unquantized", [*TRAIN, "lora.init=loftq"], ["lora.init=loftq needs model.quantization=4bit",
                                                                  "got model.quantization=none"]),
    ("lora.init loftq 8bit", [*TRAIN, "lora.init=loftq", "model.quantization=8bit"],
     ["lora.init=loftq", "got model.quantization=8bit"]),
    ("lora.r above width", [*TRAIN, "lora.r=100000"], ["lora.r=100000", "v_proj", "32x64", "<= 32"]),
    ("train.steps", [*TRAIN, "train.steps=0"], ["train.steps=0"]),
    ("train.batch_size", [*TRAIN, "train.batch_size=-2"], ["train.batch_size=-2"]),
    ("train.lr 0", [*TRAIN, "train.lr=0"], ["train.lr=0.0"]),
    ("train.lr text", [*TRAIN, "train.lr=fast"], ["'fast'", "number"]),
    ("train.warmup", [*TRAIN, "train.warmup=1.5"], ["train.warmup=1.5", "[0, 1)"]),
    ("train.schedule", [*TRAIN, "train.schedule=step"], ["step", "cosine, linear, constant"]),
    ("train.checkpointing", [*TRAIN, "train.gradient_checkpointing=maybe"], ["maybe", "true or false"]),
    ("train.max_grad_norm", [*TRAIN, "train.max_grad_norm=-1"], ["train.max_grad_norm=-1.0"]),
    ("train unknown key", [*TRAIN, "train.epochs=3"], ["train.epochs", "steps"]),
    ("eval.sets empty", [*TRAIN, "eval.sets=[]"], ["eval.sets"]),
    ("eval.sets unknown", [*TRAIN, "eval.sets=[heldout_nope]"], ["heldout_nope", "heldout_instances"]),
    ("eval.size", [*TRAIN, "eval.size=-1"], ["eval.size=-1"]),
    ("eval.batch_size", [*TRAIN, "eval.batch_size=0"], ["eval.batch_size=0"]),
    ("eval.max_new_tokens", [*TRAIN, "eval.max_new_tokens=0"], ["eval.max_new_tokens=0"]),
    ("eval.generate", [*TRAIN, "eval.generate=perhaps"], ["perhaps", "true or false"]),
    ("eval.retention mapping", [*TRAIN, "eval.retention=[{{path: x.jsonl}}]"], ["eval.retention entry", "x.jsonl",
                                                                                 "retention_user"]),
    ("eval.retention unknown", [*TRAIN, "eval.retention=[nope]"], ["'nope'", "retention_user"]),
    ("eval.retention twice", [*TRAIN, "eval.retention=[heldout_instances]"], ["heldout_instances", "twice"]),
    ("eval set generate", [*TRAIN, "eval.retention=[{tmp}/badgen.yaml]"], ["generate='maybe'", "true or false"]),
    ("split dedupe", [*TRAIN, "data.train=split:{tmp}/badsplit.yaml:train"], ["dedupe='fuzzy'",
                                                                             "none, exact, near, passage"]),
    ("study.pruner", [*TRAIN, "study.pruner=asha"], ["asha", "none, median, hyperband"]),
    ("study.direction", [*TRAIN, "study.direction=up"], ["'up'", "minimize, maximize"]),
    ("study.compile", [*TRAIN, "study.compile=maybe"], ["maybe", "auto, true, false"]),
    ("study.storage form", [*TRAIN, "study.storage=nope"], ["'nope'", "sqlite:///"]),
    ("study.storage scheme", [*TRAIN, "study.storage=foo://x/y"], ["foo://x/y", "sqlite, postgresql"]),
    ("tracking.uri form", [*TRAIN, "tracking.uri=nope"], ["'nope'", "http://"]),
    ("tracking.enabled", [*TRAIN, "tracking.enabled=2"], ["tracking.enabled=2", "true or false"]),
    ("unknown section", [*TRAIN, "foo.bar=1"], ["'foo'", "model, data, lora"]),
    ("override form", [*TRAIN, "r=8"], ["'r=8'", "section.key=value"]),
    ("config missing", [*TRAIN, "--config", "{tmp}/missing.yaml"], ["missing.yaml"]),
    ("config bad yaml", [*TRAIN, "--config", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    ("config a list", [*TRAIN, "--config", "{tmp}/list.yaml"], ["list.yaml", "mapping"]),
    ("config section", [*TRAIN, "--config", "{tmp}/section.yaml"], ["'optimizer'", "model, data"]),
    ("config print", ["config", "lora.r=-3"], ["lora.r=-3"]),
    ("argparse flag", ["train", "--bogus"], ["--bogus"]),
    ("argparse command", ["trian"], ["'trian'", "'train'"]),
    # ---- train outputs
    ("out is a file", ["train", "--out", "{tmp}/afile", *TINY], ["afile", "already exists"]),
    ("out inside a file", ["train", "--out", "{tmp}/afile/run", *TINY], ["afile", "a file"]),
    ("out under /proc", ["train", "--out", "/proc/lora-run", *TINY], ["/proc/lora-run", "system folder"]),
    ("out under /sys", ["train", "--out", "/sys/lora-run", *TINY], ["/sys/lora-run", "system folder"]),
    # --merge on a k-bit base works (tests/test_kbit.py); a k-bit tiny-llama is refused (on a CPU: k-bit is)
    ("merge quantized", ["train", "--merge", *TRAIN[1:], "model.quantization=4bit"], ["model.quantization", "none"]),
    # ---- data files
    ("data empty", [*TRAIN, "data.train={tmp}/empty.jsonl"], ["empty.jsonl", "empty"]),
    ("data blank lines", [*TRAIN, "data.train={tmp}/blank.jsonl"], ["blank.jsonl", "empty"]),
    ("data directory", [*TRAIN, "data.train={tmp}/adir.jsonl"], ["adir.jsonl", "directory"]),
    ("data binary", [*TRAIN, "data.train={tmp}/binary.jsonl"], ["binary.jsonl", "not UTF-8"]),
    ("data missing", [*TRAIN, "data.train={tmp}/none.jsonl"], ["none.jsonl", "does not exist"]),
    ("data format", [*TRAIN, "data.train={tmp}/data.txt"], ["'.txt'", ".jsonl"]),
    ("data bad json", [*TRAIN, "data.train={tmp}/badjson.jsonl"], ["badjson.jsonl", "row 1", "not valid JSON"]),
    ("data not object", [*TRAIN, "data.train={tmp}/list.jsonl"], ["list.jsonl", "not a JSON object"]),
    ("data no output", [*TRAIN, "data.train={tmp}/nooutput.jsonl"], ["'output' is missing", "instruction"]),
    ("data int output", [*TRAIN, "data.train={tmp}/intoutput.jsonl"], ["'output'", "must be a string"]),
    ("data empty field", [*TRAIN, "data.train={tmp}/blankinstr.jsonl"], ["'instruction'", "is empty"]),
    ("data no fields", [*TRAIN, "data.train={tmp}/nofields.jsonl"], ["neither", "data.fields"]),
    ("data mapping", [*TRAIN, "data.train={tmp}/data.jsonl", "data.fields={{output: answer}}"],
     ["'answer', which is not a column", "output"]),
    ("data csv empty", [*TRAIN, "data.train={tmp}/empty.csv"], ["empty.csv", "empty"]),
    ("data parquet junk", [*TRAIN, "data.train={tmp}/junk.parquet"], ["junk.parquet", "not a Parquet"]),
    ("data gz junk", [*TRAIN, "data.train={tmp}/junk.jsonl.gz"], ["junk.jsonl.gz", "gzip"]),
    ("data gz empty", [*TRAIN, "data.train={tmp}/empty.jsonl.gz"], ["empty.jsonl.gz", "empty"]),
    ("eval set empty file", [*TRAIN, "eval.sets=[{tmp}/empty.jsonl]"], ["empty.jsonl", "empty"]),
    ("eval set directory", [*TRAIN, "eval.sets=[{tmp}/adir.jsonl]"], ["adir.jsonl", "directory"]),
    # ---- study
    ("space unknown", [*STUDY[:3], "--space", "nope", *TINY], ["nope", "rank"]),
    ("space bad axis", [*STUDY[:3], "--space", "{tmp}/badaxis.yaml", *TINY], ["lora.rr"]),
    ("space bad yaml", [*STUDY[:3], "--space", "{tmp}/bad.yaml", *TINY], ["bad.yaml"]),
    ("seeds 0", [*STUDY, "--seeds", "0"], ["study.seeds=0"]),
    ("seeds text", [*STUDY, "--seeds", "abc"], ["'abc'", "--seeds"]),
    ("pack text", [*STUDY, "--pack", "x"], ["'x'", "auto"]),
    ("pack 0", [*STUDY, "--pack", "0"], ["'0'", "auto"]),
    ("n-trials neg", [*STUDY, "--n-trials", "-1"], ["study.n_trials=-1"]),
    ("timeout neg", [*STUDY, "--timeout", "-5"], ["study.timeout=-5.0"]),
    ("objective metric", [*STUDY, "--objective", "heldout_instances/bleu"], ["bleu", "nll"]),
    ("objective set", [*STUDY, "--objective", "nope/nll"], ["'nope'", "heldout_instances"]),
    ("objective generated", [*STUDY, "--objective", "heldout_instances/exact_match"],
     ["exact_match", "eval.generate=false"]),
    ("pruner no every", [*STUDY, "--pruner", "median"], ["median", "eval.every"]),
    ("storage scheme", [*STUDY, "--storage", "foo://x/y"], ["foo://x/y", "sqlite, postgresql"]),
    ("storage form", [*STUDY, "--storage", "optuna.db"], ["'optuna.db'", "sqlite:///"]),
    ("storage under /proc", [*STUDY, "--storage", "sqlite:////proc/lora/optuna.db"], ["/proc/lora", "system"]),
    ("tracking scheme", [*STUDY, "--tracking-uri", "foo://x/y"], ["foo://x/y", "sqlite, postgresql, mysql"]),
    ("tracking dead server", [*STUDY, "--tracking-uri", "http://127.0.0.1:1/"], ["127.0.0.1:1", "does not answer"]),
    ("tracking bad port", [*STUDY, "--tracking-uri", "http://127.0.0.1:port/"], ["127.0.0.1:port"]),
    ("tracking under /sys", [*STUDY, "--tracking-uri", "sqlite:////sys/lora/mlflow.db"], ["/sys/lora", "system"]),
    ("workspace a file", [*STUDY[:2], "{tmp}/afile", *STUDY[3:]], ["afile", "a file"]),
    ("workspace in a file", [*STUDY[:2], "{tmp}/afile/ws", *STUDY[3:]], ["afile", "a file"]),
    ("workspace /proc", [*STUDY[:2], "/proc/lora-ws", *STUDY[3:]], ["/proc/lora-ws", "system folder"]),
    ("workspace /sys", [*STUDY[:2], "/sys/lora-ws", *STUDY[3:]], ["/sys/lora-ws", "system folder"]),
    ("study rank above width", [*STUDY, "--space", "{tmp}/wide.yaml"], ["lora.r=100000", "<= 32"]),
    ("space loftq axis", [*STUDY, "--space", "{tmp}/loftq.yaml"], ["space loftq: axis lora.init: lora.init=loftq",
                                                                   "model.quantization=none"]),
    ("workers rank above width", [*STUDY, "--workers", "2", "--space", "{tmp}/wide.yaml"], ["lora.r=100000", "<= 32"]),
    ("resume other objective", ["study", "--workspace", "{ws}", "--space", "{space}", "--study-name", "{study}",
                                "--storage", "{storage}", "--tracking-uri", "{tracking}", "--quiet", *TINY,
                                "study.direction=maximize"], ["{study}", "optimises"]),
    ("status no storage", ["status", "--workspace", "{tmp}/ws"], ["ws", "no Optuna storage"]),
    ("ui no store", ["ui", "--workspace", "{tmp}/ws"], ["mlflow.db", "no MLflow store"]),
    # ---- export and compare
    ("export unknown study", ["export", "--workspace", "{ws}", "--study", "nope"], ["'nope'", "{study}"]),
    ("export format", ["export", *ON_WS, "--format", "pdf"], ["'pdf'", "md, csv, tex, html"]),
    ("export format empty", ["export", *ON_WS, "--format", ","], ["','", "md, csv"]),
    ("export metric", ["export", *ON_WS, "--metrics", "heldout_instances/bleu"],
     ["heldout_instances/bleu", "heldout_instances/nll"]),
    ("export no store", ["export", "--workspace", "{tmp}/ws", "--study", "x"], ["mlflow.db", "no MLflow store"]),
    ("export tracking scheme", ["export", "--study", "x", "--tracking-uri", "foo://x/y"], ["foo://x/y", "sqlite"]),
    ("export dead server", ["export", "--study", "x", "--tracking-uri", "http://127.0.0.1:1"], ["127.0.0.1:1"]),
    ("export out a file", ["export", *ON_WS, "--out", "{tmp}/afile"], ["afile", "already exists"]),
    ("export out /proc", ["export", *ON_WS, "--out", "/proc/lora-export"], ["/proc/lora-export", "system"]),
    ("export both stores", ["export", *ON_WS, "--tracking-uri", "{tracking}"], ["--tracking-uri", "--workspace"]),
    ("compare no match", ["compare", *ON_WS, "--a", "r=999", "--b", "r=4"], ["r=999", "matches no", "2, 4"]),
    ("compare unknown param", ["compare", *ON_WS, "--a", "rank=2", "--b", "r=4"], ["'rank'", "r, "]),
    ("compare selection form", ["compare", *ON_WS, "--a", "=2", "--b", "r=4"], ["'=2'", "key=value"]),
    ("compare targets", ["compare", *ON_WS, "--a", "targets=qz", "--b", "r=4"], ["'qz'", "q, k, v, o"]),
    ("compare number", ["compare", *ON_WS, "--a", "r=abc", "--b", "r=4"], ["'abc'", "not a number"]),
    ("compare same", ["compare", *ON_WS, "--a", "r=2", "--b", "r=2"], ["r=2", "same configuration"]),
    ("compare b and all", ["compare", *ON_WS, "--a", "r=2", "--b", "r=4", "--all"], ["--b", "--all", "both"]),
    ("compare no b", ["compare", *ON_WS, "--a", "r=2"], ["--b", "--all", "neither"]),
    ("compare many, one bad", ["compare", *ON_WS, "--a", "r=2", "--b", "r=4", "--b", "r=9"], ["r=9", "matches no"]),
    ("compare metric", ["compare", *ON_WS, "--a", "r=2", "--b", "r=4", "--metric", "x/nll"], ["'x/nll'"]),
    ("compare n-boot", ["compare", *ON_WS, "--a", "r=2", "--b", "r=4", "--n-boot", "10"], ["10", "at least 100"]),
    ("compare unknown study", ["compare", "--workspace", "{ws}", "--study", "nope", "--a", "r=2", "--b", "r=4"],
     ["'nope'", "{study}"]),
    # ---- eval
    ("eval no adapter", ["eval", "--adapter", "{tmp}/none"], ["none", "not a PEFT adapter"]),
    ("eval no config", ["eval", "--adapter", "{adapters}/bare"], ["bare", "--config"]),
    ("eval corrupt config", ["eval", "--adapter", "{adapters}/badjson"], ["adapter_config.json", "not valid JSON"]),
    ("eval not lora", ["eval", "--adapter", "{adapters}/notlora"], ["'IA3'", "LORA"]),
    ("eval bad lora field", ["eval", "--adapter", "{adapters}/badfield"], ["adapter_config.json", "r='abc'"]),
    ("eval corrupt weights", ["eval", "--adapter", "{adapters}/badweights"], ["adapter_model.safetensors",
                                                                             "corrupt"]),
    ("eval no weights", ["eval", "--adapter", "{adapters}/noweights"], ["noweights", "adapter_model.safetensors"]),
    ("eval other base", ["eval", "--adapter", "{adapters}/otherbase", "--config", "{adapters}/otherbase/eval.yaml"],
     ["otherbase", "'other-llama'", "'tiny-llama'", "48", "64"]),
    ("eval bad override", ["eval", "--adapter", "{adapters}/good", "eval.size=-2"], ["eval.size=-2"]),
    ("eval out is a folder", ["eval", "--adapter", "{adapters}/good", "--out", "{tmp}/adir.jsonl"],
     ["adir.jsonl", "folder"]),
    ("eval out exists", ["eval", "--adapter", "{adapters}/good", "--out", "{tmp}/afile"], ["afile", "already exists"]),
    ("eval out in a file", ["eval", "--adapter", "{adapters}/good", "--out", "{tmp}/afile/x.json"], ["afile",
                                                                                                    "a file"]),
    ("eval out /proc", ["eval", "--adapter", "{adapters}/good", "--out", "/proc/x.json"], ["/proc", "system"]),
]


# ---------------------------------------------------------------- inputs


def _write_inputs(tmp: Path) -> None:
    def jsonl(name, rows):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    (tmp / "afile").write_text("not a folder\n")
    (tmp / "adir.jsonl").mkdir()
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n\n")
    (tmp / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 8)
    (tmp / "data.txt").write_text("hello\n")
    (tmp / "badjson.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    (tmp / "list.jsonl").write_text("[1, 2]\n")
    jsonl("data.jsonl", ROWS)
    jsonl("nooutput.jsonl", [{"instruction": "x", "input": ""}])
    jsonl("intoutput.jsonl", [{"instruction": "x", "output": 5}])
    jsonl("blankinstr.jsonl", [{"instruction": "  ", "output": "y"}])
    jsonl("nofields.jsonl", [{"question": "x", "answer": "y"}])
    (tmp / "empty.csv").write_text("")
    (tmp / "junk.parquet").write_bytes(b"this is not parquet")
    (tmp / "junk.jsonl.gz").write_bytes(b"plain text, not gzip\n")
    with gzip.open(tmp / "empty.jsonl.gz", "wb"):
        pass
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "section.yaml").write_text("optimizer: {lr: 1}\n")
    (tmp / "badaxis.yaml").write_text("axes:\n  lora.rr: {grid: [1, 2]}\n")
    (tmp / "wide.yaml").write_text("axes:\n  lora.r: {grid: [100000]}\n")
    (tmp / "loftq.yaml").write_text("axes:\n  lora.init: {grid: [default, loftq]}\n")
    jsonl("pool.jsonl", [{"template": "a_x", "prompt": "p", "completion": "c"}])
    (tmp / "badsplit.yaml").write_text(f"pool: {tmp}/pool.jsonl\ngroup_by: template\nprefixes: [a]\ndedupe: fuzzy\n")
    (tmp / "badgen.yaml").write_text("source: builtin:heldout_tasks\ngenerate: maybe\n")


def _space(folder: Path) -> Path:
    space = folder / "tiny_space.yaml"
    space.write_text("description: two ranks on tiny-llama\nfixed:\n  lora.targets: [q, v]\n"
                     "axes:\n  lora.r: {grid: [2, 4]}\n")
    return space


def _adapters(folder: Path) -> Path:
    """Adapter folders saved by stock peft from tiny-llama, and broken copies of one."""
    import shutil

    import peft
    import safetensors.torch
    import yaml

    from lora_ablate.tiny import tiny_llama

    model, _ = tiny_llama()
    good = folder / "good"
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(good / "adapter"))
    run_config = {"model": {"name": "tiny-llama"}, "data": {"max_length": 64},
                  "eval": {"sets": ["heldout_instances"], "size": 4, "generate": False}}
    (good / "config.yaml").write_text(yaml.safe_dump(run_config))

    def copy(name: str) -> Path:
        shutil.copytree(good, folder / name)
        return folder / name / "adapter"

    bare = folder / "bare"
    shutil.copytree(good / "adapter", bare)
    copy("badjson").joinpath("adapter_config.json").write_text("{not json")
    for name, change in (("notlora", {"peft_type": "IA3"}), ("badfield", {"r": "abc"})):
        cfg_path = copy(name) / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    copy("badweights").joinpath("adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    copy("noweights").joinpath("adapter_model.safetensors").unlink()
    other = copy("otherbase")
    # an adapter of a base 48 wide: the same layer names, other shapes
    tensors = safetensors.torch.load_file(str(other / "adapter_model.safetensors"))
    import torch

    tensors = {k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(other / "adapter_model.safetensors"))
    (other.parent / "config.yaml").write_text(yaml.safe_dump({**run_config, "model": {"name": "other-llama"}}))
    (other.parent / "eval.yaml").write_text(yaml.safe_dump(run_config))
    return folder


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished two-trial tiny study, tracked, with a password planted in both store URLs; and what the
    study command printed."""
    root = tmp_path_factory.mktemp("done")
    ws = root / "ws"
    ws.mkdir()  # an explicit sqlite --storage is not created inside a missing folder
    storage = f"sqlite:///{ws}/optuna.db?password={SECRET}"
    tracking = f"sqlite:///{ws}/mlflow.db?password={SECRET}"
    argv = ["study", "--workspace", str(ws), "--space", str(_space(root)), "--study-name", "tiny",
            "--storage", storage, "--tracking-uri", tracking, "--quiet", *TINY]
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0, err.getvalue()
    return {"ws": ws, "study": "tiny", "storage": storage, "tracking": tracking, "root": root,
            "adapters": _adapters(tmp_path_factory.mktemp("adapters")), "space": root / "tiny_space.yaml",
            "stdout": out.getvalue(), "stderr": err.getvalue()}


def _db_rows(ws: Path) -> dict[str, int]:
    """Rows per table of the workspace's databases."""
    counts = {}
    for db in sorted(ws.glob("*.db")):
        con = sqlite3.connect(db)
        try:
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                counts[f"{db.name}:{table}"] = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        finally:
            con.close()
    return counts


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _fill(argv, values: dict) -> list[str]:
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, expected, done, tmp_path, monkeypatch, capsys):
    _write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/, exports/, lora_ablate_runs/) would land here
    values = {**{k: v for k, v in done.items() if isinstance(v, (str, Path))}, "tmp": tmp_path}
    before, rows, ws_files = _tree(tmp_path), _db_rows(done["ws"]), _tree(done["ws"])
    capsys.readouterr()
    try:
        rc = main(_fill(argv, values))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in _fill(expected, values):
        assert text in lines[0], (text, lines[0])
    assert _tree(tmp_path) == before, "bad input wrote files"
    assert not (tmp_path / "ws").exists() and not (tmp_path / "out").exists()
    assert _db_rows(done["ws"]) == rows and _tree(done["ws"]) == ws_files, "bad input changed the workspace"


def test_the_table_is_large_and_spans_every_command():
    assert len(CASES) >= 80
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {c[1][0] for c in CASES} >= {"train", "eval", "config", "study", "status", "ui", "export", "compare"}


def _run(argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lora_ablate", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize("argv, expected", [
    (["study", "--workspace", "{tmp}/afile", "--quiet", *TINY], "a file, not a folder"),
    (["export", "--study", "x", "--tracking-uri", "foo://x/y"], "unknown scheme 'foo'"),
    (["train", "--out", "{tmp}/out", *TINY, "data.train={tmp}/empty.jsonl"], "is empty"),
    (["train", "--out", "{tmp}/out", *TINY, "lora.init=loftq"], "lora.init=loftq needs model.quantization=4bit"),
], ids=["study-workspace-file", "export-tracking-scheme", "train-empty-data", "train-loftq-unquantized"])
def test_bad_input_end_to_end(argv, expected, tmp_path):
    """A real process: exit status 2, one line on stderr, no traceback."""
    _write_inputs(tmp_path)
    before = _tree(tmp_path)
    p = _run(_fill(argv, {"tmp": tmp_path}), tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: ") and expected in p.stderr, p.stderr
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------- planted secrets


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_no_secret_in_what_a_study_writes(done):
    """Output, the workspace's files (both databases, artifacts) and every MLflow param and tag."""
    from mlflow import MlflowClient

    assert done["stdout"] and "optuna:" in done["stdout"] and "mlflow:" in done["stdout"]
    assert SECRET not in done["stdout"] + done["stderr"]
    assert "password=***" in done["stdout"]
    assert not _files_holding(done["root"], SECRET)
    client = MlflowClient(tracking_uri=done["tracking"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 3  # the study's parent run and two trials
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert SECRET not in value, key
    for run in runs:
        for art in client.list_artifacts(run.info.run_id):
            if not art.is_dir:
                assert SECRET not in Path(client.download_artifacts(run.info.run_id, art.path)).read_text()


def test_no_secret_when_the_tracking_server_is_dead(tmp_path, capsys):
    """A server that does not answer fails in seconds, with the password masked and nothing written."""
    import time

    start = time.monotonic()
    argv = ["study", "--workspace", str(tmp_path / "ws"), "--quiet", *TINY,
            "--tracking-uri", f"http://user:{SECRET}@127.0.0.1:1/mlflow",
            "--storage", f"postgresql://user:{SECRET}@127.0.0.1:1/optuna"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert time.monotonic() - start < 30
    assert SECRET not in out + err and "user:***@127.0.0.1:1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ws").exists()


def test_no_secret_in_a_train_run_folder(tmp_path, monkeypatch, capsys):
    """``train`` records its config and command line; store URLs given there are masked."""
    argv = ["train", "--out", str(tmp_path / "run"), "--quiet", *TINY, "tracking.enabled=false",
            f"tracking.uri=https://user:{SECRET}@example.invalid/", f"study.storage=postgresql://u:{SECRET}@h/db"]
    monkeypatch.setattr(sys, "argv", ["lora_ablate", *argv])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert (tmp_path / "run" / "config.yaml").is_file() and not _files_holding(tmp_path, SECRET)
    assert "u:***@h/db" in (tmp_path / "run" / "config.yaml").read_text()


# ---------------------------------------------------------------- rank refused by both engines


@pytest.mark.parametrize("pack", [1, 2], ids=["reference", "packed"])
def test_both_engines_refuse_a_rank_above_a_target_width(pack, tiny_base, train_data, make_exp):
    """Failed at once, before a step: nothing trained, nothing saved."""
    from lora_ablate.trainers import make_trainer
    from lora_ablate.trial import TrialSpec

    exp = make_exp(lora={"r": 100000, "targets": ["q", "v"]})
    ok = make_exp(lora={"r": 2, "targets": ["q", "v"]}, train={"steps": 1})
    specs = [TrialSpec(exp.lora, exp.train, name="wide")] + [TrialSpec(ok.lora, ok.train, name="ok")] * (pack - 1)
    results = make_trainer(tiny_base, train_data, None, progress=False, pack=pack).train(specs)
    wide = results[0]
    assert wide.status == "failed" and "lora.r=100000" in wide.error and "v_proj" in wide.error
    assert wide.history == [] and wide.adapter_dir is None
    assert all(r.status == "ok" for r in results[1:])


def test_a_postgresql_study_summary_masks_both_passwords(capsys):
    from lora_ablate.commands.study import print_report
    from lora_ablate.config import build_experiment
    from lora_ablate.study import Objective, StudyReport
    from lora_ablate.workspace import redact

    storage = f"postgresql+psycopg2://user:{SECRET}@db.example/optuna"
    exp = build_experiment({"study": {"storage": storage},
                            "tracking": {"uri": f"postgresql+psycopg2://user:{SECRET}@db.example/mlflow"}})
    print_report(StudyReport("s", redact(storage), Objective("heldout_instances", "nll", "minimize")), exp)
    out = capsys.readouterr().out
    assert SECRET not in out and "mlflow: postgresql+psycopg2://user:***@db.example/mlflow" in out
