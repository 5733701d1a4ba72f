"""Packed trials (lora_ablate.packed) against the single-trial reference path (reference.train_one).

CPU, fp32, tiny-llama. The reference for every packed trial is the same spec trained alone by the
``ReferenceTrainer``; packed results must agree to 1e-4 relative (in practice they agree to ~1e-8).
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lora_ablate import packed
from lora_ablate.config import DataConfig, EvalConfig, LoraConfig, TrainConfig
from lora_ablate.data import encode_all, load_eval_set, load_examples
from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel
from lora_ablate.packed import Pack, PackedTrainer, auto_pack_size, fit_pack, initial_A, train_packed
from lora_ablate.reference import ReferenceTrainer
from lora_ablate.targets import resolve_targets
from lora_ablate.tiny import tiny_llama
from lora_ablate.trial import TrialHooks, TrialPruned, TrialSpec

REL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread


@pytest.fixture(scope="module")
def base():
    model, tok = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return LoadedModel(model, tok, "tiny-llama", "in-process", torch.device("cpu"), torch.float32)


def _data(base, max_length):
    return encode_all(load_examples("builtin:train", size=48, seed=0), base.tokenizer, "alpaca", max_length)


@pytest.fixture(scope="module")
def padded(base):
    """Lengths 95..112: most batches are right-padded."""
    return _data(base, 112)


@pytest.fixture(scope="module")
def unpadded(base):
    """Every example truncated to 48 tokens: no batch has padding."""
    return _data(base, 48)


@pytest.fixture(scope="module")
def evaluator(base):
    cfg = EvalConfig(sets=("heldout_instances",), size=6, max_new_tokens=4, batch_size=3, every=3)
    return Evaluator([load_eval_set("heldout_instances", 6, 0)], base.tokenizer, DataConfig(max_length=112), cfg)


def spec(name, **kw):
    lora = {k: kw.pop(k) for k in list(kw) if k in ("r", "alpha_rule", "alpha", "targets", "init", "dropout")}
    train = {"steps": 6, "batch_size": 4, "log_every": 2, "warmup": 0.2, **kw}
    return TrialSpec(LoraConfig(**lora), TrainConfig(**train), name=name)


# Trials that differ in everything a pack lets them differ in.
MIXED = [
    spec("qv-r2", r=2, targets=("q", "v"), lr=3e-3, seed=1),
    spec("qkvo-free", r=4, alpha_rule="free", alpha=8, targets=("q", "k", "v", "o"), lr=1e-3, seed=2,
         batch_size=3, grad_accum=2, schedule="linear"),
    spec("o-rslora", r=8, alpha_rule="rslora", alpha=4, targets=("o",), lr=5e-3, seed=3, schedule="constant",
         weight_decay=0.1, max_grad_norm=0),
    spec("mlp-gauss", r=4, targets=("mlp",), init="gaussian", lr=2e-3, seed=4, steps=4, log_every=1),
]


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def module_tree(model):
    return [(name, type(m), id(m)) for name, m in model.named_modules()]


def assert_same_trial(ref, got, rel=REL):
    assert got.status == ref.status == "ok", (got.status, got.error)
    assert (got.targets, got.scaling, got.trainable_params, got.tokens) == \
           (ref.targets, ref.scaling, ref.trainable_params, ref.tokens)
    assert [h["step"] for h in got.history] == [h["step"] for h in ref.history]
    for h_ref, h_got in zip(ref.history, got.history):
        assert close(h_ref["loss"], h_got["loss"], rel), (ref.spec.name, h_ref, h_got)
        assert h_ref["lr"] == h_got["lr"]
    assert [e["step"] for e in got.evals] == [e["step"] for e in ref.evals]
    for e_ref, e_got in zip(ref.evals, got.evals):
        assert all(close(e_ref[k], e_got[k], rel) for k in e_ref if k != "step"), (e_ref, e_got)
    if ref.final is not None:
        for name, m in ref.final.metrics.items():
            assert close(m["nll"], got.final.metrics[name]["nll"], rel)
            assert m["n"] == got.final.metrics[name]["n"]
        assert [r["tokens"] for r in ref.final.examples] == [r["tokens"] for r in got.final.examples]


@pytest.fixture(scope="module")
def references(base, padded, evaluator):
    """Each MIXED trial alone on the single path (computed once for the module)."""
    return {s.name: r for s, r in zip(MIXED, ReferenceTrainer(base, padded, evaluator, progress=False).train(MIXED))}


# ----------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_initial_A_is_peft_init(base, init, dtype):
    """Same seed, same A as peft's get_peft_model (bf16 bases: peft's cast down and autocast back up)."""
    model = base.model if dtype == torch.float32 else tiny_llama()[0].to(dtype)
    loaded = dataclasses.replace(base, model=model, dtype=dtype)
    s = spec("init", r=4, targets=("q", "k", "v", "o", "mlp"), init=init, seed=7)
    plan = resolve_targets(model, s.lora.targets)
    ours = initial_A(loaded, s, plan.module_names)
    torch.manual_seed(7)
    cfg = PeftLoraConfig(r=4, lora_alpha=4, target_modules=plan.target_modules,
                         init_lora_weights=True if init == "default" else "gaussian")
    peft_model = get_peft_model(model, cfg)
    try:
        for name in plan.module_names:
            theirs = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
            assert theirs.dtype == torch.float32
            assert torch.equal(ours[name], theirs.detach()), name
    finally:
        peft_model.unload()


# ----------------------------------------------------------------------------------------- equivalence


def test_packed_trials_match_single_path(base, padded, evaluator, references):
    """Four different trials in one pack: same curves, intermediate and final held-out metrics, greedy
    predictions, as each trained alone; the base is untouched afterwards."""
    tree, params = module_tree(base.model), {k: v.clone() for k, v in base.model.state_dict().items()}
    finished = []
    results = train_packed(base, MIXED, padded, evaluator, progress=False, on_result=finished.append)
    assert [r.spec.name for r in results] == [s.name for s in MIXED]
    # the 4-step trial is done (and reported) before the others
    assert finished[0].spec.name == "mlp-gauss" and sorted(r.spec.name for r in finished) == sorted(s.name for s in MIXED)
    for got in results:
        ref = references[got.spec.name]
        assert_same_trial(ref, got)
        preds = lambda r: [e["prediction"] for e in r.final.examples]  # noqa: E731
        assert preds(got) == preds(ref)
        assert 0 < got.tokens_per_s
    assert module_tree(base.model) == tree
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in params.items())
    assert base.model.config._attn_implementation == "sdpa"


def test_fused_head_loss_matches_single_path(base, padded, evaluator, references):
    """The chunked LM-head loss (the default on a GPU) trains the same trials as the full-logits path."""
    for got in train_packed(base, MIXED, padded, evaluator, progress=False, fused_head=True):
        assert_same_trial(references[got.spec.name], got)


def test_the_gpus_held_out_nll_path_gives_the_single_paths_nll(base, padded, evaluator, references, monkeypatch):
    """packed_nll's GPU path run on the CPU (causal attention with no padding mask, the NLL from the final states
    in chunks, longest examples first, groups of GENERATE_ROWS times a step's rows): every trial's held-out NLL,
    intermediate and final, and every example's NLL and token count in file order are the single path's."""
    from lora_ablate.packed import heldout

    monkeypatch.setattr(heldout, "_chunked", lambda pack: pack.head is not None)
    seen = []
    real = heldout.head_token_nll
    monkeypatch.setattr(heldout, "head_token_nll", lambda *a: seen.append(1) or real(*a))
    for got in train_packed(base, MIXED, padded, evaluator, progress=False, fused_head=True):
        ref = references[got.spec.name]
        assert_same_trial(ref, got)
        for a, b in zip(ref.final.examples, got.final.examples):
            assert (a["set"], a["idx"]) == (b["set"], b["idx"]) and close(a["nll"], b["nll"], REL)
    assert seen, "the chunked path should have run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_token_nll_is_token_nll_of_the_full_logits(monkeypatch, dtype):
    """The GPU's held-out NLL (packed_nll from the final states in chunks) against token_nll of the whole
    logits, across several chunks and masked labels: the same values and the same mask."""
    from lora_ablate.data import IGNORE
    from lora_ablate.evaluation import token_nll
    from lora_ablate.packed import loss

    monkeypatch.setattr(loss, "CHUNK_BYTES", 1)  # one row a chunk: 3 chunks
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 150, 16, generator=g).to(dtype)
    weight = torch.randn(50, 16, generator=g).to(dtype)
    labels = torch.randint(0, 50, (3, 150), generator=g)
    labels[torch.rand(3, 150, generator=g) < 0.3] = IGNORE
    want, want_mask = token_nll(h @ weight.t(), labels)
    got, mask = loss.head_token_nll(h, weight, labels)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_nll_equals_cross_entropy_over_full_logits(monkeypatch, dtype):
    """Values and gradient of head_nll against autograd through token_nll(h @ W.T), across several chunks,
    with masked labels and a per-token upstream weight."""
    from lora_ablate.data import IGNORE
    from lora_ablate.evaluation import token_nll
    from lora_ablate.packed import loss

    monkeypatch.setattr(loss, "CHUNK_BYTES", 1)  # the smallest chunk: 256 rows, so 3 x 150 rows make 2 chunks
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 150, 16, generator=g).to(dtype)
    weight = torch.randn(50, 16, generator=g).to(dtype)
    labels = torch.randint(0, 50, (3, 150), generator=g)
    labels[torch.rand(3, 150, generator=g) < 0.3] = IGNORE
    upstream = torch.rand(3, 150, generator=g)

    def through_logits(h, weight):
        h = h.clone().requires_grad_()
        nll, _ = token_nll(h @ weight.t(), labels)
        (nll * upstream[:, :-1]).sum().backward()
        return nll, h.grad

    ref, ref_grad = through_logits(h, weight)
    got_h = h.clone().requires_grad_()
    got = loss.head_nll(got_h, weight, labels)
    (got * upstream).sum().backward()

    assert got.shape == (3, 150) and got.dtype == torch.float32 and not got[:, -1].any()
    torch.testing.assert_close(got[:, :-1], ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got_h.grad, ref_grad, rtol=1e-5, atol=1e-6)
    else:  # the upstream factor is applied after the bf16 product, not before: as close to fp32 as autograd is
        _, exact = through_logits(h.float(), weight.float())
        assert (got_h.grad.float() - exact).abs().max() <= 2 * (ref_grad.float() - exact).abs().max()
    assert not got_h.grad[labels.roll(-1, 1).eq(IGNORE) | torch.arange(150).eq(149)].any()  # no label: no gradient


def test_one_trial_is_bit_identical_to_single_path(base, unpadded, tmp_path):
    """K = 1 (the fast single trial) reproduces train_one to the bit on unpadded batches, gradient
    accumulation, weight decay, clipping and dropout included, through the packed Trainer."""
    single = ReferenceTrainer(base, unpadded, None, progress=False)
    packed_one = PackedTrainer(base, unpadded, None, progress=False)
    for s in [spec("a", r=4, targets=("q", "k", "v", "o"), lr=3e-3, seed=5, grad_accum=2, weight_decay=0.05),
              spec("b", r=8, alpha_rule="free", alpha=16, targets=("v", "mlp"), dropout=0.1, lr=1e-3, seed=6)]:
        ref_dir, got_dir = tmp_path / f"ref_{s.name}", tmp_path / f"got_{s.name}"
        ref = single.train([dataclasses.replace(s, adapter_dir=ref_dir)])[0]
        got = packed_one.train([dataclasses.replace(s, adapter_dir=got_dir)])[0]
        assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]
        a, b = load_file(ref_dir / "adapter_model.safetensors"), load_file(got_dir / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
        cfg_ref = json.loads((ref_dir / "adapter_config.json").read_text())
        cfg_got = json.loads((got_dir / "adapter_config.json").read_text())
        assert cfg_ref == cfg_got


def test_export_loads_in_stock_peft_and_padding_stays_zero(base, padded, tmp_path):
    """Each trial's exported adapter, loaded by PeftModel.from_pretrained, gives the logits the pack gives
    for that trial; rank padding and non-targeted modules stay exactly zero through training."""
    specs = MIXED[:3]
    pack = Pack(base, padded, None, False)
    tree = module_tree(base.model)
    try:
        slots = [pack.new_slot(pack.new_result(s)) for s in specs]
        pack.model.train()
        pack.relayout(slots)
        for _ in range(3):
            pack.step()
        assert pack.layout.r == 8
        blocks = pack.layout.blocks(pack.weights)
        for s in slots:
            r = s.spec.lora.r
            for name, (a, b) in blocks.items():
                if name in s.modules:
                    assert a[s.row, :r].abs().sum() > 0 and b[s.row, :, :r].abs().sum() > 0, name
                    assert torch.count_nonzero(a[s.row, r:]) == 0 and torch.count_nonzero(b[s.row, :, r:]) == 0
                else:
                    assert torch.count_nonzero(a[s.row]) == 0 and torch.count_nonzero(b[s.row]) == 0
        x = torch.tensor([padded.input_ids[0][:40], padded.input_ids[1][:40]])
        pack.model.eval()
        with torch.no_grad():
            stacked = pack.model(input_ids=x.repeat(len(slots), 1)).logits.view(len(slots), *x.shape, -1)
        dirs = [tmp_path / f"adapter_{k}" for k in range(len(slots))]
        for s, d in zip(slots, dirs):
            packed.export_adapter(pack, s, d)
    finally:
        pack.close()
    assert module_tree(base.model) == tree
    for k, d in enumerate(dirs):
        model = PeftModel.from_pretrained(base.model, str(d))
        try:
            with torch.no_grad():
                theirs = model(input_ids=x).logits
            assert torch.allclose(theirs, stacked[k], rtol=1e-5, atol=1e-5), (k, (theirs - stacked[k]).abs().max())
        finally:
            base.model = model.unload()
    base.model.eval()


@pytest.mark.parametrize("k", [3, 1])
def test_optimizer_and_clipping_match_torch(base, padded, k):
    """The pack's per-trial clipping + AdamW + schedule against clip_grad_norm_ + torch.optim.AdamW +
    LambdaLR on each trial's own parameters, fed the same random gradients (K = 1: to the bit)."""
    from lora_ablate.trial import lr_lambda

    specs = [spec("x", r=4, targets=("q", "v"), lr=3e-2, weight_decay=0.1, max_grad_norm=0.5, seed=1),
             spec("y", r=2, targets=("q", "k", "v", "o"), lr=1e-2, schedule="linear", max_grad_norm=0, seed=2),
             spec("z", r=8, targets=("o",), lr=5e-2, schedule="constant", max_grad_norm=2.0, seed=3)][:k]
    pack = Pack(base, padded, None, False)
    try:
        slots = [pack.new_slot(pack.new_result(s)) for s in specs]
        pack.relayout(slots)
        refs = []
        for s in slots:
            params = [p.detach().clone().requires_grad_() for ab in pack.slot_weights(s).values() for p in ab]
            opt = torch.optim.AdamW(params, lr=s.train.lr, weight_decay=s.train.weight_decay)
            refs.append((params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.train))))
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            for s, (params, opt, sched) in zip(slots, refs):
                grads = [g for ab in pack.slot_grads(s).values() for g in ab]
                for g, p in zip(grads, params):
                    g.copy_(torch.randn(g.shape, generator=gen) * 3)
                    p.grad = g.clone()
                if s.train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, s.train.max_grad_norm)
                opt.step()
                sched.step()
            pack.optimizer_step()
        for s, (params, _, _) in zip(slots, refs):
            ours = [p for ab in pack.slot_weights(s).values() for p in ab]
            for mine, theirs in zip(ours, params):
                if k == 1:
                    assert torch.equal(mine, theirs.detach())
                else:
                    assert torch.allclose(mine, theirs.detach(), rtol=1e-5, atol=1e-7), (mine - theirs).abs().max()
        # nothing outside the trials' own blocks (rank padding, modules they do not adapt) ever moved
        assert torch.count_nonzero(pack.weights) == sum(p.numel() for params, _, _ in refs for p in params)
    finally:
        pack.close()


