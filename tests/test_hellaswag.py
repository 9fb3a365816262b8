"""eval_hellaswag.py against hand computations from the model's own unbatched, unpadded losses."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import evals.hellaswag as eval_hellaswag
from conftest import subprocess_env
from evals.hellaswag import download, evaluate, load_examples, render_example, score_examples
from model import GPT, GPTConfig
from tokenization.tokenizer import gpt2_encoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# endings of clearly different token lengths, so the summed loss (favours short) and mean loss can disagree
EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "label": 0, "endings": [
        "is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof.",
        "is ripping level tiles off.", "is holding a rubik's cube while the sun sets slowly behind the hills."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog", "label": 3, "endings": [
        "runs.", "is running around trying to avoid a bath.",
        "gets the bucket and washes it with soap and water, then dries it carefully with a towel.",
        "gets into the bath."]},
    {"ctx": "Baking cookies: preheat the oven. Then", "label": 1, "endings": [
        "you eat the oven.", "mix flour, sugar and butter in a bowl.", "sing.",
        "the kids put on their coats and go outside to play in the snow for an hour or two."]},
    {"ctx": "The weather report says it will rain all day, so she", "label": 2, "endings": [
        "takes an umbrella.", "paints the fence.", "stays inside and reads.", "flies."]},
    {"ctx": "Two kids are playing chess in a park. One of them", "label": 0, "endings": [
        "moves a knight forward.", "eats the board.",
        "climbs a tree and shouts at the passing cars for no particular reason at all.", "wins."]},
    {"ctx": "He opens the fridge and", "label": 3, "endings": [
        "it is empty.", "finds a penguin reading the newspaper inside the vegetable drawer.",
        "closes it.", "takes out a carton of milk."]},
    {"ctx": "The orchestra tunes up, the lights dim and the conductor", "label": 1, "endings": [
        "raises her baton.", "bows.", "forgets the music and leaves the stage.", "orders a pizza for everyone."]},
]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def tiny_gpt(block_size=64, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        # sharpen the (tied) embeddings: a random model with opinions, so losses of endings differ clearly
        model.transformer.wte.weight.mul_(30)
    return model


def hand_losses(model, example, max_len=None):
    """Sum and mean loss of each ending from one unpadded forward per context + ending, via the model's loss."""
    enc = gpt2_encoding()
    context = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    if max_len is not None:  # the documented truncation: drop context from the left, endings stay whole
        context = context[-(max_len - max(len(e) for e in endings)):]
    sums, means = [], []
    for ending in endings:
        ids = torch.tensor([context + ending])  # (1, T)
        targets = ids[:, 1:].clone()
        targets[:, :len(context) - 1] = -1  # only the ending's tokens are scored
        with torch.no_grad():
            _, mean_loss = model(ids[:, :-1], targets)
        means.append(mean_loss.item())
        sums.append(mean_loss.item() * len(ending))
    return torch.tensor(sums), torch.tensor(means)


def hand_predictions(model, examples, max_len=None):
    losses = [hand_losses(model, ex, max_len) for ex in examples]
    return [s.argmin().item() for s, _ in losses], [m.argmin().item() for _, m in losses]


# ---- data ----------------------------------------------------------------------------------------
def test_download_fetches_the_split_once_into_data_dir(tmp_path):
    source = tmp_path / "mirror"
    source.mkdir()
    write_jsonl(source / "hellaswag_val.jsonl", EXAMPLES)
    data_dir = tmp_path / "cache"
    path = download("val", data_dir, base_url=source.as_uri(), progress=False)
    assert path == data_dir / "hellaswag_val.jsonl"
    assert path.read_bytes() == (source / "hellaswag_val.jsonl").read_bytes()
    (source / "hellaswag_val.jsonl").unlink()  # the second call must not go back to the source
    assert download("val", data_dir, base_url=source.as_uri(), progress=False) == path
    assert load_examples(path) == EXAMPLES


