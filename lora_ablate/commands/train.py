"""``python -m lora_ablate train``: one trial, end to end, into a self-describing run folder."""

from __future__ import annotations

import time
from pathlib import Path

from lora_ablate.config import Experiment
from lora_ablate.context import build_context, check_leakage
from lora_ablate.errors import UserError
from lora_ablate.merge import merge_adapter, summary_line
from lora_ablate.rundir import RunDir, environment
from lora_ablate.tracking import redacted
from lora_ablate.trainers import make_trainer
from lora_ablate.trial import TrialSpec


def default_out() -> Path:
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def train(exp: Experiment, out: Path | None = None, merge: bool = False, progress: bool = True) -> Path:
    """Train one adapter and write ``out``: config.yaml, adapter/, metrics.json, scores.jsonl,
    history.jsonl, environment.json (and merged/ with ``merge``). Returns ``out``."""
    out = Path(out) if out else default_out()
    run = RunDir(out)  # checks that out is free before any work
    leak = check_leakage(exp)  # a held-out score is void if it was trained on: refuse before the model loads
    ctx = build_context(exp)  # all input checks happen here, before anything is written
    base = ctx.base
    ctx.evaluator.progress = progress
    with run:
        report_base = ctx.evaluator.run(base.model, base.device) if exp.eval.base else None
        spec = TrialSpec(exp.lora, exp.train, name="train", adapter_dir=run.path / "adapter")
        # on a GPU the fast path (packed engine, one trial: CUDA graphs, chunked loss, packing); the plain peft
        # loop on a CPU or with study.pack=1, the reference. Both train a k-bit base alike (tests/test_kbit.py:
        # the packed layers call the bitsandbytes layer they wrap), but torch.compile over bitsandbytes' kernels
        # is untested, so study.compile=auto leaves a k-bit base eager
        fast = base.device.type == "cuda" and exp.study.pack != "1"
        result = make_trainer(base, ctx.train, ctx.evaluator, progress=progress, pack=1, fast=fast,
                              compile=exp.study.compiles(fast and base.quantization == "none"),
                              attention=exp.study.attention).train([spec])[0]
        if result.status != "ok":
            raise UserError(f"training {result.status}: {result.error}")
        run.yaml("config.yaml", redacted(exp).to_dict())
        run.json("environment.json", {**environment(), "model_source": base.source, "base_model": base.identity})
        metrics = {
            "model": exp.model.name, "targets": result.targets, "scaling": result.scaling,
            "base": report_base.metrics if report_base else None,
            "final": result.final.metrics,
            "trial": result.summary(),
            "headline": {s.name: s.headline for s in ctx.evaluator.sets},  # the metric each set is judged by
            "leakage": {**leak.summary, "examples": leak.rows},
        }
        if merge:
            # before metrics.json, which records what the merge of an adapter trained on a k-bit base costs
            merged = merge_adapter(base, run.path / "adapter", run.path / "merged", ctx.evaluator)
            if base.quantization != "none":
                metrics["merge"] = merged
        run.json("metrics.json", metrics)
        rows = [{"phase": "final", **r} for r in result.final.examples]
        if report_base:
            rows = [{"phase": "base", **r} for r in report_base.examples] + rows
        run.jsonl("scores.jsonl", rows)
        run.jsonl("history.jsonl", [{"kind": "train", **h} for h in result.history]
                  + [{"kind": "eval", **e} for e in result.evals])
    print_metrics(metrics)
    if "merge" in metrics:
        print(summary_line(metrics["merge"]))
    print(f"run written to {out}")
    return out


def print_metrics(metrics: dict) -> None:
    print(f"targets: {metrics['targets']}   scaling: {metrics['scaling']:.4g}")
    names = ["nll", "ppl", "exact_match", "rouge_l"]
    print(f"{'set':<22}{'phase':<7}" + "".join(f"{n:>12}" for n in names))
    for phase in ("base", "final"):
        for s, m in (metrics.get(phase) or {}).items():
            print(f"{s:<22}{phase:<7}" + "".join(f"{m[n]:>12.4f}" if n in m else f"{'-':>12}" for n in names))
