"""The held-out reward accuracy of a DPO run, at its first and last evaluation, from its log.jsonl.

    python dpo_eval.py out-dpo-shakespeare
"""
import sys

from tools.errors import UserError
from training.run_dir import read_log


def reward_accuracy_summary(out_dir):
    """'held-out reward accuracy: 0.500 before, 0.870 after (step N)' from a run's log.jsonl."""
    path, records = read_log(out_dir, "dpo")
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    if not evals:
        raise UserError(f"{path} has no val metrics of a DPO run: run with objective='dpo' and eval_interval > 0")
    first, last = evals[0], evals[-1]
    return (f"held-out reward accuracy: {first['eval_rewards/accuracies']:.3f} at step {first['step']}, "
            f"{last['eval_rewards/accuracies']:.3f} at step {last['step']} (margin {last['eval_rewards/margins']:.3f})")


if __name__ == "__main__":  # python dpo_eval.py OUT_DIR: the held-out reward accuracy of a DPO run, first and last eval
    from tools.errors import report_user_errors
    args = report_user_errors(sys.argv[1:])
    print(reward_accuracy_summary(args[0] if args else "out-dpo-shakespeare"))
