"""LoftQ (``lora.init=loftq``) on a bitsandbytes 4-bit tiny-llama on the CPU ($LORA_ABLATE_KBIT_CPU, as
tests/test_kbit.py): A0, B0 shrink each projection's quantization error to its best rank-r approximation
for every alpha rule, the start is closer to the unquantized model than the 4-bit base, the CLI's adapter
reloads with stock peft on a fresh 4-bit base, the packed engine trains it as the reference path does, and
the config refuses it anywhere but on a 4-bit base."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_ablate.config import LoraConfig, ModelConfig, TrainConfig, build_experiment
from lora_ablate.errors import UserError
from lora_ablate.models import KBIT_CPU_ENV, load_base
from lora_ablate.trial import TrialSpec
from tests.probes import LogitsProbe, logits_of

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread

ALL = ("q", "k", "v", "o", "mlp")
REL = 1e-4


def load_4bit(where):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KBIT_CPU_ENV, "1")
        return load_base(ModelConfig(name=str(where), quantization="4bit", device="cpu"))


@pytest.fixture
def kbit_base(tiny_dir):
    """A fresh 4-bit base for each test (a fraction of a second; LoftQ's factors are cached per base);
    trials must hand it back without LoRA."""
    base = load_4bit(tiny_dir)
    yield base
    assert not any("lora" in n for n, _ in base.model.named_modules()), "LoRA layers left in the base"
    assert not base.model.training, "base left in training mode"


# ----------------------------------------------------------------------------- the init itself


@pytest.mark.parametrize("alpha_rule", ["rank", "free", "rslora"])
def test_loftq_shrinks_the_quantization_error_to_its_best_rank_r_approximation(kbit_base, alpha_rule):
    from lora_ablate.loftq import dequantized, loftq_factors
    from lora_ablate.targets import resolve_targets
    from lora_ablate.tiny import tiny_llama

    lora = LoraConfig(r=8, alpha_rule=alpha_rule, alpha=5.0, targets=ALL)
    names = resolve_targets(kbit_base.model, ALL).module_names
    factors = loftq_factors(kbit_base, names, lora.r, lora.scaling)
    assert sorted(factors) == sorted(names) == sorted(n for n in names if "layers" in n) and len(names) == 14
    original = dict(tiny_llama()[0].named_modules())
    for name, (a, b) in factors.items():
        w = original[name].weight.float()
        error = w - dequantized(kbit_base.model.get_submodule(name))
        left = error - lora.scaling * b @ a  # what the 4-bit base + the LoftQ adapter still misses of W
        # strictly smaller by a clear margin, and exactly the rank-8 SVD's remainder (Eckart-Young): B0 A0
        # accounts for the scale, which peft's _loftq_init_new leaves out
        assert left.norm() < 0.85 * error.norm(), name
        s = torch.linalg.svdvals(error)
        assert left.norm().item() == pytest.approx(s[lora.r:].norm().item(), rel=1e-4), name
        assert torch.count_nonzero(b) == b.numel() and a.shape == (8, w.shape[1]) and b.shape == (w.shape[0], 8)
    again = loftq_factors(kbit_base, names, lora.r, lora.scaling)  # once per (module, r, scale)
    assert all(again[n][0] is factors[n][0] and again[n][1] is factors[n][1] for n in names)


def test_loftq_starts_closer_to_the_unquantized_model_than_the_4bit_base(kbit_base, train_data):
    """Before any step (one step of lr 1e-9 moves nothing) on both paths: the 4-bit base plus its LoftQ adapter
    computes logits nearer to the unquantized model's than the 4-bit base alone."""
    from lora_ablate.packed import Pack
    from lora_ablate.reference import ReferenceTrainer
    from lora_ablate.tiny import tiny_llama

    tok = kbit_base.tokenizer
    full = logits_of(tiny_llama()[0].eval(), tok)
    quantized = logits_of(kbit_base.model, tok)
    spec = TrialSpec(LoraConfig(r=8, init="loftq", targets=ALL, alpha_rule="free", alpha=3.0),
                     TrainConfig(steps=1, lr=1e-9, batch_size=4), name="start")
    start = ReferenceTrainer(kbit_base, train_data, LogitsProbe(tok), progress=False).train([spec])[0]
    assert start.status == "ok", start.error
    pack = Pack(kbit_base, train_data, None, compile=False)
    try:
        pack.relayout([pack.new_slot(pack.new_result(spec))])
        assert pack.initial is None  # nothing frozen: A0, B0 are only where A and B start
        packed = logits_of(pack.model, tok)
    finally:
        pack.close()
    for logits in (start.final, packed):
        assert (logits - full).pow(2).mean() < 0.8 * (quantized - full).pow(2).mean()
    torch.testing.assert_close(packed, start.final, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the reference path


def test_train_cli_loftq_adapter_reloads_with_stock_peft_on_a_fresh_4bit_base(tiny_dir, cpu_kbit, tmp_path):
    """``python -m lora_ablate train`` (in process) with lora.init=loftq on a 4-bit base, evaluated before it
    trains: the run records the init, the adapter is plain LoRA (init_lora_weights true) and stock peft on a
    freshly loaded 4-bit base scores the held-out set as the trained model did (and, adapter off, as the base)."""
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file

    from lora_ablate.cli import main
    from lora_ablate.context import build_context

    out = tmp_path / "run"
    args = [f"model.name={tiny_dir}", "model.quantization=4bit", "model.device=cpu", "lora.init=loftq", "lora.r=4",
            "lora.alpha_rule=free", "lora.alpha=8", "lora.targets=[q,v,mlp]", "data.train_size=16",
            "data.max_length=64", "train.steps=4", "train.batch_size=4", "train.lr=1e-2", "train.log_every=1",
            "eval.size=4", "eval.generate=false", "eval.base=true", "eval.sets=[heldout_instances]",
            "tracking.enabled=false"]
    assert main(["train", "--out", str(out), "--quiet", *args]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["init"] == "loftq"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 5 and all(torch.count_nonzero(w) == w.numel() for w in weights.values())
    metrics = json.loads((out / "metrics.json").read_text())
    final, base = (metrics[phase]["heldout_instances"]["nll"] for phase in ("final", "base"))

    ctx = build_context(build_experiment({}, args))
    stock = PeftModel.from_pretrained(ctx.base.model, str(out / "adapter")).eval()
    assert stock.peft_config["default"].init_lora_weights is True
    reloaded = ctx.evaluator.nll(stock, "cpu")["heldout_instances"][0]
    assert reloaded == pytest.approx(final, rel=REL)
    with stock.disable_adapter():
        assert ctx.evaluator.nll(stock, "cpu")["heldout_instances"][0] == pytest.approx(base, rel=REL)
    assert abs(base - final) > 1e-2  # the adapter does something


@pytest.mark.parametrize("alpha_rule", ["rank", "rslora"])
def test_reference_loftq_adapter_gives_the_trained_logits_with_stock_peft(kbit_base, train_data, tiny_dir, tmp_path,
                                                                        alpha_rule):
    from peft import PeftModel

    tok = kbit_base.tokenizer
    spec = TrialSpec(LoraConfig(r=4, init="loftq", targets=ALL, alpha_rule=alpha_rule, alpha=6.0),
                     TrainConfig(steps=3, lr=1e-2, batch_size=4), name="ref", adapter_dir=tmp_path / "a")
    from lora_ablate.reference import ReferenceTrainer

    result = ReferenceTrainer(kbit_base, train_data, LogitsProbe(tok), progress=False).train([spec])[0]
    assert result.status == "ok", result.error
    fresh = load_4bit(tiny_dir).model
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits_of(reloaded, tok), result.final, rtol=0, atol=1e-5)
    with reloaded.disable_adapter():
        assert not torch.allclose(logits_of(reloaded, tok), result.final, atol=1e-3)


# ----------------------------------------------------------------------------- the packed path


def _both(base, data, specs, refill=()):
    from lora_ablate.packed import PackedTrainer
    from lora_ablate.reference import ReferenceTrainer

    ref_specs = [TrialSpec(s.lora, s.train, name=s.name, adapter_dir=s.adapter_dir.with_name("ref-" + s.name))
                 for s in [*specs, *refill]]
    ref = ReferenceTrainer(base, data, None, progress=False).train(ref_specs)
    queue = list(refill)
    got = PackedTrainer(base, data, None, progress=False).train(specs, refill=lambda: queue.pop(0) if queue else None)
    return ref, got


def spec(name, tmp, r=4, init="loftq", steps=4, targets=ALL, **lora):
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-2, log_every=1, seed=len(name), weight_decay=0.1)
    return TrialSpec(LoraConfig(r=r, init=init, targets=targets, **lora), train, name=name, adapter_dir=tmp / name)


def test_packed_loftq_trials_train_as_the_reference_path(kbit_base, train_data, tiny_dir, tmp_path):
    """A pack of LoftQ trials of other ranks and scales next to a default one, and a LoftQ trial joining the
    live pack (its A0, B0 from the 4-bit projections inside the wrappers): the reference path's losses per step,
    and adapters that stock peft reloads to the same logits on a fresh 4-bit base."""
    from peft import PeftModel

    specs = [spec("loftq-r4", tmp_path, steps=5),
             spec("default-r2", tmp_path, r=2, init="default", steps=2, targets=("q", "v")),
             spec("loftq-free", tmp_path, r=2, alpha_rule="free", alpha=6.0, steps=3, targets=("k", "o"))]
    late = [spec("late-rslora", tmp_path, r=8, alpha_rule="rslora", alpha=4.0, steps=2, targets=("q", "mlp"))]
    before = {k: v.clone() for k, v in kbit_base.model.state_dict().items()}
    ref, got = _both(kbit_base, train_data, specs, late)
    after = kbit_base.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert [r.spec.name for r in got] == [s.name for s in [*specs, *late]]
    fresh = load_4bit(tiny_dir).model
    tok = kbit_base.tokenizer
    for a, b in zip(ref, got):
        assert a.status == b.status == "ok", (a.error, b.error)
        assert (a.trainable_params, a.tokens) == (b.trainable_params, b.tokens)
        assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
        losses = [h["loss"] for h in b.history]
        assert losses == pytest.approx([h["loss"] for h in a.history], rel=REL), a.spec.name
        assert len(set(losses)) == len(losses)  # the steps moved the adapter
        cfg_a, cfg_b = (json.loads((r.adapter_dir / "adapter_config.json").read_text()) for r in (a, b))
        keys = ("r", "lora_alpha", "init_lora_weights", "use_rslora", "target_modules")
        assert {k: cfg_b[k] for k in keys} == {k: cfg_a[k] for k in keys} and cfg_b["init_lora_weights"] is True
        logits = []
        for r in (a, b):
            model = PeftModel.from_pretrained(fresh, str(r.adapter_dir)).eval()
            logits.append(logits_of(model, tok))
            fresh = model.unload()
        torch.testing.assert_close(logits[1], logits[0], rtol=REL, atol=REL)


def test_one_loftq_trial_with_dropout_pack_matches_the_reference_path(kbit_base, train_data, tmp_path):
    """One trial: the packed layer runs peft's own dropout, so its draws must follow the same RNG state (the
    default init's draws for A, replaced by LoftQ's A0 on both paths)."""
    ref, got = _both(kbit_base, train_data, [spec("dropout", tmp_path, dropout=0.3, alpha_rule="free", alpha=2.0)])
    assert ref[0].status == got[0].status == "ok", (ref[0].error, got[0].error)
    assert [h["loss"] for h in got[0].history] == pytest.approx([h["loss"] for h in ref[0].history], rel=REL)


def test_packed_loftq_with_the_gpu_options_trains_as_the_reference_path(kbit_base, train_data, tmp_path):
    """``train`` takes the packed engine on a GPU, with its chunked LM-head loss, sequence packing (and here
    checkpointing): a LoftQ trial on the 4-bit base trains there as the peft loop trains it."""
    import dataclasses

    from lora_ablate.packed import train_packed
    from lora_ablate.reference import ReferenceTrainer

    s = spec("gpu-options", tmp_path, alpha_rule="rslora", alpha=3.0)
    ref = ReferenceTrainer(kbit_base, train_data, None, progress=False).train(
        [dataclasses.replace(s, adapter_dir=None)])[0]
    s = dataclasses.replace(s, train=dataclasses.replace(s.train, gradient_checkpointing=True), adapter_dir=None)
    got = train_packed(kbit_base, [s], train_data, None, progress=False, fused_head=True, packing=True)[0]
    assert ref.status == got.status == "ok", (ref.error, got.error)
    assert [h["loss"] for h in got.history] == pytest.approx([h["loss"] for h in ref.history], rel=REL)


def test_loftq_off_a_4bit_base_is_refused_by_both_paths(tiny_base, train_data):
    """A spec built without an experiment (its check) is refused on an unquantized base by either path."""
    from lora_ablate.packed import PackedTrainer
    from lora_ablate.reference import ReferenceTrainer

    s = TrialSpec(LoraConfig(r=2, init="loftq"), TrainConfig(steps=1, batch_size=4), name="p")
    for trainer in (ReferenceTrainer, PackedTrainer):
        with pytest.raises(UserError, match=r"^lora\.init=loftq needs model\.quantization=4bit .*; got "
                                            r"model\.quantization=none$"):
            trainer(tiny_base, train_data, None, progress=False).train([s])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_config_refuses_loftq_without_a_4bit_base_in_one_line(quantization):
    with pytest.raises(UserError) as e:
        build_experiment({"lora": {"init": "loftq"}, "model": {"quantization": quantization}})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lora.init=loftq needs model.quantization=4bit")
    assert msg.endswith(f"got model.quantization={quantization}")
    exp = build_experiment({"model": {"quantization": "4bit"}}, ["lora.init=loftq"])
    assert exp.lora.init == "loftq" and exp.flat()["lora.init"] == "loftq"
    assert LoraConfig(init="loftq").init == "loftq"  # a section alone cannot tell: the experiment judges


def test_a_space_with_a_loftq_axis_is_judged_on_the_study_experiment(tmp_path):
    from lora_ablate.spaces import load_space, study_experiment
    from lora_ablate.study import check_study

    path = tmp_path / "inits.yaml"
    path.write_text("axes:\n  lora.init: {grid: [default, loftq]}\n")
    space = load_space(str(path))  # the file alone is fine: it does not say which base
    settings = {"model": {"name": "tiny-llama"}, "eval": {"sets": ["heldout_instances"]}}
    with pytest.raises(UserError, match=r"^space inits: axis lora\.init: lora\.init=loftq needs "
                                        r"model\.quantization=4bit .*got model\.quantization=none$"):
        check_study(study_experiment(space, None, [], settings), space)
    four = study_experiment(space, None, [], {**settings, "model": {"name": "x/y", "quantization": "4bit"}})
    check_study(four, space)
    assert space.trial_experiment(four, {"init": "loftq"}).lora.init == "loftq"


def test_scaling_of_the_rules_matches_the_factors_split():
    """The split into A0, B0 is symmetric in sqrt(S / scale), like peft's, whatever the scale."""
    from lora_ablate.loftq import _factors

    gen = torch.Generator().manual_seed(0)
    residual = torch.randn(12, 10, generator=gen)
    for scale in (1.0, 0.5, 8 / math.sqrt(4)):
        a, b = _factors(residual, 3, scale)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        torch.testing.assert_close(scale * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))  # the same share of S on each side


