"""objective='sft': supervised fine-tuning on task examples (prepare_sft.py's folders). Only answers are targets.

Each example is a prompt and its answer (or a chat whose assistant turns are the answers); y is -1 everywhere
else, so the loss is the mean over answer tokens only. With packing=True several examples share a row, each
attending only to itself (block-diagonal attention through position_ids restarting at 0, model/attention.py);
packing=False puts one example on a row, padded. Micro-batches hold different numbers of answer tokens, and the
step's gradient is the mean over all of them (objective.py's one rule does exactly that).

Every `eval_generate_every` steps it also decodes the val prompts greedily and scores the answers against the
references (evals/exact_match.py), each rank its share of the prompts: the whole answer (eval_generate_match='exact',
logged as val_exact_match) or its last number ('numeric', val_numeric_match).
"""
from loaders.sft import SFTLoader
from objectives.objective import Objective


class SFT(Objective):
    name = "sft"
    settings = ("packing", "eval_generate_every", "eval_generate_limit", "eval_generate_match")

    @classmethod
    def needs(cls, c):
        return [("packing", "packing=True (objective='sft')")] if c["packing"] else []

    def make_loaders(self):
        c, r = self.c, self.run
        return tuple(SFTLoader(c["data_dir"], c["batch_size"], c["block_size"], r.rank, r.world_size, split,
                               c["packing"], c["seed"]) for split in ("train", "val"))

    def forward_loss(self, model, batch):
        x, y, position_ids = batch  # position_ids: None without packing
        return model(x, y, position_ids=position_ids)[1]

    def extra_evaluations(self, model, step, last_step):
        every = self.c["eval_generate_every"]
        if every == 0 or not (step % every == 0 or last_step):
            return {}
        from evals.exact_match import exact_match, log_key
        from tokenization import load_tokenizer
        val, match, r = self.val_examples, self.c["eval_generate_match"], self.run
        with r.autocast:
            correct, n = exact_match(model, val.examples, load_tokenizer(val.header["tokenizer"]), r.device, r.rank,
                                     r.world_size, self.c["eval_generate_limit"], match=match)
        if r.master:
            print(f"step {step}: val {match} match {correct / n:.4f}")
        return {log_key(match): correct / n}

    def start(self, model, loaders, **run_state):
        self.val_examples = loaders[1]  # the val split's examples, for the exact match
