"""LoRA on our LLaMA: adapters on all seven projections are interchangeable with PEFT's, and training one leaves
the base model untouched."""
import pytest
import torch

from lora import LoRAConfig, apply_lora, lora_layers, load_adapter, save_adapter
from model import LLaMA, LLaMAConfig
from training.optim import configure_adamw

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_hf_llama(path=None):
    """A random LlamaForCausalLM with GQA (4 query heads, 2 K/V heads); the same weights on every call."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, initializer_range=0.2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    if path is not None:
        hf.save_pretrained(path)
    return hf


def logits_of(model, T=24):
    idx = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def test_our_adapter_on_all_seven_projections_loads_in_peft_with_identical_logits(tmp_path):
    hf = make_hf_llama(tmp_path / "base")
    base_logits = logits_of(hf)
    ours = LLaMA.from_pretrained(tmp_path / "base").eval()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=SEVEN))
    assert len(lora_layers(ours)) == 2 * 7
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init, which would prove nothing
        for _, layer in lora_layers(ours):
            layer.lora_B.normal_(0.0, 0.2)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ref = logits_of(peft_model)
    assert (ref - base_logits).abs().max().item() > 0.1  # the adapter matters
    assert (logits_of(ours) - ref).abs().max().item() < 1e-4


def test_peft_adapter_on_all_seven_projections_loads_into_ours_with_identical_logits(tmp_path):
    make_hf_llama(tmp_path / "base")
    # init_lora_weights=False: PEFT draws lora_B at random too, so the adapter changes the model
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SEVEN), lora_dropout=0.0,
                                  init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(make_hf_llama(), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = LLaMA.from_pretrained(tmp_path / "base").eval()
    base_logits = logits_of(ours)
    load_adapter(ours, tmp_path / "adapter")
    ref = logits_of(peft_model)
    assert (ref - base_logits).abs().max().item() > 0.1
    assert (logits_of(ours) - ref).abs().max().item() < 1e-4


def test_lora_fine_tuning_lowers_the_loss_and_leaves_base_weights_bit_identical():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig(vocab_size=101, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                              max_seq_len=32))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=SEVEN))
    # weight decay 0.1: were a frozen base weight handed to AdamW, decay alone would change it
    optimizer = configure_adamw(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    idx = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(10):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"{k} changed"
