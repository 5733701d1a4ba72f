"""CUDA graphs and the fused LM-head loss on a GPU, against the eager reference step on the same GPU; packed
rows under flex_attention and under flash varlen attention against the same rows under SDPA.

Skipped without a CUDA device (CI has none); run on the GPU machine:
``python -m pytest -q -m gpu tests/test_packed_gpu.py``.
"""

import pytest
import torch

from lora_ablate.config import DataConfig, EvalConfig
from lora_ablate.data import encode_all, load_eval_set, load_examples
from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel
from lora_ablate.packed import train_packed
from lora_ablate.packed.graphs import StepGraphs
from lora_ablate.tiny import tiny_llama
from tests.test_packed import assert_same_trial, spec
from tests.test_varlen import mixed_examples

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# trials long enough for graphs (GRAPH_MIN_SPAN), differing in what a pack lets them differ in; one leaves
# early so the pack re-lays out (graphs dropped and captured again), one uses dropout (RNG inside the graph)
LONG = [
    spec("qv", r=2, targets=("q", "v"), lr=3e-3, seed=1, steps=24, log_every=4),
    spec("qkvo", r=4, alpha_rule="free", alpha=8, targets=("q", "k", "v", "o"), lr=1e-3, seed=2, batch_size=3,
         grad_accum=2, schedule="linear", steps=24, log_every=4),
    spec("o", r=8, alpha_rule="rslora", alpha=4, targets=("o",), lr=5e-3, seed=3, schedule="constant",
         weight_decay=0.1, max_grad_norm=0, steps=12, log_every=3),
]


@pytest.fixture(scope="module")
def base():
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = tiny_llama()
    model = model.to("cuda").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-llama", "in-process", torch.device("cuda"), torch.float32)


@pytest.fixture(scope="module")
def data(base):
    return encode_all(load_examples("builtin:train", size=64, seed=0), base.tokenizer, "alpaca", 112)


@pytest.fixture(scope="module")
def evaluator(base):
    cfg = EvalConfig(sets=("heldout_instances",), size=6, max_new_tokens=4, batch_size=3, every=6)
    return Evaluator([load_eval_set("heldout_instances", 6, 0)], base.tokenizer, DataConfig(max_length=112), cfg)


@pytest.fixture
def replays(monkeypatch):
    """How many steps ran as graph replays."""
    count = []
    real = StepGraphs.replay

    def counted(self, key, capture):
        ran = real(self, key, capture)
        count.append(ran)
        return ran

    monkeypatch.setattr(StepGraphs, "replay", counted)
    return count


