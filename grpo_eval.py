"""The held-out greedy accuracy of a GRPO run, at its first and last evaluation, from its log.jsonl.

    python grpo_eval.py out-grpo-arithmetic

eval_reward is the mean reward of each val prompt's greedy completion: with grpo_reward 'exact' or 'numeric', the
fraction answered right. Its first evaluation (step 0) is the model before any step: with a fresh LoRA adapter, the
base itself.
"""
import sys

from tools.errors import UserError
from training.run_dir import read_log


def accuracy_summary(out_dir):
    """'held-out greedy accuracy: 0.225 at step 0, 0.475 at step N' from a run's log.jsonl."""
    path, records = read_log(out_dir, "grpo")
    seconds = sum(r.get("dt_ms") or 0.0 for r in records)
    evals = [r for r in records if "eval_reward" in r]
    if not evals:
        raise UserError(f"{path} has no eval_reward of a GRPO run: run with objective='grpo' and eval_interval > 0")
    first, last = evals[0], evals[-1]
    return (f"held-out greedy accuracy (eval_reward): {first['eval_reward']:.3f} at step {first['step']}, "
            f"{last['eval_reward']:.3f} at step {last['step']} ({seconds / 1000 / 60:.1f} min of training steps)")


if __name__ == "__main__":  # python grpo_eval.py OUT_DIR
    from tools.errors import report_user_errors
    args = report_user_errors(sys.argv[1:])
    print(accuracy_summary(args[0] if args else "out-grpo-arithmetic"))
