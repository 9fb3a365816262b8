"""objective='lm': language modelling on a token stream (fineweb.py's shards). Every token is a target.

The plain next-token loss of pretraining and of continued pretraining on new text: the row objective.py describes,
with the token loader. Its val split has no end, so an evaluation reads the first eval_iters batches of it.
"""
from loaders.tokens import DataLoaderLite
from objectives.objective import Objective


class LM(Objective):
    name = "lm"

    @classmethod
    def refuse(cls, c):
        if c["eval_iters"] == 0:
            return ("eval_iters=0 is not valid for objective='lm': 0 means the whole val split, which a token stream "
                    "does not have; give a number of batches, e.g. --eval_iters=20")
        return None

    def make_loaders(self):
        c, r = self.c, self.run
        return tuple(DataLoaderLite(c["data_dir"], c["batch_size"], c["block_size"], r.rank, r.world_size, split=s)
                     for s in ("train", "val"))
