"""``python -m lora_ablate eval --adapter DIR``: evaluate a saved adapter on held-out sets."""

from __future__ import annotations

import json
from pathlib import Path

from lora_ablate.config import build_experiment, load_yaml
from lora_ablate.context import build_context
from lora_ablate.errors import UserError
from lora_ablate.models import base_name_of_adapter


def find_run_config(adapter: Path) -> Path:
    for cand in (adapter / "config.yaml", adapter.parent / "config.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"no config.yaml next to adapter {str(adapter)!r}; give --config FILE with the model settings")


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
    if out is not None and Path(out).exists():
        raise UserError(f"output file {str(out)!r} already exists")
    ctx = build_context(exp, with_train=False)  # the training file may be long gone
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
        Path(out).write_text(json.dumps({"metrics": report.metrics, "examples": report.examples}, indent=2))
    return report.metrics
