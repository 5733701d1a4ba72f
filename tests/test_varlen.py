"""Sequence packing (lora_ablate.packed.varlen) against the padded path and the single-trial reference.

CPU, fp32, tiny-llama, on data that mixes very short and very long examples (where padding wastes most).
"""

import contextlib
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
from lora_ablate.packed import Pack, train_packed
from lora_ablate.packed.attention import _flex_attention, flex_refusal
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


@pytest.mark.parametrize("flex", [False, True], ids=["sdpa", "flex"])
def test_packed_rows_give_the_padded_per_token_nll(base, mixed, flex):
    """Two trials' micro-batches of very short and very long examples as packed rows: every example's
    per-token NLL is the padded batch's (to 1e-5), under SDPA's boolean mask and under flex_attention's
    BlockMask alike; an example's last token predicts nothing. (Forward only for flex: torch's
    flex_attention has no backward on a CPU; tests/test_packed_gpu.py trains with it.)"""
    pad = base.tokenizer.pad_token_id
    trials = TRIALS
    flat = _FlatData(mixed, pad, torch.device("cpu"))
    plan = _VarlenPlan(flat, [[trials]], False, torch.device("cpu"), flex=flex)
    width = plan.widths[0][0]
    assert width % WIDTH == 0 and width >= max(sum(len(mixed.input_ids[i]) for i in ex) for ex in trials)
    ids, labels, extra = plan.batch(plan.tables[0][0], width)
    assert isinstance(extra["attention_mask"], torch.Tensor) != flex
    with torch.no_grad(), _flex_attention(base.model) if flex else contextlib.nullcontext():
        packed, _ = token_nll(base.model(input_ids=ids, use_cache=False, **extra).logits, labels)
    assert base.model.config._attn_implementation == "sdpa"
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
                       torch.device("cpu"), flex=True)
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


def test_flex_is_refused_where_it_cannot_train(base, mixed):
    """study.attention=flex where it cannot work (a CPU, the reference loop, a non-SDPA model, a bad value)
    is one line naming the value and the choices, before any trial starts."""
    for make in (lambda: make_trainer(base, mixed, None, pack=2, attention="flex"),
                 lambda: make_trainer(base, mixed, None, pack=1, attention="flex"),
                 lambda: train_packed(base, [MIXED[0]], mixed, None, progress=False, attention="flex")):
        with pytest.raises(UserError) as e:
            make()
        assert "study.attention=flex" in str(e.value) and "choose one of: auto, sdpa" in str(e.value)
    assert "no backward on cpu" in flex_refusal(base.model, torch.device("cpu"))
    base.model.config._attn_implementation = "eager"
    try:  # the device is not touched: a CUDA device's checks of the model, without one
        assert "'eager'" in flex_refusal(base.model, torch.device("cuda"))
    finally:
        base.model.config._attn_implementation = "sdpa"
    assert flex_refusal(base.model, torch.device("cuda")) is None
    assert build_experiment({}, ["study.attention=flex"]).study.attention == "flex"
    with pytest.raises(UserError, match=r"study.attention='dense' is not valid; choose one of: auto, sdpa, flex"):
        build_experiment({}, ["study.attention=dense"])


@pytest.fixture(scope="module")
def references(base, mixed, tmp_path_factory):
    """Each MIXED trial alone on the single path, with its exported adapter."""
    root = tmp_path_factory.mktemp("ref")
    trainer = ReferenceTrainer(base, mixed, None, progress=False)
    return {s.name: trainer.train([dataclasses.replace(s, adapter_dir=root / s.name)])[0] for s in MIXED}


def test_packed_trials_with_packing_match_single_path(base, mixed, references, tmp_path):
    """Four trials that differ in rank, batch size, accumulation, targets, schedule: trained in one pack
    with packing on, the same losses and adapter weights (1e-4) as each alone on the single path."""
    specs = [dataclasses.replace(s, adapter_dir=tmp_path / s.name) for s in MIXED]
    results = train_packed(base, specs, mixed, None, progress=False, packing=True)
    assert base.model.config._attn_implementation == "sdpa"
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

