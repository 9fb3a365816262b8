"""A trained model as one GGUF file, llama.cpp's format (what llama.cpp, ollama and LM Studio run): the inverse of
formats/gguf.py.

    export_gguf("out-sft-speakers", "models/sft-speakers.Q8_0.gguf", "q8_0")  # out_dir, adapter, HF folder, .gguf
    python -m formats.gguf export out-sft-speakers models/sft-speakers.Q8_0.gguf --type q8_0
    write_gguf(model, tokenizer, "out/merged.gguf", "f16")                      # a merged model in memory (train.py)

The model is loaded as every tool here loads it (training.checkpoint.load_model: an adapter run is its base plus
the adapter), the LoRA folded into the weights (W + s B A) and a quantized base dequantized, so that only plain
weights are left. Then we write what llama.cpp's own converter (convert_hf_to_gguf.py) writes for that model:
  - the hyperparameters under llama.cpp's key names, each a uint32 or a float32: llama.block_count,
    llama.attention.head_count_kv, llama.rope.freq_base, ... (gpt2.* for GPT-2);
  - the tensors under llama.cpp's names (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight), with the
    rows of q_proj and k_proj reordered: llama.cpp's RoPE rotates adjacent channels (2i, 2i+1) of a head, Hugging
    Face's rotates channel i with i + D/2; permute_qk interleaves the two halves of each head so that llama.cpp
    rotates the very pairs we rotate (formats/gguf.py's unpermute_qk undoes it when reading);
  - the tokenizer (byte-level BPE: tokens, merges, token types, the BOS/EOS/PAD ids, whether to add BOS, and the
    llama.cpp name of the pre-tokenizer, which splits text before the merges) and the chat template.
Types (--type): f32; f16 and bf16 (rounded to nearest, ties to even); q8_0, llama.cpp's 8-bit blocks: every 32
consecutive weights of a row share one fp16 scale d = max|w| / 127 and keep q = round(w / d) as int8, w ~ d q
(34 bytes per 32 weights, 8.5 bits a weight; a weight moves by at most d / 2 = max|w| / 254). As llama.cpp's
converter does, 1-D tensors (norms, biases) and GPT-2's position table stay f32, and a q8_0 row whose length is not
a multiple of 32 is written f16. The file is written one tensor at a time (one converted tensor in memory) into a
temporary file that is renamed at the end, so OUT is either the old file or the whole new one.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from formats.gguf import LAYER_NAMES, PRE_TOKENIZERS, TOP_LEVEL_NAMES
from tools.atomic import atomic_path
from tools.errors import UserError, report_user_errors

# --type -> (the GGML type of the 2-D weights, general.file_type: gguf.LlamaFileType)
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
QK8_0 = 32  # weights per Q8_0 block
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType
# The pre-tokenizers we can name, as llama.cpp names them (tokenizer.ggml.pre): GPT-2's byte-level regex is "gpt-2"
# (llama.cpp refuses "gpt2"), SmolLM's is single digits first, then GPT-2's ("smollm").
PRE_NAMES = {"smollm": PRE_TOKENIZERS["smollm"], "gpt-2": PRE_TOKENIZERS["gpt2"]}

# GPT-2 (model/gpt.py, Hugging Face's names) -> llama.cpp's 'gpt2' architecture
GPT2_TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
            "lm_head": "output"}
GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def check_type(kind):
    if kind not in TYPES:
        raise UserError(f"--type {kind!r} is not a GGUF type we write: use one of {', '.join(TYPES)}")


def check_output(path, overwrite):
    path = Path(path)
    if path.suffix != ".gguf":
        raise UserError(f"{path}: name the output file NAME.gguf (llama.cpp, ollama and load_model go by the suffix)")
    if path.is_dir():
        raise UserError(f"{path} is a folder: name the .gguf file to write")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it, or choose another name")
    return path


# ---- the tensors --------------------------------------------------------------------------------------------------
def permute_qk(w, n_head):
    """Hugging Face's q_proj / k_proj rows -> llama.cpp's (n_head: the K/V heads for k_proj); unpermute_qk's inverse.
    Each head's rows (x_0..x_{D/2-1}, y_0..y_{D/2-1}) become (x_0, y_0, x_1, y_1, ...):
    (H, 2, D/2, C) -> (H, D/2, 2, C)."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, 2, D // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0(w):
    """llama.cpp's Q8_0 of a float32 array (..., n), n a multiple of 32, as bytes (..., n / 32 * 34): per block of 32
    weights the scale d as fp16, then 32 int8 codes. ggml's quantize_row_q8_0_ref, which gguf.quants mirrors."""
    blocks = w.reshape(-1, QK8_0)  # (n_blocks, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127  # float32: the largest |w| of a block becomes +-127
    inverse = np.divide(1, d, out=np.zeros_like(d), where=d > 0)  # an all-zero block: d = 0, codes 0
    x = np.abs(blocks * inverse)
    q = np.sign(blocks) * (np.floor(x) + np.floor(2 * (x - np.floor(x))))  # C's roundf: halves away from zero
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)
    return out.reshape(*w.shape[:-1], -1)


