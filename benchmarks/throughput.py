"""Trials per GPU-hour: HF Trainer + peft vs the single-trial path vs packed trials, in one command.

    python benchmarks/throughput.py --out $OUT/bench.json            # the GPU benchmark (~3-5 min on an H200)
    python benchmarks/throughput.py --out $OUT/study.json --parts study   # the default rank study, timed
    python benchmarks/throughput.py --device cpu --steps 2 --out /tmp/bench.json   # CPU smoke (tiny-llama)

Workload: the default model, batch 8 x 256 tokens (built-in training records tokenised and cut into rows
of exactly 256 tokens, every token labelled, so a step is 8 * 256 real tokens per trial), LoRA r=8 on
q/k/v/o. Each configuration runs ``--warmup`` untimed steps and then ``--steps`` timed ones; the clock
is read in the training-log hook, right after the loss is read back (a device sync).

Variable-length rows (``varlen``, what a study trains on): instruction examples at their own lengths, cut at
``--varlen-length`` (384) tokens with the prompt masked - the T0 prompt/completion pairs of a prepared study
data folder (``--varlen-data <folder>/train.jsonl``, from ``benchmarks/study.py --data-out``) or the built-in
records - trained by a pack of ``--varlen-packs`` (21) trials with sequence packing (each trial's micro-batch
concatenated into one row under a document mask; the GPU default) and padded (every row padded to the
step's longest example), compiled on a GPU as a study is, against HF Trainer + peft on the same examples
with dynamic padding. Their tokens are real (non-padding) tokens: counted exactly over the timed steps for
lora_ablate's trials (the seeded batch order is known), and for the Trainer estimated as the mean example
length x batch x steps (its sampler's order is its own).

Reported per configuration: tokens/s per trial and in aggregate, ratio to the HF Trainer baseline, MFU
against a measured bf16 matmul ceiling (model FLOPs per token = 4 x parameters: the frozen base does a
forward and an activation-gradient backward, no weight gradients), and peak memory per trial
(torch.cuda.max_memory_allocated over the run / trials in the pack). The JSON is rewritten after every
part, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lora_ablate.config import LoraConfig, ModelConfig, TrainConfig
from lora_ablate.data import Encoded, load_examples
from lora_ablate.models import load_base
from lora_ablate.packed import auto_pack_size, train_packed
from lora_ablate.reference import ReferenceTrainer
from lora_ablate.targets import resolve_targets
from lora_ablate.trial import TrialHooks, TrialSpec, peft_config

SEEDS = (0, 1, 2)  # the default rank study: the rank space's 7 ranks x 3 seeds, 300 steps each
STUDY_STEPS = 300


# ----------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    device: torch.device
    model_name: str
    seq: int
    batch: int
    warmup: int
    steps: int
    packs: list[int]
    compiled: list[int]
    smoke: bool
    eager: list[int]
    varlen_source: str = "builtin:train"
    varlen_length: int = 384
    varlen_packs: tuple[int, ...] = (21,)


def fixed_length_rows(tokenizer, seq: int, records: int) -> Encoded:
    """Built-in training records, tokenised end to end and cut into rows of exactly ``seq`` tokens."""
    from lora_ablate.data import encode

    stream: list[int] = []
    for ex in load_examples("builtin:train", size=records, seed=0):
        stream += encode(ex, tokenizer, "alpaca", 10**6)[0]
    rows = [stream[i:i + seq] for i in range(0, len(stream) - seq + 1, seq)]
    return Encoded(rows, [list(r) for r in rows])


def variable_length_rows(tokenizer, seq: int, source: str, records: int) -> Encoded:
    """Instruction examples at their own lengths (at most ``seq`` tokens, prompt masked), as a study encodes
    them: ``source`` is a prompt/completion JSONL or ``builtin:train``."""
    from lora_ablate.config import DataConfig
    from lora_ablate.data import encode_all

    fields = {} if source.startswith("builtin:") else {"prompt": "prompt", "completion": "completion"}
    return encode_all(load_examples(source, fields, size=records, seed=0), tokenizer, DataConfig().template, seq)


def timed_real_tokens(data: Encoded, spec: TrialSpec, setup: Setup) -> int:
    """The real tokens of ``spec``'s timed steps (steps warmup+1 .. warmup+steps of its seeded batch order)."""
    from lora_ablate.trial import batch_order

    order = batch_order(len(data), spec.train.batch_size, spec.train.seed)
    batches = [next(order) for _ in range(setup.warmup + setup.steps)][setup.warmup:]
    return sum(len(data.input_ids[i]) for b in batches for i in b)


