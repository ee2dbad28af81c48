"""LoRA expert for two-digit addition trained with configs/math.py's REINFORCE recipe: the
paper's Table 4 comparison (LoRA under the policy gradient that trains SVF).

  python -m t2jax.train --config configs/math_lora_rl.py [--workdir runs/math_lora_rl]

Rollouts, rewards, KL and steps are the SVF expert's; only what is trained (LoRA rank 16,
alpha 32, dropout 0.05 on the same MLP projections) and its learning rate differ.
"""

import os

from t2jax.config_defaults import config_module

math_config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "math.py"))


def get_config():
  c = math_config.get_config()
  c.adapter = "lora"
  c.lr = 2e-4
  return c