# ----------------------------------------------------------------------------------------- leaving the pack


class PruneAt(TrialHooks):
    def __init__(self, name, step):
        self.name, self.step = name, step

    def on_eval(self, spec, step, values):
        if spec.name == self.name and step == self.step:
            raise TrialPruned(f"pruned at {step}")


def test_failed_and_pruned_trials_leave_and_free_slots_are_refilled(base, padded, evaluator, references,
                                                                   monkeypatch):
    """A trial whose weights turn NaN fails, a pruned one stops, a new trial takes a freed slot; the others
    (and the newcomer) still match their single-path references."""
    step = Pack.step

    def step_then_poison(pack):  # divergence on demand: the tiny model's RMSNorms absorb any learning rate
        step(pack)
        for s in pack.slots:
            if s.spec.name == "diverges" and s.done == 2:
                for a, _ in pack.slot_weights(s).values():
                    a.fill_(float("nan"))

    monkeypatch.setattr(Pack, "step", step_then_poison)
    diverging = spec("diverges", r=4, targets=("q", "v"), seed=9, log_every=1)
    pruned = dataclasses.replace(MIXED[0], name="pruned")
    queue = [MIXED[3]]
    done = []
    results = train_packed(base, [MIXED[1], diverging, pruned, MIXED[2]], padded, evaluator, PruneAt("pruned", 3),
                           progress=False, refill=lambda: queue.pop() if queue else None, on_result=done.append)
    by_name = {r.spec.name: r for r in results}
    assert by_name["diverges"].status == "failed"
    assert by_name["diverges"].error == "training loss became nan by step 3"
    assert [h["step"] for h in by_name["diverges"].history] == [1, 2]
    assert by_name["pruned"].status == "pruned" and by_name["pruned"].error == "pruned at 3"
    assert by_name["pruned"].final is None and [e["step"] for e in by_name["pruned"].evals] == [3]
    for name in ("qkvo-free", "o-rslora", "mlp-gauss"):
        assert_same_trial(references[name], by_name[name])
    assert [r.spec.name for r in results][-1] == "mlp-gauss"  # joined last, through refill, at step 3
    assert [r.spec.name for r in done][:2] == ["diverges", "pruned"]


