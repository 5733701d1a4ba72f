"""Search spaces as data: a YAML file -> grid axes, sampled axes and fixed settings.

Shipped spaces live in ``experiments/spaces/<name>.yaml`` (``$LORA_ABLATE_SPACES`` points elsewhere);
``--space`` also takes the path of any YAML file, so an experiment can bring its own. A space file::

    description: one line for `python -m lora_ablate spaces`
    fixed:                       # the settings every trial starts from (a --config file and key=value
      lora.targets: [q, k, v, o] # overrides still win over these; the axes win over everything)
      train.steps: 24
    axes:                        # what varies; each axis is one Optuna parameter, named by its last part
      lora.r: {grid: [1, 2, 4]}                      # every value is run
      train.lr: {log_uniform: [1.0e-4, 1.0e-2]}      # sampled (TPE); also uniform, int, log_int, choice
      lora.targets: {grid: {subsets: [q, k, v, o]}}  # the 15 non-empty subsets (also as choice)
    samples: 1                   # sampled configurations per grid cell (default 1, or 20 without a grid)
    match_budget:                # choose r per targets subset so that every subset trains as many
      reference: {targets: [q], r: 8}  # parameters as the reference (the LoRA paper's fixed-budget table)

Seeds are not an axis of the file: ``--seeds N`` adds them to every space.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lora_ablate.config import (
    Experiment,
    LoraConfig,
    TrainConfig,
    build_experiment,
    build_sections,
    load_yaml,
    read_mapping,
    replace,
)
from lora_ablate.errors import UserError, choices
from lora_ablate.vocab import ROLES, SEED_KEY, targets_text, unknown_roles

SPACES_ENV = "LORA_ABLATE_SPACES"
GRID = "grid"
SAMPLED_KINDS = ("choice", "uniform", "log_uniform", "int", "log_int")
KINDS = (GRID, *SAMPLED_KINDS)
# Only what a TrialSpec carries can vary between trials: the base model, data and held-out sets are
# loaded once per worker. The seed is the --seeds axis.
AXIS_SECTIONS = {"lora": LoraConfig, "train": TrainConfig}
DEFAULT_SAMPLES = 20
FILE_KEYS = ("name", "description", "fixed", "axes", "samples", "match_budget", "startup_trials")


def spaces_dir() -> Path:
    override = os.environ.get(SPACES_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "experiments" / "spaces"


def space_names() -> list[str]:
    d = spaces_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def axis_keys() -> list[str]:
    keys = [f"{sec}.{f.name}" for sec, cls in AXIS_SECTIONS.items() for f in dataclasses.fields(cls)]
    return [k for k in keys if k != SEED_KEY]


def targets_value(roles) -> str:
    """Targets as an Optuna/MLflow value: roles in q,k,v,o,mlp order joined by ',' (``q,v``)."""
    if isinstance(roles, str):
        roles = [r for r in roles.replace(" ", "").split(",") if r]
    roles = list(roles)
    if unknown_roles(roles) or not roles:
        raise UserError(f"targets {roles!r} is not valid; choose a non-empty subset of: {choices(ROLES)}")
    return targets_text(roles)


def subsets(roles) -> list[str]:
    """Every non-empty subset of ``roles``, smallest first (``q``, ``k``, ..., ``q,k``, ..., ``q,k,v,o``)."""
    roles = targets_value(roles).split(",")
    return [",".join(c) for n in range(1, len(roles) + 1) for c in itertools.combinations(roles, n)]


@dataclass(frozen=True)
class Axis:
    key: str  # dotted config key, e.g. lora.r
    kind: str  # grid, choice, uniform, log_uniform, int, log_int
    values: tuple = ()  # grid and choice values, as Optuna stores them (targets as "q,v")
    low: float = 0.0
    high: float = 0.0

    @property
    def name(self) -> str:
        """The Optuna parameter (and MLflow param) name."""
        return self.key.split(".", 1)[1]

    @property
    def sampled(self) -> bool:
        return self.kind != GRID

    def config_value(self, value):
        return value.split(",") if self.key == "lora.targets" else value

    def describe(self) -> str:
        if self.kind in (GRID, "choice"):
            return f"{self.key} {self.kind} {{{', '.join(map(str, self.values))}}}"
        return f"{self.key} {self.kind} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Budget:
    """Match trainable parameters to LoRA of rank ``r`` on ``targets``."""

    targets: str
    r: int


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    fixed: dict  # dotted key -> value
    axes: tuple[Axis, ...]
    samples: int
    budget: Budget | None = None
    startup_trials: int = 8  # TPE's random trials before it models the objective
    path: Path | None = None

    @property
    def grid_axes(self) -> list[Axis]:
        return [a for a in self.axes if not a.sampled]

    @property
    def sampled_axes(self) -> list[Axis]:
        return [a for a in self.axes if a.sampled]

    @property
    def kind(self) -> str:
        """grid (every trial fixed in advance), sampled (TPE only) or mixed (TPE inside every grid cell)."""
        if not self.sampled_axes:
            return "grid"
        return "mixed" if self.grid_axes else "sampled"

    def cells(self) -> list[dict]:
        """The grid cells as Optuna params, in file order (one empty cell when there is no grid)."""
        axes = self.grid_axes
        return [dict(zip([a.name for a in axes], combo)) for combo in itertools.product(*[a.values for a in axes])]

    def configurations(self) -> int:
        """Configurations a full run of the space trains, before seeds."""
        return len(self.cells()) * (self.samples if self.sampled_axes else 1)

    def fixed_raw(self) -> dict:
        """``fixed`` as the nested mapping ``build_experiment`` takes."""
        return _nest(self.fixed)

    def target_sets(self) -> list[tuple[str, ...]]:
        """Every targets subset a trial may use (to check them all against the model before training)."""
        axis = next((a for a in self.axes if a.key == "lora.targets"), None)
        sets = [tuple(v.split(",")) for v in axis.values] if axis is not None else []
        return sets + ([tuple(self.budget.targets.split(","))] if self.budget else [])

    def largest_rank(self, exp: Experiment) -> int | None:
        """The largest lora.r a trial of this space may train (None under match_budget: r comes from the
        model's shapes), so a rank the model cannot hold is refused before the study exists."""
        if self.budget is not None:
            return None
        axis = next((a for a in self.axes if a.key == "lora.r"), None)
        if axis is None:
            return exp.lora.r
        return int(max(axis.values) if axis.values else axis.high)

    def trial_experiment(self, exp: Experiment, params: dict[str, Any],
                         params_per_rank: Callable[[tuple[str, ...]], int] | None = None) -> Experiment:
        """The experiment of one trial: ``exp`` with the axes (and ``seed``) set from Optuna ``params``."""
        changes: dict[str, dict] = {"lora": {}, "train": {}}
        for axis in self.axes:
            if axis.name in params:
                section, field_name = axis.key.split(".", 1)
                changes[section][field_name] = axis.config_value(params[axis.name])
        if "seed" in params:
            changes["train"]["seed"] = params["seed"]
        trial = replace(exp, **changes)
        if self.budget is not None:
            if params_per_rank is None:
                raise ValueError("a space with match_budget needs params_per_rank (the model's shapes)")
            r = budget_rank(params_per_rank, trial.lora.targets, self.budget)
            trial = replace(trial, lora={"r": r})
        return trial

    def describe(self) -> str:
        return "; ".join(a.describe() for a in self.axes)

    def check_axes(self, exp: Experiment) -> None:
        """Every value (or bound) of every axis set on the study's experiment ``exp``: what the space's file
        could not judge alone, the checks across sections (lora.init=loftq needs model.quantization=4bit),
        refused in one UserError line before the study starts."""
        for axis in self.axes:
            section, name = axis.key.split(".", 1)
            for value in axis.values or (axis.low, axis.high):
                try:
                    replace(exp, **{section: {name: axis.config_value(value)}})
                except UserError as e:
                    raise UserError(f"space {self.name}: axis {axis.key}: {e}") from None


def budget_rank(params_per_rank: Callable[[tuple[str, ...]], int], targets: tuple[str, ...], budget: Budget) -> int:
    """The rank that gives ``targets`` the trainable parameters of rank ``budget.r`` on ``budget.targets``.

    LoRA adds r * (in + out) parameters per adapted matrix, so the budget is linear in r; with grouped-query
    attention k and v are narrower (out = kv_heads * head_dim), so they get a larger r than q and o.
    """
    total = budget.r * params_per_rank(tuple(budget.targets.split(",")))
    return max(1, round(total / params_per_rank(tuple(targets))))


def params_per_rank(model, roles: tuple[str, ...]) -> int:
    """Sum of (in + out) over the matrices LoRA on ``roles`` adapts: trainable parameters at r = 1."""
    from lora_ablate.targets import resolve_targets

    total = 0
    for name in resolve_targets(model, roles).module_names:
        module = model.get_submodule(name)
        if hasattr(module, "in_features"):
            total += module.in_features + module.out_features
        else:  # transformers Conv1D (gpt2): weight is (in, out)
            total += sum(module.weight.shape)
    return total


# ----------------------------------------------------------------------------- loading


def load_space(name_or_path: str) -> Space:
    """A shipped space by name, or a space file by path; any problem is one UserError line."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        if not path.is_file():
            raise UserError(f"space file {text!r} does not exist; shipped spaces: {choices(space_names())}")
        return parse_space(_read(path), path.stem, path)
    candidate = spaces_dir() / f"{text}.yaml"
    if not candidate.is_file():
        raise UserError(f"unknown space {text!r}; choose one of: {choices(space_names())}")
    return parse_space(_read(candidate), text, candidate)


def _read(path: Path) -> dict:
    return read_mapping(path, "space file", f"a mapping with keys: {choices(FILE_KEYS)}")


def parse_space(raw: dict, default_name: str, path: Path | None = None) -> Space:
    name = str(raw.get("name") or default_name)
    where = f"space {name}"
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {choices(FILE_KEYS)}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{where}: fixed must be a mapping of dotted keys, e.g. {{train.steps: 24}}")
    fixed = {str(k): v for k, v in fixed.items()}
    for key in fixed:
        if "." not in key:
            raise UserError(f"{where}: fixed key {key!r} is not dotted; write section.key, e.g. train.steps")
    _check_config(where, "fixed", _nest(fixed))

    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise UserError(f"{where} has no axes; give at least one, e.g. axes: {{lora.r: {{grid: [4, 8]}}}}")
    # unique names: the lora and train sections share no field name, and train.seed is not an axis
    axes = tuple(_parse_axis(where, str(key), spec) for key, spec in axes_raw.items())

    budget = _parse_budget(where, raw.get("match_budget"), axes)
    has_sampled = any(a.sampled for a in axes)
    samples = raw.get("samples", DEFAULT_SAMPLES if has_sampled and all(a.sampled for a in axes) else 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"{where}: samples={samples!r} is not valid; it must be a positive integer")
    if samples > 1 and not has_sampled:
        raise UserError(f"{where}: samples={samples} needs a sampled axis; a pure grid runs each cell once "
                        "(use --seeds to repeat)")
    startup = raw.get("startup_trials", 8)
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise UserError(f"{where}: startup_trials={startup!r} is not valid; it must be an integer >= 0")
    return Space(name, str(raw.get("description", "")), fixed, axes, samples, budget, startup, path)


def _nest(flat: dict) -> dict:
    raw: dict[str, dict] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw


def _check_config(where: str, what: str, raw: dict) -> None:
    """Let config validation judge the values, each section on its own (what spans sections, e.g. lora.init=loftq
    on a 4-bit base, is judged on the study's experiment: ``check_axes``); prefix its one-line message with
    where they came from."""
    try:
        build_sections(raw)
    except UserError as e:
        raise UserError(f"{where}: {what}: {e}") from None


def _parse_axis(where: str, key: str, spec) -> Axis:
    if key not in axis_keys():
        hint = "; train.seed is set by --seeds" if key == SEED_KEY else ""
        raise UserError(f"{where}: {key!r} cannot be an axis{hint}; axes may vary: {choices(axis_keys())}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: axis {key} must be one of {choices(KINDS)} with its values, "
                        "e.g. {grid: [4, 8]} or {log_uniform: [1.0e-4, 1.0e-2]}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise UserError(f"{where}: axis {key} has unknown kind {kind!r}; choose one of: {choices(KINDS)}")
    section, name = key.split(".", 1)
    if kind in (GRID, "choice"):
        if isinstance(values, dict) and set(values) == {"subsets"} and key == "lora.targets":
            values = subsets(values["subsets"])
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: axis {key} has an empty {kind}; give a non-empty list of values")
        if key == "lora.targets":
            try:
                values = [targets_value(v) for v in values]
            except UserError as e:
                raise UserError(f"{where}: axis {key}: {e}") from None
        for v in values:
            if isinstance(v, (dict, list)) or v is None:
                raise UserError(f"{where}: axis {key} value {v!r} is not a single value")
            _check_config(where, f"axis {key}", {section: {name: v.split(",") if key == "lora.targets" else v}})
        if len(set(map(str, values))) != len(values):
            raise UserError(f"{where}: axis {key} repeats a value in {values}")
        return Axis(key, kind, tuple(values))
    if key == "lora.targets" or not (isinstance(values, list) and len(values) == 2):
        raise UserError(f"{where}: axis {key}: {kind} needs [low, high] of a numeric setting")
    low, high = values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise UserError(f"{where}: axis {key}: {kind} [{low}, {high}] is not a range of numbers")
    if kind in ("int", "log_int") and not all(float(v).is_integer() for v in values):
        raise UserError(f"{where}: axis {key}: {kind} [{low}, {high}] needs integer bounds")
    if not low < high or (kind.startswith("log") and low <= 0):
        need = "0 < low < high" if kind.startswith("log") else "low < high"
        raise UserError(f"{where}: axis {key}: {kind} [{low}, {high}] is not a valid range; need {need}")
    for v in values:
        _check_config(where, f"axis {key}", {section: {name: v}})
    if kind in ("int", "log_int"):
        return Axis(key, kind, low=int(low), high=int(high))
    return Axis(key, kind, low=float(low), high=float(high))


def _parse_budget(where: str, raw, axes: tuple[Axis, ...]) -> Budget | None:
    if raw is None:
        return None
    ref = raw.get("reference") if isinstance(raw, dict) else None
    if not isinstance(ref, dict) or set(ref) != {"targets", "r"}:
        raise UserError(f"{where}: match_budget must be {{reference: {{targets: [q], r: 8}}}}")
    keys = {a.key for a in axes}
    if "lora.targets" not in keys or "lora.r" in keys:
        raise UserError(f"{where}: match_budget chooses r per targets subset: it needs a lora.targets axis "
                        "and no lora.r axis")
    r = ref["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{where}: match_budget reference r={r!r} is not valid; it must be a positive integer")
    return Budget(targets_value(ref["targets"]), r)


# ----------------------------------------------------------------------------- experiments


def study_experiment(space: Space, config: Path | str | None = None, overrides: list[str] = (),
                     settings: dict[str, dict] | None = None) -> Experiment:
    """The base experiment of a study: dataclass defaults < the space's ``fixed`` < the ``--config`` file <
    ``settings`` (command-line flags) < ``key=value`` overrides. An override of an axis is refused (the
    axis would silently win)."""
    from lora_ablate.config import parse_override

    axis_by_key = {a.key: a for a in space.axes}
    for text in overrides:
        section, name, _ = parse_override(text)
        if f"{section}.{name}" in axis_by_key or f"{section}.{name}" == "train.seed":
            what = "the --seeds axis" if name == "seed" else f"an axis of space {space.name}"
            raise UserError(f"{section}.{name} is {what}; it varies per trial and cannot be set by an override")
        if space.budget is not None and f"{section}.{name}" == "lora.r":
            raise UserError(f"lora.r is chosen per targets subset by space {space.name}'s match_budget; "
                            "it cannot be set by an override")
    raw = space.fixed_raw()
    for layer in (load_yaml(config) if config else {}), (settings or {}):
        for section, values in layer.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values  # build_experiment names the problem
    return build_experiment(raw, list(overrides))
