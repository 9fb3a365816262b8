"""HellaSwag: can the model pick the right one of four endings? The benchmark build-nanogpt tracks in training.

An example is a context ("A man is sitting on a roof. He") and four endings, one of them right. The model
scores each ending by its cross-entropy loss on the ending's tokens given the context: no prompt, no
training, just "which continuation does the model find least surprising". Two accuracies:
    acc       argmin of the *summed* loss over the ending's tokens (favours short endings: fewer terms)
    acc_norm  argmin of the *mean* loss per ending token (length-normalised; the number usually quoted)
Reference acc_norm on the 10,042 val examples: GPT-2 124M 0.2955, GPT-3 Small 0.337; chance is 0.25.
eval_hellaswag.py runs it on any model; train.py every `hellaswag_every` steps (evals/in_training.py).
"""
import json
import urllib.request
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from tools.atomic import atomic_path
from tokenization import load_tokenizer
from tools.errors import UserError

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("train", "val", "test")
NUM_ENDINGS = 4


class DownloadError(UserError, OSError):
    """A download that failed (no network, a wrong URL): the user's to fix, in one line; an OSError like urllib's."""


# ---- data ----------------------------------------------------------------------------------------
def download(split, data_dir="data/hellaswag", base_url=BASE_URL, progress=True):
    """Path of hellaswag_{split}.jsonl in data_dir, downloaded from base_url the first time.

    base_url is anything urllib opens (https://..., or file:///some/folder in the tests).
    """
    if split not in SPLITS:
        raise UserError(f"HellaSwag split {split!r} does not exist: use one of {SPLITS}")
    path = Path(data_dir) / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    url = f"{base_url.rstrip('/')}/hellaswag_{split}.jsonl"
    failed = f"could not download {url}"
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except OSError as e:  # urllib's URLError/HTTPError are OSErrors
        raise DownloadError(f"{failed}: {e}. Check the network, or download the file yourself and pass it with "
                            f"--file") from e
    # atomic: an interrupted download leaves no half file that the next run would take for the data set; a data_dir
    # that cannot be written (read-only, full) is an OSError of its own that names it
    with response, atomic_path(path) as tmp, open(tmp, "wb") as f:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {path.name}", disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:  # the connection dropped
                    raise DownloadError(f"{failed}: {e}. Check the network and run again") from e
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    return path


def check_example(example, where):
    """The example if it has what scoring needs; else a ValueError naming `where` (file:line) and the problem."""
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object with ctx/endings/label, got {type(example).__name__}")
    for key in ("ctx", "endings", "label"):
        if key not in example:
            hint = " (the test split's labels are not public: evaluate on val)" if key == "label" else ""
            raise UserError(f"{where}: missing key {key!r}{hint}")
    if not isinstance(example["ctx"], str) or not example["ctx"]:
        # an empty context would leave the first ending token with nothing to be predicted from
        raise UserError(f"{where}: ctx must be a non-empty string, got {example['ctx']!r}")
    endings = example["endings"]
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: endings must be a list of {NUM_ENDINGS} strings, got {endings!r}")
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: label must be an integer 0..{NUM_ENDINGS - 1}, got {label!r}")
    return example


def load_examples(path, limit=None):
    """The examples of a HellaSwag jsonl file (one JSON object a line), checked; the first `limit` if given."""
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit}: evaluate at least 1 example")
    examples = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(enumerate(f, start=1))
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a text file (HellaSwag files are UTF-8 jsonl): pass the .jsonl "
                             f"file") from None
        for line_number, line in lines:
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(check_example(example, where))
    if not examples:
        raise UserError(f"{path} holds no examples; pass a HellaSwag .jsonl file")
    return examples


# ---- scoring -------------------------------------------------------------------------------------
def render_example(example, encode, max_len=None):
    """One example as the four sequences context + ending_i.

    Returns tokens (4, T) int64, mask (4, T) bool (True on the ending's tokens) and the label. Rows are
    right-padded with token 0 to the longest; the mask is False there, so padding is never scored.
    If the longest row exceeds max_len (the model's block size), context tokens are dropped from the
    left: every ending stays whole and all four see the same (shortened) context.
    """
    context = encode(example["ctx"])
    # " " + ending: GPT-2's BPE attaches the space to the next word, as in running text
    endings = [encode(" " + ending) for ending in example["endings"]]
    longest = max(len(e) for e in endings)
    if max_len is not None and len(context) + longest > max_len:
        keep = max_len - longest
        if keep < 1:
            raise UserError(f"an ending of {longest} tokens leaves no room for context in a block of {max_len} "
                             f"tokens; use a model with a longer block_size")
        context = context[-keep:]
    T = len(context) + longest
    tokens = torch.zeros((NUM_ENDINGS, T), dtype=torch.long)
    mask = torch.zeros((NUM_ENDINGS, T), dtype=torch.bool)
    for i, ending in enumerate(endings):
        row = context + ending
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(context):len(row)] = True
    return tokens, mask, example["label"]


