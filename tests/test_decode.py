"""Greedy decoding (lora_ablate.decode) against HF ``generate``: the same tokens on a CPU in fp32, for every
batch shape that held-out generation produces (left padding or none, rows stopping at EOS at different steps,
a pack's stacked copies), and ``generate`` itself wherever the fast path would not be exact."""

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lora_ablate.decode import CHECK_EVERY, fast_decoding, greedy, grouped_attention, new_tokens
from lora_ablate.evaluation import left_padded
from lora_ablate.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models want one intra-op thread
NEW = 14


@pytest.fixture(scope="module")
def llama():
    """tiny-llama with its matrices scaled up: at its own scale it repeats one token forever, which would
    leave EOS, padding and positions untested; scaled, every row wanders through the vocabulary."""
    model, tok = tiny_llama(layers=2, hidden=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8)
    return model.eval(), tok


def reference(model, ids, mask, pad, eos, new=NEW):
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         pad_token_id=pad, eos_token_id=eos)
    return out[:, ids.shape[1]:]


def prompts(seed: int, n: int, vocab: int, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def staggered_eos(model, ids, mask, pad) -> int:
    """A token that the free-running continuations produce at different steps in different rows (some rows
    never), so rows stop at EOS one after another."""
    free = reference(model, ids, mask, pad, None)
    first: dict[int, set[int]] = {}
    for row in free.tolist():
        for t in set(row):
            first.setdefault(t, set()).add(row.index(t))
    return max(first, key=lambda t: (len(first[t]), min(first[t])))


@pytest.mark.parametrize("seed", range(6))
def test_the_same_tokens_as_generate(llama, seed):
    model, tok = llama
    assert fast_decoding(model, 64)
    ids, mask = left_padded(prompts(seed, 2 + seed, len(tok)), tok.pad_token_id)
    for eos in (tok.eos_token_id, staggered_eos(model, ids, mask, tok.pad_token_id)):
        ref = reference(model, ids, mask, tok.pad_token_id, eos)
        got = greedy(model, ids, mask, NEW, tok.pad_token_id, eos)
        assert torch.equal(got, ref), (eos, got, ref)


def test_rows_stopping_at_different_steps_end_where_generate_ends(llama):
    """EOS staggered over the rows, some never stopping (40 tokens); and batches where every row stops before
    max_new_tokens, between two of the every-CHECK_EVERY-tokens checks: the output still ends at the step the
    last row stopped, as generate's does."""
    model, tok = llama
    ids, mask = left_padded(prompts(11, 6, len(tok)), tok.pad_token_id)
    eos = staggered_eos(model, ids, mask, tok.pad_token_id)
    ref = reference(model, ids, mask, tok.pad_token_id, eos, new=40)
    assert len({row.index(eos) for row in ref.tolist() if eos in row}) > 1, "rows should stop at different steps"
    assert torch.equal(greedy(model, ids, mask, 40, tok.pad_token_id, eos), ref)
    cut = 0
    for seed in range(40):
        ids, mask = left_padded(prompts(seed, 2, len(tok)), tok.pad_token_id)
        eos = staggered_eos(model, ids, mask, tok.pad_token_id)
        ref = reference(model, ids, mask, tok.pad_token_id, eos)
        if ref.shape[1] < NEW and ref.shape[1] % CHECK_EVERY:
            assert torch.equal(greedy(model, ids, mask, NEW, tok.pad_token_id, eos), ref)
            cut += 1
    assert cut >= 3, "the seeds above should give batches that stop early between two checks"


def test_no_padding_and_single_rows(llama):
    model, tok = llama
    same = prompts(3, 1, len(tok))[0]
    for batch in ([same] * 4, [same], prompts(4, 1, len(tok))):
        ids, mask = left_padded(batch, tok.pad_token_id)
        assert torch.equal(greedy(model, ids, mask, NEW, tok.pad_token_id, tok.eos_token_id),
                           reference(model, ids, mask, tok.pad_token_id, tok.eos_token_id))
    assert greedy(model, ids, mask, 0, tok.pad_token_id, tok.eos_token_id).shape == (1, 0)


def test_grouped_heads_are_repeated_heads():
    """The GPU's decode attention (query heads grouped over their kv head) computes transformers' SDPA with
    the kv heads repeated, padding mask or none."""
    g = torch.Generator().manual_seed(0)
    B, H, kv, S, D = 5, 6, 2, 17, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, 1), (kv, S), (kv, S)))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // kv, True
    for m in (mask, None):
        want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
        torch.testing.assert_close(grouped_attention(q, k, v, m, 0.3), want, rtol=1e-6, atol=1e-6)
    # and the reshape really pairs query head h with kv head h // (H / kv)
    rep = k.repeat_interleave(H // kv, 1), v.repeat_interleave(H // kv, 1)
    torch.testing.assert_close(grouped_attention(q, k, v, None, 0.3),
                               F.scaled_dot_product_attention(q, *rep, scale=0.3).transpose(1, 2))


def test_generation_settings_that_change_a_greedy_token_go_through_generate(llama):
    model, tok = llama
    ids, mask = left_padded(prompts(5, 3, len(tok)), tok.pad_token_id)
    gen = model.generation_config
    gen.no_repeat_ngram_size = 1  # the tiny model repeats its last token: this changes every row
    try:
        assert not fast_decoding(model, 64)
        penalised = new_tokens(model, ids, mask, NEW, tok.pad_token_id, tok.eos_token_id)
        assert torch.equal(penalised, reference(model, ids, mask, tok.pad_token_id, tok.eos_token_id))
    finally:
        gen.no_repeat_ngram_size = 0
    assert fast_decoding(model, 64)
    assert not torch.equal(penalised, new_tokens(model, ids, mask, NEW, tok.pad_token_id, tok.eos_token_id))


@pytest.mark.slow
def test_the_default_model_in_bf16_on_a_cpu_decodes_token_for_token_as_generate():
    """The embedded default (GQA, 9 query and 3 kv heads; its own tokenizer, EOS and chat-free alpaca prompts)
    in bf16, where near-ties are everywhere (generate itself drifted between one batch of 64 prompts and two of
    32 in 13 of 64 rows over 24 tokens on a CPU, docs/benchmarks.md): our loop gives generate's tokens exactly,
    on the CPU path and with the GPU's grouped-head attention forced."""
    pytest.importorskip("gguf")
    from lora_ablate import decode
    from lora_ablate.config import ModelConfig
    from lora_ablate.data import load_eval_set, prompt_ids
    from lora_ablate.models import default_gguf, load_base

    try:
        default_gguf()
    except Exception as e:  # the package that embeds the GGUF is not installed here
        pytest.skip(str(e))
    base = load_base(ModelConfig(dtype="bfloat16", device="cpu"))
    tok = base.tokenizer
    prompts_ = [prompt_ids(ex, tok, "alpaca") for ex in load_eval_set("heldout_instances", 24, 0).examples]
    ids, mask = left_padded(prompts_, tok.pad_token_id)
    want = reference(base.model, ids, mask, tok.pad_token_id, tok.eos_token_id, new=16)
    assert torch.equal(greedy(base.model, ids, mask, 16, tok.pad_token_id, tok.eos_token_id), want)

    from transformers.modeling_utils import AttentionInterface

    def grouped(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if q.shape[2] == 1:
            return grouped_attention(q, k, v, kwargs.get(decode._MASK), scaling), None
        return decode._decode_attention(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(decode._IMPL, grouped)
    try:
        assert torch.equal(greedy(base.model, ids, mask, 16, tok.pad_token_id, tok.eos_token_id), want)
    finally:
        AttentionInterface.register(decode._IMPL, decode._decode_attention)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_default_model_on_the_gpu_decodes_as_generate_does():
    """The embedded default on the GPU (``python -m pytest -q -m gpu tests/test_decode.py``), 64 built-in
    held-out prompts, 24 tokens. fp32: generate's tokens (a near-tie may flip a row; at most 2 may). bf16: the
    first token is generate's (the same prompt forward), and rows drift from generate's no more often than
    generate's own rows drift when the same prompts are decoded in two batches of 32 instead of one (twice
    that, plus 4: an H200 gave 19 of 64 rows differing somewhere in the 24 tokens)."""
    from lora_ablate.config import ModelConfig
    from lora_ablate.data import load_eval_set, prompt_ids
    from lora_ablate.models import load_base

    def differing(a, b):
        n = min(a.shape[1], b.shape[1])
        return int((a[:, :n] != b[:, :n]).any(1).sum())

    for dtype in ("float32", "bfloat16"):
        base = load_base(ModelConfig(dtype=dtype))
        tok = base.tokenizer
        prompts_ = [prompt_ids(ex, tok, "alpaca") for ex in load_eval_set("heldout_instances", 64, 0).examples]

        def generated(batch, ours=False, base=base, tok=tok):
            ids, mask = (t.cuda() for t in left_padded(batch, tok.pad_token_id))
            if ours:
                assert fast_decoding(base.model, ids.shape[1] + 24)
                return greedy(base.model, ids, mask, 24, tok.pad_token_id, tok.eos_token_id)
            return reference(base.model, ids, mask, tok.pad_token_id, tok.eos_token_id, new=24)

        want, got = generated(prompts_), generated(prompts_, ours=True)
        if dtype == "float32":
            assert differing(got, want) <= 2
            continue
        assert torch.equal(got[:, 0], want[:, 0])
        noise = differing(generated(prompts_[:32]), want[:32]) + differing(generated(prompts_[32:]), want[32:])
        assert differing(got, want) <= 2 * noise + 4, (differing(got, want), noise)


def test_a_call_is_as_wide_as_the_free_memory_allows(llama, monkeypatch):
    """rows_per_call: CACHE_SHARE of the free GPU memory over one row's cache (layers x keys and values x kv
    heads x head dim x the dtype's bytes x the row's tokens), at most MAX_ROWS; None off a GPU. The held-out
    prompts go in chunks of that many rows over the pack's copies, half as many when generate decodes (its
    cache is concatenated anew at each token)."""
    from lora_ablate import decode
    from lora_ablate.config import DataConfig, EvalConfig
    from lora_ablate.data import load_eval_set
    from lora_ablate.evaluation import Evaluator

    model, tok = llama
    cfg = model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_token * 100 * 1000, 0))
    assert decode.rows_per_call(model, 100, "cpu") is None
    assert decode.rows_per_call(model, 100, "cuda") == int(1000 * decode.CACHE_SHARE)
    assert decode.rows_per_call(model, 1, "cuda") == decode.MAX_ROWS

    ev = Evaluator([load_eval_set("heldout_instances", 30, 0)], tok, DataConfig(max_length=112),
                   EvalConfig(sets=("heldout_instances",), size=30, max_new_tokens=4, batch_size=3))
    longest = max(map(len, ev.prompts["heldout_instances"])) + 4
    monkeypatch.setattr("lora_ablate.evaluation.rows_per_call",
                        lambda m, length, device: 40 if length == longest and str(device) == "cuda" else None)
    sizes = lambda copies: [len(c) for c in ev.generation_chunks("heldout_instances", "cuda", model, copies)]  # noqa: E731
    assert sizes(1) == [30] and sizes(4) == [10, 10, 10] and sizes(20) == [3] * 10  # never below eval.batch_size
    assert [len(c) for c in ev.generation_chunks("heldout_instances", "cpu", model, 4)] == [3] * 10
    chunks = ev.generation_chunks("heldout_instances", "cuda", model, 4)
    lengths = [len(ev.prompts["heldout_instances"][i]) for c in chunks for i in c]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    monkeypatch.setattr("lora_ablate.evaluation.fast_decoding", lambda m, length: False)
    assert sizes(4) == [5] * 6
