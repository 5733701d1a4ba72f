"""``python -m lora_ablate eval --adapter DIR``: evaluate a saved adapter on held-out sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_ablate.config import build_experiment, load_yaml
from lora_ablate.context import build_context
from lora_ablate.errors import UserError
from lora_ablate.models import base_name_of_adapter
from lora_ablate.workspace import check_writable

WEIGHTS = "adapter_model.safetensors"
LORA_PARTS = {"lora_A": 1, "lora_B": 0}  # which axis of each LoRA matrix meets the base layer: in, out


def find_run_config(adapter: Path) -> Path:
    for cand in (adapter / "config.yaml", adapter.parent / "config.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"no config.yaml next to adapter {str(adapter)!r}; give --config FILE with the model settings")


def read_adapter(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a saved LoRA adapter, read from the file headers only: a corrupt or
    foreign adapter is a one-line error before the base model loads."""
    import safetensors

    config = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{str(config)!r} is not valid JSON ({e}); the adapter is corrupt") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{str(config)!r} is not a LoRA adapter config (peft_type {got!r}; expected 'LORA')")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:  # peft takes any value and fails deep inside
        raise UserError(f"{str(config)!r} is not a valid LoRA config: r={r!r} is not a positive integer")
    weights = adapter_dir / WEIGHTS
    if not weights.is_file():
        raise UserError(f"adapter {str(adapter_dir)!r} has no {WEIGHTS}")
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{str(weights)!r} is corrupt: {' '.join(str(e).split())[:200]}") from None


def check_fits(shapes: dict[str, tuple[int, ...]], model, adapter: Path, adapter_base: str, base: str) -> None:
    """Each LoRA matrix meets a layer of this base with the same width: an adapter of another base would
    otherwise surface as a state-dict size-mismatch traceback from peft."""
    for key, shape in sorted(shapes.items()):
        parts = key.split(".")
        if len(parts) < 3 or parts[-2] not in LORA_PARTS or len(shape) != 2:
            continue
        name = ".".join(parts[:-2]).removeprefix("base_model.model.")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"adapter {str(adapter)!r} (base {adapter_base}) adapts {name!r}, which this run's "
                            f"base {base} does not have: the adapter belongs to another base") from None
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        want = weight.shape[0] if parts[-2] == "lora_B" else weight.shape[1]  # Linear: [out, in]
        have = shape[LORA_PARTS[parts[-2]]]
        if have != want:
            raise UserError(f"adapter {str(adapter)!r} was trained on base {adapter_base}, not this run's base "
                            f"{base}: its {name} is {have} wide, the base's {want}")


def adapter_base(adapter_dir: Path) -> str:
    """The base an adapter was trained on, as its run folder or peft recorded it."""
    try:
        name = (load_yaml(find_run_config(adapter_dir)).get("model") or {}).get("name")
    except UserError:
        name = None
    if not name:
        name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return repr(name) if name else "(not recorded)"


def check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give the JSON file to write")
    if out.exists():
        raise UserError(f"output file {str(out)!r} already exists")
    check_writable(out.parent, "--out")


def evaluate_adapter(adapter: Path, config: Path | None = None, overrides: list[str] = (),
                     out: Path | None = None) -> dict:
    """Load the run's base model, attach the adapter with stock peft, evaluate; returns metrics per set."""
    from peft import PeftModel

    adapter = Path(adapter)
    adapter_dir = adapter / "adapter" if (adapter / "adapter" / "adapter_config.json").is_file() else adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json) nor a run folder")
    try:
        raw = load_yaml(config or find_run_config(adapter_dir))
    except UserError:
        # a bare adapter folder: the base it records (base_model.json / base_model_name_or_path) loads it
        name = base_name_of_adapter(adapter_dir) if config is None else None
        if name is None:
            raise
        raw = {"model": {"name": name}}
    raw.pop("study", None)
    exp = build_experiment(raw, list(overrides))
    shapes = read_adapter(adapter_dir)
    if out is not None:
        check_out(Path(out))  # before the evaluation: its results must not be lost to a bad path
    ctx = build_context(exp, with_train=False)  # the training file may be long gone
    check_fits(shapes, ctx.base.model, adapter_dir, adapter_base(adapter_dir), repr(exp.model.name))
    model = PeftModel.from_pretrained(ctx.base.model, str(adapter_dir))
    report = ctx.evaluator.run(model, ctx.base.device)
    from peft.tuners.lora import LoraLayer

    from lora_ablate.commands.train import print_metrics

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    scales = {m.scaling["default"] for m in layers.values()}
    # the adapted module names, as people read them (the saved config only holds peft's regex)
    adapted = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers}))
    print_metrics({"targets": f"{adapted} ({len(layers)} modules)",
                   "scaling": scales.pop() if len(scales) == 1 else float("nan"), "final": report.metrics})
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps({"metrics": report.metrics, "examples": report.examples}, indent=2))
        tmp.rename(out)
    return report.metrics