def lora_spec(setup: Setup, seed: int = 0) -> TrialSpec:
    """r=8 on q/k/v/o; logging every ``warmup`` steps is what ticks the clock."""
    return TrialSpec(LoraConfig(r=8, alpha_rule="rank", targets=("q", "k", "v", "o")),
                     TrainConfig(steps=setup.warmup + setup.steps, batch_size=setup.batch, lr=1e-3,
                                 log_every=setup.warmup, seed=seed),
                     name=f"bench-{seed}")


def param_count(model: torch.nn.Module) -> int:
    """Parameters of the base, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------- ceiling


def matmul_ceiling(device: torch.device, smoke: bool) -> float:
    """Median TFLOP/s of a square matmul: bf16 8192^3 on a GPU, fp32 512^3 on a CPU (smoke)."""
    n, dtype = (512, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(3 if smoke else 20):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------------------- timing


class Clock(TrialHooks):
    """Wall time at each log step (the loss was just read back: the device is in sync there)."""

    def __init__(self):
        self.at: dict[int, float] = {}

    def on_train_log(self, spec, step, values):
        self.at.setdefault(step, time.perf_counter())

    def window(self, warmup: int, total: int) -> float:
        return self.at[total] - self.at[warmup]


def measure(name: str, setup: Setup, run, trials: int, tokens: list[int] | None = None) -> dict:
    """Run ``run(hooks)`` (training ``trials`` trials of warmup + steps steps) and time the steady part;
    ``tokens``: each trial's real tokens in the timed steps (default: fixed rows, steps x batch x seq)."""
    clock = Clock()
    reset_peak(setup.device)
    t0 = time.perf_counter()
    results = run(clock)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) {failed[0].status}: {failed[0].error}")
    seconds = clock.window(setup.warmup, setup.warmup + setup.steps)
    total = sum(tokens) if tokens is not None else setup.steps * setup.batch * setup.seq * trials
    peak = peak_mb(setup.device)
    return {"name": name, "trials": trials, "steps_timed": setup.steps, "seconds": seconds,
            "tokens_per_s_per_trial": total / trials / seconds, "tokens_per_s_aggregate": total / seconds,
            "peak_mem_mb_per_trial": peak / trials if peak is not None else None,
            "warmup_seconds": clock.at[setup.warmup] - t0}


