"""Typed experiment configuration: YAML file + dotted ``key=value`` overrides -> frozen dataclasses.

Validation happens once, in each section's ``__post_init__`` and, for what spans sections (``lora.init=loftq``
needs ``model.quantization=4bit``), in ``Experiment.__post_init__``; after that the config is never mutated
(use :func:`replace` to derive a new one, which validates again).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_ablate.errors import UserError, choices
from lora_ablate.vocab import ROLES, canonical_roles, unknown_roles
from lora_ablate.workspace import (
                                   ARTIFACTS,
                                   DEFAULT_WORKSPACE,
                                   MLFLOW_DB,
                                   OPTUNA_DB,
                                   STORAGE_SCHEMES,
                                   TRACKING_SCHEMES,
                                   check_url,
                                   redact,
)

ALPHA_RULES = ("rank", "free", "rslora")
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEMPLATES = ("alpaca", "chat")
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
FUSED_SUBSETS = ("refuse", "rows")
SCHEDULES = ("cosine", "linear", "constant")
ATTENTIONS = ("auto", "sdpa", "flex", "varlen")  # study.attention
FIELD_KEYS = ("instruction", "input", "output", "instances", "prompt", "completion")
# what an inline eval.sets entry may say (a set file under evals/sets/ says the same, plus description)
SET_KEYS = ("path", "source", "name", "fields", "format", "size", "metrics", "headline", "leakage", "generate")


def _f(default, doc: str):
    """A field with a default and a one-line doc (shown by ``python -m lora_ablate config``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _one_of(section: str, name: str, value, valid) -> None:
    if value not in valid:
        raise UserError(f"{section}.{name}={value!r} is not valid; choose one of: {choices(valid)}")


def _positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        need = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{section}.{name}={value!r} is not valid; it must be {need}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("smollm2-135m-instruct",
                   "base model: smollm2-135m-instruct (embedded GGUF), tiny-llama (tests), an HF dir, a .gguf file "
                   "or a hub id")
    dtype: str = _f("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    device: str = _f("auto", "device: auto (cuda if available), cpu, cuda, cuda:N")
    quantization: str = _f("none", "load the frozen base through bitsandbytes: none, 8bit, 4bit (nf4); CUDA only")

    def __post_init__(self):
        if not self.name:
            raise UserError("model.name is empty; give smollm2-135m-instruct, tiny-llama, a path or a hub id")
        _one_of("model", "dtype", self.dtype, DTYPES)
        _one_of("model", "quantization", self.quantization, QUANTIZATIONS)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"model.device={self.device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("builtin:train",
                    "training records: builtin:<split>, a .jsonl/.json/.csv/.parquet file, or hf:<dataset id>")
    fields: dict = _f({}, "field mapping from our names (instruction, input, output | prompt, completion) to the "
                          "file's columns")
    template: str = _f("alpaca", "prompt template: alpaca, or chat (the tokenizer's chat template)")
    max_length: int = _f(256, "sequences are truncated to this many tokens (prompt + output)")
    train_size: int = _f(2000, "number of training records (built-in: generated; files: first N, 0 = all)")
    seed: int = _f(0, "seed of the built-in suite's generator (the held-out sets depend on it too)")
    max_leakage: float = _f(0.01, "refuse to train when more than this fraction of a held-out set also occurs in "
                                  "the training data (exact or near-duplicate); 1 = report only")

    def __post_init__(self):
        _one_of("data", "template", self.template, TEMPLATES)
        if not 0 <= self.max_leakage <= 1:
            raise UserError(f"data.max_leakage={self.max_leakage!r} is not valid; it must be in [0, 1]")
        _positive("data", "max_length", self.max_length)
        _positive("data", "train_size", self.train_size, allow_zero=True)
        bad = set(self.fields) - set(FIELD_KEYS)
        if bad:
            raise UserError(f"data.fields has unknown key(s) {sorted(bad)}; valid keys: {', '.join(FIELD_KEYS)}")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank (1-64 in the shipped spaces; any positive integer here)")
    alpha_rule: str = _f("rank", "rank: alpha = r (scale 1); free: scale alpha/r; rslora: scale alpha/sqrt(r)")
    alpha: float = _f(16.0, "alpha for the free and rslora rules (ignored by the rank rule)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    targets: tuple = _f(("q", "v"),
                        "attention projections to adapt, by role: any non-empty subset of q, k, v, o (and mlp)")
    init: str = _f("default", "LoRA init: default (Kaiming-uniform A, peft's default) or gaussian (B zero); pissa "
                              "or olora (A, B from the base weight's SVD / QR; saved adapters are converted to "
                              "plain LoRA on the original base, the shared base is never changed; both paths, "
                              "unquantized bases only); loftq (model.quantization=4bit only: A, B from the SVD of "
                              "the 4-bit base's quantization error, a plain LoRA adapter on that same 4-bit base)")

    fused_subset: str = _f("refuse", "part of a fused q/k/v matrix (gpt2, gpt_neox, phi3, falcon, bloom): refuse, or "
                                     "rows (one adapter on the matrix, rank r per adapted role, the other roles' "
                                     "B rows kept zero; both paths)")

    def __post_init__(self):
        if isinstance(self.r, bool) or self.r < 1:
            raise UserError(f"lora.r={self.r!r} is not valid; it must be a positive integer (e.g. 1, 2, 4, ..., 64)")
        _one_of("lora", "alpha_rule", self.alpha_rule, ALPHA_RULES)
        _positive("lora", "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout={self.dropout!r} is not valid; it must be in [0, 1)")
        if not self.targets:
            raise UserError(f"lora.targets is empty; choose a non-empty subset of: {choices(ROLES)}")
        bad = unknown_roles(self.targets)
        if bad:
            raise UserError(f"lora.targets has unknown target {bad[0]!r}; choose a subset of: {choices(ROLES)}")
        if len(set(self.targets)) != len(self.targets):
            raise UserError(f"lora.targets={list(self.targets)} repeats a target")
        object.__setattr__(self, "targets", canonical_roles(self.targets))
        _one_of("lora", "init", self.init, INITS)
        _one_of("lora", "fused_subset", self.fused_subset, FUSED_SUBSETS)

    @property
    def lora_alpha(self) -> float:
        """The alpha handed to peft."""
        return float(self.r) if self.alpha_rule == "rank" else float(self.alpha)

    @property
    def scaling(self) -> float:
        """The factor multiplying B·A: 1 (rank), alpha/r (free) or alpha/sqrt(r) (rslora)."""
        if self.alpha_rule == "rank":
            return 1.0
        if self.alpha_rule == "free":
            return self.alpha / self.r
        return self.alpha / math.sqrt(self.r)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(200, "optimizer steps")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step; the loss (and the logged training loss) is the "
                            "token mean over all of them, as one batch of batch_size * grad_accum")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA parameters")
    warmup: float = _f(0.06, "linear warm-up, as a fraction of steps")
    schedule: str = _f("cosine", "learning-rate decay after warm-up: cosine, linear, constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    seed: int = _f(0, "seed of the LoRA init, dropout and data order")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    log_every: int = _f(10, "record the training loss every N steps")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _positive("train", name, getattr(self, name))
        _positive("train", "lr", self.lr)
        _positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _positive("train", "max_grad_norm", self.max_grad_norm, allow_zero=True)
        if not 0 <= self.warmup < 1:
            raise UserError(f"train.warmup={self.warmup!r} is not valid; it must be a fraction in [0, 1)")
        _one_of("train", "schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class EvalConfig:
    sets: tuple = _f(("heldout_instances", "heldout_tasks"),
                     "held-out sets: names of YAML sets under evals/sets/, set .yaml files, record files, "
                     "split:<split>:<part>, or mappings {path, fields, metrics, headline, ...}")
    size: int = _f(64, "examples per held-out set (0 = the set's own size)")
    every: int = _f(0, "evaluate held-out NLL every N steps during training (0 = only at the end)")
    batch_size: int = _f(16, "sequences per evaluation batch")
    max_new_tokens: int = _f(32, "greedy generation length limit")
    generate: bool = _f(True, "score greedy generations (exact match, ROUGE-L); off = NLL only")
    base: bool = _f(True, "also evaluate the base model before training, for comparison")
    retention: tuple = _f((), "retention (forgetting) sets, scored with the base model and every adapter by NLL "
                              "only (a set file's generate: true adds generation): set names, set .yaml files, "
                              "record files or split:<split>:<part>, e.g. [retention_user]")

    def __post_init__(self):
        if not self.sets:
            raise UserError("eval.sets is empty; name at least one held-out set (see evals/sets/)")
        for entry in self.sets:
            if isinstance(entry, dict):
                _check_set_entry(entry)
        for entry in self.retention:
            # export reads the sets back from the recorded config, so an entry must be a name, not a mapping
            if not isinstance(entry, str) or not entry:
                raise UserError(f"eval.retention entry {entry!r} is not valid; name a set under evals/sets/ "
                                "(e.g. retention_user), a set .yaml file, a record file or split:<split>:<part>")
        _positive("eval", "size", self.size, allow_zero=True)
        _positive("eval", "every", self.every, allow_zero=True)
        _positive("eval", "batch_size", self.batch_size)
        _positive("eval", "max_new_tokens", self.max_new_tokens)


def _check_set_entry(entry: dict) -> None:
    bad = sorted(set(entry) - set(SET_KEYS))
    if bad:
        raise UserError(f"eval.sets entry {entry!r} has unknown key(s) {bad}; valid keys: {choices(SET_KEYS)}")
    if not (entry.get("path") or entry.get("source")):
        raise UserError(f"eval.sets entry {entry!r} names no records; give path: <file> (or source:)")
    bad = sorted(set(entry.get("fields") or {}) - set(FIELD_KEYS))
    if bad:
        raise UserError(f"eval.sets entry {entry!r}: fields has unknown key(s) {bad}; valid keys: "
                        f"{', '.join(FIELD_KEYS)}")


@dataclass(frozen=True)
class StudyConfig:
    space: str = _f("rank", "search space: a name from experiments/spaces/ or a YAML file")
    name: str = _f("", "study name (default: <space>-<model>)")
    seeds: int = _f(1, "repeat every configuration with this many seeds (seed is a trial parameter)")
    n_trials: int = _f(0, "trials to run in this invocation (0 = all the space still needs: the grid cells "
                          "not done, or its sampled budget; more than that samples new configurations)")
    timeout: float = _f(0.0, "stop starting new trials after this many seconds (0 = no limit)")
    objective: str = _f("heldout_instances/nll", "held-out metric to optimise, <set>/<metric>")
    direction: str = _f("auto", "minimize, maximize, or auto (from the metric: nll/ppl down, scores up)")
    pruner: str = _f("none", "prune on intermediate held-out loss: none, median, hyperband")
    pack: str = _f("auto", "trials trained together in one pass over the base (the packed engine): auto = as "
                           "many as fit on a GPU, and on a CPU 1, the plain peft reference loop; or a number")
    compile: str = _f("auto", "torch.compile the model's blocks in packed training (about 2x faster steps on a "
                              "GPU after a one-off compilation): auto (on a GPU), true, false")
    attention: str = _f("auto", "attention of sequence-packed training rows: sdpa (a dense boolean document mask), "
                                "flex (a FlexAttention BlockMask that skips masked tiles), varlen (flash varlen "
                                "attention over each example's own tokens, no mask; flex and varlen: CUDA, packed "
                                "engine only), auto = varlen where it can train, else sdpa")
    workspace: str = _f(DEFAULT_WORKSPACE, f"folder of the embedded stores: {OPTUNA_DB}, {MLFLOW_DB}, {ARTIFACTS}/")
    storage: str = _f("", f"Optuna RDB storage URL (default: sqlite:///<workspace>/{OPTUNA_DB})")
    retry_failed: bool = _f(True, "train failed trials again when the study is resumed (false: a failure is final)")

    def __post_init__(self):
        _positive("study", "seeds", self.seeds)
        if not self.workspace:
            raise UserError(f"study.workspace is empty; give a folder, e.g. --workspace {DEFAULT_WORKSPACE}")
        if self.storage and "://" not in self.storage:
            raise UserError(f"study.storage={redact(self.storage)!r} is not an RDB URL; write e.g. "
                            "sqlite:///study.db or postgresql://user@host/db")
        check_url(self.storage, "study.storage", STORAGE_SCHEMES)
        _positive("study", "n_trials", self.n_trials, allow_zero=True)
        _positive("study", "timeout", self.timeout, allow_zero=True)
        _one_of("study", "direction", self.direction, ("auto", "minimize", "maximize"))
        _one_of("study", "pruner", self.pruner, ("none", "median", "hyperband"))
        if "/" not in self.objective:
            raise UserError(f"study.objective={self.objective!r} is not valid; write <set>/<metric>, "
                            "e.g. heldout_instances/nll or heldout_instances/exact_match")
        if self.pack != "auto" and not (str(self.pack).isdigit() and int(self.pack) >= 1):
            raise UserError(f"study.pack={self.pack!r} is not valid; give a positive integer or auto")
        _one_of("study", "compile", str(self.compile).lower(), ("auto", "true", "false"))
        _one_of("study", "attention", self.attention, ATTENTIONS)

    def compiles(self, cuda: bool) -> bool:
        """Whether packed training compiles the model's blocks, on a GPU (``cuda``) or not."""
        setting = str(self.compile).lower()
        return setting == "true" or (setting == "auto" and cuda)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = _f(True, "record runs in MLflow (training works with this off)")
    uri: str = _f("", f"MLflow tracking URI (default: sqlite:///<workspace>/{MLFLOW_DB})")
    artifact_root: str = _f("", f"folder of new experiments' artifacts, shared by every worker (default "
                                f"<workspace>/{ARTIFACTS}/ for a database store; a tracking server chooses)")

    def __post_init__(self):
        if self.uri and "://" not in self.uri and not self.uri.startswith(("databricks", "file:")):
            raise UserError(f"tracking.uri={redact(self.uri)!r} is not a URI; write e.g. http://host:5000 or "
                            f"sqlite:///{MLFLOW_DB}")
        check_url(self.uri, "tracking.uri", TRACKING_SCHEMES)


@dataclass(frozen=True)
class Experiment:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        # the checks across sections; each section has judged its own fields already
        if error := init_error(self.lora.init, self.model.quantization):
            raise UserError(error)

    def to_dict(self) -> dict:
        return to_plain(self)

    def flat(self) -> dict[str, Any]:
        """``{"lora.r": 8, "lora.targets": "q,v", ...}``: every resolved field, for tracking params."""
        out = {}
        for sec, values in self.to_dict().items():
            for k, v in values.items():
                out[f"{sec}.{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v
        return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Experiment)}


def init_error(init: str, quantization: str) -> str | None:
    """Why ``lora.init`` cannot train on a ``model.quantization`` base (one line), or None: LoftQ needs the
    4-bit base (the experiment's check, and the training paths' for a spec built without one)."""
    if init == "loftq" and quantization != "4bit":
        return ("lora.init=loftq needs model.quantization=4bit (LoftQ initialises the adapter from the 4-bit "
                f"base's quantization error); got model.quantization={quantization}")
    return None


def to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _section_class(name: str):
    return {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
            "eval": EvalConfig, "study": StudyConfig, "tracking": TrackingConfig}[name]


def coerce(where: str, value, typ):
    """Coerce a YAML/CLI value to the field's declared type, or raise a one-line UserError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML reads `flag=1` as an int
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{where}={value!r} is not valid; it must be true or false")
    if typ is int:
        if isinstance(value, bool):
            raise UserError(f"{where}={value!r} is not valid; it must be an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}={value!r} is not valid; it must be an integer") from None
        if not as_float.is_integer():
            raise UserError(f"{where}={value!r} is not valid; it must be an integer")
        return int(as_float)
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}={value!r} is not valid; it must be a number") from None
    if typ is str:
        if value is None:  # an empty YAML value (`name:`) is an empty string, not "None"
            return ""
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}={value!r} is not valid; it must be a single value")
        return str(value)
    if typ is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}={value!r} is not valid; it must be a list, e.g. [q,v]")
        # a mapping stays one (an inline eval set); everything else is a name
        return tuple(v if isinstance(v, dict) else str(v).strip() for v in value)
    if typ is dict:
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{where}={value!r} is not valid; it must be a mapping, e.g. {{output: answer}}")
        return {str(k): str(v) for k, v in value.items()}
    raise TypeError(typ)


def _build_section(name: str, values: dict):
    cls = _section_class(name)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key {name}.{key}; valid keys in {name}: {choices(known)}")
        kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``lora.r=16`` -> ("lora", "r", 16); values are YAML (``[q,v]``, ``true``, ``3e-4``)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"override {text!r} is not valid; write section.key=value, e.g. lora.r=16 "
                        f"(sections: {choices(SECTIONS)})")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    if section not in SECTIONS:
        raise UserError(f"unknown config section {section!r} in {text!r}; valid sections: {choices(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    return read_mapping(p, "config file", f"a mapping of sections ({choices(SECTIONS)})")


def read_mapping(path: Path, what: str, shape: str) -> dict:
    """The YAML mapping in the file at ``path`` (empty: {}); bad YAML or another shape is one UserError line
    naming ``what`` the file is ("config file") and the ``shape`` it must have."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise UserError(f"{what} {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {str(path)!r} must be {shape}")
    return raw


def build_experiment(raw: dict | None = None, overrides: list[str] = ()) -> Experiment:
    """The one place config is validated: merge the raw mapping and the overrides, then type-check."""
    return Experiment(**build_sections(raw, overrides))


def build_sections(raw: dict | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Each section of the raw mapping and the overrides, validated on its own: ``build_experiment`` without
    the checks across sections, for settings judged before the experiment they join is known (a space's
    fixed settings and axis values)."""
    merged: dict[str, dict] = {}
    for section, values in (raw or {}).items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r}; valid sections: {choices(SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping of keys to values")
        merged[section] = dict(values)
    for text in overrides:
        section, name, value = parse_override(text)
        merged.setdefault(section, {})[name] = value
    return {name: _build_section(name, merged.get(name, {})) for name in SECTIONS}


def load_experiment(path: str | Path | None = None, overrides: list[str] = ()) -> Experiment:
    return build_experiment(load_yaml(path) if path else {}, overrides)


def replace(exp: Experiment, **sections: dict) -> Experiment:
    """A new Experiment with some fields changed, e.g. ``replace(exp, lora={"r": 4})``; validated again."""
    raw = exp.to_dict()
    for section, changes in sections.items():
        raw[section].update(changes)
    return build_experiment(raw)


def describe() -> list[tuple[str, Any, str]]:
    """Every field with its default and doc: ``[("lora.r", 8, "LoRA rank ..."), ...]``."""
    rows = []
    for name in SECTIONS:
        for f in dataclasses.fields(_section_class(name)):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{name}.{f.name}", to_plain(default), f.metadata.get("doc", "")))
    return rows
