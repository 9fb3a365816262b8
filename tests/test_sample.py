"""sample.py on the three kinds of folder it takes, greedy output checked against transformers and PEFT."""
import pytest
import torch

import sample
from training.checkpoint import save_checkpoint
from lora import LoRAConfig, apply_lora, save_adapter
from model import GPT, GPTConfig
from tokenization.tokenizer import EOT, gpt2_encoding

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
PROMPT = "ROMEO:"


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)).eval()


def greedy_reference(hf_model, n_new=8):
    """transformers' greedy continuation of PROMPT (EOT-opened, as our documents), up to EOS, as text."""
    ids = torch.tensor([[EOT] + gpt2_encoding().encode_ordinary(PROMPT)])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=EOT, pad_token_id=EOT)
    new = out[0, ids.size(1):].tolist()
    return PROMPT + gpt2_encoding().decode(new[:new.index(EOT)] if EOT in new else new)


def run_sample(capsys, folder, *flags):
    sample.main([f"--init_from={folder}", f"--start={PROMPT}", "--temperature=0", "--max_new_tokens=8",
                 "--device=cpu", *flags])
    return capsys.readouterr().out


def samples_of(out):
    """The printed samples: the lines between the settings sample.py echoes and the separators."""
    text = "\n".join(line for line in out.splitlines() if not line.startswith("overriding"))
    return [s.strip("\n") for s in text.split("---------------") if s.strip()]


def test_a_hugging_face_folder_samples_what_transformers_generates(tmp_path, capsys):
    tiny_gpt().save_pretrained(tmp_path / "hf")
    expected = greedy_reference(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval())
    assert samples_of(run_sample(capsys, tmp_path / "hf", "--num_samples=2")) == [expected, expected]


def test_an_adapter_folder_samples_what_peft_generates_on_its_base(tmp_path, capsys):
    base = tiny_gpt()
    base.save_pretrained(tmp_path / "base")
    apply_lora(base, LoRAConfig(r=4, alpha=8, targets=("c_attn", "c_fc")))
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the output
    save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    expected = greedy_reference(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval())
    # num_samples=1 streams the tokens as they come: the same text, printed piece by piece
    assert samples_of(run_sample(capsys, tmp_path / "adapter", "--num_samples=1")) == [expected]


def test_an_out_dir_samples_what_its_model_exported_to_transformers_generates(tmp_path, capsys):
    model = tiny_gpt(seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "out", model, optimizer, 1, {}, {"shard": 0, "position": 0})
    model.save_pretrained(tmp_path / "hf")
    expected = greedy_reference(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval())
    assert samples_of(run_sample(capsys, tmp_path / "out", "--num_samples=1")) == [expected]


def test_a_folder_that_is_none_of_the_three_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of a training out_dir .ckpt.pt., a LoRA adapter folder"):
        sample.main([f"--init_from={tmp_path / 'empty'}"])


def test_chat_wraps_the_prompt_in_the_plain_template_and_prints_the_reply_on_its_own_line(tmp_path, capsys):
    tiny_gpt(seed=2).save_pretrained(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    # the README's plain template for a model without one: <bos>User: {user}\n\nAssistant:
    ids = torch.tensor([[EOT] + gpt2_encoding().encode_ordinary(f"User: {PROMPT}\n\nAssistant:")])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=EOT, pad_token_id=EOT)
    new = out[0, ids.size(1):].tolist()
    reply = gpt2_encoding().decode(new[:new.index(EOT)] if EOT in new else new)
    printed = run_sample(capsys, tmp_path / "hf", "--num_samples=1", "--chat")
    assert samples_of(printed) == [f"{PROMPT}\n{reply}".strip("\n")]


# ---- .gguf files (llama.cpp) --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A tiny Q8_0 .gguf file as llama.cpp writes it (tests/test_gguf.py), and the Hugging Face folder made from it."""
    gguf = pytest.importorskip("gguf")
    from formats.gguf import convert_gguf
    from test_gguf import make_hf_llama, write_gguf
    tmp = tmp_path_factory.mktemp("gguf")
    path = write_gguf(tmp / "tiny.gguf", make_hf_llama(tied=False), gguf.GGMLQuantizationType.Q8_0)
    return path, convert_gguf(path, tmp / "converted")


def transformers_sample(folder, messages=None):
    """transformers' greedy continuation of PROMPT (or of the chat, by the model's template) from `folder`."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = (tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] if messages
           else tok(PROMPT).input_ids)
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id)
    new = out[0, ids.size(1):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, clean_up_tokenization_spaces=False)


def test_a_gguf_file_and_an_out_dir_trained_from_one_sample_what_transformers_generates(gguf_model, tmp_path, capsys):
    from training.checkpoint import load_model
    path, folder = gguf_model
    model = load_model(path)
    save_checkpoint(tmp_path / "out", model, torch.optim.AdamW(model.parameters()), 1, {}, {"shard": 0, "position": 0},
                    base=str(path))  # a run whose base is the .gguf file: its tokenizer is the file's
    expected = (PROMPT + transformers_sample(folder)).strip("\n")
    for spec in (path, tmp_path / "out", folder):
        assert samples_of(run_sample(capsys, spec, "--num_samples=2")) == [expected, expected], spec
    reply = transformers_sample(folder, [{"role": "user", "content": PROMPT}])
    for spec in (path, tmp_path / "out"):  # --chat: the template inside the .gguf file
        printed = run_sample(capsys, spec, "--num_samples=2", "--chat")
        assert samples_of(printed) == [f"{PROMPT}\n{reply}".strip("\n")] * 2
