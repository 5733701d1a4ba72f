"""A real-data study end to end through the CLI, against the usual sequential HF Trainer + peft + generate loop.

    # host side, once: prepare the data folder from ../shared/data/t0_pool.jsonl.gz (small, deterministic)
    python benchmarks/study.py --data-out benchmarks/data/t0-study --prepare-only
    # GPU host: the folder travels with the tree
    python benchmarks/study.py --data benchmarks/data/t0-study --out $OUT/study
    # CPU smoke (tiny-llama, 2 ranks, 1 seed, a few steps), outputs under /tmp
    python benchmarks/study.py --smoke --out /tmp/bench-study-smoke

What is timed:

1. ``lora_ablate``: ``python -m lora_ablate study --space rank --seeds 3 --pack auto train.steps=300
   data.train=<train.jsonl> eval.sets=[<heldout_instances.jsonl>,<heldout_tasks.jsonl>] ...`` as a
   subprocess, tracking on (what users run), wall time around it (interpreter start, imports, data,
   model load, base evaluation, every trial, MLflow writes). The phases are read back from what the study
   recorded in its MLflow workspace (run start/end times, per-trial ``train_s``, ``tokens_per_s``,
   ``wall_s``; docs/tracking.md).
2. the baseline, the usual way, in its own subprocess: the base loaded once and evaluated once, then for
   each of ``--baseline-trials`` trials of the same study (the trials' own recorded ``config.yaml``, picked
   evenly over the study's trial list), one after another: ``peft.get_peft_model`` on the base, HF
   ``Trainer`` over the same training records (same tokenisation with the prompt masked, steps, batch
   size, lr, schedule, warm-up, clipping, seed; dynamic padding; bf16 on CUDA), then held-out NLL and
   batched greedy ``model.generate`` on the same held-out sets (same prompts, same max_new_tokens, same
   eval batch size), scored with the same metrics; the adapter saved; ``unload()``. Its time is
   extrapolated to the study's trial count (the JSON
   says so, with the measured numbers): the baseline process's wall + the missing trials x its mean seconds
   per trial. The baseline records nothing in MLflow.

Real tokens are the non-padding tokens of the training batches (prompt and completion; what lora_ablate
counts for ``tokens_per_s``); aggregate tokens/s divides all trials' tokens by the wall time during which
any trial was training.

Data rule (``prepare``): a T0 template's name is ``<source dataset>_<template>``; the source is the
longest ``prefixes`` entry of ``evals/splits/t0_by_source.yaml`` (the P3 source datasets present in the pool, subsets folded into their
dataset: ``adversarial_qa_dbert_*`` and ``adversarial_qa_dbidaf_*`` are both ``adversarial_qa``,
``duorc_SelfRC_*`` and ``duorc_ParaphraseRC_*`` are ``duorc``) that the name equals or starts with followed
by ``_``. A template matching no entry is an error, so new data is never silently mis-grouped (a longest
common prefix would merge ``wiki_qa``, ``wiki_bio`` and ``wiki_hop``). Whole sources (``--heldout-sources``,
default 4 drawn with ``--seed``) go to ``heldout_tasks``; the rows of the other sources are shuffled with the
seed and split into ``train`` and ``heldout_instances`` (a held-out instance whose prompt also occurs in
train is dropped). Rows with an empty prompt or completion are dropped (the loader refuses them).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # lora_ablate from this checkout; throughput.py
POOL = ROOT.parent / "shared" / "data" / "t0_pool.jsonl.gz"
SETS = ("heldout_instances", "heldout_tasks")

# the T0 source rule (known sources, longest prefix) is the library's split definition
T0_SPLIT = "t0_by_source"


@functools.lru_cache(maxsize=None)
def source_of(template: str) -> str:
    """The source dataset of a T0 template name (``evals/splits/t0_by_source.yaml``'s longest-prefix rule)."""
    from lora_ablate.errors import UserError
    from lora_ablate.splits import load_split

    try:
        return load_split(T0_SPLIT).group_of(template)
    except UserError as e:
        raise SystemExit(str(e)) from None


def prepare(pool: Path, out: Path, seed: int, train_rows: int, heldout_rows: int,
            heldout_sources: list[str] | None, n_heldout_sources: int) -> dict:
    """Write train.jsonl, heldout_instances.jsonl, heldout_tasks.jsonl, sets/*.yaml and manifest.json."""
    with gzip.open(pool, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if str(r.get("prompt") or "").strip() and str(r.get("completion") or "").strip()]
    by_source: dict[str, list[dict]] = {}
    for r in kept:
        by_source.setdefault(source_of(r["template"]), []).append(
            {"template": r["template"], "prompt": r["prompt"], "completion": r["completion"]})
    rng = random.Random(f"bench-study:{seed}")
    names = sorted(by_source)
    if heldout_sources:
        unknown = sorted(set(heldout_sources) - set(names))
        if unknown:
            raise SystemExit(f"--heldout-sources {unknown} not in the pool; sources: {', '.join(names)}")
        held = sorted(heldout_sources)
    else:
        held = sorted(rng.sample(names, n_heldout_sources))
    trained = [r for s in names if s not in held for r in by_source[s]]
    tasks = [r for s in held for r in by_source[s]]
    rng.shuffle(trained)
    rng.shuffle(tasks)
    train = trained[:train_rows]
    seen = {r["prompt"] for r in train}
    instances = [r for r in trained[train_rows:] if r["prompt"] not in seen][:heldout_rows]
    tasks = tasks[:heldout_rows]
    if len(train) < train_rows or len(instances) < heldout_rows or len(tasks) < heldout_rows:
        raise SystemExit(f"not enough rows: train {len(train)}/{train_rows}, heldout_instances "
                         f"{len(instances)}/{heldout_rows}, heldout_tasks {len(tasks)}/{heldout_rows}")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in (("train", train), ("heldout_instances", instances), ("heldout_tasks", tasks)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        files[name] = {"rows": len(part), "bytes": path.stat().st_size,
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                       "sources": sorted({source_of(r["template"]) for r in part})}
    descriptions = {
        "heldout_instances": "T0 rows of the trained source datasets that are not in train.jsonl (new instances "
                             "of trained tasks).",
        "heldout_tasks": f"T0 rows of whole source datasets never trained on: {', '.join(held)}.",
    }
    (out / "sets").mkdir(exist_ok=True)
    for name in SETS:  # evals/sets format; copy into evals/sets/ (source relative to the repository root)
        (out / "sets" / f"{name}.yaml").write_text(
            f"name: {name}\ndescription: >-\n  {descriptions[name]}\n"
            f"# a record file used as a set; relative paths are relative to the repository root\n"
            f"source: {os.path.relpath(out / (name + '.jsonl'), ROOT)}\n"
            f"fields: {{prompt: prompt, completion: completion}}\nsize: {heldout_rows}\n"
            f"metrics: [exact_match, rouge_l]\n")
    manifest = {"pool": str(pool), "pool_rows": len(rows), "dropped_empty": len(rows) - len(kept), "seed": seed,
                "rule": "source = longest t0_by_source prefix s with template == s or template.startswith(s + '_')",
                "sources": {s: len(by_source[s]) for s in names}, "heldout_task_sources": held, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------------------- the lora_ablate study


def study_command(args, data: Path, workspace: Path) -> list[str]:
    sets = ",".join(str((data / f"{s}.jsonl").resolve()) for s in SETS)
    return [sys.executable, "-m", "lora_ablate", "study", "--space", args.space, "--seeds", str(args.seeds),
            "--pack", args.pack, "--study-name", args.study_name, "--workspace", str(workspace), "--quiet",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"data.train={(data / 'train.jsonl').resolve()}", "data.fields={prompt: prompt, completion: completion}",
            "data.train_size=0", f"data.max_length={args.max_length}", f"eval.sets=[{sets}]",
            f"eval.size={args.eval_size}", f"eval.max_new_tokens={args.max_new_tokens}",
            # a timing benchmark: its heldout_instances shares passages with train (over a third share a passage, see
            # the leakage check); evals/splits/t0_clean.yaml is the clean split for accuracy claims
            "data.max_leakage=1", *args.overrides]


def run_study(args, data: Path, workspace: Path, log: Path) -> dict:
    cmd = study_command(args, data, workspace)
    print("[bench] " + " ".join(cmd), flush=True)
    t_epoch, t0 = time.time(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy(), check=False)
    wall = time.perf_counter() - t0
    tail = log.read_text()[-3000:]
    print(tail, flush=True)
    if proc.returncode:
        raise RuntimeError(f"study exited {proc.returncode}: {tail[-500:]}")
    return {"command": " ".join(cmd), "wall_s": wall, **study_phases(workspace, args.study_name, t_epoch, wall)}


def study_phases(workspace: Path, name: str, t_start: float, wall: float) -> dict:
    """The study's phases from its MLflow records (times in ms since the epoch, this host's clock)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parent = max((r for r in runs if r.data.tags.get("lora_ablate.kind") == "study"), key=lambda r: r.info.start_time)
    trials = sorted((r for r in runs if r.data.tags.get("lora_ablate.kind") == "trial"
                     and (r.data.tags.get("lora_ablate.parent_run") or r.data.tags.get("mlflow.parentRunId"))
                     == parent.info.run_id),
                    key=lambda r: int(r.data.tags["lora_ablate.trial_number"]))
    s = lambda ms: ms / 1000 - t_start
    rows = []
    for r in trials:
        m = r.data.metrics
        rows.append({"trial": int(r.data.tags["lora_ablate.trial_number"]), "state": r.data.tags.get("lora_ablate.state"),
                     "params": {k: r.data.params.get(k) for k in ("r", "seed", "lr", "targets", "alpha_rule")},
                     "run_id": r.info.run_id, "start_s": s(r.info.start_time), "end_s": s(r.info.end_time or 0),
                     "train_s": m.get("train_s"), "wall_s": m.get("wall_s"), "tokens_per_s": m.get("tokens_per_s"),
                     "tokens": (m.get("train_s") or 0) * (m.get("tokens_per_s") or 0), "peak_mem_mb": m.get("peak_mem_mb"),
                     **{f"final/{st}/nll": m.get(f"final/{st}/nll") for st in SETS}})
    ok = [r for r in rows if r["state"] == "COMPLETE"]
    first = min(r["start_s"] for r in rows)
    last = max(r["end_s"] for r in rows)
    # training wall: the union of [start, start + train_s] over trials (a pack trains its trials at once)
    spans = sorted((r["start_s"], r["start_s"] + (r["train_s"] or 0)) for r in ok)
    training, cur = 0.0, None
    for a, b in spans:
        if cur and a <= cur[1]:
            cur = (cur[0], max(cur[1], b))
        else:
            if cur:
                training += cur[1] - cur[0]
            cur = (a, b)
    training += (cur[1] - cur[0]) if cur else 0.0
    tokens = sum(r["tokens"] for r in ok)
    return {"trials": len(rows), "complete": len(ok),
            "phases": {"startup_and_model_load_s": s(parent.info.start_time),
                       "base_eval_and_pack_sizing_s": first - s(parent.info.start_time),
                       "first_trial_start_s": first,
                       "trials_s": last - first,
                       "training_s": training,
                       "evaluation_export_tracking_s": (last - first) - training,
                       "shutdown_s": wall - last},
            "tokens_per_s_per_trial_mean": sum(r["tokens_per_s"] for r in ok) / len(ok) if ok else None,
            "tokens_per_s_aggregate": tokens / training if training else None,
            "tokens_total": tokens, "trial_rows": rows}


# ----------------------------------------------------------------------------------------- the baseline


def trial_configs(workspace: Path, rows: list[dict], n: int) -> list[dict]:
    """``n`` complete trials spread evenly over the study's trial list, each with its recorded config.yaml."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace.resolve() / 'mlflow.db'}")
    ok = [r for r in rows if r["state"] == "COMPLETE"]
    n = min(n, len(ok))
    picks = sorted({round(i * (len(ok) - 1) / max(1, n - 1)) for i in range(n)})
    out = []
    for i in picks:
        path = client.download_artifacts(ok[i]["run_id"], "config.yaml", tempfile.mkdtemp(prefix="bench-cfg-"))
        out.append({"trial": ok[i]["trial"], "config": Path(path).read_text(),
                    "study_final": {k: v for k, v in ok[i].items() if k.startswith("final/")}})
    return out


def run_baseline(trials: list[dict], work: Path, log: Path) -> dict:
    spec = work / "baseline_in.json"
    result = work / "baseline_out.json"
    spec.write_text(json.dumps(trials))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(spec), str(result)]
    print("[bench] baseline: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy(), check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"baseline exited {proc.returncode}: {log.read_text()[-800:]}")
    return {"wall_s_measured": wall, **json.loads(result.read_text())}


def baseline_worker(spec_path: Path, out_path: Path) -> None:
    """Runs in its own interpreter: everything a plain HF script does, timed from its start."""
    t0 = time.perf_counter()
    import torch
    import yaml
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lora_ablate.config import build_experiment
    from lora_ablate.data import encode_all, load_eval_set, load_examples, prompt_ids
    from lora_ablate.metrics import score
    from lora_ablate.models import load_base
    from lora_ablate.targets import resolve_targets
    from lora_ablate.trial import peft_config

    trials = json.loads(spec_path.read_text())
    exps = [build_experiment(yaml.safe_load(t["config"])) for t in trials]
    exp = exps[0]
    base = load_base(exp.model)
    tok = base.tokenizer
    tok.padding_side = "right"  # training batches (the collator); generation batches are left-padded by hand
    cuda = base.device.type == "cuda"
    train_ex = load_examples(exp.data.train, exp.data.fields, exp.data.train_size, exp.data.seed)
    enc = encode_all(train_ex, tok, exp.data.template, exp.data.max_length)
    rows = [{"input_ids": i, "labels": lab, "attention_mask": [1] * len(i)} for i, lab in zip(enc.input_ids, enc.labels)]
    sets = [load_eval_set(name, exp.eval.size, exp.data.seed) for name in exp.eval.sets]
    ev_enc = {s.name: encode_all(s.examples, tok, exp.data.template, exp.data.max_length) for s in sets}
    budget = max(8, exp.data.max_length - exp.eval.max_new_tokens)
    ev_prompts = {s.name: [prompt_ids(ex, tok, exp.data.template)[-budget:] for ex in s.examples] for s in sets}
    from throughput import sync as device_sync  # benchmarks/throughput.py's helper

    sync = lambda: device_sync(base.device)
    sync()
    loaded = time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(model) -> dict:
        model.eval()
        bs, pad = exp.eval.batch_size, tok.pad_token_id
        out = {}
        for s in sets:
            e = ev_enc[s.name]
            nll_sum = count = 0.0
            for a in range(0, len(e), bs):  # right-padded NLL batches
                ids, labs = e.input_ids[a:a + bs], e.labels[a:a + bs]
                w = max(map(len, ids))
                x = torch.tensor([i + [pad] * (w - len(i)) for i in ids], device=base.device)
                y = torch.tensor([lb + [-100] * (w - len(lb)) for lb in labs], device=base.device)
                m = torch.tensor([[1] * len(i) + [0] * (w - len(i)) for i in ids], device=base.device)
                logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
                t = y[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1),
                                                        ignore_index=-100, reduction="sum")
                nll_sum += nll.item()
                count += (t != -100).sum().item()
            preds = []
            for a in range(0, len(ev_prompts[s.name]), bs):  # left-padded greedy generation
                ps = ev_prompts[s.name][a:a + bs]
                w = max(map(len, ps))
                x = torch.tensor([[pad] * (w - len(p)) + p for p in ps], device=base.device)
                m = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps], device=base.device)
                g = model.generate(input_ids=x, attention_mask=m, do_sample=False, max_new_tokens=exp.eval.max_new_tokens,
                                   pad_token_id=pad, eos_token_id=tok.eos_token_id)
                preds += [tok.decode(r, skip_special_tokens=True).split("###")[0].strip() for r in g[:, w:]]
            refs = [ex.output for ex in s.examples]
            out[s.name] = {"nll": nll_sum / max(1, count), **{k: score(k, preds, refs)[0] for k in ("exact_match", "rouge_l")}}
        return out

    t = time.perf_counter()
    base_metrics = evaluate(base.model) if exp.eval.base else None
    sync()
    base_eval = time.perf_counter() - t

    class Counting(Trainer):
        real_tokens = 0

        def compute_loss(self, model, inputs, *a, **k):
            self.real_tokens = self.real_tokens + inputs["attention_mask"].sum()  # stays on the device
            return super().compute_loss(model, inputs, *a, **k)

    results = []
    for spec, tx in zip(trials, exps):
        tc, lc = tx.train, tx.lora
        t_trial = time.perf_counter()
        torch.manual_seed(tc.seed)
        model = get_peft_model(base.model, peft_config(lc, resolve_targets(base.model, lc.targets).target_modules))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                sched = {"constant": "constant_with_warmup"}.get(tc.schedule, tc.schedule)
                targs = TrainingArguments(
                    output_dir=tmp, per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
                    max_steps=tc.steps, learning_rate=tc.lr, weight_decay=tc.weight_decay, lr_scheduler_type=sched,
                    warmup_steps=int(tc.warmup * tc.steps), max_grad_norm=tc.max_grad_norm or 0.0, bf16=cuda,
                    use_cpu=not cuda, logging_strategy="steps", logging_steps=tc.log_every, save_strategy="no",
                    report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                    seed=tc.seed, data_seed=tc.seed)
                trainer = Counting(model=model, args=targs, train_dataset=rows,
                                   data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
                t_train = time.perf_counter()
                trainer.train()
                sync()
                train_s = time.perf_counter() - t_train
                tokens = int(trainer.real_tokens)
                t_eval = time.perf_counter()
                metrics = evaluate(model)
                sync()
                eval_s = time.perf_counter() - t_eval
                model.save_pretrained(str(Path(tmp) / "adapter"))
        finally:
            base.model = model.unload()
            base.model.eval()
        seconds = time.perf_counter() - t_trial
        results.append({"trial": spec["trial"], "r": lc.r, "seed": tc.seed, "seconds": seconds, "train_s": train_s,
                        "eval_s": eval_s, "tokens": tokens, "tokens_per_s": tokens / train_s, "metrics": metrics,
                        "study_final": spec["study_final"]})
        print(f"[baseline] trial {spec['trial']} r={lc.r} seed={tc.seed}: {seconds:.1f} s "
              f"(train {train_s:.1f}, eval {eval_s:.1f}), {tokens / train_s:,.0f} tok/s", flush=True)
    out_path.write_text(json.dumps({"load_s": loaded, "base_eval_s": base_eval, "base_metrics": base_metrics,
                                    "device": str(base.device), "dtype": str(base.dtype), "trials": results}))


# ----------------------------------------------------------------------------------------- report


def summarize(report: dict) -> dict:
    st, bl = report.get("study"), report.get("baseline")
    if not st or not bl or st.get("error") or bl.get("error"):
        return {}
    n = st["trials"]
    per_trial = sum(t["seconds"] for t in bl["trials"]) / len(bl["trials"])
    # the measured subprocess (interpreter start, load, base eval, the measured trials, exit) plus the missing trials
    extrap = bl["wall_s_measured"] + (n - len(bl["trials"])) * per_trial
    train = sum(t["train_s"] for t in bl["trials"]) / len(bl["trials"])
    ev = sum(t["eval_s"] for t in bl["trials"]) / len(bl["trials"])
    tps = sum(t["tokens"] for t in bl["trials"]) / sum(t["train_s"] for t in bl["trials"])
    rest = bl["wall_s_measured"] - bl["load_s"] - bl["base_eval_s"] - sum(t["seconds"] for t in bl["trials"])
    return {"note": f"baseline measured on {len(bl['trials'])} trial(s) (trials {[t['trial'] for t in bl['trials']]}), "
                    f"extrapolated to the study's {n}: the baseline process's measured wall (start-up, load, base eval, "
                    f"those trials, exit) + {n - len(bl['trials'])} x its mean seconds per trial",
            "baseline_extrapolated_s": extrap, "baseline_seconds_per_trial": per_trial,
            "baseline_train_s_per_trial": train, "baseline_eval_s_per_trial": ev,
            "baseline_training_extrapolated_s": n * train, "baseline_evaluation_extrapolated_s": n * ev,
            "baseline_tokens_per_s": tps, "baseline_interpreter_and_exit_s": rest, "lora_ablate_wall_s": st["wall_s"],
            "ratio_wall": extrap / st["wall_s"],
            "ratio_training": n * train / st["phases"]["training_s"] if st["phases"]["training_s"] else None,
            "ratio_tokens_per_s_aggregate": st["tokens_per_s_aggregate"] / tps if st.get("tokens_per_s_aggregate") else None,
            "ratio_tokens_per_s_per_trial": st["tokens_per_s_per_trial_mean"] / tps if st.get("tokens_per_s_per_trial_mean") else None}


def markdown(report: dict) -> str:
    f = lambda v, fmt=",.1f": "-" if v is None else format(v, fmt)
    st, bl, sm = report.get("study") or {}, report.get("baseline") or {}, report.get("summary") or {}
    ph = st.get("phases", {})
    lines = [(f"# Study benchmark: `{report['settings']['space']}` space, {report['settings']['seeds']} seed(s), "
             f"{report['settings']['steps']} steps"), "",
             (f"card: {report['device']}; torch {report['torch']}, transformers {report['transformers']}, "
             f"peft {report['peft']}, mlflow {report['mlflow']}, optuna {report['optuna']}, python {report['python']}"), "",
             f"data: {report['data']}; settings: {report['settings']}", "",
             "| phase | lora_ablate study (CLI) | HF Trainer + peft + generate |", "| --- | ---: | ---: |",
             f"| total wall (s) | {f(st.get('wall_s'))} | {f(sm.get('baseline_extrapolated_s'))} (extrapolated) |",
             (f"| start-up + model load (s) | {f(ph.get('startup_and_model_load_s'))} | {f(bl.get('load_s'))} in process, "
             f"+ {f(sm.get('baseline_interpreter_and_exit_s'))} interpreter start and exit |"),
             f"| base evaluation (+ pack sizing) (s) | {f(ph.get('base_eval_and_pack_sizing_s'))} | {f(bl.get('base_eval_s'))} |",
             f"| training (s) | {f(ph.get('training_s'))} | {f(sm.get('baseline_training_extrapolated_s'))} (extrapolated) |",
             (f"| evaluation + export + tracking (s) | {f(ph.get('evaluation_export_tracking_s'))} | "
             f"{f(sm.get('baseline_evaluation_extrapolated_s'))} (extrapolated, eval only) |"),
             f"| trials | {st.get('complete', '-')}/{st.get('trials', '-')} | {len(bl.get('trials', []))} measured |",
             f"| real tokens/s per trial | {f(st.get('tokens_per_s_per_trial_mean'), ',.0f')} | {f(sm.get('baseline_tokens_per_s'), ',.0f')} |",
             f"| real tokens/s aggregate | {f(st.get('tokens_per_s_aggregate'), ',.0f')} | {f(sm.get('baseline_tokens_per_s'), ',.0f')} |",
             f"| ratio (baseline / lora_ablate), wall | **{f(sm.get('ratio_wall'), '.1f')}x** | |",
             f"| ratio, training only | {f(sm.get('ratio_training'), '.1f')}x | |", ""]
    if sm.get("note"):
        lines += [sm["note"], ""]
    if bl.get("trials"):
        lines += ["| baseline trial | r | seed | s | train s | eval s | tok/s | heldout_instances nll (baseline / study) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for t in bl["trials"]:
            lines.append(f"| {t['trial']} | {t['r']} | {t['seed']} | {f(t['seconds'])} | {f(t['train_s'])} | {f(t['eval_s'])} | "
                         f"{f(t['tokens_per_s'], ',.0f')} | {f(t['metrics']['heldout_instances']['nll'], '.3f')} / "
                         f"{f(t['study_final'].get('final/heldout_instances/nll'), '.3f')} |")
    for part in ("study", "baseline"):
        if (report.get(part) or {}).get("error"):
            lines.append(f"{part} failed: {report[part]['error']}")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import mlflow
    import optuna
    import peft
    import torch
    import transformers

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu"),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "mlflow": mlflow.__version__, "optuna": optuna.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------- main


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an already prepared data folder (train.jsonl, heldout_*.jsonl)")
    p.add_argument("--data-out", type=Path, help="prepare the data folder here from --pool")
    p.add_argument("--prepare-only", action="store_true", help="only prepare --data-out, run nothing")
    p.add_argument("--pool", type=Path, default=POOL, help=f"T0 pool (default {POOL})")
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    p.add_argument("--train-rows", type=int, default=2400, help="training rows (300 steps x 8 = one epoch)")
    p.add_argument("--heldout-rows", type=int, default=200, help="rows per held-out set")
    p.add_argument("--heldout-sources", help="comma list of source datasets held out as tasks (default: drawn)")
    p.add_argument("--n-heldout-sources", type=int, default=4, help="sources drawn for heldout_tasks")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-study"), help="folder for study.json, study.md, logs")
    p.add_argument("--workspace", type=Path, help="study workspace (default: a fresh folder under --out)")
    p.add_argument("--space", default="rank")
    p.add_argument("--study-name", default="bench-rank")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pack", default="auto")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--baseline-trials", type=int, default=2, help="baseline trials to time (0: no baseline)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny-llama, 2 ranks, 1 seed, a few steps")
    p.add_argument("--baseline-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed through to the study (and so the baseline)")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return None
    if args.smoke:
        args.out = args.out if str(args.out).startswith("/tmp") else Path("/tmp/bench-study-smoke")
        args.train_rows, args.heldout_rows = 64, 8
        args.seeds, args.steps, args.eval_size, args.max_new_tokens, args.max_length = 1, 4, 4, 4, 128
        space = args.out / "rank_smoke.yaml"
        args.out.mkdir(parents=True, exist_ok=True)
        text = (ROOT / "experiments" / "spaces" / f"{args.space}.yaml").read_text()
        space.write_text(text.replace("{grid: [1, 2, 4, 8, 16, 32, 64]}", "{grid: [2, 8]}"))
        args.space = str(space)
        args.overrides = ["model.name=tiny-llama", "model.device=cpu", *args.overrides]
        if not args.data and not args.data_out:
            args.data_out = args.out / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data_out:
        manifest = prepare(args.pool, args.data_out, args.seed, args.train_rows, args.heldout_rows,
                           args.heldout_sources.split(",") if args.heldout_sources else None, args.n_heldout_sources)
        size = sum(p.stat().st_size for p in args.data_out.rglob("*") if p.is_file())
        print(f"[bench] data: {args.data_out} ({size / 1e6:.2f} MB; heldout_tasks sources: "
              f"{', '.join(manifest['heldout_task_sources'])})", flush=True)
        args.data = args.data or args.data_out
        if args.prepare_only:
            return manifest
    if not args.data:
        raise SystemExit("give --data DIR (a prepared folder) or --data-out DIR (prepare one)")
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="ws-", dir=args.out))
    manifest = json.loads((args.data / "manifest.json").read_text()) if (args.data / "manifest.json").is_file() else {}
    report = {**versions(), "data": {"folder": str(args.data), "heldout_task_sources": manifest.get("heldout_task_sources"),
                                     "rows": {k: v["rows"] for k, v in manifest.get("files", {}).items()}},
              "settings": {k: getattr(args, k) for k in ("space", "seeds", "pack", "steps", "batch_size", "max_length",
                                                         "eval_size", "max_new_tokens", "baseline_trials", "overrides")},
              "workspace": str(workspace)}

    def save():
        report["summary"] = summarize(report)
        (args.out / "study.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "study.md").write_text(markdown(report))

    prime = [sys.executable, "-c", ("import sys; from lora_ablate.config import build_experiment; "
             "from lora_ablate.models import load_base; "
             "load_base(build_experiment({}, sys.argv[1:]).model)"), *[o for o in args.overrides if o.startswith("model.")]]
    t = time.perf_counter()  # fills the dequantized-GGUF cache, so neither side pays the one-off conversion
    subprocess.run(prime, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    report["cache_priming_s_not_counted"] = time.perf_counter() - t
    try:
        report["study"] = run_study(args, args.data, workspace, args.out / "study.log")
    except Exception as e:  # noqa: BLE001 - the report says what failed
        traceback.print_exc()
        report["study"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
    save()
    if args.baseline_trials and not report["study"].get("error"):
        try:
            trials = trial_configs(workspace, report["study"]["trial_rows"], args.baseline_trials)
            report["baseline"] = run_baseline(trials, args.out, args.out / "baseline.log")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report["baseline"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
    save()
    print(markdown(report), flush=True)
    sm = report["summary"]
    st = report["study"]
    print(f"card: {report['device']} | torch {report['torch']} transformers {report['transformers']} peft {report['peft']}")
    if not st.get("error"):
        print("lora_ablate phases (s): " + ", ".join(f"{k}={v:.1f}" for k, v in st["phases"].items()))
        print(f"lora_ablate real tokens/s: per trial {st['tokens_per_s_per_trial_mean'] or 0:,.0f}, "
              f"aggregate {st['tokens_per_s_aggregate'] or 0:,.0f}")
    if sm:
        print(f"baseline real tokens/s: {sm['baseline_tokens_per_s']:,.0f}; {sm['note']}")
        print(f"study-level ratio (baseline extrapolated {sm['baseline_extrapolated_s']:.1f} s / lora_ablate "
              f"{sm['lora_ablate_wall_s']:.1f} s): {sm['ratio_wall']:.2f}x")
    print(f"[bench] wrote {args.out / 'study.json'} and {args.out / 'study.md'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
