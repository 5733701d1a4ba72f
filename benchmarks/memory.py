"""What an 8-bit or 4-bit (nf4) base saves in GPU memory against bf16, per phase, with and without
gradient checkpointing, on the default model.

    python benchmarks/memory.py --out $OUT/memory          # GPU host with bitsandbytes, < 3 min on an H200
    python benchmarks/memory.py --smoke --out /tmp/mem     # CPU, tiny-llama, no bitsandbytes: the harness only

Workload: batch 8 x 256 tokens (the throughput benchmark's rows: every token labelled), LoRA r=8 on
q/k/v/o, ``--steps`` (30) AdamW steps. Each configuration runs in its own process, so its peak counters
see nothing of another's; bf16 runs first and is the baseline of the ratios.

Per configuration, from ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (peaks reset around
each phase), in the plain peft step the reference trainer runs:

* ``weights``: allocated after the base is loaded (a k-bit base also holds what
  ``prepare_model_for_kbit_training`` upcasts to fp32: norms, embeddings and the LM head);
* ``adapter``: the LoRA parameters; ``optimizer``: AdamW's state after the first step (gradients freed);
* ``activations``: the median over steps of the peak during forward + backward minus what was allocated
  just before the forward (activations, logits, the adapter's gradients, bitsandbytes' dequantization
  buffers);
* ``peak``: the largest allocation of the loop's steps (forward, backward, optimizer step); ``step_ms``:
  the median step time after 5 warm-up steps (each step synchronizes for the counters).

Then one whole trial of the same length through each engine (``ReferenceTrainer``, and the packed engine
``train`` uses on a GPU), whose ``peak_mem_mb`` is what a study records per trial.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch
from throughput import fixed_length_rows

from lora_ablate.config import LoraConfig, ModelConfig, TrainConfig
from lora_ablate.models import DEFAULT_MODEL, TINY_MODEL, load_base
from lora_ablate.trial import TrialSpec

BASES = ("none", "8bit", "4bit")  # model.quantization; "none" is the compute dtype (bf16 on a GPU)
WARMUP = 5
MB = 2 ** 20
PHASES = ("weights_mb", "adapter_mb", "optimizer_mb", "activations_mb", "peak_mb", "step_ms",
          "reference_trial_peak_mb", "packed_trial_peak_mb")


# ----------------------------------------------------------------------------------------- one configuration


class Meter:
    """CUDA allocation counters; None on a CPU, where there are none to read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device) / MB

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / MB


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def measure(args) -> dict:
    """One configuration, in this process: the phases of the peft step, then a trial through each engine."""
    import peft

    from lora_ablate.evaluation import token_nll
    from lora_ablate.reference import lora_config
    from lora_ablate.targets import resolve_targets
    from lora_ablate.trainers import make_trainer

    device = torch.device(args.device)
    meter = Meter(device)
    meter.reset_peak()
    base = load_base(ModelConfig(name=args.model, quantization=args.quantization, device=args.device))
    weights = meter.now()
    rows = fixed_length_rows(base.tokenizer, args.max_length, records=512)
    spec = TrialSpec(LoraConfig(r=8, targets=("q", "k", "v", "o")),
                     TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-3, log_every=args.steps,
                                 gradient_checkpointing=args.checkpointing), name="memory")
    plan = resolve_targets(base.model, spec.lora.targets)
    if args.checkpointing:  # before peft wraps the model, as the reference trainer does
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(base.model, lora_config(spec, plan))
    adapter = _minus(meter.now(), weights)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    pad = base.tokenizer.pad_token_id
    model.train()
    optimizer, activations, peaks, times = None, [], [], []
    for step in range(args.steps):
        b = rows.batch([(step * args.batch + i) % len(rows) for i in range(args.batch)], pad, device)
        static = meter.now()
        meter.reset_peak()
        t0 = time.perf_counter()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll, mask = token_nll(logits, b["labels"])
        (nll.sum() / mask.sum()).backward()
        del logits, nll, mask
        activations.append(_minus(meter.peak(), static))
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(meter.peak())  # synchronizes
        times.append(time.perf_counter() - t0)
        if step == 0:  # the gradients are freed, AdamW's moments are new: what the first step added
            optimizer = _minus(meter.now(), static)
    del opt, params
    base.model = model.unload()
    if args.checkpointing:
        base.model.gradient_checkpointing_disable()
    base.model.eval()
    out = {"quantization": args.quantization, "checkpointing": args.checkpointing,
           "dtype": str(base.dtype).removeprefix("torch."), "weights_mb": weights, "adapter_mb": adapter,
           "optimizer_mb": optimizer, "activations_mb": statistics.median(activations) if meter.cuda else None,
           "peak_mb": max(peaks) if meter.cuda else None,
           "step_ms": 1000 * statistics.median(times[WARMUP:] or times)}
    for engine, fast in (("reference", False), ("packed", True)):
        if meter.cuda:
            torch.cuda.empty_cache()
        result = make_trainer(base, rows, None, progress=False, fast=fast).train([spec])[0]
        if result.status != "ok":
            raise RuntimeError(f"{engine} trial {result.status}: {result.error}")
        out[f"{engine}_trial_peak_mb"] = result.peak_mem_mb if meter.cuda else None
    return out


# ----------------------------------------------------------------------------------------- the parent


def configs(bases: list[str]) -> list[tuple[str, bool]]:
    """The unquantized base first (the baseline), each base without and with gradient checkpointing."""
    return [(q, ckpt) for q in sorted(bases, key=BASES.index) for ckpt in (False, True)]