def stack_rendered(rendered):
    """Several rendered examples as one batch: tokens, mask (4 * N, T) right-padded to the longest row."""
    T = max(tokens.size(1) for tokens, _, _ in rendered)
    tokens = torch.zeros((NUM_ENDINGS * len(rendered), T), dtype=torch.long)
    mask = torch.zeros((NUM_ENDINGS * len(rendered), T), dtype=torch.bool)
    for i, (t, m, _) in enumerate(rendered):
        rows = slice(NUM_ENDINGS * i, NUM_ENDINGS * (i + 1))
        tokens[rows, :t.size(1)] = t
        mask[rows, :m.size(1)] = m
    return tokens, mask


def completion_losses(model, tokens, mask):
    """Summed and mean cross-entropy over the masked tokens of each row: two (R,) float32 tensors.

    Causal attention is why right-padding is harmless: position t only sees tokens <= t, so the pads after
    an ending change nothing before them, and the mask keeps the pads' own losses out.
    """
    logits, _ = model(tokens)  # (R, T, V)
    # logits at position t predict token t + 1: score token t + 1 where it belongs to the ending
    targets, target_mask = tokens[:, 1:], mask[:, 1:]  # (R, T - 1)
    scored_logits = logits[:, :-1][target_mask]  # (M, V): only the ending positions, M = target_mask.sum()
    token_losses = F.cross_entropy(scored_logits.float(), targets[target_mask], reduction="none")  # (M,)
    row_of_token = target_mask.nonzero()[:, 0]  # (M,) which row each scored token belongs to
    sum_loss = torch.zeros(tokens.size(0), device=tokens.device).index_add_(0, row_of_token, token_losses)  # (R,)
    return sum_loss, sum_loss / target_mask.sum(1)


def score_examples(model, examples, device, encode=None, batch_examples=4, progress=False, amp=True):
    """Per-ending losses of every example: sum_loss, mean_loss (N, 4) float32 and labels (N,), on the CPU.

    `batch_examples` examples (4 rows each) go through the model in one forward. amp: bf16 autocast on CUDA
    (ignored elsewhere: never bf16 on the CPU).
    """
    if batch_examples < 1:
        raise UserError(f"batch_examples must be >= 1, got {batch_examples}")
    encode = encode or partial(load_tokenizer().encode, add_special_tokens=False)  # default: GPT-2's
    max_len = getattr(model, "max_seq_len", None)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    sums, means, labels = [torch.zeros(0, NUM_ENDINGS)], [torch.zeros(0, NUM_ENDINGS)], []
    with tqdm(total=len(examples), unit="ex", desc="hellaswag", disable=not progress) as bar:
        for start in range(0, len(examples), batch_examples):
            rendered = [render_example(ex, encode, max_len) for ex in examples[start:start + batch_examples]]
            tokens, mask = stack_rendered(rendered)
            with torch.no_grad(), autocast:
                sum_loss, mean_loss = completion_losses(model, tokens.to(device), mask.to(device))
            sums.append(sum_loss.view(-1, NUM_ENDINGS).cpu())  # (n, 4)
            means.append(mean_loss.view(-1, NUM_ENDINGS).cpu())  # (n, 4)
            labels += [label for _, _, label in rendered]
            bar.update(len(rendered))
    return torch.cat(sums), torch.cat(means), torch.tensor(labels, dtype=torch.long)


def evaluate(model, examples, device, encode=None, batch_examples=4, rank=0, world_size=1, progress=False,
             amp=True):
    """HellaSwag accuracy of `model` (called as `logits, loss = model(idx)`) on `examples`.

    Under DDP or FSDP every rank scores examples[rank::world_size] and the counts are summed over ranks, so all
    ranks return the totals. encode: text -> token ids (default GPT-2's); pass another tokenizer's for
    models trained with it. The model is put in eval mode (no dropout) and back afterwards.
    Returns dict(acc, acc_norm, n, correct, correct_norm).
    """
    if not examples:
        raise UserError("evaluate: no examples to score")
    shard = examples[rank::world_size]
    # every rank runs the same number of forwards (an FSDP model needs all ranks in each): a shorter shard scores
    # extra copies of examples[0] that are then dropped
    padding = [examples[0]] * (-(-len(examples) // world_size) - len(shard))
    was_training = model.training
    model.eval()
    try:
        sum_loss, mean_loss, labels = score_examples(model, shard + padding, device, encode, batch_examples,
                                                     progress and rank == 0, amp)
    finally:
        model.train(was_training)
    sum_loss, mean_loss, labels = sum_loss[:len(shard)], mean_loss[:len(shard)], labels[:len(shard)]
    correct = (sum_loss.argmin(1) == labels).sum().item()
    correct_norm = (mean_loss.argmin(1) == labels).sum().item()
    counts = torch.tensor([len(shard), correct, correct_norm], dtype=torch.long, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)  # sum over ranks (nccl needs the tensor on this rank's GPU, hence device)
    n, correct, correct_norm = counts.tolist()
    return dict(acc=correct / n, acc_norm=correct_norm / n, n=n, correct=correct, correct_norm=correct_norm)
