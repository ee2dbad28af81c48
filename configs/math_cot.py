"""SVF expert for two-digit addition answered step by step: the paper's MATH setting in
miniature (a written-out solution ending in "The answer is N."), for the adapt evaluation's
chain-of-thought math suite (`--config configs/adapt.py:cot`).

  python -m t2jax.train --config configs/math_cot.py [--workdir runs/math_cot] [--config.steps=16]

Greedy, the base model writes ~100 tokens a solution here (max ~145) and gets 8-16 % right;
rollouts are 4× longer than configs/math.py's, so batches are half as large. Measured on 2 CPU
cores: 23.8 min, greedy accuracy val 15.6 → 34.4 % (32), test 7.8 → 45.3 % (64); the expert's
solutions are ~28 tokens ("To find 10 + 16, we need to perform the calculation 10 + 16 = 26.").
"""

import os

from t2jax.config_defaults import config_module

# the recipe is configs/math.py's; only the answer format and the sizes it forces differ
math_config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "math.py"))

SYSTEM_PROMPT = "Solve the problem step by step. End with 'The answer is N.'"
MAX_NEW_TOKENS = 160  # greedy base solutions end by ~145 tokens


def get_config():
  c = math_config.get_config()
  c.task_args.system_prompt = SYSTEM_PROMPT
  c.max_new_tokens = MAX_NEW_TOKENS
  c.steps = 16
  c.batch_size = 8
  c.microbatches = 2  # 32 rollouts of ~200 tokens: two slices keep the update's logits small
  c.eval_every = 8
  c.eval_size = 32
  c.test_size = 64
  c.eval_batch_size = 32
  return c