def run_child(args, quantization: str, checkpointing: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="lora-mem-") as tmp:
        dest = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(dest), "--model", args.model,
               "--device", args.device, "--quantization", quantization, "--steps", str(args.steps),
               "--batch", str(args.batch), "--max-length", str(args.max_length)]
        if checkpointing:
            cmd.append("--checkpointing")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        if proc.returncode != 0 or not dest.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"quantization": quantization, "checkpointing": checkpointing,
                    "error": f"exit {proc.returncode}: {tail[0]}"}
        row = json.loads(dest.read_text())
    row["wall_s"] = time.perf_counter() - t0
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's phases over the bf16 row of the same checkpointing setting."""
    baseline = {r["checkpointing"]: r for r in rows if r["quantization"] == "none" and "error" not in r}
    for r in rows:
        ref = baseline.get(r["checkpointing"])
        if ref is None or "error" in r:
            continue
        r["ratio"] = {k: r[k] / ref[k] for k in PHASES if r.get(k) is not None and ref.get(k)}
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """Plain sentences: does a k-bit base lower the peak on this model, and by how much."""
    lines = []
    for r in rows:
        if r["quantization"] == "none" or "error" in r or "peak_mb" not in r.get("ratio", {}):
            continue
        ratio = r["ratio"]["peak_mb"]
        ckpt = "with" if r["checkpointing"] else "without"
        weights = r["ratio"].get("weights_mb")
        if ratio >= 1:
            lines.append(f"{r['quantization']} {ckpt} checkpointing: peak {ratio:.2f}x bf16's: quantization does NOT "
                         f"pay on this model (its weights are {weights:.2f}x bf16's, but what k-bit training adds "
                         f"elsewhere outweighs that: see the phases)")
        else:
            lines.append(f"{r['quantization']} {ckpt} checkpointing: peak {ratio:.2f}x bf16's "
                         f"({r['peak_mb']:,.0f} MB against {r['peak_mb'] / ratio:,.0f} MB)")
    return lines


def _cell(v, fmt="{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    head = ("| base | checkpointing | weights MB | adapter MB | optimizer MB | activations MB | peak MB | "
            "peak / unquantized | step ms | step / unquantized | reference trial peak MB | packed trial peak MB |")
    lines = [f"# Memory per phase: {report['model']} on {report['device_name']}", "",
             f"batch {report['batch']} x {report['max_length']} tokens, LoRA r=8 on q/k/v/o, {report['steps']} "
             "steps; MB = 2^20 bytes of torch.cuda allocations.", "", head, "|" + " --- |" * 12]
    for r in report["rows"]:
        name = r.get("dtype", "bf16") if r["quantization"] == "none" else r["quantization"]
        if "error" in r:
            lines.append(f"| {name} | {r['checkpointing']} | error: {r['error']} |" + " |" * 9)
            continue
        ratio = r.get("ratio", {})
        cells = [name, str(r["checkpointing"]), _cell(r["weights_mb"]), _cell(r["adapter_mb"], "{:,.1f}"),
                 _cell(r["optimizer_mb"], "{:,.1f}"), _cell(r["activations_mb"]), _cell(r["peak_mb"]),
                 _cell(ratio.get("peak_mb"), "{:.2f}x"), _cell(r["step_ms"], "{:,.1f}"),
                 _cell(ratio.get("step_ms"), "{:.2f}x"), _cell(r["reference_trial_peak_mb"]),
                 _cell(r["packed_trial_peak_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    if report["verdicts"]:
        lines += ["", *[f"- {v}" for v in report["verdicts"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for memory.json and memory.md")
    p.add_argument("--smoke", action="store_true", help="tiny-llama on the CPU, bf16 only: the harness, no numbers")
    p.add_argument("--model", help="model.name (default: smollm2-135m-instruct; --smoke: tiny-llama, which has "
                                   "no k-bit mode: give an HF folder of it for k-bit bases)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--bases", help="comma-separated model.quantization values to run (default: none,8bit,4bit; "
                                   "--smoke: none; k-bit on a CPU needs $LORA_ABLATE_KBIT_CPU=1)")
    p.add_argument("--child-timeout", type=int, default=150, help="seconds one configuration may take")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure one config into this file
    p.add_argument("--quantization", default="none", choices=BASES, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.child.write_text(json.dumps(measure(args)))
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.smoke:
        args.device, args.steps, args.batch, args.max_length = "cpu", WARMUP + 2, 2, 32
    elif not torch.cuda.is_available():
        print("error: the memory benchmark reads CUDA allocation counters; on a CPU run --smoke", file=sys.stderr)
        return 2
    args.model = args.model or (TINY_MODEL if args.smoke else DEFAULT_MODEL)
    bases = (args.bases or ("none" if args.smoke else ",".join(BASES))).split(",")
    if "none" not in bases or not set(bases) <= set(BASES):
        print(f"error: --bases={args.bases!r} must list none (the baseline) and only {', '.join(BASES)}",
              file=sys.stderr)
        return 2
    rows = []
    t0 = time.perf_counter()
    for quantization, checkpointing in configs(bases):
        rows.append(run_child(args, quantization, checkpointing))
        print(json.dumps(rows[-1]), flush=True)
    rows = with_ratios(rows)
    report = {"model": args.model, "device_name": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
              "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
              "torch": torch.__version__, "python": platform.python_version(), "wall_s": time.perf_counter() - t0,
              "rows": rows, "verdicts": verdicts(rows)}
    try:
        report["bitsandbytes"] = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:  # the smoke run needs none
        report["bitsandbytes"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(report, indent=2))
    (args.out / "memory.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
