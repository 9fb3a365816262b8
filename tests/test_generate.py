"""KV-cache generation (model/attention.py, model/generate.py): the cache must not change what the model computes.

The reference is the plain full-sequence forward pass, which has no cache at all; for batch_generate (prompts of
different lengths, left-padded into one batch) also each prompt decoded alone, by generate() and by transformers.
"""
import pytest
import torch

from model import GPT, Gemma, GemmaConfig, GPTConfig, LLaMA, LLaMAConfig
from model.attention import KVCache
from model.gemma import GLOBAL, LOCAL
from model.generate import batch_generate, generate, sample_next
from tools.errors import UserError

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


# ---- batch_generate: prompts of different lengths, left-padded into one batch ------------------------------------
LENGTHS = (5, 1, 11, 3)  # the longest is past tiny_gemma's window of 4, the shortest a single token


def tiny_gemma():  # local and global layers, GQA 4/2, a window shorter than most prompts; untied: random tied
    # weights make a Gemma repeat its input token (the scaled embedding dominates the residual stream)
    return Gemma(GemmaConfig(vocab_size=VOCAB, n_embd=32, intermediate_size=64, n_layer=3, n_head=4, n_kv_head=2,
                             head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                             layer_types=[LOCAL, GLOBAL, LOCAL], max_seq_len=64, rope_theta=1000.0,
                             rope_local_theta=50.0, tie_word_embeddings=False))