def test_refill_into_modules_a_live_trial_adapts(base, padded, evaluator, references):
    """A newcomer whose targets overlap a trial still in the pack (q, v inside q, k, v, o) initialises its
    A from the base projections under the pack's wrappers, and still matches its single-path reference."""
    short = spec("short", r=2, targets=("q", "v"), steps=2, log_every=1, seed=7)
    queue = [MIXED[0]]
    results = train_packed(base, [MIXED[1], short], padded, evaluator, progress=False,
                           refill=lambda: queue.pop() if queue else None)
    by_name = {r.spec.name: r for r in results}
    assert by_name["short"].status == "ok"
    assert_same_trial(references["qv-r2"], by_name["qv-r2"])
    assert_same_trial(references["qkvo-free"], by_name["qkvo-free"])


def test_evaluation_time_is_not_training_time(base, padded, evaluator, monkeypatch):
    """train_seconds (hence tokens/s) leaves out the held-out evaluations the trial sat through, its own
    intermediate ones and other trials' final ones, as the single path does."""
    import time

    from lora_ablate.packed import train as train_module

    real_nll, real_reports = train_module.packed_nll, train_module.packed_reports
    pause = 0.4

    def slow(real):
        def call(*args, **kw):
            time.sleep(pause)
            return real(*args, **kw)
        return call

    monkeypatch.setattr(train_module, "packed_nll", slow(real_nll))
    monkeypatch.setattr(train_module, "packed_reports", slow(real_reports))
    short = spec("short", r=2, targets=("q",), steps=3, log_every=1)  # finishes (final evaluation) first
    t0 = time.perf_counter()
    results = train_packed(base, [MIXED[0], short], padded, evaluator, progress=False)  # eval at step 3
    wall = time.perf_counter() - t0
    long = results[0]
    assert long.status == "ok" and [e["step"] for e in long.evals] == [3]
    # it sat through 3 paused evaluations: its own at step 3, short's final one, and its own final one
    # (after its stamp); only the first two happened inside its training time
    assert long.train_seconds < wall - 3 * pause + 0.5 * pause
    assert long.train_seconds > 0


