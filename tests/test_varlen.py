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

from lora_ablate.data import IGNORE, Encoded, encode_all, load_examples
from lora_ablate.evaluation import token_nll
from lora_ablate.packed import Pack, train_packed
from lora_ablate.packed.varlen import WIDTH, _FlatData, _VarlenPlan
from lora_ablate.reference import ReferenceTrainer

REL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread


@pytest.fixture(scope="module")
def mixed(base):
    """A third of the examples 3-8 tokens (their output's tail), a third as encoded (~100), a third two
    examples end to end (~200): most of a padded batch is padding."""
    enc = encode_all(load_examples("builtin:train", size=49, seed=0), base.tokenizer, "alpaca", 112)
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


def test_packed_rows_give_the_padded_per_token_nll(base, mixed):
    """Two trials' micro-batches of very short and very long examples as packed rows: every example's
    per-token NLL is the padded batch's (to 1e-5); an example's last token predicts nothing."""
    pad = base.tokenizer.pad_token_id
    trials = [[0, 1, 2, 3, 6], [5, 9, 12, 2]]  # short, long, longest, short, ... and one trial fewer
    flat = _FlatData(mixed, pad, torch.device("cpu"))
    plan = _VarlenPlan(flat, [[trials]], False, torch.device("cpu"))
    width = plan.widths[0][0]
    assert width % WIDTH == 0 and width >= max(sum(len(mixed.input_ids[i]) for i in ex) for ex in trials)
    ids, labels, extra = plan.batch(plan.tables[0][0], width)
    with torch.no_grad():
        packed, _ = token_nll(base.model(input_ids=ids, use_cache=False, **extra).logits, labels)
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

