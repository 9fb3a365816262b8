"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT on transformers' GPT-2 and LLaMA: the same
tensors give the same logits, adapters load both ways, and decoding through the KV cache matches full forwards."""
import warnings

import pytest
import torch

from lora import print_trainable_parameters, summary
from model import GPT, LLaMA
from prompts import PromptConfig, apply_prompt, load_prompt_adapter, save_prompt_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, N = 100, 3
IDX = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
ARCHS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)), GPT),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # grouped-query: 4 heads, 2 kv heads
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)), LLaMA),
}
# (our config, PEFT's config) for each method
METHODS = {
    "prompt": (PromptConfig("prompt", N), lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "ptuning-mlp": (PromptConfig("ptuning", N, encoder_hidden_size=16), lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16)),
    "ptuning-lstm": (PromptConfig("ptuning", N, encoder_type="LSTM", encoder_hidden_size=16),
                     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                      encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
    "prefix": (PromptConfig("prefix", N), lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix-projection": (PromptConfig("prefix", N, prefix_projection=True, encoder_hidden_size=16),
                          lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          prefix_projection=True, encoder_hidden_size=16)),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def base(request, tmp_path_factory):
    """(arch, folder of a random tiny Hugging Face model)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    ARCHS[request.param][0]().save_pretrained(path)
    return request.param, path


def hf_model(base):
    arch, path = base
    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    return cls.from_pretrained(path).eval()


def our_model(base):
    return ARCHS[base[0]][1].from_pretrained(base[1]).eval()


def peft_model(base, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf_model(base), METHODS[method][1]()).eval()


def peft_logits(model):
    with torch.no_grad():
        logits = model(input_ids=IDX).logits
    return logits[:, -IDX.size(1):]  # prompt tuning returns the virtual positions' logits too: drop them


def ours_with_peft_tensors(base, method, pm):
    """Our model with the very tensors of PEFT's prompt encoder (the state-dict names are PEFT's)."""
    ours = apply_prompt(our_model(base), METHODS[method][0])
    ours.prompt_encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return ours


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_tensors_give_peft_logits(base, method):
    pm = peft_model(base, method)
    ours = ours_with_peft_tensors(base, method, pm)
    with torch.no_grad():
        logits = ours(IDX)[0]
    torch.testing.assert_close(logits, peft_logits(pm), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(logits, our_model(base)(IDX)[0], atol=1e-3)  # the prompt changes the output


@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm", "prefix-projection"])
def test_gradients_reach_the_encoder_as_in_peft(base, method):
    pm = peft_model(base, method)
    ours = ours_with_peft_tensors(base, method, pm).train()
    weights = torch.randn(IDX.size(0), IDX.size(1), VOCAB, generator=torch.Generator().manual_seed(3))
    (pm(input_ids=IDX).logits[:, -IDX.size(1):] * weights).sum().backward()
    (ours(IDX)[0] * weights).sum().backward()
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    for name, p in ours.prompt_encoder.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("prompt_encoder."))


ROUND_TRIP = ["prompt", "ptuning-mlp", "prefix-projection"]  # a saved adapter is one table: these cover the layouts


@pytest.mark.parametrize("method", ROUND_TRIP)
def test_our_adapter_loads_in_peft(base, method, tmp_path):
    pm = peft_model(base, method)
    ours = ours_with_peft_tensors(base, method, pm)
    save_prompt_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(hf_model(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(loaded), ours(IDX)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ROUND_TRIP)
def test_peft_adapter_loads_in_ours(base, method, tmp_path):
    pm = peft_model(base, method)
    pm.save_pretrained(tmp_path)
    ours = load_prompt_adapter(our_model(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX)[0], peft_logits(pm), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_decoding_through_the_kv_cache_matches_full_forwards(base, method):
    """Prefill, then one token at a time with the cache: every step's logits equal PEFT's on the whole sequence."""
    pm = peft_model(base, method)
    ours = ours_with_peft_tensors(base, method, pm)
    cache = ours.make_kv_cache(IDX.size(0), IDX.size(1) + 3)
    seq, step_input = IDX, IDX
    with torch.no_grad():
        for _ in range(3):
            cached = ours(step_input, kv_cache=cache)[0][:, -1]  # (B, V)
            torch.testing.assert_close(cached, ours(seq)[0][:, -1], rtol=0, atol=1e-5)  # uncached
            torch.testing.assert_close(cached, pm(input_ids=seq).logits[:, -1], rtol=0, atol=1e-5)
            step_input = cached.argmax(-1, keepdim=True)
            seq = torch.cat([seq, step_input], dim=1)
        assert torch.equal(ours.generate(IDX, 3, temperature=0), seq)
        assert torch.equal(ours.generate(IDX, 3, temperature=0, use_cache=False), seq)


def test_virtual_tokens_take_positions_from_the_model(base):
    ours = our_model(base)
    full = ours.max_seq_len
    apply_prompt(ours, PromptConfig("prefix", N))
    assert ours.max_seq_len == full - N  # real tokens run at positions N.. (as in PEFT)
    with pytest.raises(ValueError, match="tokens"):
        ours(torch.zeros(1, full - N + 1, dtype=torch.long))


@pytest.mark.parametrize("method", ["ptuning-mlp", "prefix-projection"])
def test_trainable_parameter_line_is_peft_s(base, method, capsys):
    pm = peft_model(base, method)
    pm.print_trainable_parameters()
    expected = capsys.readouterr().out.strip()
    ours = ours_with_peft_tensors(base, method, pm)
    assert print_trainable_parameters(ours) == expected


def test_only_the_prompt_trains_and_the_base_is_frozen(base):
    ours = apply_prompt(our_model(base), PromptConfig("ptuning", N))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    assert "PTuning(3 virtual tokens x 32, MLP)" in summary(ours)