def test_too_little_data_fails_only_that_trial(base, padded):
    greedy = spec("too-big", r=2, batch_size=len(padded) + 1)
    results = train_packed(base, [greedy, MIXED[0]], padded, None, progress=False)
    assert results[0].status == "failed" and "fewer than train.batch_size" in results[0].error
    assert results[1].status == "ok"


# ----------------------------------------------------------------------------------------- out of GPU memory


def _oom(*args, **kw):
    raise torch.OutOfMemoryError("CUDA out of memory (injected)")


class Recorded(TrialHooks):
    def __init__(self):
        self.calls = []

    def on_train_log(self, spec, step, values):
        self.calls.append((spec.name, "train", step))

    def on_eval(self, spec, step, values):
        self.calls.append((spec.name, "eval", step))


def _oom_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lora_ablate.packed.train"]


def test_a_pack_out_of_memory_is_trained_again_in_halves(base, padded, evaluator, references, monkeypatch,
                                                         caplog):
    """Packs of more than one trial run out of memory at their fifth step: the pack of 4 is trained again as
    two packs of 2, each of those as two of 1; every trial ends as trained alone, the one that finished
    before the first shrink is kept, refills join the last pack only, and each step reaches the hooks once."""
    step = Pack.step
    monkeypatch.setattr(Pack, "step", lambda pack: _oom() if len(pack.slots) > 1 and
                        max(s.done for s in pack.slots) >= 4 else step(pack))
    queue = [dataclasses.replace(MIXED[0], name="refill-2"), dataclasses.replace(MIXED[0], name="refill-1")]
    hooks, told = Recorded(), []
    results = train_packed(base, MIXED, padded, evaluator, hooks, progress=False,
                           refill=lambda: queue.pop() if queue else None, on_result=told.append)
    # mlp-gauss finished at step 4 (refill-1 took its slot); refill-2 joined the last pack of 1, at its end
    names = ["mlp-gauss", "qv-r2", "qkvo-free", "o-rslora", "refill-1", "refill-2"]
    assert [r.spec.name for r in results] == names
    assert sorted(r.spec.name for r in told) == sorted(names) and all(r in told for r in results)
    for r in results:
        assert_same_trial(references[r.spec.name if r.spec.name in references else "qv-r2"], r)
        calls = [c for c in hooks.calls if c[0] == r.spec.name]
        assert [st for _, kind, st in calls if kind == "train"] == [h["step"] for h in r.history]
        assert [st for _, kind, st in calls if kind == "eval"] == [e["step"] for e in r.evals]
    assert _oom_warnings(caplog) == [
        "pack of 4 ran out of GPU memory at step 5; training its 4 trials again in packs of 2",
        "pack of 2 ran out of GPU memory at step 5; training its 2 trials again in packs of 1",
        "pack of 2 ran out of GPU memory at step 5; training its 2 trials again in packs of 1"]