def random_weights(m, std=0.2):
    """N(0, std) for every matrix: varied, confident greedy outputs (see the `model` fixture); Gemma's norm weights
    N(0, 0.5) (its scale is 1 + w)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif isinstance(m, Gemma) and "norm" in name:
                p.normal_(0.0, 0.5)
    return m.eval()


@pytest.fixture(params=[tiny_gpt, tiny_llama, tiny_gemma], ids=["gpt", "llama", "gemma"])
def any_model(request):
    return random_weights(request.param())


def prompts_of(lengths=LENGTHS, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n, **kw):
    """generate() on the one prompt: no padding, the path the tests above check against the full forward."""
    return generate(model, torch.tensor([prompt]), n, **kw)[0, len(prompt):].tolist()


def test_each_padded_row_gets_the_logits_it_has_alone(any_model):
    prompts = prompts_of()
    T = max(LENGTHS)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # (4, 11), left-padded
    pad = torch.tensor([T - len(p) for p in prompts])
    nxt = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))  # 6 more tokens a row
    with torch.no_grad():
        cache = any_model.make_kv_cache(4, T + 6, pad=pad)
        steps = [any_model(idx, kv_cache=cache, logits_to_keep=1)[0]]  # prefill: the last position's logits only
        steps += [any_model(nxt[:, t:t + 1], kv_cache=cache)[0] for t in range(3)]  # one token a step
        steps.append(any_model(nxt[:, 3:], kv_cache=cache)[0])  # then a chunk of 3 after the padded past
        padded = torch.cat(steps, dim=1)  # (4, 7, V)
        for b, p in enumerate(prompts):
            full = any_model(torch.cat([torch.tensor([p]), nxt[b:b + 1]], dim=1))[0]  # (1, len + 6, V)
            assert (padded[b] - full[0, len(p) - 1:]).abs().max().item() < 1e-5
    assert steps[0].shape == (4, 1, VOCAB)


def test_batch_greedy_equals_each_prompt_decoded_alone(any_model):
    prompts = prompts_of()
    out = batch_generate(any_model, prompts, 16, temperature=0)
    assert [len(row) for row in out] == [16] * 4
    assert out == [alone(any_model, p, 16, temperature=0) for p in prompts]
    assert len({t for row in out for t in row}) > 10  # varied tokens: a wrong position or mask would show


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_decode_padded_rows_as_alone(any_model, method):
    """The virtual tokens sit in the cache before each row's padding; in Gemma's local layers the window, counted
    in positions, reaches past the padding to them."""
    from prompts import PromptConfig, apply_prompt
    apply_prompt(any_model, PromptConfig(method=method, num_virtual_tokens=3))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in any_model.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    prompts = prompts_of((2, 7, 1))
    out = batch_generate(any_model, prompts, 10, temperature=0)
    assert out == [alone(any_model, p, 10, temperature=0) for p in prompts]


def test_per_row_generators_make_a_sample_independent_of_its_companions(any_model):
    prompts = prompts_of()
    kw = dict(temperature=1.0, top_k=20, top_p=0.95)
    out = batch_generate(any_model, prompts, 12, generator=[torch.Generator().manual_seed(10 + i) for i in range(4)],
                         **kw)
    # the same prompts in another order, and each one alone: row i's sample depends only on its generator
    order = [2, 0, 3, 1]
    shuffled = batch_generate(any_model, [prompts[i] for i in order], 12,
                              generator=[torch.Generator().manual_seed(10 + i) for i in order], **kw)
    assert [shuffled[order.index(i)] for i in range(4)] == out
    for i, p in enumerate(prompts):
        assert batch_generate(any_model, [p], 12, generator=[torch.Generator().manual_seed(10 + i)], **kw)[0] == out[i]
    assert out != batch_generate(any_model, prompts, 12, temperature=0)  # it samples
    one = batch_generate(any_model, prompts, 12, generator=torch.Generator().manual_seed(0), **kw)  # one for all
    assert one == batch_generate(any_model, prompts, 12, generator=torch.Generator().manual_seed(0), **kw)


def test_eos_ends_each_row_and_decoding_stops_when_all_have(any_model):
    prompts = prompts_of()
    greedy = batch_generate(any_model, prompts, 16, temperature=0)
    eos = greedy[0][3]  # row 0 emits this at step 3 (or before): call it end-of-sequence
    calls = []
    hook = any_model.register_forward_hook(lambda *args: calls.append(1))
    out = batch_generate(any_model, prompts, 16, temperature=0, eos_id=eos)
    hook.remove()
    for row, full in zip(out, greedy):
        assert row == (full[:full.index(eos) + 1] if eos in full else full)  # up to and with its first eos
    assert out[0][-1] == eos and len(out[0]) <= 4
    steps = max(len(row) for row in out)
    if all(eos in full for full in greedy):
        assert steps < 16 and len(calls) == steps  # every row ended: no step after the last eos


def test_batch_generate_refuses_what_does_not_fit_in_one_line(any_model):
    with pytest.raises(UserError, match=r"prompt \(60\) \+ max_new_tokens \(5\) exceeds the model's 64 positions"):
        batch_generate(any_model, [[1] * 60, [1, 2]], 5)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        batch_generate(any_model, [[1], []], 5)
    with pytest.raises(UserError, match="2 generators for 3 prompts"):
        batch_generate(any_model, [[1], [2], [3]], 5, generator=[torch.Generator()] * 2)
    assert batch_generate(any_model, [], 5) == [] and batch_generate(any_model, [[1, 2]], 0) == [[]]
    assert len(batch_generate(any_model, [[1] * 60, [1, 2]], 4, temperature=0)[0]) == 4  # exactly fits: 64


# ---- against transformers: the same weights, each prompt alone through model.generate ------------------------------
def hf_llama(transformers):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2,
        tie_word_embeddings=False))


def hf_gpt2(transformers):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))


def hf_gemma3(transformers):
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=[LOCAL, GLOBAL, LOCAL], max_position_embeddings=64, initializer_range=0.2,
        tie_word_embeddings=False,
        rope_parameters={GLOBAL: {"rope_type": "default", "rope_theta": 1000.0},
                         LOCAL: {"rope_type": "default", "rope_theta": 50.0}},
        attn_implementation="eager"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)  # Gemma's 1 + w: around 1, so that a norm read wrongly shows
    return hf


@pytest.fixture(scope="module", params=[hf_llama, hf_gpt2, hf_gemma3], ids=["llama", "gpt2", "gemma3"])
def hf_and_ours(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from model import load_pretrained
    torch.manual_seed(0)
    hf = request.param(transformers).eval()
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens tokens, EOS or not
    hf.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, load_pretrained(path).eval()


def test_batch_greedy_equals_transformers_on_each_prompt_alone(hf_and_ours):
    hf, ours = hf_and_ours
    prompts = prompts_of()
    out = batch_generate(ours, prompts, 14, temperature=0)
    for p, row in zip(prompts, out):
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=14, do_sample=False)[0, len(p):].tolist()
        assert row == theirs == alone(ours, p, 14, temperature=0)
    assert len({t for row in out for t in row}) > 10