def encode(w, qtype):
    """A float32 array as the bytes (or array) a tensor of GGML type `qtype` stores."""
    if qtype == "F32":
        return w
    if qtype == "F16":
        return w.astype(np.float16)  # IEEE round to nearest even, as ggml's fp32 -> fp16
    if qtype == "BF16":  # the upper 16 bits of the float32, rounded to nearest even (torch does it as ggml)
        return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return q8_0(w)


def stored_type(gguf_name, shape, kind):
    """The GGML type of one tensor, by llama.cpp's converter's rules (prepare_tensors)."""
    if len(shape) < 2 or not gguf_name.endswith(".weight") or gguf_name.startswith("position_embd."):
        return "F32"  # norms, biases, GPT-2's positions: llama.cpp computes with them in f32
    qtype = TYPES[kind][0]
    if qtype == "Q8_0" and shape[-1] % QK8_0:
        return "F16"  # rows that are not whole blocks: the converter's fallback
    return qtype


def llama_file(model):
    """('llama', {metadata key: value}, [(llama.cpp name, tensor, heads to permute by or None)]) for our LLaMA."""
    c = model.config
    meta = {"context_length": c.max_seq_len, "embedding_length": c.n_embd, "feed_forward_length": c.intermediate_size,
            "block_count": c.n_layer, "attention.head_count": c.n_head, "attention.head_count_kv": c.n_kv_head,
            "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
            "rope.dimension_count": c.head_dim, "rope.freq_base": float(c.rope_theta),
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size}
    top, layer = {v: k for k, v in TOP_LEVEL_NAMES.items()}, {v: k for k, v in LAYER_NAMES.items()}
    heads = {"self_attn.q_proj": c.n_head, "self_attn.k_proj": c.n_kv_head}
    tied = model.lm_head.weight is model.model.embed_tokens.weight  # then llama.cpp writes no output.weight
    tensors = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            tensors.append((f"blk.{i}.{layer.get(rest, rest)}.{kind}", t, heads.get(rest), rest in layer))
        else:
            tensors.append((f"{top.get(module, module)}.{kind}", t, None, module in top))
    return "llama", meta, known(tensors)


def gpt2_file(model):
    """('gpt2', metadata, tensors) for our GPT: llama.cpp's 'gpt2' architecture, the converter's layout (fused qkv
    rows q, k, v; output.weight written even though it is the embedding). A bias=False GPT gets zero biases, which
    llama.cpp's GPT-2 requires and which change nothing."""
    c = model.config
    meta = {"context_length": c.block_size, "embedding_length": c.n_embd, "feed_forward_length": 4 * c.n_embd,
            "block_count": c.n_layer, "attention.head_count": c.n_head,
            "attention.layer_norm_epsilon": float(c.layer_norm_eps), "vocab_size": c.vocab_size}
    sd, tensors = model.state_dict(), []
    for name, t in sd.items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("transformer.h."):
            _, _, i, rest = module.split(".", 3)
            tensors.append((f"blk.{i}.{GPT2_LAYER.get(rest, rest)}.{kind}", t, None, rest in GPT2_LAYER))
        else:
            tensors.append((f"{GPT2_TOP.get(module, module)}.{kind}", t, None, module in GPT2_TOP))
        if kind == "weight" and f"{module}.bias" not in sd and module not in ("transformer.wte", "transformer.wpe",
                                                                               "lm_head"):
            tensors.append((tensors[-1][0][:-len("weight")] + "bias", torch.zeros(t.shape[0]), None, True))
    return "gpt2", meta, known(tensors)


def known(tensors):
    unknown = [name for name, _, _, ok in tensors if not ok]
    if unknown:
        raise UserError(f"tensors {unknown[:3]} have no llama.cpp name: only a plain model (adapter merged) exports")
    return [(name, t, heads) for name, t, heads, _ in tensors]


ARCHITECTURES = {"llama": llama_file, "gpt2": gpt2_file}  # our model_type -> its llama.cpp file


