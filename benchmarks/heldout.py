"""Held-out evaluation of a pack of trials: lora_ablate's decoding against HF ``generate``, in one command.

    # GPU host, a prepared study data folder (benchmarks/study.py --data-out ...)
    python benchmarks/heldout.py --data .bench-data/t0-study --out $OUT/heldout.json
    # CPU smoke (tiny-llama, 2 trials, a few examples)
    python benchmarks/heldout.py --smoke --out /tmp/heldout.json

What a study's trials end with: the rank space's 7 ranks x 3 seeds (21 trials, one pack, trained ``--steps``
steps so the adapters differ; eagerly unless ``--compile``, as the evaluation never runs compiled), then every
trial's final evaluation on both held-out sets (``--eval-size`` examples each, NLL and greedy generation of
``--max-new-tokens`` tokens), timed three ways on the same trained pack, one after the other in one process:

1. ``packed_reports`` as the study runs it (lora_ablate/decode.py's greedy decoding);
2. the same, with generation through HF ``generate`` on the stacked batch (what it was before decode.py);
3. the usual way, one trial: its adapter loaded onto the base with peft, NLL and ``generate`` per trial
   (``Evaluator.run`` with ``generate``), extrapolated to the pack's trial count, which the JSON says.

The NLL part of 1 is timed on its own as well, so generation's share is known. Predictions of 1 and 2 are
compared example by example: on a GPU in bf16 they may differ where two tokens are near-tied (the grouped
decode attention runs other kernels); the count of differing predictions is reported, not hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

import lora_ablate.decode as decode  # noqa: E402
import lora_ablate.packed.train as packed_train  # noqa: E402
from lora_ablate.packed.heldout import packed_nll  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def through_generate():
    """HF generate instead of lora_ablate's decoding, while the context is open."""
    fast = decode.fast_decoding
    decode.fast_decoding = lambda *args: False
    try:
        yield
    finally:
        decode.fast_decoding = fast


def experiment(args):
    from lora_ablate.spaces import load_space, study_experiment

    overrides = [f"train.steps={args.steps}", f"eval.size={args.eval_size}",
                 f"eval.max_new_tokens={args.max_new_tokens}", f"data.max_length={args.max_length}"]
    if args.smoke:
        overrides += ["model.name=tiny-llama", "model.device=cpu", "data.train_size=64", "train.steps=2"]
    else:
        sets = ",".join(str(args.data / f"{s}.jsonl") for s in ("heldout_instances", "heldout_tasks"))
        overrides += [f"data.train={args.data / 'train.jsonl'}", "data.fields={prompt: prompt, completion: completion}",
                      "data.train_size=0", f"eval.sets=[{sets}]"]
    space = load_space("rank")
    return space, study_experiment(space, overrides=overrides)


def predictions(reports) -> list[list[str]]:
    return [[row.get("prediction") for row in r.examples] for r in reports]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a prepared study data folder (train.jsonl, heldout_*.jsonl)")
    p.add_argument("--out", type=Path, default=Path("/tmp/heldout.json"))
    p.add_argument("--steps", type=int, default=20, help="training steps before the evaluation")
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the training steps (the evaluation is "
                   "never compiled; off: the few training steps need no compilation)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny-llama, 2 trials, a few examples")
    args = p.parse_args(argv)
    if args.smoke:
        args.eval_size, args.max_new_tokens, args.max_length, args.seeds = 4, 4, 64, 1
    elif args.data is None:
        p.error("--data (a prepared study data folder) is needed unless --smoke")

    from lora_ablate.context import build_context
    from lora_ablate.evaluation import Evaluator
    from lora_ablate.trial import TrialSpec

    space, exp = experiment(args)
    t0 = time.perf_counter()
    ranks = [cell["r"] for cell in space.cells()][: 2 if args.smoke else None]
    ctx = build_context(exp, rank=max(ranks))
    load_s = time.perf_counter() - t0
    out_dir = Path(tempfile.mkdtemp(prefix="heldout-bench-"))
    specs = [TrialSpec(dataclasses.replace(exp.lora, r=r), dataclasses.replace(exp.train, seed=s),
                       name=f"r{r}-s{s}", adapter_dir=out_dir / f"r{r}-s{s}")
             for r in ranks for s in range(args.seeds)]
    evaluator: Evaluator = ctx.evaluator
    rows = {}
    real = packed_train.packed_reports

    def measured(pack, ev, slots):
        """The pack's final evaluation, timed three ways (see the module docstring); returns the first."""
        fast, rows["packed_fast_s"] = timed(real, pack, ev, slots)
        _, rows["packed_nll_s"] = timed(packed_nll, pack, ev, slots)
        with through_generate():
            slow, rows["packed_generate_s"] = timed(real, pack, ev, slots)
        a, b = predictions(fast), predictions(slow)
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None]
        rows["predictions"], rows["predictions_differing"] = len(pairs), sum(x != y for x, y in pairs)
        return fast

    packed_train.packed_reports = measured
    try:
        results, train_s = timed(lambda: packed_train.train_packed(
            ctx.base, specs, ctx.train, evaluator, progress=False,
            compile=args.compile))
    finally:
        packed_train.packed_reports = real
    assert all(r.status == "ok" for r in results), [r.error for r in results]

    from peft import PeftModel

    model = PeftModel.from_pretrained(ctx.base.model, str(results[0].adapter_dir))
    with through_generate():
        _, rows["usual_one_trial_s"] = timed(evaluator.run, model, ctx.base.device)
    _, rows["fast_one_trial_s"] = timed(evaluator.run, model, ctx.base.device)
    ctx.base.model = model.unload()

    k = len(specs)
    examples = sum(len(s.examples) for s in evaluator.sets)
    rows.update(trials=k, examples_per_trial=examples, max_new_tokens=args.max_new_tokens,
                usual_extrapolated_s=rows["usual_one_trial_s"] * k, load_s=load_s,
                train_and_eval_s=train_s,
                generation_fast_s=rows["packed_fast_s"] - rows["packed_nll_s"],
                generation_generate_s=rows["packed_generate_s"] - rows["packed_nll_s"])
    rows["ratio_to_packed_generate"] = rows["packed_generate_s"] / rows["packed_fast_s"]
    rows["ratio_to_usual"] = rows["usual_extrapolated_s"] / rows["packed_fast_s"]
    rows["target_10s"] = rows["packed_fast_s"] <= 10.0
    import peft
    import transformers
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
              "note": f"usual way measured on 1 trial and extrapolated to {k}", **rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