def test_failed_download_leaves_no_file_behind(tmp_path):
    data_dir = tmp_path / "cache"
    with pytest.raises(OSError, match="hellaswag_val.jsonl"):
        download("val", data_dir, base_url=(tmp_path / "nowhere").as_uri(), progress=False)
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


def test_download_rejects_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'dev'"):
        download("dev", tmp_path)


def test_limit_keeps_the_first_examples(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", EXAMPLES)
    assert load_examples(path, limit=2) == EXAMPLES[:2]


GOOD = json.dumps(EXAMPLES[0])
MALFORMED = {
    "bad json": ('{"ctx": "A", "endings": [', "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "missing ctx": (json.dumps({"endings": ["a", "b", "c", "d"], "label": 0}), "missing key 'ctx'"),
    "missing endings": (json.dumps({"ctx": "A", "label": 0}), "missing key 'endings'"),
    "missing label": (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"]}), "missing key 'label'"),
    "label too large": (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 4}), "label"),
    "label negative": (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": -1}), "label"),
    "label a string": (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": "1"}), "label"),
    "three endings": (json.dumps({"ctx": "A", "endings": ["a", "b", "c"], "label": 0}), "4 strings"),
    "empty ctx": (json.dumps({"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}), "ctx"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_line_is_reported_with_file_and_line_number(tmp_path, kind):
    line, problem = MALFORMED[kind]
    path = write_jsonl(tmp_path / "h.jsonl", [GOOD, "", line, GOOD])  # the bad one is line 3
    with pytest.raises(ValueError) as error:
        load_examples(path)
    assert f"{path}:3:" in str(error.value)
    assert problem in str(error.value)


# ---- scoring -------------------------------------------------------------------------------------
def test_per_ending_losses_equal_unbatched_hand_computation():
    model = tiny_gpt()
    sum_loss, mean_loss, labels = score_examples(model, EXAMPLES, "cpu", batch_examples=3)
    for i, example in enumerate(EXAMPLES):
        hand_sum, hand_mean = hand_losses(model, example)
        torch.testing.assert_close(sum_loss[i], hand_sum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mean_loss[i], hand_mean, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [ex["label"] for ex in EXAMPLES]


def test_acc_and_acc_norm_count_hand_computed_argmins_and_disagree_on_length():
    model = tiny_gpt()
    by_sum, by_mean = hand_predictions(model, EXAMPLES)
    assert by_sum != by_mean, "fixture must contain an example where summed and mean loss pick differently"
    # label every example with the length-normalised choice: acc_norm is then 100%, acc counts agreements
    examples = [dict(ex, label=pred) for ex, pred in zip(EXAMPLES, by_mean)]
    result = evaluate(model, examples, "cpu", batch_examples=4)
    agree = sum(s == m for s, m in zip(by_sum, by_mean))
    assert result == dict(n=7, correct=agree, correct_norm=7, acc=agree / 7, acc_norm=1.0)
    # and with the dataset's own labels
    result = evaluate(model, EXAMPLES, "cpu", batch_examples=4)
    labels = [ex["label"] for ex in EXAMPLES]
    assert result["correct"] == sum(p == y for p, y in zip(by_sum, labels))
    assert result["correct_norm"] == sum(p == y for p, y in zip(by_mean, labels))


def test_batching_examples_of_different_lengths_does_not_change_their_losses():
    model = tiny_gpt()
    lengths = {render_example(ex, gpt2_encoding().encode_ordinary)[0].size(1) for ex in EXAMPLES}
    assert len(lengths) > 1  # so batching them together really pads
    one_sum, one_mean, _ = score_examples(model, EXAMPLES, "cpu", batch_examples=1)
    all_sum, all_mean, _ = score_examples(model, EXAMPLES, "cpu", batch_examples=len(EXAMPLES))
    assert (one_mean - all_mean).abs().max().item() < 1e-5
    assert (one_sum - all_sum).abs().max().item() < 1e-5 * one_sum.abs().max().item()


def test_long_context_is_cut_from_the_left_and_endings_stay_whole():
    block_size = 32  # the longest ending has 21 tokens: 11 of the ~50 context tokens remain
    model = tiny_gpt(block_size=block_size)
    example = dict(EXAMPLES[1], ctx="Once upon a time there was a long story that went on and on. " * 3 +
                   "A woman is outside with a bucket and a dog. The dog")
    enc = gpt2_encoding()
    tokens, mask, _ = render_example(example, enc.encode_ordinary, max_len=block_size)
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    longest = max(len(e) for e in endings)
    assert tokens.size(1) == block_size
    context = enc.encode_ordinary(example["ctx"])[-(block_size - longest):]
    for row, ending in enumerate(endings):
        assert tokens[row, :len(context) + len(ending)].tolist() == context + ending
        assert mask[row].sum().item() == len(ending)
    sum_loss, mean_loss, _ = score_examples(model, [example], "cpu")
    hand_sum, hand_mean = hand_losses(model, example, max_len=block_size)
    torch.testing.assert_close(mean_loss[0], hand_mean, atol=1e-5, rtol=1e-5)


def test_ending_longer_than_the_block_is_an_error():
    example = dict(EXAMPLES[0], endings=["a b c d e f g h i j k l m n o p q r", "x", "y", "z"])
    with pytest.raises(ValueError, match="block of 8 tokens"):
        render_example(example, gpt2_encoding().encode_ordinary, max_len=8)


def test_evaluate_scores_without_dropout_and_restores_training_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    model.train()
    expected_sum, expected_mean = hand_predictions(model.eval(), EXAMPLES)
    model.train()
    result = evaluate(model, EXAMPLES, "cpu")
    labels = [ex["label"] for ex in EXAMPLES]
    assert result["correct"] == sum(p == y for p, y in zip(expected_sum, labels))
    assert result["correct_norm"] == sum(p == y for p, y in zip(expected_mean, labels))
    assert model.training


# ---- command line, one process and DDP -----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder_and_expected_counts(tmp_path_factory):
    """A tiny GPT-2 saved by transformers, the fixture jsonl, and counts computed with transformers' model."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("hellaswag_cli")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(30)  # tied to lm_head: a model with clear preferences
    hf.save_pretrained(tmp / "model")
    enc = gpt2_encoding()
    by_sum, by_mean = [], []
    for ex in EXAMPLES:
        context = enc.encode_ordinary(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            ids = torch.tensor([context + enc.encode_ordinary(" " + ending)])
            with torch.no_grad():
                logits = hf(ids).logits[0, len(context) - 1:-1]  # the positions predicting the ending
            losses = torch.nn.functional.cross_entropy(logits, ids[0, len(context):], reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        by_sum.append(int(torch.tensor(sums).argmin()))
        by_mean.append(int(torch.tensor(means).argmin()))
    # label every third example with the summed-loss choice, the rest with the mean-loss choice: both counts
    # are then well above chance, they differ, and they need both ranks' shards under DDP
    examples = [dict(ex, label=by_sum[i] if i % 3 == 0 else by_mean[i]) for i, ex in enumerate(EXAMPLES)]
    correct = sum(s == ex["label"] for s, ex in zip(by_sum, examples))
    correct_norm = sum(m == ex["label"] for m, ex in zip(by_mean, examples))
    assert correct != correct_norm
    jsonl = write_jsonl(tmp / "h.jsonl", examples)
    return tmp / "model", jsonl, (correct, correct_norm)


def run_cli(launcher, model_dir, jsonl):
    args = ["eval_hellaswag.py", "--model", str(model_dir), "--file", str(jsonl), "--device", "cpu",
            "--batch_examples", "2"]
    out = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = re.findall(r"^acc: +(\d+)/(\d+) = ", out.stdout, re.M)
    acc_norm = re.findall(r"^acc_norm: +(\d+)/(\d+) = ", out.stdout, re.M)
    assert len(acc) == len(acc_norm) == 1, out.stdout  # printed once: by rank 0 only
    return int(acc[0][0]), int(acc_norm[0][0]), int(acc[0][1])


def test_cli_on_hf_folder_matches_counts_from_transformers_model(hf_folder_and_expected_counts):
    model_dir, jsonl, (correct, correct_norm) = hf_folder_and_expected_counts
    assert run_cli([], model_dir, jsonl) == (correct, correct_norm, len(EXAMPLES))


def test_cli_under_torchrun_with_two_processes_counts_like_one(hf_folder_and_expected_counts):
    model_dir, jsonl, (correct, correct_norm) = hf_folder_and_expected_counts
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # 7 examples: rank 0 scores 4, rank 1 scores 3; the all-reduced counts must cover all 7
    assert run_cli(torchrun, model_dir, jsonl) == (correct, correct_norm, len(EXAMPLES))


def hand_counts(logits_of, encode, examples):
    """(correct, correct_norm) from an independent model's logits: one unpadded forward per context + ending."""
    correct = correct_norm = 0
    for ex in examples:
        context = encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            ending_ids = encode(" " + ending)
            ids = torch.tensor([context + ending_ids])
            with torch.no_grad():
                logits = logits_of(ids)[0, len(context) - 1:-1]  # the positions predicting the ending
            losses = torch.nn.functional.cross_entropy(logits, ids[0, len(context):], reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        correct += int(torch.tensor(sums).argmin()) == ex["label"]
        correct_norm += int(torch.tensor(means).argmin()) == ex["label"]
    return correct, correct_norm


def test_cli_on_an_adapter_folder_scores_like_peft_on_its_base(hf_folder_and_expected_counts, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora import LoRAConfig, apply_lora, save_adapter
    model_dir, jsonl, _ = hf_folder_and_expected_counts
    ours = apply_lora(GPT.from_pretrained(model_dir), LoRAConfig(r=4, alpha=8, targets=("c_attn", "c_fc")))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a trained-looking adapter: it must change the scores
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    examples = [json.loads(line) for line in jsonl.read_text().splitlines()]
    expected = hand_counts(lambda ids: reference(ids).logits, gpt2_encoding().encode_ordinary, examples)
    assert run_cli([], tmp_path / "adapter", jsonl) == (*expected, len(examples))


def test_cli_on_a_llama_folder_uses_its_own_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    # a word-level tokenizer over the fixture's words: far fewer than GPT-2's 50257 tokens
    words = sorted({w for ex in EXAMPLES for text in [ex["ctx"], *ex["endings"]]
                    for w, _ in Whitespace().pre_tokenize_str(text)})
    tokenizer = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(words) + 1, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)  # a model with clear preferences
    hf.save_pretrained(tmp_path / "llama")
    tokenizer.save(str(tmp_path / "llama" / "tokenizer.json"))
    jsonl = write_jsonl(tmp_path / "h.jsonl", EXAMPLES)
    expected = hand_counts(lambda ids: hf(ids).logits, lambda text: tokenizer.encode(text).ids, EXAMPLES)
    assert run_cli([], tmp_path / "llama", jsonl) == (*expected, len(EXAMPLES))


def test_cli_on_a_prefix_tuning_adapter_scores_like_peft_on_its_base(hf_folder_and_expected_counts, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from prompts import PromptConfig, apply_prompt, save_prompt_adapter
    model_dir, jsonl, _ = hf_folder_and_expected_counts
    torch.manual_seed(1)
    ours = apply_prompt(GPT.from_pretrained(model_dir), PromptConfig("prefix", num_virtual_tokens=4))
    save_prompt_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    examples = [json.loads(line) for line in jsonl.read_text().splitlines()]
    expected = hand_counts(lambda ids: reference(input_ids=ids).logits, gpt2_encoding().encode_ordinary, examples)
    assert expected != hand_counts(lambda ids: hf(ids).logits, gpt2_encoding().encode_ordinary, examples)
    assert run_cli([], tmp_path / "adapter", jsonl) == (*expected, len(examples))