def check_architecture(model):
    if model.model_type not in ARCHITECTURES:
        raise UserError(f"model_type {model.model_type!r} has no GGUF export (we write {', '.join(ARCHITECTURES)})")
    scaling = getattr(model.config, "rope_scaling", None)
    if scaling is not None:
        raise UserError(f"rope_scaling {scaling['rope_type']!r} (Llama 3.1's long context) is not exported: llama.cpp "
                         f"keeps it as a rope_freqs tensor, which formats/gguf.py does not read back")


def check_exportable(model, tok):
    """What write_gguf would refuse, said before a training run rather than at its end: the architecture and the
    tokenizer (`model` may carry its adapter still; None for `tok`: the model's tokenizer could not be loaded)."""
    check_architecture(model)
    if tok is None:
        raise UserError("a GGUF file holds the tokenizer, and this model's could not be loaded")
    bpe_vocab(tok, model.config.vocab_size)


def describe(model):
    """(llama.cpp architecture, metadata, tensors) of a plain model; a UserError for anything else."""
    check_architecture(model)
    from adapters import FULL, method_of
    row = method_of(model)
    if row is not FULL:
        raise UserError(f"the model carries a {row.name} adapter, which a GGUF file cannot hold"
                         + ("" if "merge" in row.can else " (its virtual tokens do not fold into the weights)"))
    return ARCHITECTURES[model.model_type](model)


# ---- the tokenizer ------------------------------------------------------------------------------------------------
def bpe_vocab(tok, vocab_size):
    """The tokenizer in llama.cpp's terms: {tokens, types, merges, pre}, one token per id of the model (ids the
    tokenizer does not use become unused '[PAD<id>]' tokens, as the converter pads them). Only byte-level BPE."""
    from tokenization.tokenizer import GPT2Tokenizer, gpt2_data_dir
    if isinstance(tok, GPT2Tokenizer):  # tiktoken's GPT-2 (tokenization/tokenizer.py): the same two official files
        data = Path(gpt2_data_dir())
        vocab, special = json.loads((data / "encoder.json").read_text()), {"<|endoftext|>": True}
        merges = [m for m in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if m]  # 1: #version
        pre = "gpt-2"
        ids = {}
    else:
        spec = json.loads(tok.tokenizer.to_str())
        model = spec["model"]
        if model["type"] != "BPE" or model.get("byte_fallback"):  # SentencePiece-style BPE falls back to <0xNN>
            kind = "BPE tokenizer with byte fallback" if model["type"] == "BPE" else f"{model['type']} tokenizer"
            raise UserError(f"{tok.name}: a {kind}; only byte-level BPE tokenizers (GPT-2, SmolLM2) are exported")
        if spec.get("normalizer") is not None:
            raise UserError(f"{tok.name}: the tokenizer normalizes text ({spec['normalizer']['type']}), which "
                             f"llama.cpp's byte-level BPE does not; it cannot be exported")
        pre_tokenizer = spec.get("pre_tokenizer") or {}
        steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
        pre = next((name for name, known_steps in PRE_NAMES.items() if steps == known_steps), None)
        if pre is None:
            raise UserError(f"{tok.name}: its pre-tokenizer ({', '.join(s.get('type', '?') for s in steps)}) is none "
                             f"that llama.cpp names and formats/gguf.py reads ({', '.join(PRE_NAMES)})")
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        special = {a["content"]: a["special"] for a in spec["added_tokens"]}
        ids = {a["id"]: a["content"] for a in spec["added_tokens"]}
    by_id = {**{i: t for t, i in vocab.items()}, **ids}
    if max(by_id) >= vocab_size:
        raise UserError(f"{tok.name}: the tokenizer has ids up to {max(by_id)}, the model only {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in by_id else NORMAL if t not in special else CONTROL if special[t] else USER_DEFINED
             for i, t in enumerate(tokens)]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def special_ids(tok):
    """{bos, eos, padding, unknown: id or None}: the tokenizer's own BOS/EOS, and PAD/UNK as its source names them
    (tokenizer_config.json beside a tokenizer.json, or the .gguf file's metadata)."""
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "padding": None, "unknown": None}
    source = Path(tok.name)
    if source.suffix == ".gguf":
        from formats.gguf import open_gguf, tokenizer_config
        config = tokenizer_config(open_gguf(source))
    else:
        config = json.loads((source / "tokenizer_config.json").read_text()) \
            if (source / "tokenizer_config.json").is_file() else {}
    for key, entry in (("padding", "pad_token"), ("unknown", "unk_token")):
        text = config.get(entry)
        text = text.get("content") if isinstance(text, dict) else text
        ids[key] = tok.tokenizer.token_to_id(text) if text and hasattr(tok, "tokenizer") else None
    return ids