def test_a_trial_out_of_memory_alone_fails_with_the_error(base, padded, monkeypatch, caplog):
    monkeypatch.setattr(Pack, "step", _oom)
    told = []
    results = train_packed(base, MIXED[:3], padded, None, progress=False, on_result=told.append)
    assert [(r.spec.name, r.status, r.error) for r in results] == \
        [(s.name, "failed", "CUDA out of memory (injected)") for s in MIXED[:3]]
    assert [r.spec.name for r in told] == [s.name for s in MIXED[:3]]
    assert _oom_warnings(caplog) == [
        "pack of 3 ran out of GPU memory at step 1; training its 3 trials again in packs of 2 and 1",
        "pack of 2 ran out of GPU memory at step 1; training its 2 trials again in packs of 1"]


def test_an_evaluation_out_of_memory_is_run_again_in_halves(base, padded, evaluator, references, monkeypatch):
    """Held-out evaluations of more than one trial run out of memory (and o-rslora's final one even alone):
    the intermediate and final evaluations of 3 trials are run again 2 + 1, then 1 + 1; only o-rslora
    fails."""
    from lora_ablate.packed import train as train_module

    def tight(real, alone_too=""):
        def call(pack, ev, slots):
            if len(slots) > 1 or slots[0].spec.name == alone_too:
                _oom()
            return real(pack, ev, slots)
        return call

    monkeypatch.setattr(train_module, "packed_nll", tight(train_module.packed_nll))
    monkeypatch.setattr(train_module, "packed_reports", tight(train_module.packed_reports, "o-rslora"))
    results = train_packed(base, MIXED[:3], padded, evaluator, progress=False)
    assert_same_trial(references["qv-r2"], results[0])
    assert_same_trial(references["qkvo-free"], results[1])
    failed = results[2]
    assert (failed.status, failed.error, failed.final) == ("failed", "CUDA out of memory (injected)", None)
    (got,), (ref,) = failed.evals, references["o-rslora"].evals  # its intermediate evaluation went through
    assert got["step"] == ref["step"] and close(got["heldout_instances/nll"], ref["heldout_instances/nll"])


