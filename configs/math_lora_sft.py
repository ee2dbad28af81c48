"""LoRA expert for two-digit addition trained by next-token prediction on the reference
answers: the paper's LoRA baseline (Table 1) beside configs/math.py's SVF expert.

  python -m t2jax.train --config configs/math_lora_sft.py [--workdir runs/math_lora_sft]

LoRA rank 16, alpha 32, dropout 0.05 on the MLP projections SVF adapts (the paper's LoRA
settings; it put them on q and v: set config.targets to compare that). The reference answer
is "The answer is N." plus the end-of-turn token, so a step is one forward and backward pass
of 16 prompts with no sampling.
"""

import os

from t2jax.config_defaults import config_module

math_config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "math.py"))


def get_config():
  c = math_config.get_config()  # task, sizes and evaluation as the SVF expert's
  c.adapter = "lora"
  c.objective = "sft"
  c.steps = 60  # the per-token NLL fell from 1.4 to ~0.4 in 15 steps of a 120-step try
  c.lr = 2e-4
  c.schedule = "cosine"
  c.warmup_steps = 5
  c.eval_every = 20
  return c
