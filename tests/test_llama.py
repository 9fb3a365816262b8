"""Our hand-written LLaMA against transformers' LlamaForCausalLM, and its basic contracts."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig, LLaMA, LLaMAConfig, load_pretrained
from tokenization import load_tokenizer
from training.optim import configure_adamw

transformers = pytest.importorskip("transformers")

# with head_dim 8 and rope_theta 500 the 4 channel pairs have wavelengths 6.3, 30, 140, 664: pretrained on 32
# positions, Llama 3.1's rule keeps the first (< 32/4), blends the second (< 32/1) and slows the other two down
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def make_hf_llama(path=None, **kw):
    """A random LlamaForCausalLM: GQA (4 query heads, 2 K/V heads), rope_theta 500, untied, unless kw says otherwise.

    initializer_range 0.2 instead of 0.02: attention far from uniform, so a wrong RoPE moves logits by O(1).
    """
    torch.manual_seed(0)
    args = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2,
                tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**args, **kw})).eval()
    if path is not None:
        hf.save_pretrained(path)
    return hf


def max_logit_diff(ours, hf, T=40):
    idx = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_gqa_untied_checkpoint_with_custom_rope_theta_loads_with_identical_logits(tmp_path):
    hf = make_hf_llama(tmp_path)
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert (ours.config.n_head, ours.config.n_kv_head, ours.config.rope_theta) == (4, 2, 500.0)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert max_logit_diff(ours, hf) < 1e-4


def test_tied_checkpoint_loads_with_lm_head_sharing_the_embedding(tmp_path):
    hf = make_hf_llama(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # transformers stores it once
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert max_logit_diff(ours, hf) < 1e-4


def test_llama3_rope_scaling_checkpoint_loads_with_identical_logits(tmp_path):
    hf = make_hf_llama(tmp_path, rope_scaling=dict(LLAMA3_ROPE))  # a copy: transformers edits it
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling == LLAMA3_ROPE
    assert max_logit_diff(ours, hf, T=60) < 1e-4  # 60 positions: well past original_max_position_embeddings


def test_transformers_4_config_layout_is_read(tmp_path):
    # transformers 4.x writes rope_theta at the top level and the scaling as rope_scaling {"type": ...}
    hf = make_hf_llama(tmp_path, rope_scaling=dict(LLAMA3_ROPE))  # a copy: transformers edits it
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 500.0
    cfg["rope_scaling"] = {k if k != "rope_type" else "type": v for k, v in LLAMA3_ROPE.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert max_logit_diff(ours, hf, T=60) < 1e-4


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_unsupported_rope_scaling_type_is_refused_by_name(tmp_path, rope_type):
    make_hf_llama(tmp_path)
    edit_config(tmp_path, rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 500.0})
    with pytest.raises(ValueError, match=f"rope scaling type '{rope_type}' is not supported"):
        LLaMA.from_pretrained(tmp_path)


def test_attention_and_mlp_biases_and_a_wider_head_dim_load_with_identical_logits(tmp_path):
    hf = make_hf_llama(tmp_path, attention_bias=True, mlp_bias=True, head_dim=16)  # 4 heads x 16 != hidden 32
    with torch.no_grad():  # transformers initialises biases to zero; make them count
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    assert max_logit_diff(ours, hf) < 1e-4


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    hf = make_hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert max_logit_diff(ours, hf) < 1e-4


def test_bf16_checkpoint_loads_as_float32_by_default_and_as_bf16_when_asked(tmp_path):
    hf = make_hf_llama()
    bf16_values = {k: v.to(torch.bfloat16).float() for k, v in hf.state_dict().items()}
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    reference = make_hf_llama()  # float32, holding exactly the bf16 values
    reference.load_state_dict(bf16_values)
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert max_logit_diff(ours, reference) < 1e-4
    # asked for bf16: only the dtype is checked (no bf16 compute on CPU)
    assert {p.dtype for p in LLaMA.from_pretrained(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_loads_in_transformers_with_identical_logits(tmp_path, tied):
    torch.manual_seed(1)
    ours = LLaMA(LLaMAConfig(vocab_size=101, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             rope_theta=500.0, rope_scaling=dict(LLAMA3_ROPE), max_seq_len=64,
                             tie_word_embeddings=tied))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)  # norms too: a saved RMSNorm weight that was ignored would show
    ours.eval().save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == tied
    assert max_logit_diff(ours, hf, T=60) < 1e-4


def test_load_pretrained_dispatches_on_model_type(tmp_path):
    make_hf_llama(tmp_path)
    assert isinstance(load_pretrained(tmp_path), LLaMA)


def test_module_names_match_hugging_face(tmp_path):
    hf = make_hf_llama(tmp_path)
    assert set(LLaMA.from_pretrained(tmp_path).state_dict()) == set(hf.state_dict())


def test_gpt2_folder_is_refused_with_a_clear_error(tmp_path):
    GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2', not 'llama'"):
        LLaMA.from_pretrained(tmp_path)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    make_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        LLaMA.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    make_hf_llama(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.gate_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\): model.layers.1.mlp.gate_proj.weight"):
        LLaMA.from_pretrained(tmp_path)


def test_config_that_disagrees_with_the_weights_names_the_tensor(tmp_path):
    make_hf_llama(tmp_path)
    edit_config(tmp_path, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\)"):
        LLaMA.from_pretrained(tmp_path)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = LLaMA(LLaMAConfig(vocab_size=50, n_embd=16, intermediate_size=32, n_layer=1, n_head=2, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_at_init_is_about_log_vocab():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig(vocab_size=1000, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                              max_seq_len=64))
    _, loss = model(torch.randint(0, 1000, (4, 64)), torch.randint(0, 1000, (4, 64)))
    assert abs(loss.item() - math.log(1000)) < 0.1  # near-uniform predictions at init


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig(vocab_size=64, n_embd=128, intermediate_size=256, n_layer=8, n_head=4))
    block = model.model.layers[0]
    assert abs(block.self_attn.q_proj.weight.std().item() - 0.02) < 0.001
    for w in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 0.0003  # 0.02 / sqrt(2 * n_layer)
    assert torch.equal(block.input_layernorm.weight, torch.ones(128))


LLAMA_3_2_1B = LLaMAConfig(vocab_size=128256, n_embd=2048, intermediate_size=8192, n_layer=16, n_head=32,
                           n_kv_head=8, rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0,
                                                                           "original_max_position_embeddings": 8192},
                           max_seq_len=131072, tie_word_embeddings=True)


def test_llama_3_2_1b_parameter_count():
    with torch.device("meta"):
        model = LLaMA(LLAMA_3_2_1B)
    assert model.num_params() == 1_235_814_400  # Meta's published count for Llama 3.2 1B


def test_optimizer_decays_matrices_but_not_rmsnorm_gains(capsys):
    with torch.device("meta"):
        model = LLaMA(LLAMA_3_2_1B)
    configure_adamw(model, 0.1, 3e-4, (0.9, 0.95), "cpu")
    out = capsys.readouterr().out
    # 16 layers x 7 matrices + the (tied) embedding; 16 x 2 RMSNorms + the final one, 2048 each
    assert "num decayed parameter tensors: 113, with 1,235,746,816 parameters" in out
    assert "num non-decayed parameter tensors: 33, with 67,584 parameters" in out


def test_only_dropout_can_be_overridden(tmp_path):
    make_hf_llama(tmp_path)
    assert LLaMA.from_pretrained(tmp_path, dropout=0.1).config.dropout == 0.1
    with pytest.raises(ValueError, match=r"only dropout can be overridden, got \['n_layer'\]"):
        LLaMA.from_pretrained(tmp_path, n_layer=1)


# ---- tokenizer.json ----------------------------------------------------------------------------------------------
def test_tokenizer_json_encodes_and_decodes(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    ours = load_tokenizer(tmp_path)
    assert ours.encode("hello world hi") == [0, 3, 4, 2]  # BOS prepended, unknown word -> [UNK]
    assert ours.encode("hello", add_special_tokens=False) == [3]
    assert ours.decode([3, 4]) == "hello world"
    assert (ours.bos_id, ours.eos_id) == (0, 1)  # the first of several eos ids


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(tmp_path)