def test_compile_failure_falls_back_to_eager(base, unpadded, monkeypatch):
    """If torch.compile breaks, the pack trains eagerly and the result is the eager result; the model's
    blocks are the original modules afterwards."""
    def broken_compile(module, **kw):
        class Broken(torch.nn.Module):
            def forward(self, *a, **k):
                raise RuntimeError("compiler exploded")
        return Broken()

    layers = list(base.model.model.layers)
    s = spec("c", r=2, targets=("q", "v"), lr=3e-3, steps=3)
    eager = train_packed(base, [s, MIXED[0]], unpadded, None, progress=False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = train_packed(base, [s, MIXED[0]], unpadded, None, progress=False, compile=True)
    assert [h["loss"] for r in compiled for h in r.history] == [h["loss"] for r in eager for h in r.history]
    assert all(a is b for a, b in zip(base.model.model.layers, layers))


# ----------------------------------------------------------------------------------------- pack size


def test_pack_size(base, padded):
    assert auto_pack_size(base, MIXED, padded) == packed.CPU_PACK
    assert auto_pack_size(base, MIXED[0], padded, limit=2) == 2
    gib = 2**30
    assert fit_pack(budget=80 * gib, fixed=2 * gib, per_trial=3 * gib, limit=64) == 26
    assert fit_pack(budget=80 * gib, fixed=2 * gib, per_trial=0.1 * gib, limit=64) == 64
    assert fit_pack(budget=1 * gib, fixed=2 * gib, per_trial=3 * gib, limit=64) == 1


# ----------------------------------------------------------------------------------------- benchmark


def test_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/throughput.py in its CPU smoke mode: every part runs and reports its numbers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("throughput", None)
    import throughput

    out = tmp_path / "bench.json"
    throughput.main(["--device", "cpu", "--steps", "2", "--packs", "1,2", "--study", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert {"hf_trainer_peft", "single_trial", "packed_k1", "packed_k2", "packed_auto"} <= set(rows), rows
    for row in rows.values():
        assert not row.get("error"), row
        assert row["tokens_per_s_aggregate"] > 0 and row["tokens_per_s_per_trial"] > 0
        assert math.isclose(row["tokens_per_s_aggregate"], row["tokens_per_s_per_trial"] * row["trials"], rel_tol=1e-9)
        assert row["ratio_to_baseline"] > 0 and 0 < row["mfu"]
    assert report["ceiling_tflops"] > 0
    # variable-length rows: real tokens, below what fixed rows of the longest example would count
    assert {"varlen_hf_trainer_peft", "varlen_k2_packed", "varlen_k2_padded"} <= set(rows), rows
    assert report["varlen"]["tokens_mean"] < report["varlen"]["tokens_max"] <= 384
    for name in ("varlen_k2_packed", "varlen_k2_padded"):
        tokens = rows[name]["tokens_per_s_aggregate"] * rows[name]["seconds"]
        assert 0 < tokens < 2 * rows[name]["steps_timed"] * 8 * report["varlen"]["tokens_max"]
    assert report["targets"]["varlen_best"] in ("varlen_k2_packed", "varlen_k2_padded")
    assert report["study"]["ok"] == report["study"]["trials"] == 2
    assert report["targets"]["best_pack"] in rows and report["targets"]["study_seconds"] > 0


def test_packed_evaluation_shows_one_bar_that_ends_full(base, padded, evaluator, monkeypatch):
    """The final evaluation of a pack advances the evaluator's progress bar once per batch and generate
    call, and the bar's total counts exactly those."""
    from contextlib import contextmanager

    from lora_ablate.evaluation import Evaluator

    bars, ticks = [], []
    real_bar, real_tick = Evaluator.bar, Evaluator.tick

    @contextmanager
    def bar(self, steps, who=""):
        bars.append((steps, who, len(ticks)))
        with real_bar(self, steps, who):
            yield

    def tick(self, what):
        ticks.append((what, self._bar is not None))
        real_tick(self, what)

    monkeypatch.setattr(Evaluator, "bar", bar)
    monkeypatch.setattr(Evaluator, "tick", tick)
    short = spec("short", r=2, targets=("q",), steps=2, log_every=1)
    train_packed(base, [short, spec("short2", r=4, targets=("v",), steps=2, log_every=1)], padded, evaluator,
                 progress=False)
    ((steps, who, before),) = bars  # both trials end at step 2: one final evaluation of both
    shown = [what for what, open_ in ticks[before:] if open_]
    assert who == " of 2 trials" and steps == len(shown) > 0
    assert {"heldout_instances NLL", "heldout_instances generation"} == set(shown)