@pytest.mark.parametrize("fused_head", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_graphs_match_eager_steps(base, data, evaluator, replays, fused_head, compile):
    """Losses, intermediate and final held-out metrics of graph-replayed steps equal the eager steps' (fp32,
    padded batches of varying width, evaluation between steps, a trial leaving mid-way)."""
    eager = train_packed(base, LONG, data, evaluator, progress=False, cuda_graphs=False, fused_head=False)
    assert not replays
    graphed = train_packed(base, LONG, data, evaluator, progress=False, cuda_graphs=True, fused_head=fused_head,
                           compile=compile)
    assert sum(replays) >= 20, replays  # almost every step replayed a graph
    for ref, got in zip(eager, graphed):
        assert_same_trial(ref, got, rel=1e-4)


def test_graphs_with_dropout_train_and_stay_finite(base, data, replays):
    """Dropout inside a graph draws fresh masks every replay (graph-safe RNG): the loss moves, stays finite."""
    s = spec("drop", r=4, targets=("q", "v"), dropout=0.1, lr=3e-3, steps=16, log_every=1)
    result = train_packed(base, [s, LONG[0]], data, None, progress=False, cuda_graphs=True)[0]
    losses = [h["loss"] for h in result.history]
    assert result.status == "ok" and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == len(losses)
    assert sum(replays) >= 8


@pytest.mark.parametrize("compile", [False, True])
def test_graphs_with_a_pissa_trial_match_eager_steps(base, data, evaluator, replays, compile):
    """A PiSSA trial's frozen correction (A0, B0) is read inside the graphs as in the eager step; a default
    trial shares the pack and the pissa one outlives it (re-layout carries A0, B0 into new graphs)."""
    trials = [spec("pissa", r=4, init="pissa", targets=("q", "v", "o", "mlp"), lr=3e-3, seed=5, steps=24,
                   log_every=4), LONG[2]]
    eager = train_packed(base, trials, data, evaluator, progress=False, cuda_graphs=False, fused_head=False)
    graphed = train_packed(base, trials, data, evaluator, progress=False, cuda_graphs=True, compile=compile)
    assert sum(replays) >= 20, replays
    for ref, got in zip(eager, graphed):
        assert_same_trial(ref, got, rel=1e-4)


def test_graphs_keep_fused_rows_masked_like_eager_steps(replays, tmp_path):
    """B's row mask of a part-adapted fused matrix (tiny gpt2 c_attn) is applied inside the graphs: same
    losses as the eager steps, the exported adapters' left-out rows exactly zero."""
    import dataclasses

    from safetensors.torch import load_file

    from lora_ablate.config import LoraConfig, TrainConfig
    from lora_ablate.reference import fused_row_mask
    from lora_ablate.targets import resolve_targets
    from lora_ablate.trial import TrialSpec
    from tests.test_fused_rows import _loaded

    gpt2 = _loaded("gpt2")
    gpt2 = dataclasses.replace(gpt2, model=gpt2.model.to("cuda"), device=torch.device("cuda"))
    data = encode_all(load_examples("builtin:train", size=64, seed=0), gpt2.tokenizer, "alpaca", 48)

    def trials(graphs):
        return [TrialSpec(LoraConfig(r=r, targets=roles, fused_subset="rows"),
                          TrainConfig(steps=16, batch_size=4, lr=1e-2, log_every=4, weight_decay=0.1, seed=r),
                          name=n, adapter_dir=tmp_path / f"{n}-{graphs}")
                for n, roles, r in (("q", ("q",), 2), ("kv", ("k", "v"), 4))]

    eager = train_packed(gpt2, trials(False), data, None, progress=False, cuda_graphs=False, packing=False)
    graphed = train_packed(gpt2, trials(True), data, None, progress=False, cuda_graphs=True, packing=False)
    assert sum(replays) >= 10, replays
    for ref, got in zip(eager, graphed):
        assert_same_trial(ref, got, rel=1e-4)
        plan = resolve_targets(gpt2.model, got.spec.lora.targets, "rows")
        state = load_file(str(got.adapter_dir / "adapter_model.safetensors"))
        for name, rows in plan.fused_rows.items():
            b = state[f"base_model.model.{name}.lora_B.weight"]
            keep = fused_row_mask(rows, b.shape[0], got.spec.lora.r)
            assert torch.count_nonzero(b[keep == 0]) == 0 and torch.count_nonzero(b[keep == 1]) > 0


def _trains_like_sdpa(base, attention, evaluator, replays, rel, **options) -> list[bool]:
    """LONG on mixed short and long examples, packed, under SDPA's boolean document mask and then under
    ``attention``: the same losses and held-out metrics to ``rel``, the same steps replayed (no capture under
    ``attention`` was refused), the model back on SDPA after (evaluation runs it); the replays."""
    data = mixed_examples(base.tokenizer)
    sdpa = train_packed(base, LONG, data, evaluator, progress=False, packing=True, attention="sdpa", **options)
    sdpa_replays = replays[:]
    replays.clear()
    other = train_packed(base, LONG, data, evaluator, progress=False, packing=True, attention=attention, **options)
    assert base.model.config._attn_implementation == "sdpa"
    assert replays == sdpa_replays, replays
    for ref, got in zip(sdpa, other):
        assert_same_trial(ref, got, rel=rel)
    return replays


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("compile", [False, True])
def test_flex_attention_trains_packed_rows_like_sdpa(base, evaluator, replays, graphs, compile):
    """study.attention=flex: packed rows under flex_attention's BlockMask give the same losses and held-out
    metrics (1e-4, fp32) as under SDPA's boolean document mask, in eager steps and in CUDA graphs (the
    BlockMask is built inside the capture from the static table), with and without compiled blocks."""
    ran = _trains_like_sdpa(base, "flex", evaluator, replays, 1e-4, cuda_graphs=graphs, compile=compile)
    assert (sum(ran) > 0) == graphs, ran


@pytest.fixture(scope="module")
def bf16_base():
    """tiny-llama in bf16 with head dim 64 (and GQA: 4 query heads, 2 kv heads), what flash kernels take."""
    model, tok = tiny_llama(hidden=256)
    model = model.to("cuda", torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-llama", "in-process", torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("compile", [False, True])
def test_varlen_attention_trains_packed_rows_like_sdpa(bf16_base, replays, compile):
    """study.attention=varlen (what auto picks here): packed rows under flash varlen attention give the same
    per-step losses (bf16 noise, 2e-2) as under SDPA's boolean document mask, replayed as CUDA graphs (the
    segment offsets copied into the static buffer), with and without compiled blocks."""
    from lora_ablate.packed.attention import resolve_attention

    assert resolve_attention("auto", bf16_base.model, bf16_base.device, packing=True) == "varlen"
    ran = _trains_like_sdpa(bf16_base, "varlen", None, replays, 2e-2, cuda_graphs=True, compile=compile)
    assert sum(ran) >= 20, ran
