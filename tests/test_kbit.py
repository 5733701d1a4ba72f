"""Training on a k-bit (bitsandbytes 8-bit / 4-bit) base and merging into a full-precision reload.

bitsandbytes runs its 8-bit and 4-bit layers on a CPU too, so these tests train for real on a k-bit
tiny-llama (saved as an HF folder, the source the reload reads again) after opting in with
$LORA_ABLATE_KBIT_CPU. The same flow on a GPU, on the default model, is the ``gpu`` marked test at the end:
``python -m pytest -q -m gpu tests/test_kbit.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ablate.config import ModelConfig
from lora_ablate.errors import UserError
from lora_ablate.merge import heldout_batches, kbit_merge_loss, logit_difference
from lora_ablate.models import KBIT_CPU_ENV, load_base, reload_full_precision
from tests.probes import TEXTS

bnb = pytest.importorskip("bitsandbytes")


def batches(tok, device="cpu"):
    b = tok(list(TEXTS), return_tensors="pt", padding=True)
    return [{k: v.to(device) for k, v in b.items()}]


def lora_on(model, r=4, seed=0, b_scale=1.0):
    """``model`` with a LoRA on q and v whose B is drawn (non-zero), so the update is real."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = (b_scale * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)
    return peft_model.eval()


# ----------------------------------------------------------------------------- the logit comparison


def test_logit_difference_of_a_model_and_perturbed_copies():
    from lora_ablate.tiny import tiny_llama

    model, tok = tiny_llama()
    model.eval()
    same = logit_difference(model, copy.deepcopy(model), batches(tok))
    real = int(batches(tok)[0]["attention_mask"].sum())
    assert same == {"max_abs": 0.0, "mean_abs": 0.0, "argmax_agree": 1.0, "tokens": real}

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    small = logit_difference(model, nudged, batches(tok))
    b = batches(tok)[0]
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        diff = (model(**b).logits - nudged(**b).logits).abs()[mask]
    assert small["max_abs"] == pytest.approx(diff.max().item()) and small["max_abs"] > 0
    assert small["mean_abs"] == pytest.approx(diff.mean().item())

    scrambled = copy.deepcopy(model)  # a head of its own (tiny-llama ties it to the embeddings), drawn anew
    scrambled.lm_head = torch.nn.Linear(*reversed(model.lm_head.weight.shape), bias=False)
    far = logit_difference(model, scrambled, batches(tok))
    assert far["max_abs"] > small["max_abs"] and far["argmax_agree"] < 0.5


# ----------------------------------------------------------------------------- the reload and the k-bit merge


def test_quantization_on_cpu_needs_the_opt_in(tiny_dir, monkeypatch):
    monkeypatch.delenv(KBIT_CPU_ENV, raising=False)
    with pytest.raises(UserError) as e:
        load_base(ModelConfig(name=str(tiny_dir), quantization="8bit", device="cpu"))
    assert "\n" not in str(e.value) and "8bit" in str(e.value) and "CUDA" in str(e.value)