def hf_trainer_baseline(base, data: Encoded, setup: Setup, name: str = "hf_trainer_peft") -> dict:
    """transformers Trainer on a plain peft model: the same rows (their labels; padded per batch to its
    longest row, as the usual dynamic padding does), LoRA, batch and learning rate."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    spec = lora_spec(setup)
    plan = resolve_targets(base.model, spec.lora.targets)
    torch.manual_seed(0)
    model = get_peft_model(base.model, peft_config(spec.lora, plan.target_modules))
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(data.input_ids, data.labels)]
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        grid = lambda key, fill: torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in batch])  # noqa: E731
        return {"input_ids": grid("input_ids", pad), "labels": grid("labels", -100),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                for r in batch])}
    stamps: dict[int, float] = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (setup.warmup, setup.warmup + setup.steps):
                sync(setup.device)
                stamps[state.global_step] = time.perf_counter()

    cuda = setup.device.type == "cuda"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=setup.batch,
                                     max_steps=setup.warmup + setup.steps, learning_rate=1e-3,
                                     lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
                                     logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                                     dataloader_num_workers=0, remove_unused_columns=False, seed=0)
            reset_peak(setup.device)
            t0 = time.perf_counter()
            Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Stamp()]).train()
    finally:
        base.model = model.unload()
        base.model.eval()
    seconds = stamps[setup.warmup + setup.steps] - stamps[setup.warmup]
    tokens = setup.steps * setup.batch * statistics.mean(len(r) for r in data.input_ids)  # expected real tokens
    peak = peak_mb(setup.device)
    return {"name": name, "trials": 1, "steps_timed": setup.steps, "seconds": seconds,
            "tokens_per_s_per_trial": tokens / seconds, "tokens_per_s_aggregate": tokens / seconds,
            "peak_mem_mb_per_trial": peak, "warmup_seconds": stamps[setup.warmup] - t0}


# ----------------------------------------------------------------------------------------- the study


def rank_study(setup: Setup, pack: int | None) -> dict:
    """The default rank study end to end: config, data, model load, 7 ranks x 3 seeds x 300 steps in packs,
    final evaluation (held-out NLL and greedy generations) of every trial. No Optuna or MLflow: the engine."""
    from lora_ablate.context import build_context
    from lora_ablate.spaces import load_space, study_experiment

    t0 = time.perf_counter()
    space = load_space("rank")
    overrides = [f"model.device={setup.device.type}", f"train.steps={STUDY_STEPS}"]
    ranks, seeds = [cell["r"] for cell in space.cells()], SEEDS
    if setup.smoke:
        overrides += ["model.name=tiny-llama", "data.train_size=64", "data.max_length=64", "eval.size=4",
                      "eval.max_new_tokens=2", "train.steps=2"]
        ranks, seeds = (1, 4), (0,)
    exp = study_experiment(space, overrides=overrides)
    ctx = build_context(exp)
    loaded = time.perf_counter() - t0
    specs = [TrialSpec(dataclasses.replace(exp.lora, r=r), dataclasses.replace(exp.train, seed=s),
                       name=f"r{r}-s{s}") for r in ranks for s in seeds]
    k = pack or min(len(specs), auto_pack_size(ctx.base, specs, ctx.train))
    queue = specs[k:]
    results = train_packed(ctx.base, specs[:k], ctx.train, ctx.evaluator, progress=False,
                           refill=lambda: queue.pop(0) if queue else None,
                           compile=exp.study.compiles(setup.device.type == "cuda"))  # as the study command
    total = time.perf_counter() - t0
    ok = [r for r in results if r.status == "ok"]
    return {"trials": len(specs), "ok": len(ok), "steps": exp.train.steps, "pack": k,
            "settings": [f"{key}={value}" for key, value in space.fixed.items()] + overrides,
            "compiled": exp.study.compiles(setup.device.type == "cuda"),
            "seconds_total": total, "seconds_load": loaded, "seconds_train_and_eval": total - loaded,
            "objective": {r.spec.name: r.final.metrics[exp.eval.sets[0]]["nll"] for r in ok}}


# ----------------------------------------------------------------------------------------- report


class Report:
    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "rows": []}

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        ok = {r["name"]: r for r in self.data["rows"] if not r.get("error")}
        ceiling, fpt = self.data.get("ceiling_tflops"), self.data["flops_per_token"]
        for r in self.data["rows"]:
            if r.get("error"):
                continue
            # variable-length rows against the Trainer on the same examples, the rest against fixed rows
            base = ok.get(VARLEN_BASELINE if r["name"].startswith("varlen_") else "hf_trainer_peft")
            r["ratio_to_baseline"] = (r["tokens_per_s_aggregate"] / base["tokens_per_s_aggregate"]) if base else None
            r["ratio_per_trial_to_baseline"] = (r["tokens_per_s_per_trial"] / base["tokens_per_s_per_trial"]
                                                if base else None)
            r["mfu"] = r["tokens_per_s_aggregate"] * fpt / (ceiling * 1e12) if ceiling else None
        self.data["targets"] = self.targets()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))

    def targets(self) -> dict:
        """The issue's goals against what was measured (None where a part is missing)."""
        rows = {r["name"]: r for r in self.data["rows"] if not r.get("error")}
        fast = [r for n, r in rows.items() if n in ("packed_k1", "packed_k1_compiled") and not r.get("fallback")]
        packs = [r for n, r in rows.items() if n.startswith("packed_") and r["trials"] > 1]
        single = rows.get("single_trial")
        best_fast = max((r.get("ratio_to_baseline") or 0 for r in fast), default=None)
        best_pack = max(packs, key=lambda r: r["tokens_per_s_aggregate"], default=None)
        mem = [r["peak_mem_mb_per_trial"] for r in packs if r.get("peak_mem_mb_per_trial") is not None]
        study = self.data.get("study", {})
        varlen = max((r for n, r in rows.items() if n.startswith("varlen_k")), default=None,
                     key=lambda r: r["tokens_per_s_aggregate"])
        return {
            "varlen_best": varlen["name"] if varlen else None,
            "varlen_best_real_tokens_per_s": varlen["tokens_per_s_aggregate"] if varlen else None,
            "varlen_ok": None if not varlen else varlen["trials"] >= 21 and varlen["tokens_per_s_aggregate"] >= 3e5,
            "fast_single_x_baseline": best_fast, "fast_single_ok": None if best_fast is None else best_fast >= 8,
            "best_pack": best_pack["name"] if best_pack else None,
            "best_pack_x_baseline": best_pack.get("ratio_to_baseline") if best_pack else None,
            "best_pack_mfu": best_pack.get("mfu") if best_pack else None,
            "pack_ok": None
            if not best_pack or best_pack.get("ratio_to_baseline") is None or best_pack.get("mfu") is None
            else best_pack["ratio_to_baseline"] >= 50 and best_pack["mfu"] >= 0.30,
            "pack_memory_per_trial_ok": None if not (mem and single and single.get("peak_mem_mb_per_trial"))
            else max(mem) <= single["peak_mem_mb_per_trial"],
            "study_seconds": study.get("seconds_total"),
            "study_ok": None if "seconds_total" not in study else study["seconds_total"] < 120,
        }

    def table(self) -> str:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        lines = [f"{'configuration':<24}{'K':>4}{'tok/s/trial':>13}{'tok/s total':>13}{'x base':>9}"
                 f"{'MFU':>8}{'MB/trial':>10}"]
        for r in self.data["rows"]:
            if r.get("error"):
                lines.append(f"{r['name']:<24}  error: {r['error'][:90]}")
                continue
            lines.append(f"{r['name']:<24}{r['trials']:>4}{r['tokens_per_s_per_trial']:>13,.0f}"
                         f"{r['tokens_per_s_aggregate']:>13,.0f}{f(r.get('ratio_to_baseline'), '.1f'):>9}"
                         f"{f(r.get('mfu'), '.1%'):>8}{f(r.get('peak_mem_mb_per_trial'), ',.0f'):>10}")
        if "ceiling_tflops" in self.data:
            lines.append(f"ceiling: {self.data['ceiling_tflops']:.0f} TFLOP/s ({self.data['ceiling_kind']}); "
                         f"model FLOPs/token: {self.data['flops_per_token'] / 1e6:.0f}M "
                         f"(4 x {self.data['params'] / 1e6:.1f}M)")
        if "study" in self.data:
            s = self.data["study"]
            lines.append(s.get("error") or (f"rank study: {s['ok']}/{s['trials']} trials x {s['steps']} steps in "
                                            f"{s['seconds_total']:.1f} s (load {s['seconds_load']:.1f} s, "
                                            f"pack {s['pack']})"))
        return "\n".join(lines)


