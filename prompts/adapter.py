"""Prompt-based adapters on disk, in Hugging Face PEFT's format: PEFT loads ours and we load PEFT's.

A folder with two files, whatever the method:

    adapter_config.json        {"peft_type": "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING", "num_virtual_tokens": n,
                                "token_dim", "num_layers", "num_attention_heads", ...}
    adapter_model.safetensors  prompt_embeddings   prompt tuning, P-tuning: (n, C) the virtual token embeddings
                                                   prefix tuning: (n, L * 2 * H_kv * D) every layer's keys/values

Only the encoder's *output* is saved (PEFT's inference_mode): a P-tuning MLP/LSTM or a prefix projection is not
needed to use the adapter, so a loaded adapter is that table alone. To continue training with the encoder, resume
from the training checkpoint (ckpt.pt), which keeps all of it. For prefix tuning on a grouped-query model PEFT
records token_dim = H_kv * D and num_attention_heads = H_kv (the shape of one layer's keys), and so do we.
"""
import torch

from lora.adapter import read_adapter_files, write_adapter_files
from prompts import PromptConfig, apply_prompt, model_dims, remove_prompt
from tools.errors import UserError

PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
METHOD_OF = {v: k for k, v in PEFT_TYPES.items()}
PROMPT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def peft_dims(model, method):
    """PEFT's (token_dim, num_attention_heads, num_layers) for this model and method."""
    n_layer, n_embd, n_kv_head, head_dim = model_dims(model)
    if method == "prefix":
        return n_kv_head * head_dim, n_kv_head, n_layer
    return n_embd, model.config.n_head, n_layer


def save_prompt_adapter(model, path, base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors (PEFT format) into folder `path`, atomically each."""
    config = getattr(model, "prompt_config", None)
    if config is None:
        raise UserError(f"save_prompt_adapter: {type(model).__name__} has no prompt encoder; apply_prompt first")
    token_dim, heads, layers = peft_dims(model, config.method)
    peft_config = {"peft_type": PEFT_TYPES[config.method], "task_type": "CAUSAL_LM",
                   "num_virtual_tokens": config.num_virtual_tokens, "token_dim": token_dim,
                   "num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": layers,
                   "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
                   "modules_to_save": None}
    hidden = config.encoder_hidden_size or token_dim
    if config.method == "prompt":
        text = config.init == "text" and base_model_name_or_path  # PEFT's TEXT needs a tokenizer to name
        peft_config.update(prompt_tuning_init=PROMPT_INITS[config.init if config.init != "text" or text else "random"],
                           prompt_tuning_init_text=config.init_text or None,
                           tokenizer_name_or_path=base_model_name_or_path if text else None, tokenizer_kwargs=None)
    elif config.method == "ptuning":
        peft_config.update(encoder_reparameterization_type=config.encoder_type, encoder_hidden_size=hidden,
                           encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout)
    else:
        peft_config.update(encoder_hidden_size=hidden, prefix_projection=config.prefix_projection,
                           init_weights="zero" if config.init == "zero" else None)
    tensors = {"prompt_embeddings": model.prompt_encoder.saved_embeddings().float()}
    return write_adapter_files(path, peft_config, tensors)


def load_prompt_adapter(model, path):
    """Attach a PEFT-format prompt/P-tuning/prefix adapter (ours or PEFT's) to `model`, in place; returns the model."""
    config, tensors = read_adapter_files(path)
    method = METHOD_OF.get(config.get("peft_type"))
    if method is None:
        raise UserError(f"{path}: peft_type={config.get('peft_type')!r} is not a prompt method "
                         f"({', '.join(METHOD_OF)})")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{path}: task_type={config['task_type']!r}; only CAUSAL_LM adapters fit our models")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise UserError(f"{path}: num_transformer_submodules={config['num_transformer_submodules']} is an "
                         f"encoder-decoder adapter; our models are decoders (1)")
    if config.get("modules_to_save"):
        raise UserError(f"{path}: modules_to_save={config['modules_to_save']} is not supported with prompt methods")
    expected = peft_dims(model, method)
    found = (config.get("token_dim"), config.get("num_attention_heads"), config.get("num_layers"))
    if found != expected:
        raise UserError(f"{path}: adapter made for token_dim, num_attention_heads, num_layers = {found}; this "
                         f"model has {expected}: a different base model")
    if set(tensors) != {"prompt_embeddings"}:
        raise UserError(f"{path}: expected one tensor 'prompt_embeddings', found {sorted(tensors)}")
    ours = PromptConfig(method=method, num_virtual_tokens=config["num_virtual_tokens"],
                        encoder_type=config.get("encoder_reparameterization_type") or "MLP")
    apply_prompt(model, ours, inference_mode=True)
    table = model.prompt_encoder.embedding.weight
    if tensors["prompt_embeddings"].shape != table.shape:
        remove_prompt(model)
        raise UserError(f"{path}: prompt_embeddings has shape {tuple(tensors['prompt_embeddings'].shape)}, "
                         f"the model expects {tuple(table.shape)}")
    with torch.no_grad():
        table.copy_(tensors["prompt_embeddings"])
    return model