def add_tokenizer(w, tok, vocab):
    from tokenization.chat import PLAIN_CHAT_TEMPLATE
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, token_id in special_ids(tok).items():
        if token_id is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    # what encode(text) puts around a text: GPT-2's <|endoftext|> in front, LLaMA's BOS, SmolLM2 nothing
    plain, ids = tok.encode("a", add_special_tokens=False), tok.encode("a")
    add_bos = tok.bos_id is not None and ids[:1] == [tok.bos_id] and ids[1:1 + len(plain)] == plain
    add_eos = tok.eos_id is not None and ids[-1:] == [tok.eos_id] and ids[-1 - len(plain):-1] == plain
    w.add_add_bos_token(add_bos)
    if add_eos:
        w.add_add_eos_token(True)
    # no template of its own: the one sample.py --chat and SFT use (tokenization/chat.py), so chats match
    w.add_chat_template(tok.chat_template or PLAIN_CHAT_TEMPLATE)


# ---- the file -----------------------------------------------------------------------------------------------------
def write_gguf(model, tok, path, kind="f16", overwrite=False, name=None):
    """Write `model` (a plain GPT or LLaMA: no adapter, no quantized layer) with tokenizer `tok` as the GGUF file
    `path`, its 2-D weights in `kind` ('f32' | 'f16' | 'bf16' | 'q8_0'). Returns {GGML type: tensor count}."""
    import gguf
    check_type(kind)
    path = check_output(path, overwrite)
    arch, meta, tensors = describe(model)  # every refusal before a byte is written
    vocab = bpe_vocab(tok, model.config.vocab_size)
    plan = [(n, t.detach().float().cpu(), heads, stored_type(n, t.shape, kind)) for n, t, heads in tensors]
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            w.add_name(name or path.stem)
            w.add_file_type(gguf.LlamaFileType[TYPES[kind][1]])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value in meta.items():  # llama.cpp reads each with its exact type
                (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
            add_tokenizer(w, tok, vocab)
            for n, t, _, qtype in plan:  # the table of tensors first: names, shapes, types, byte sizes
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
                w.add_tensor_info(n, tuple(t.shape), np.dtype(np.float32), t.numel() // block * size,
                                  raw_dtype=gguf.GGMLQuantizationType[qtype])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for n, t, heads, qtype in plan:  # then the data, one tensor converted at a time
                a = t.numpy()
                w.write_tensor_data(encode(permute_qk(a, heads) if heads else a, qtype))
        finally:
            w.close()
    return dict(Counter(qtype for *_, qtype in plan))


def merged_model(src):
    """The model `src` names (load_model), its LoRA / AdaLoRA folded into the weights and quantized layers made
    plain again: what a GGUF file holds."""
    from adapters import method_of
    from lora import merge_and_unload
    from quant import dequantize
    from training.checkpoint import load_model
    model = load_model(src)
    row = method_of(model)
    if "merge" not in row.can and row.attribute:  # prompt, P-tuning, prefix: nothing to fold into a weight
        raise UserError(f"{src}: a {row.name} adapter adds virtual tokens before every sequence, which do not fold "
                         f"into the weights; a GGUF file holds only weights (LoRA and AdaLoRA runs export)")
    return dequantize(merge_and_unload(model)).float().eval()


def export_gguf(src, out, kind="f16", overwrite=False):
    """Load `src` (out_dir, adapter folder, Hugging Face folder or .gguf), merge, and write `out`. Returns
    (out, {GGML type: tensor count})."""
    from tokenization import load_tokenizer
    check_type(kind)
    check_output(out, overwrite)  # before the slow part
    model = merged_model(src)
    tok = load_tokenizer(src, model.config.vocab_size)
    name = Path(src).stem if Path(src).is_file() else Path(src).name  # general.name: the run, folder or file
    return Path(out), write_gguf(model, tok, out, kind, overwrite, name=name)


def main(argv=None):
    argv = report_user_errors(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m formats.gguf export", description="Write a model as one GGUF file "
                                "for llama.cpp / ollama: an out_dir of train.py (an adapter run is merged onto its "
                                "base), a LoRA adapter folder, a Hugging Face folder or a .gguf file")
    p.add_argument("src", help="out_dir, adapter folder, Hugging Face folder or .gguf file")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f16", help=f"the weights' type: {' | '.join(TYPES)} (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    out, counts = export_gguf(args.src, args.out, args.type, args.overwrite)
    print(f"{out}: {out.stat().st_size / 1e6:,.1f} MB, {sum(counts.values())} tensors ("
          + ", ".join(f"{n} {t.lower()}" for t, n in counts.items()) + f") from {args.src}")
    return out


if __name__ == "__main__":
    main()