def attempt(report: Report, name: str, fn) -> dict | None:
    """Run one part; a failure is recorded in its row and the benchmark goes on."""
    print(f"[bench] {name} ...", flush=True)
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - one broken configuration must not cost the rest of the GPU run
        traceback.print_exc()
        row = {"name": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    if row is not None:
        report.add(row)
        print(f"[bench] {name}: {json.dumps({k: v for k, v in row.items() if k != 'name'})}", flush=True)
    return row


# ----------------------------------------------------------------------------------------- main


PARTS = ("baseline", "single", "eager", "packed", "auto", "compiled", "varlen", "profile", "study")
VARLEN_BASELINE = "varlen_hf_trainer_peft"


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu (smoke: tiny-llama)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--packs", default="1,4,8,16,32", help="pack sizes K to measure")
    p.add_argument("--compiled", default=None, help="pack sizes to measure again with torch.compile "
                                                     "(default 1,16,32 on a GPU, none on a CPU)")
    p.add_argument("--eager", default="1,16", help="pack sizes to measure with the eager reference step "
                                                    "(full logits, no CUDA graphs)")
    p.add_argument("--parts", default=",".join(PARTS[:-2]), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--study", action="store_true", help="also time the default rank study (adds 'study')")
    p.add_argument("--study-pack", type=int, default=0, help="pack size for the study (0: auto, at most 21)")
    p.add_argument("--varlen-data", default="builtin:train",
                   help="prompt/completion JSONL for the variable-length rows (e.g. <benchmarks/study.py "
                        "--data-out folder>/train.jsonl); default the built-in records")
    p.add_argument("--varlen-length", type=int, default=384, help="variable-length rows: max tokens an example")
    p.add_argument("--varlen-packs", default=None, help="variable-length rows: pack sizes K (default 21; CPU 2)")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="keep SDPA off its cuDNN backend (flash instead), to compare attention kernels")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:  # the clock ticks every `warmup` steps
        p.error(f"--warmup and --steps must be at least 1 (got {args.warmup} and {args.steps})")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    smoke = device.type == "cpu"
    steps = args.steps
    warmup = min(args.warmup, steps) if smoke else args.warmup
    if steps % warmup:
        steps += warmup - steps % warmup  # the clock ticks every `warmup` steps
    compiled = args.compiled if args.compiled is not None else ("" if smoke else "1,16,32")
    setup = Setup(device, "tiny-llama" if smoke else "smollm2-135m-instruct", 64 if smoke else 256, 8, warmup, steps,
                  [int(k) for k in args.packs.split(",") if k], [int(k) for k in compiled.split(",") if k], smoke,
                  [int(k) for k in args.eager.split(",") if k], args.varlen_data, args.varlen_length,
                  tuple(int(k) for k in (args.varlen_packs or ("2" if smoke else "21")).split(",") if k))
    parts = set(args.parts.split(",")) | ({"study"} if args.study else set())
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = Report(args.out, {"device": device_name,
                               "torch": torch.__version__, "python": platform.python_version(),
                               "model": setup.model_name, "batch": setup.batch, "seq": setup.seq,
                               "lora": "r=8, alpha=r, q/k/v/o", "warmup_steps": warmup, "timed_steps": steps,
                               "cudnn_attention": not args.no_cudnn_attention,
                               "flops_per_token": 0, "params": 0})
    _versions(report)
    if parts - {"study"}:
        _throughput(report, setup, parts)
    if "study" in parts:
        try:
            report.data["study"] = rank_study(setup, args.study_pack or None)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report.data["study"] = {"error": f"rank study failed: {type(e).__name__}: {e}"}
        report.save()
    print(report.table())
    return report.data


def _versions(report: Report) -> None:
    import peft
    import transformers

    report.data.update(transformers=transformers.__version__, peft=peft.__version__)


def _throughput(report: Report, setup: Setup, parts: set[str]) -> None:
    t0 = time.perf_counter()
    base = load_base(ModelConfig(name=setup.model_name, device=setup.device.type))
    report.data["model_load_seconds"] = time.perf_counter() - t0
    n = param_count(base.model)
    report.data.update(params=n, flops_per_token=4 * n)
    report.data["ceiling_tflops"] = matmul_ceiling(setup.device, setup.smoke)
    report.data["ceiling_kind"] = "fp32 512^3 (CPU smoke)" if setup.smoke else "bf16 8192^3 torch.matmul, median"
    data = fixed_length_rows(base.tokenizer, setup.seq, 300 if setup.smoke else 2000)
    report.data["rows_available"] = len(data)
    report.save()
    spec = lora_spec(setup)

    if "baseline" in parts:
        attempt(report, "hf_trainer_peft", lambda: hf_trainer_baseline(base, data, setup))
    if "single" in parts:
        single = lambda clock: ReferenceTrainer(base, data, None, clock, progress=False).train([spec])  # noqa: E731
        attempt(report, "single_trial", lambda: measure("single_trial", setup, single, 1))
    if "packed" in parts:
        for k in setup.packs:
            attempt(report, f"packed_k{k}", lambda k=k: pack_row(f"packed_k{k}", base, data, setup, k))
    if "eager" in parts:  # the reference step: full logits, no CUDA graphs (what packed_k* ran before)
        for k in setup.eager:
            attempt(report, f"packed_k{k}_eager", lambda k=k: pack_row(
                f"packed_k{k}_eager", base, data, setup, k, fused_head=False, cuda_graphs=False))
    if "auto" in parts:
        def auto():
            t = time.perf_counter()
            k = auto_pack_size(base, spec, data)
            row = pack_row("packed_auto", base, data, setup, k)
            return {**row, "sizing_seconds": time.perf_counter() - t - row["seconds"] - row["warmup_seconds"]}

        attempt(report, "packed_auto", auto)
    if "compiled" in parts:
        for k in setup.compiled:
            attempt(report, f"packed_k{k}_compiled", lambda k=k: pack_row(f"packed_k{k}_compiled", base, data, setup,
                                                                           k, compile=True))
    if "varlen" in parts:
        _variable_length(report, base, setup)
    if "profile" in parts:
        report.data["profile"] = profile(base, data, setup)
        report.save()


def _variable_length(report: Report, base, setup: Setup) -> None:
    """The variable-length rows: the Trainer with dynamic padding, then packs of K with sequence packing and
    padded (compiled on a GPU, as a study trains)."""
    records = 200 if setup.smoke else 0  # 0: every example of the source
    data = variable_length_rows(base.tokenizer, setup.varlen_length, setup.varlen_source, records)
    lengths = sorted(len(ids) for ids in data.input_ids)
    report.data["varlen"] = {"source": setup.varlen_source, "max_length": setup.varlen_length, "examples": len(data),
                             "tokens_mean": statistics.mean(lengths), "tokens_median": statistics.median(lengths),
                             "tokens_max": lengths[-1]}
    report.save()
    attempt(report, VARLEN_BASELINE, lambda: hf_trainer_baseline(base, data, setup, VARLEN_BASELINE))
    for k in setup.varlen_packs:
        for packing in (True, False):
            name = f"varlen_k{k}_{'packed' if packing else 'padded'}"
            attempt(report, name, lambda k=k, name=name, packing=packing: pack_row(
                name, base, data, setup, k, real_tokens=True, packing=packing, compile=not setup.smoke))


def pack_row(name: str, base, data: Encoded, setup: Setup, k: int, real_tokens: bool = False, **options) -> dict:
    """One pack of ``k`` copies of the benchmark trial (different seeds) with ``train_packed``'s ``options``;
    a torch.compile or CUDA-graph fallback to eager is reported in the row. ``real_tokens``: count each
    trial's real tokens of the timed steps (variable-length data) instead of steps x batch x seq."""
    caught = _Warnings()
    logger = logging.getLogger("lora_ablate.packed")
    logger.addHandler(caught)
    specs = [lora_spec(setup, seed=i) for i in range(k)]
    tokens = [timed_real_tokens(data, spec, setup) for spec in specs] if real_tokens else None
    try:
        row = measure(name, setup, lambda clock: train_packed(base, specs, data, None, clock, progress=False,
                                                              **options), k, tokens)
    finally:
        logger.removeHandler(caught)
    fallback = [m for m in caught.messages if "failed" in m]
    return {**row, "options": {k: str(v) for k, v in options.items()}, "fallback": fallback[0] if fallback else None}


def profile(base, data: Encoded, setup: Setup, k: int = 16, steps: int = 3) -> dict:
    """Where a packed step's device time goes: torch.profiler over ``steps`` compiled, fused-head steps of a
    pack of ``k`` (without CUDA graphs, so every kernel is seen; they are the same kernels), by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = setup.device.type == "cuda"
    k = k if cuda else 2
    prof = torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    class Window(TrialHooks):  # every step logs; profile steps 2 .. steps + 1 (step 1 compiles)
        def on_train_log(self, spec, step, values):
            if spec.name == "bench-0" and step in (1, 1 + steps):
                sync(setup.device)
                prof.start() if step == 1 else prof.stop()

    specs = [TrialSpec(s.lora, dataclasses.replace(s.train, steps=steps + 2, log_every=1), name=s.name)
             for s in (lora_spec(setup, seed=i) for i in range(k))]
    train_packed(base, specs, data, None, Window(), progress=False, compile=cuda, cuda_graphs=False)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = "device_time_total" if cuda else "cpu_time_total"
    events = prof.key_averages()
    # on a GPU the kernels themselves (device-side events) hold the device time; operators only sum it up
    kernels = [e for e in events if not cuda or "CUDA" in str(getattr(e, "device_type", ""))]
    ms = lambda e, attr=key: (getattr(e, attr, 0) or 0) / 1e3 / steps  # noqa: E731
    return {"trials": k, "steps": steps, "per_step_ms": sum(ms(e) for e in kernels),
            "top_kernels": [{"name": e.key[:120], "calls": e.count // steps, "ms_per_step": ms(e)}
                            for e in sorted(kernels, key=lambda e: -ms(e))[:40]],
            "top_operators": [{"name": e.key[:120], "calls": e.count // steps,
                               "ms_per_step": ms(e, total)}
                              for e in sorted(events, key=lambda e: -ms(e, total))[:40]],
            "table": events.table(sort_by=key, row_limit=40, max_name_column_width=80)}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


if __name__ == "__main__":
    main(sys.argv[1:])
