"""Sample from a trained model, with nanoGPT's sample.py conventions.

    python sample.py --init_from=out-shakespeare --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=out-sft-speakers/adapter --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=models/smollm2-135m-instruct --chat --start="What is LoRA?" --num_samples=1
    python sample.py --init_from=SmolLM2-135M-Instruct.Q4_1.gguf --chat --start="What is LoRA?"

init_from is one of:
    a training out_dir (ckpt.pt)           the model it trained (a LoRA run: its base with the adapter)
    a LoRA adapter folder (adapter_config.json, PEFT format): its base from base_model_name_or_path (or --base)
    a Hugging Face folder (config.json)    GPT-2, LLaMA or Gemma 3, by its model_type
    a .gguf file (llama.cpp)               LLaMA or Gemma 3, dequantized (formats/gguf.py)
The text goes through the model's own tokenizer (tokenization.load_tokenizer: GPT-2's, or the tokenizer.json of the
folder or the tokenizer of the .gguf file the model came from). --chat wraps the prompt as one user message in the
model's chat template (chat.py).
A sample ends at EOS or after max_new_tokens; with num_samples=1 the tokens stream to stdout as they come.
"""
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from tools.errors import UserError

# -----------------------------------------------------------------------------------------------
init_from = "out"  # out_dir | adapter folder | Hugging Face folder | .gguf file
base = ""  # an adapter's base, when its adapter_config.json names none (or another copy of it)
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 0 = greedy
top_k = 200  # 0 = off
top_p = 1.0  # nucleus sampling; 1.0 = off
seed = 1337
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on CUDA, else float32) | 'float32' | 'bfloat16' | 'float16'
compile = False
chat = False  # wrap the prompt in the chat template (the model's own, else the plain one)
# -----------------------------------------------------------------------------------------------


def model_kind(path):
    """'gguf' | 'out_dir' | 'adapter' | 'hf', or a one-line error naming what it lacks."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if (path / "ckpt.pt").is_file():
        return "out_dir"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    what = "a folder" if path.is_dir() else "not a folder" if path.exists() else "does not exist"
    raise UserError(f"--init_from={path}: {what}, and none of a training out_dir (ckpt.pt), a LoRA adapter folder "
                     f"(adapter_config.json), a Hugging Face model folder (config.json) or a .gguf file")


def read_start(start):
    """The prompt: --start itself, or the text of the file --start=FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:])
    if path.is_dir():
        raise UserError(f"--start=FILE:{path}: a folder; name a text file holding the prompt")
    if not path.is_file():
        raise FileNotFoundError(f"--start=FILE:{path}: no such file; name a text file holding the prompt")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--start=FILE:{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"the prompt file must be text in UTF-8") from None


def check_settings(s):
    """The flags' values by range, each refused by name; returns (device, dtype)."""
    for name, ok, need in (("num_samples", s.num_samples >= 1, ">= 1"),
                           ("max_new_tokens", s.max_new_tokens >= 1, ">= 1"),
                           ("temperature", math.isfinite(s.temperature) and s.temperature >= 0, "a number >= 0"),
                           ("top_k", s.top_k >= 0, ">= 0 (0 = off)"), ("top_p", 0 < s.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise UserError(f"--{name}={getattr(s, name)!r}: it must be {need}")
    if s.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={s.dtype!r}: use auto, float32, bfloat16 or float16")
    dev = s.device if s.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(dev).type, torch.device(dev).index
    except RuntimeError:
        raise UserError(f"--device={dev!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device={dev}: this machine has no {kind.upper()} device that torch can use; use "
                         f"--device=cpu")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UserError(f"--device={dev}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    dt = s.dtype if s.dtype != "auto" else "bfloat16" if dev.startswith("cuda") else "float32"
    if not dev.startswith("cuda") and dt != "float32":
        raise UserError(f"--dtype={dt} on {dev}: low precision is for CUDA; use --dtype=float32")
    return dev, dt


def main(argv):
    from configurator import configure
    from model.generate import generate
    from tokenization import load_tokenizer
    from tokenization.chat import generation_prompt_ids
    from training.checkpoint import load_model
    argv = ["--chat=True" if a == "--chat" else a for a in argv if a != "--debug"]  # a bare --chat switches it on
    try:
        s = SimpleNamespace(**{**DEFAULTS, **configure(DEFAULTS, argv)})
    except TypeError as e:  # a flag of the wrong type (configurator's TypeError): the user's to fix
        raise UserError(str(e)) from None
    dev, dt = check_settings(s)
    model_kind(s.init_from)
    text = read_start(s.start)  # before the model loads: a bad prompt file fails fast
    model = load_model(s.init_from, base=s.base or None).to(dev).eval()
    tok = load_tokenizer(s.base or s.init_from, model.config.vocab_size)
    ids = generation_prompt_ids(tok, [{"role": "user", "content": text}]) if s.chat else tok.encode(text)
    if not ids:
        raise UserError(f"the prompt is empty ({tok.name} adds no token in front of a text): give --start=TEXT")
    n_new = min(s.max_new_tokens, model.max_seq_len - len(ids))
    if n_new < 1:
        raise UserError(f"the prompt has {len(ids)} tokens: no room left in the model's {model.max_seq_len} positions")
    if s.compile:
        model = torch.compile(model)  # generate() reads max_seq_len and make_kv_cache through it
    autocast = torch.autocast("cuda", dtype=getattr(torch, dt)) if dt != "float32" else nullcontext()
    idx = torch.tensor([ids], dtype=torch.long, device=dev).repeat(s.num_samples, 1)  # (num_samples, T)
    gen = torch.Generator(device=dev).manual_seed(s.seed)
    streamer = Streamer(tok) if s.num_samples == 1 else None
    shown = text + "\n" if s.chat else text  # a chat's reply starts on a line of its own
    print(shown, end="", flush=True)
    with torch.no_grad(), autocast:
        out = generate(model, idx, n_new, s.temperature, s.top_k or None, s.top_p, tok.eos_id, generator=gen,
                       on_token=streamer)
    for i, row in enumerate(out):
        new = row[len(ids):].tolist()
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new  # EOS ends a sample
        if streamer is None:
            print((shown if i else "") + tok.decode(new))
            print("---------------")
    if streamer is not None:
        print()


class Streamer:
    """on_token for generate(): print the new text of one sample as it comes. The whole continuation is decoded
    each time and only what is new is printed: a character may take several byte-level tokens."""

    def __init__(self, tok):
        self.tok, self.new, self.printed, self.ended = tok, [], "", False

    def __call__(self, token):  # token (1, 1)
        if self.ended or token.item() == self.tok.eos_id:
            self.ended = True
            return
        self.new.append(token.item())
        text = self.tok.decode(self.new)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


DEFAULTS = {k: v for k, v in dict(globals()).items() if k in (
    "init_from", "base", "start", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
    "device", "dtype", "compile", "chat")}

if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
