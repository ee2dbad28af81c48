"""The unseen math target (paper: GSM8K → MATH): multi-step word problems (task `math_word`,
t2jax/tasks/math.py), which no expert and no classifier trains on. Score the base model or an
expert on it:

  python -m t2jax.evaluate --config configs/math_word.py --split test [--expert runs/math/expert]

The math expert trains on two-digit sums (configs/math.py); here the same answer format and
reward ("The answer is N.") ask for 2-3 chained steps read from a story. The real-data option
is GSM8K-format JSONL: --config.task=gsm8k --config.task_args.train_path=... (test_path too).
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "math_word"
  c.task_args.min_steps = 2
  c.task_args.max_steps = 3
  c.task_args.test_size = 300  # >= 256 scored problems
  c.max_new_tokens = 128  # room to write the steps out before "The answer is N."
  c.eval_batch_size = 32
  c.test_size = 0  # all of them
  return c
