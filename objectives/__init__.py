"""What a run optimises, behind one table: OBJECTIVES, train.py's `objective` -> its row (objectives/objective.py).

    objective  data                                      loss                                    file
    lm         a token stream (fineweb.py)               next-token cross-entropy, every token   lm.py
    sft        task examples (prepare_sft.py)            cross-entropy on the answers only       sft.py
    dpo        preference pairs (prepare_sft.py)         DPO against a reference                 dpo.py
    grpo       prompts with answers (prepare_sft.py)     GRPO on sampled, rewarded completions   grpo.py

A new objective is one file with its row and one entry below; train.py never names one.
"""
from objectives.dpo import DPO
from objectives.grpo import GRPO
from objectives.lm import LM
from objectives.objective import Objective, Run
from objectives.sft import SFT

OBJECTIVES = {o.name: o for o in (LM, SFT, DPO, GRPO)}

__all__ = ["OBJECTIVES", "Objective", "Run"]