# ----------------------------------------------------------------------------- the same on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loftq_on_the_default_model_on_the_gpu(make_exp, tmp_path):
    """The embedded default on a 4-bit base on the GPU (``python -m pytest -q -m gpu tests/test_loftq.py``):
    every adapted projection's LoftQ start leaves exactly the rank-r SVD remainder of its quantization error,
    and ``train`` (the packed engine, train's GPU path) saves an adapter that stock peft, on a freshly loaded
    4-bit base, scores as the trained model did (bf16 on the GPU: 2% relative)."""
    from peft import PeftModel

    from lora_ablate.commands.train import train
    from lora_ablate.context import build_context
    from lora_ablate.loftq import dequantized, loftq_factors
    from lora_ablate.models import unquantized_weights
    from lora_ablate.targets import resolve_targets

    exp = make_exp(model={"name": "smollm2-135m-instruct", "quantization": "4bit"},
                   lora={"init": "loftq", "r": 8, "targets": ["q", "k", "v", "o"]},
                   train={"steps": 20, "lr": 1e-3, "batch_size": 8}, eval={"size": 16, "base": False})
    out = train(exp, tmp_path / "run", progress=False)
    final = json.loads((out / "metrics.json").read_text())["final"]

    ctx = build_context(exp)
    names = resolve_targets(ctx.base.model, exp.lora.targets).module_names
    factors = loftq_factors(ctx.base, names, exp.lora.r, exp.lora.scaling)
    originals = unquantized_weights(ctx.base, names)
    for name, (a, b) in factors.items():
        error = originals[name].to(a.device) - dequantized(ctx.base.model.get_submodule(name))
        left = (error - exp.lora.scaling * b @ a).norm().item()
        assert left < error.norm().item(), name
        assert left == pytest.approx(torch.linalg.svdvals(error)[exp.lora.r:].norm().item(), rel=1e-3), name
    stock = PeftModel.from_pretrained(ctx.base.model, str(out / "adapter")).eval()
    for set_name, scores in ctx.evaluator.nll(stock, "cuda").items():
        assert scores[0] == pytest.approx(final[set_name]["nll"], rel=2e-2), set_name
