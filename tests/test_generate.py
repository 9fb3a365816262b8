"""KV-cache generation (model/attention.py, model/generate.py) for GPT and LLaMA: the cache must not change what the model computes.

The reference is always the plain full-sequence forward pass, which has no cache at all.
"""
import pytest
import torch

from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from model.attention import KVCache
from model.generate import sample_next

VOCAB = 97


def tiny_gpt():
    return GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32))


def tiny_llama():  # grouped-query attention: 4 query heads share 2 K/V heads
    return LLaMA(LLaMAConfig(vocab_size=VOCAB, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             max_seq_len=64, rope_theta=500.0))


@pytest.fixture(params=[tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def model(request):
    torch.manual_seed(0)
    m = request.param().eval()
    # the N(0, 0.02) training init makes nearly uniform predictions and greedy decoding repeats one token;
    # larger random weights give varied, confident outputs, so a wrong cache position would show
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return m


def prompt(batch=2, T=5, seed=1):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_cached_greedy_generation_equals_uncached_token_for_token(model):
    idx = prompt()
    cached = model.generate(idx, 24, temperature=0)
    uncached = model.generate(idx, 24, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + 24)
    assert len(set(cached[0, 5:].tolist())) > 5  # the comparison is not between two runs of one repeated token
    assert torch.equal(cached, uncached)


def test_cached_logits_at_each_step_equal_full_forward(model):
    seq = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(seq)  # (B, 30, V)
        cache = model.make_kv_cache(2, 30)
        steps = [model(seq[:, :8], kv_cache=cache)[0]]  # prefill 8 tokens, then one at a time
        steps += [model(seq[:, t:t + 1], kv_cache=cache)[0] for t in range(8, 30)]
    assert cache.pos == 30
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_kv_cache_advances_once_every_layer_has_stored_the_new_positions():
    cache = KVCache(n_layer=2, batch_size=1, n_kv_head=1, max_len=8, head_dim=2, device="cpu", dtype=torch.float32)
    k0 = torch.ones(1, 1, 3, 2)
    keys, _ = cache.update(0, k0, k0)
    assert cache.pos == 0 and keys.shape == (1, 1, 3, 2)  # layer 1 still has to store the same 3 positions
    cache.update(1, 2 * k0, 2 * k0)
    assert cache.pos == 3
    keys, _ = cache.update(0, 3 * k0[:, :, :1], 3 * k0[:, :, :1])  # the next token goes after the first three
    assert keys[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0, 3.0]


def test_multi_token_step_after_a_filled_cache_equals_full_forward(model):
    # T > 1 on a non-empty cache takes cached_attention's explicit-mask branch (speculative decoding, chunked prefill)
    seq = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(seq)
        cache = model.make_kv_cache(2, 24)
        first, _ = model(seq[:, :10], kv_cache=cache)
        second, _ = model(seq[:, 10:17], kv_cache=cache)
        third, _ = model(seq[:, 17:], kv_cache=cache)
    assert (torch.cat([first, second, third], dim=1) - full).abs().max().item() < 1e-5


def test_top_k_of_one_samples_the_greedy_tokens(model):
    idx = prompt()
    greedy = model.generate(idx, 20, temperature=0)
    sampled = model.generate(idx, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_eos_stops_a_row_and_pads_it_while_others_continue(model):
    idx = prompt()
    greedy = model.generate(idx, 20, temperature=0)
    eos_step = 3
    eos = greedy[0, 5 + eos_step].item()  # row 0 emits this token at step 3: call it end-of-sequence
    first_eos = [next((i for i in range(20) if greedy[r, 5 + i] == eos), None) for r in range(2)]
    assert first_eos[0] <= eos_step
    out = model.generate(idx, 20, temperature=0, eos_id=eos)
    for row in range(2):
        stop = first_eos[row]
        if stop is None:  # this row never emits eos: it runs to the end, unchanged
            assert torch.equal(out[row], greedy[row][:out.size(1)])
            continue
        assert torch.equal(out[row, :5 + stop + 1], greedy[row, :5 + stop + 1])  # identical up to its eos
        assert (out[row, 5 + stop:] == eos).all()  # and eos from there on


def test_generation_stops_early_when_every_row_has_emitted_eos(model):
    idx = prompt(batch=1).repeat(2, 1)  # both rows the same prompt: both emit eos at the same step
    greedy = model.generate(idx, 20, temperature=0)
    eos = greedy[0, 5 + 4].item()
    first = next(i for i in range(20) if greedy[0, 5 + i] == eos)
    out = model.generate(idx, 20, temperature=0, eos_id=eos)
    assert out.shape == (2, 5 + first + 1)
    assert torch.equal(out, greedy[:, :5 + first + 1])


def test_cache_too_small_for_prompt_plus_new_tokens_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        model.generate(prompt(T=50), 20)


# ---- sample_next on hand-made logits ------------------------------------------------------------------------------
PROBS = torch.tensor([0.15, 0.50, 0.05, 0.30])  # shuffled, so the nucleus has to be found by sorting


def draw(n=4000, **kw):
    logits = PROBS.log().repeat(n, 1)  # (n, 4): n independent draws from one distribution
    return sample_next(logits, generator=torch.Generator().manual_seed(0), **kw).flatten()


@pytest.mark.parametrize("top_p, kept", [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 0}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_reaching_p(top_p, kept):
    # sorted: 0.50 (token 1), 0.30 (3), 0.15 (0), 0.05 (2); cumulative 0.50, 0.80, 0.95, 1.00
    assert set(draw(top_p=top_p).tolist()) == kept


def test_top_p_renormalises_over_the_kept_tokens():
    tokens = draw(top_p=0.75)
    share_of_1 = (tokens == 1).float().mean().item()
    assert abs(share_of_1 - 0.5 / 0.8) < 0.03  # 0.625 expected; binomial std at n=4000 is 0.008


def test_top_k_keeps_the_k_most_likely_tokens():
    assert set(draw(top_k=2).tolist()) == {1, 3}


def test_temperature_zero_is_argmax():
    assert draw(n=3, temperature=0).tolist() == [1, 1, 1]