@pytest.mark.parametrize("mode,layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_full_precision_reload_is_the_same_base_unquantized(tiny_dir, cpu_kbit, mode, layer):
    from lora_ablate.tiny import tiny_llama

    kbit = load_base(ModelConfig(name=str(tiny_dir), quantization=mode, device="cpu"))
    assert type(kbit.model.model.layers[0].self_attn.q_proj).__name__ == layer
    full = reload_full_precision(kbit)
    assert full.quantization == "none" and full.dtype == torch.float32 and full.identity == kbit.identity
    original, _ = tiny_llama()
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                 original.state_dict().values()))

    moved = copy.copy(kbit)
    moved.identity = {**kbit.identity, "path": "/elsewhere"}
    with pytest.raises(UserError) as e:
        reload_full_precision(moved)
    assert "\n" not in str(e.value) and "/elsewhere" in str(e.value)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_kbit_merge_loss_measures_the_rounding_and_restores_the_layers(tiny_dir, cpu_kbit, mode):
    from peft.utils.integrations import dequantize_bnb_weight

    kbit = load_base(ModelConfig(name=str(tiny_dir), quantization=mode, device="cpu"))
    tok = kbit.tokenizer
    # an update far below one quantization step rounds away entirely (8-bit: no entry moves; 4-bit's
    # double-quantized scales do not requantize to themselves, so entries move by noise unrelated to it);
    # one far above it mostly survives
    tiny_update = lora_on(kbit.model, b_scale=1e-7)
    with torch.no_grad():
        before = tiny_update(**batches(tok)[0]).logits
    tiny = kbit_merge_loss(tiny_update)
    with torch.no_grad():
        assert torch.equal(tiny_update(**batches(tok)[0]).logits, before), "a layer was left merged"
    assert tiny["modules"] == 4 and tiny["update_lost"] > 0.98
    if mode == "8bit":
        assert tiny["update_lost"] == pytest.approx(1.0, abs=0.02) and tiny["entries_unchanged"] > 0.99
    model = tiny_update.unload()

    big_update = lora_on(model, b_scale=1.0)
    q = big_update.base_model.model.model.layers[0].self_attn.q_proj
    weight = q.get_base_layer().weight
    big = kbit_merge_loss(big_update)
    assert q.get_base_layer().weight is weight and not q.merged
    assert 0 < big["update_lost"] < 0.5 and big["entries_unchanged"] < 0.2
    # the number is what peft's own k-bit merge keeps of the update, summed over the four layers
    layers = [m for n, m in big_update.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "merge")]
    err2 = upd2 = 0.0
    for m in layers:
        base = m.get_base_layer()
        state = getattr(base, "state", None)
        w0 = dequantize_bnb_weight(base.weight, state).float()
        delta = m.get_delta_weight("default").float()
        m.merge()
        moved = dequantize_bnb_weight(base.weight, state).float() - w0
        err2 += (moved - delta).pow(2).sum().item()
        upd2 += delta.pow(2).sum().item()
    assert big["update_lost"] == pytest.approx((err2 / upd2) ** 0.5, rel=1e-4)


# ----------------------------------------------------------------------------- train --merge on a k-bit base


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_train_merge_on_a_kbit_base(tiny_dir, cpu_kbit, make_exp, tmp_path, capsys, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ablate.commands.train import train
    from lora_ablate.tiny import tiny_llama

    exp = make_exp(model={"name": str(tiny_dir), "quantization": mode, "device": "cpu"},
                   train={"steps": 6, "lr": 1e-2, "batch_size": 4}, eval={"size": 4, "base": False})
    out = train(exp, tmp_path / "run", merge=True, progress=False)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("merged the")]
    assert len(line) == 1 and f"{mode}-trained" in line[0] and "argmax agree" in line[0]

    record = json.loads((out / "metrics.json").read_text())["merge"]
    assert record == json.loads((out / "merged" / "merge.json").read_text())
    assert record["trained_on"] == mode and record["merged_into"] == "float32"
    assert record["base_model"]["path"] == str(tiny_dir.resolve())
    lg, km = record["logits"], record["kbit_merge"]
    assert lg["tokens"] > 0 and 0 < lg["mean_abs"] <= lg["max_abs"] and 0.5 < lg["argmax_agree"] <= 1
    assert km["modules"] > 0 and km["update_lost"] > 0
    readme = (out / "merged" / "README.md").read_text()
    assert f"bitsandbytes {mode} base" in readme and str(tiny_dir.resolve()) in readme

    # merged/ is the full-precision base + adapter exactly, loadable with stock transformers
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    original, tok = tiny_llama()
    adapted = PeftModel.from_pretrained(original, str(out / "adapter")).eval()
    b = batches(tok)[0]
    with torch.no_grad():
        assert torch.allclose(merged(**b).logits, adapted(**b).logits, atol=1e-5)

    # and the recorded difference is the k-bit base + adapter's against it on the held-out sets
    from lora_ablate.context import build_context

    ctx = build_context(exp)
    kbit = PeftModel.from_pretrained(ctx.base.model, str(out / "adapter")).eval()
    again = logit_difference(kbit, merged, heldout_batches(ctx.evaluator, "cpu"))
    # bitsandbytes' CPU 4-bit matmul is not bit-reproducible across loads; the k-bit noise itself is ~1e-1
    assert again["max_abs"] == pytest.approx(lg["max_abs"], rel=2e-2)
    assert again["mean_abs"] == pytest.approx(lg["mean_abs"], rel=2e-2)
    assert again["argmax_agree"] == pytest.approx(lg["argmax_agree"], abs=0.02)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_packed_engine_trains_on_a_kbit_base_like_the_reference(tiny_dir, cpu_kbit, train_data, mode):
    """``train`` takes the packed engine on a GPU: with its GPU options (chunked LM-head loss, sequence
    packing) and checkpointing it must train a k-bit base as the peft loop does."""
    from lora_ablate.config import LoraConfig, TrainConfig
    from lora_ablate.packed import train_packed
    from lora_ablate.trainers import make_trainer
    from lora_ablate.trial import TrialSpec

    kbit = load_base(ModelConfig(name=str(tiny_dir), quantization=mode, device="cpu"))
    train = TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1)
    ref = make_trainer(kbit, train_data, None, progress=False).train([TrialSpec(LoraConfig(r=4), train, name="r")])[0]
    spec = TrialSpec(LoraConfig(r=4), dataclasses.replace(train, gradient_checkpointing=True), name="p")
    packed = train_packed(kbit, [spec], train_data, None, progress=False, fused_head=True, packing=True)[0]
    assert ref.status == packed.status == "ok", (ref.error, packed.error)
    # step 1's loss is the base's; the later ones match only if the packed steps updated the adapter alike
    losses = [h["loss"] for h in packed.history]
    assert len(set(losses)) == 4 and losses == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)


