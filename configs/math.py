"""SVF expert for two-digit addition on the embedded default model, sized to show learning
on a 2-core CPU in under 30 minutes.

  python -m t2jax.train --config configs/math.py [--workdir runs/math] [--config.steps=40]
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "math"
  c.task_args.level = 2  # two-digit addition: the base model gets ~15 % greedy
  c.task_args.system_prompt = ""  # "" = the chat template's own system prompt
  c.steps = 40
  c.batch_size = 16
  c.samples_per_prompt = 4
  c.max_new_tokens = 16
  c.temperature = 0.6  # at 1.0 the 135M model solves ~3 % of samples: too little signal
  c.kl = "exact"
  c.kl_coef = 0.01
  c.lr = 5e-3  # z moves ~0.5 % per step: the format and the sums improve within 10 steps
  c.schedule = "cosine"  # at a constant 5e-3, val accuracy wanders late in the run
  c.eval_every = 10
  c.eval_size = 128
  c.test_size = 256
  return c
