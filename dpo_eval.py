"""The held-out reward accuracy of a DPO run, at its first and last evaluation, from its log.jsonl.

    python dpo_eval.py out-dpo-shakespeare
"""
import json
import sys
from pathlib import Path
from tools.errors import UserError

def reward_accuracy_summary(out_dir):
    """'held-out reward accuracy: 0.500 before, 0.870 after (step N)' from a run's log.jsonl."""
    with open(Path(out_dir) / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_rewards/accuracies" in r]
    if not evals:
        raise UserError(f"{out_dir}/log.jsonl has no val metrics: run with eval_interval > 0")
    first, last = evals[0], evals[-1]
    return (f"held-out reward accuracy: {first['eval_rewards/accuracies']:.3f} at step {first['step']}, "
            f"{last['eval_rewards/accuracies']:.3f} at step {last['step']} (margin {last['eval_rewards/margins']:.3f})")


if __name__ == "__main__":  # python dpo_eval.py OUT_DIR: the held-out reward accuracy of a DPO run, first and last eval
    try:
        print(reward_accuracy_summary(sys.argv[1] if len(sys.argv) > 1 else "out-dpo-shakespeare"))
    except (OSError, ValueError) as e:
        sys.exit(f"dpo_eval.py: {e}")
