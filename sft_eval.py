"""Exact match on an SFT val split: does greedy decoding of each val prompt give the reference answer?

The prompt of a val example is everything before its last trained span (the completion, or the last assistant
reply), the reference is that span without its EOS. The model completes the prompt greedily until EOS; the
example counts as right when the decoded completion equals the reference, both stripped of surrounding whitespace
(--match exact), or when its last number is the reference's (--match numeric: worked answers, scored by the result).

    python sft_eval.py --data data/shakespeare_speakers/sft --model models/smollm2-135m-instruct \
        --model out-sft-speakers
    python sft_eval.py --data data/arithmetic_worked/sft --model models/smollm2-135m-instruct --match numeric

prints the exact match of each model (an out_dir, an adapter folder, a Hugging Face folder or a .gguf file) and of
the trivial baseline that always answers the most frequent training answer (numeric: the most frequent last number
of the training answers). train.py calls exact_match() every `eval_generate_every` steps, each rank on its share of
the prompts, the counts all-reduced.
"""
import argparse
import sys

from evals.exact_match import MATCHES, exact_match, majority_baseline
from loaders.sft import check_tokenizer, read_examples
from tokenization import load_tokenizer
from tools.errors import UserError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a folder prepare_sft.py wrote")
    p.add_argument("--model", action="append", default=[], help="out_dir, adapter folder, HF folder or .gguf file "
                   "(repeatable)")
    p.add_argument("--limit", type=int, default=0, help="only the first N val examples (0 = all)")
    p.add_argument("--match", default="exact", choices=list(MATCHES),
                   help="what must equal the reference: the whole answer (exact) or its last number (numeric)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.limit < 0:
        raise UserError(f"--limit={args.limit}: it must be >= 0 (0 = all)")
    from training.checkpoint import load_model
    header, val = read_examples(args.data, "val")
    _, train = read_examples(args.data, "train")
    for spec in args.model:  # before any model loads: each must read the data's token ids as the data means them
        check_tokenizer(args.data, header, spec)
    val = val[:args.limit or None]
    tok = load_tokenizer(header["tokenizer"])  # the tokenizer prepare_sft.py used
    answer, correct, n = majority_baseline(train, val, tok, args.match)
    print(f"{args.match} match on {n} val examples of {args.data}:")
    print(f"  always {answer!r} (most frequent training answer, by {args.match} match): {correct / n:.3f} "
          f"({correct}/{n})")
    for spec in args.model:
        model = load_model(spec).to(args.device)
        if header["vocab_size"] > model.config.vocab_size:
            raise UserError(f"{args.data} was tokenized with {header['tokenizer']} ({header['vocab_size']} tokens), "
                             f"more than {spec}'s vocab_size {model.config.vocab_size}: prepare it with "
                             f"prepare_sft.py --tokenizer {spec}")
        correct, n = exact_match(model, val, tok, args.device, match=args.match)
        print(f"  {spec}: {correct / n:.3f} ({correct}/{n})")


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
