"""SVF expert for four-option reasoning questions (procedural: orderings, days of the week,
syllogisms, unit conversions, odd one out) on the embedded default model.

  python -m t2jax.train --config configs/reasoning.py [--workdir runs/reasoning] [--config.steps=40]
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "reasoning"
  c.task_args.kinds = ""  # "" = every generator (base model ~16 % greedy, chance is 25 %)
  c.steps = 40
  c.batch_size = 16
  c.samples_per_prompt = 4
  c.max_new_tokens = 64  # a sentence of reasoning, then "The answer is (X)."
  c.temperature = 0.6
  c.kl = "exact"
  c.kl_coef = 0.01
  c.lr = 5e-3
  c.schedule = "cosine"
  c.eval_every = 10
  c.eval_size = 128
  c.test_size = 0  # all 200 test problems
  return c