# ----------------------------------------------------------------------------- benchmarks/memory.py

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def memory_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("memory", None)
    import memory

    return memory


def test_memory_benchmark_measures_a_kbit_configuration(memory_bench, tiny_dir, cpu_kbit):
    """One configuration in-process on a CPU 4-bit base (with checkpointing): the phased loop and both
    engines' trials run; CUDA counters are absent on a CPU, so only the step time is a number."""
    args = memory_bench.argparse.Namespace(model=str(tiny_dir), device="cpu", quantization="4bit",
                                           checkpointing=True, steps=memory_bench.WARMUP + 1, batch=2,
                                           max_length=32)
    row = memory_bench.measure(args)
    assert row["quantization"] == "4bit" and row["checkpointing"] and row["step_ms"] > 0
    assert {k for k in memory_bench.PHASES if row[k] is None} == set(memory_bench.PHASES) - {"step_ms"}


def test_memory_benchmark_smoke(tmp_path):
    """The parent: one process per configuration, unquantized first, the ratios, JSON and markdown."""
    out = tmp_path / "mem"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "memory.json").read_text())
    assert [(r["quantization"], r["checkpointing"]) for r in report["rows"]] == [("none", False), ("none", True)]
    assert all(r["ratio"]["step_ms"] == 1.0 and r["wall_s"] > 0 for r in report["rows"])
    table = [x for x in (out / "memory.md").read_text().splitlines() if x.startswith("| float32")]
    assert len(table) == 2

    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--smoke", "--bases", "4bit",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "'4bit'" in lines[0]
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the same on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_train_merge_on_a_kbit_base_on_the_gpu(make_exp, tmp_path, mode):
    """The default model (the embedded GGUF) on a k-bit base on the GPU, trained by the packed engine
    (``train``'s GPU path) and merged into a bf16 reload: the merged model is close to what was trained."""
    from lora_ablate.commands.train import train

    exp = make_exp(model={"name": "smollm2-135m-instruct", "quantization": mode},
                   train={"steps": 20, "lr": 1e-3, "batch_size": 8}, eval={"size": 16, "base": False})
    out = train(exp, tmp_path / "run", merge=True, progress=False)
    record = json.loads((out / "metrics.json").read_text())["merge"]
    assert record["trained_on"] == mode and record["merged_into"] == "bfloat16"
    assert record["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["logits"]["argmax_agree"] > 0.6 and record["logits"]["tokens"] > 0
    # the 135M default's k-bit step is larger than most entries of a 20-step update
    assert record["kbit_merge"]["update_lost"] > 0.2
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged
