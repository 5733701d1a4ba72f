"""Sequence packing (lora_ablate.packed.varlen) against the padded path and the single-trial reference.

CPU, fp32, tiny-llama, on data that mixes very short and very long examples (where padding wastes most).
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_packed import (  # the equality tests' own trials, checks and fixtures
    MIXED,
    assert_same_trial,
    base,  # noqa: F401 - a fixture: the tiny-llama base
    spec,
)

from lora_ablate.config import build_experiment
from lora_ablate.data import IGNORE, Encoded, encode_all, load_examples
from lora_ablate.errors import UserError
from lora_ablate.evaluation import token_nll
from lora_ablate.packed import Pack, attention, train_packed
from lora_ablate.packed.attention import attention_refusal, packed_attention, require_attention, resolve_attention
from lora_ablate.packed.varlen import WIDTH, _FlatData, _VarlenPlan, document_block_mask, document_mask
from lora_ablate.reference import ReferenceTrainer
from lora_ablate.trainers import make_trainer

REL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread


def mixed_examples(tokenizer) -> Encoded:
    """A third of the examples 3-8 tokens (their output's tail), a third as encoded (~100), a third two
    examples end to end (~200): most of a padded batch is padding."""
    enc = encode_all(load_examples("builtin:train", size=49, seed=0), tokenizer, "alpaca", 112)
    ids, labels = [], []
    for i in range(48):
        x, y = enc.input_ids[i], enc.labels[i]
        if i % 3 == 0:
            n = 3 + i % 6
            x, y = x[-n:], y[-n:]
        elif i % 3 == 2:
            x, y = x + enc.input_ids[i + 1], y + enc.labels[i + 1]
        ids.append(list(x))
        labels.append(list(y))
    return Encoded(ids, labels)


@pytest.fixture(scope="module")
def mixed(base):
    return mixed_examples(base.tokenizer)


TRIALS = [[0, 1, 2, 3, 6], [5, 9, 12, 2]]  # short, long, longest, short, ... and one trial fewer


def segment_attention(query, key, value, cu_seqlens, max_len, scale):
    """The flash varlen kernel's contract by per-segment causal SDPA (kv heads repeated): a CPU has no
    flash kernel."""
    assert cu_seqlens.dtype == torch.int32 and query.shape[0] == cu_seqlens[-1]
    rep = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert 0 <= end - start <= max_len
        if end > start:
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
            o = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0),
                                                                 v.repeat_interleave(rep, 0), is_causal=True,
                                                                 scale=scale)
            out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """study.attention=varlen on a CPU: the flash kernel swapped for ``segment_attention`` and its CUDA
    requirement waived (the model's checks stay), so the whole varlen routing runs; the offsets of every
    kernel call are recorded."""
    calls = []
    real = attention.attention_refusal

    def kernel(*args):
        calls.append(args[3])
        return segment_attention(*args)

    monkeypatch.setattr(attention, "varlen_kernel", kernel)
    monkeypatch.setattr(attention, "attention_refusal", lambda a, model, device: real(a, model, torch.device("cuda")))
    return calls


@pytest.mark.parametrize("kind", ["sdpa", "flex", "varlen"])
def test_packed_rows_give_the_padded_per_token_nll(base, mixed, kind, request):
    """Two trials' micro-batches of very short and very long examples as packed rows: every example's
    per-token NLL is the padded batch's (to 1e-5), under SDPA's boolean mask, flex_attention's BlockMask and
    varlen's segments (the second trial has an example fewer: an empty segment) alike; an example's last
    token predicts nothing. (Forward only for flex: torch's flex_attention has no backward on a CPU;
    tests/test_packed_gpu.py trains with it.)"""
    calls = request.getfixturevalue("varlen_on_cpu") if kind == "varlen" else None
    pad = base.tokenizer.pad_token_id
    trials = TRIALS
    flat = _FlatData(mixed, pad, torch.device("cpu"))
    plan = _VarlenPlan(flat, [[trials]], False, torch.device("cpu"), attention=kind)
    width = plan.widths[0][0]
    assert width % WIDTH == 0 and width >= max(sum(len(mixed.input_ids[i]) for i in ex) for ex in trials)
    ids, labels, extra = plan.batch(plan.rows(0), 0, width)
    assert ("attention_mask" not in extra) == (kind == "varlen")
    assert isinstance(extra.get("attention_mask"), torch.Tensor) == (kind == "sdpa")
    with torch.no_grad(), packed_attention(base.model, kind):
        packed, _ = token_nll(base.model(input_ids=ids, use_cache=False, **extra).logits, labels)
    assert base.model.config._attn_implementation == "sdpa"
    if calls is not None:
        assert len(calls) == base.model.config.num_hidden_layers  # every layer's attention ran the kernel
    for k, ex in enumerate(trials):
        batch = mixed.batch(ex, pad)
        with torch.no_grad():  # right padding + causal: the pack's padded path
            ref, mask = token_nll(base.model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
        offset = 0
        for row, i in enumerate(ex):
            n = len(mixed.input_ids[i])
            assert torch.equal(ids[k, offset:offset + n], torch.tensor(mixed.input_ids[i]))
            got = packed[k, offset:offset + n - 1]
            torch.testing.assert_close(got, ref[row, :n - 1], rtol=1e-5, atol=1e-5)
            assert not got[~mask[row, :n - 1]].any()
            if offset + n - 1 < packed.shape[1]:
                assert packed[k, offset + n - 1] == 0  # the next example's first token is no target
            offset += n
        assert not packed[k, offset:].any() and (labels[k, offset:] == IGNORE).all()


def test_document_block_mask_is_the_document_mask_and_skips_masked_tiles(base, mixed):
    """The BlockMask of packed rows allows exactly the boolean document mask's pairs, and its tiles are
    exactly those holding an allowed pair: a tile no query may attend is never computed."""
    from torch.nn.attention.flex_attention import create_mask

    plan = _VarlenPlan(_FlatData(mixed, base.tokenizer.pad_token_id, torch.device("cpu")), [[TRIALS]], False,
                       torch.device("cpu"), attention="flex")
    width = plan.widths[0][0]
    doc = plan.tables[0][0][2, :, :width]
    block = document_block_mask(doc)
    dense = document_mask(doc)
    assert torch.equal(create_mask(block.mask_mod, len(TRIALS), 1, width, width, device=doc.device), dense)
    q, kv = block.BLOCK_SIZE
    padded = torch.nn.functional.pad(dense, (0, -width % kv, 0, -width % q))
    K, _, Q, KV = padded.shape
    used = padded.view(K, 1, Q // q, q, KV // kv, kv).any(-1).any(-2)
    assert torch.equal(block.to_dense().bool(), used)
    causal_tiles = (Q // q) * (Q // q + 1) // 2
    assert used[0].sum() < causal_tiles  # the first row's documents end inside it: off-diagonal tiles skipped


@pytest.mark.parametrize("kind", ["flex", "varlen"])
def test_flex_and_varlen_are_refused_where_they_cannot_train(base, mixed, kind):
    """study.attention=flex or varlen where it cannot work (a CPU, the reference loop, a bad value) is one
    line naming the value and the choices that work, before any trial starts."""
    for make in (lambda: make_trainer(base, mixed, None, pack=2, attention=kind),
                 lambda: make_trainer(base, mixed, None, pack=1, attention=kind),
                 lambda: train_packed(base, [MIXED[0]], mixed, None, progress=False, attention=kind)):
        with pytest.raises(UserError) as e:
            make()
        # on a CPU neither flex nor varlen works: only the choices without requirements are offered
        assert f"study.attention={kind} cannot train here" in str(e.value)
        assert str(e.value).endswith("choose one of: auto, sdpa")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # the device is not touched: a CUDA device's checks
    assert ("no backward on cpu" if kind == "flex" else "no cpu kernel") in attention_refusal(kind, base.model, cpu)
    base.model.config._attn_implementation = "eager"
    try:
        assert "'eager'" in attention_refusal(kind, base.model, cuda)
    finally:
        base.model.config._attn_implementation = "sdpa"
    assert attention_refusal(kind, base.model, cuda) is None
    with pytest.raises(UserError, match=f"study.attention={kind} cannot train here: it is for sequence-packed rows, "
                                        "and packing is off; choose one of: auto, sdpa$"):
        resolve_attention(kind, base.model, cuda, packing=False)
    assert build_experiment({}, [f"study.attention={kind}"]).study.attention == kind
    with pytest.raises(UserError, match=r"study.attention='dense' is not valid; choose one of: auto, sdpa, flex, "
                                        r"varlen"):
        build_experiment({}, ["study.attention=dense"])


@pytest.mark.parametrize("setting, why", [("attention_dropout", "attention dropout is 0.1"),
                                          ("attn_logit_softcapping", "soft-caps attention logits"),
                                          ("sliding_window", "sliding window")])
def test_varlen_is_refused_for_what_flash_varlen_cannot_apply(base, monkeypatch, setting, why):
    """A model with attention dropout, logit soft-capping or a sliding window cannot train under varlen: an
    explicit varlen names why and the choices that do work there (flex too: it can apply the last two),
    and auto resolves to sdpa; on a CPU auto is always sdpa."""
    cuda = torch.device("cuda")
    assert resolve_attention("auto", base.model, cuda, packing=True) == "varlen"
    assert resolve_attention("auto", base.model, cuda, packing=False) == "sdpa"
    assert resolve_attention("auto", base.model, torch.device("cpu"), packing=True) == "sdpa"
    monkeypatch.setattr(base.model.config, setting, 0.1 if setting == "attention_dropout" else 64, raising=False)
    assert why in attention_refusal("varlen", base.model, cuda)
    assert resolve_attention("auto", base.model, cuda, packing=True) == "sdpa"
    with pytest.raises(UserError) as e:
        require_attention("varlen", base.model, cuda)
    valid = "auto, sdpa" if setting == "attention_dropout" else "auto, sdpa, flex"
    assert str(e.value).startswith("study.attention=varlen cannot train here: ") and why in str(e.value)
    assert str(e.value).endswith(f"choose one of: {valid}")


def test_varlen_offsets_are_the_document_segments(base, mixed):
    """The varlen plan's cu_seqlens: per micro-batch K * (b_max + 1) + 1 int32 offsets, one shape for every
    step of the span (a graph's static buffer takes any of them); flattened rows cut at them give exactly
    the document ids of the plan's tables: segment k * (b_max + 1) + d is row k's example d, its last
    segment the row's padding tail; a trial with fewer examples (or none, in a micro-batch it does not have)
    gets empty segments."""
    flat = _FlatData(mixed, base.tokenizer.pad_token_id, torch.device("cpu"))
    per_micro = [[TRIALS, [[7], []]], [[[1, 4], [8, 10, 11]], [[20, 21, 22], []]]]  # 2 steps of 2 micro-batches
    plan = _VarlenPlan(flat, per_micro, False, torch.device("cpu"), attention="varlen")
    most = max(len(ex) for step in per_micro for micro in step for ex in micro)
    K = len(TRIALS)
    assert {tuple(c.shape) for c in plan.cu_seqlens} == {(2, K * (most + 1) + 1)}
    static = plan.static()
    for j, step in enumerate(per_micro):
        plan.load(static, j)
        assert torch.equal(static[1], plan.cu_seqlens[j])
        for m, micro in enumerate(step):
            width = plan.widths[j][m]
            cu = plan.cu_seqlens[j][m]
            assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == K * width and (cu.diff() >= 0).all()
            doc = plan.tables[j][m, 2, :, :width].long()
            # the segment of every flattened token: the last offset at or before it
            segment = torch.searchsorted(cu.long(), torch.arange(K * width), right=True).view(K, width) - 1
            row = torch.arange(K).view(K, 1) * (most + 1)
            assert torch.equal(segment, row + torch.where(doc >= 0, doc, most))
            for k, ex in enumerate(micro):
                lengths = cu[k * (most + 1) + 1:(k + 1) * (most + 1) + 1].diff()
                assert lengths[len(ex):-1].eq(0).all()  # the examples it lacks: empty segments
                assert lengths[-1] == width - sum(len(mixed.input_ids[i]) for i in ex)  # the padding tail
    assert _VarlenPlan(flat, per_micro, False, torch.device("cpu")).cu_seqlens is None  # sdpa reads the mask


@pytest.fixture(scope="module")
def references(base, mixed, tmp_path_factory):
    """Each MIXED trial alone on the single path, with its exported adapter."""
    root = tmp_path_factory.mktemp("ref")
    trainer = ReferenceTrainer(base, mixed, None, progress=False)
    return {s.name: trainer.train([dataclasses.replace(s, adapter_dir=root / s.name)])[0] for s in MIXED}


@pytest.mark.parametrize("kind", ["sdpa", "varlen"])
def test_packed_trials_with_packing_match_single_path(base, mixed, references, tmp_path, kind, request):
    """Four trials that differ in rank, batch size, accumulation, targets, schedule: trained in one pack
    with packing on, the same losses and adapter weights (1e-4) as each alone on the single path, under
    SDPA's document mask and under varlen's segments (batch sizes 4 and 3, and micro-batches only the
    accumulating trial has: empty segments and all-padding rows)."""
    calls = request.getfixturevalue("varlen_on_cpu") if kind == "varlen" else None
    specs = [dataclasses.replace(s, adapter_dir=tmp_path / s.name) for s in MIXED]
    results = train_packed(base, specs, mixed, None, progress=False, packing=True, attention=kind)
    assert base.model.config._attn_implementation == "sdpa"
    if calls is not None:  # every layer of every micro-batch, and offsets of one shape throughout each span
        assert len(calls) >= MIXED[0].train.steps * 2 * base.model.config.num_hidden_layers
        assert len({c.shape for c in calls}) <= len({s.train.steps for s in MIXED})
    for got in results:
        ref = references[got.spec.name]
        assert_same_trial(ref, got, REL)
        a = load_file(ref.adapter_dir / "adapter_model.safetensors")
        b = load_file(got.adapter_dir / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=REL, atol=1e-6)


def _row_tokens(pack, j, m):
    """Real tokens of each trial's row in micro-batch m of step j of the pack's plan."""
    lengths = [len(x) for x in pack.encoded.input_ids]
    return [sum(lengths[i] for i in s.batches[(s.done + j) * s.train.grad_accum + m]) if m < s.train.grad_accum
            else 0 for s in pack.slots]


# the same data order (seed, batch size) with different ranks and targets: equally long rows
SAME_ORDER = [spec("q-r2", r=2, targets=("q",), seed=1), spec("kv-r8", r=8, targets=("k", "v"), seed=1),
              spec("o-r4", r=4, targets=("o",), seed=1, lr=1e-3)]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("specs", [MIXED, SAME_ORDER], ids=["mixed", "same-order"])
def test_packed_steps_compute_about_their_real_tokens(base, mixed, packing, specs):
    """With packing, each micro-batch is as wide as its longest trial row rounded up to WIDTH, so trials
    that see equally long rows cost their real tokens plus at most WIDTH each; the pack counts real and
    computed tokens. Unpacked, a third or more of the same steps is padding."""
    pack = Pack(base, mixed, None, False, packing=packing)
    try:
        slots = [pack.new_slot(pack.new_result(s)) for s in specs]
        pack.model.train()
        pack.relayout(slots)
        K = len(slots)
        steps = pack.steps
        for j in range(steps.span):
            for m in range(steps.ga):
                rows = _row_tokens(pack, j, m)
                if packing:
                    assert steps.widths[j][m] < max(max(rows), 2) + WIDTH
                    if specs is SAME_ORDER:
                        assert K * steps.widths[j][m] <= sum(rows) + WIDTH * K
        for _ in range(3):
            pack.step()
        real, computed = pack.real_tokens, pack.computed_tokens
        assert real == sum(sum(s.tokens[:3]) for s in slots)
        if not packing:
            assert computed > 1.3 * real
        elif specs is SAME_ORDER:
            assert real <= computed <= real + 3 * steps.ga * WIDTH * K
        else:
            assert real <= computed < real * 2
    finally:
        pack.close()
        base.model.eval()


def test_packing_needs_sdpa(base, mixed):
    """A model on another attention implementation trains unpacked (its masks are not boolean)."""
    base.model.config._attn_implementation = "eager"
    try:
        pack = Pack(base, mixed, None, False, packing=True)
        assert pack.flat is None
        pack.close()
    finally:
        base.model.config._attn_implementation = "sdpa"

