"""SVF classification expert for the two-pass `cls_expert` strategy: RL on prompts drawn from
the TRAIN splits of the source tasks (math, code, reasoning), rewarded +1 when the completion's
\\boxed{label} names the prompt's source (the official code trained it on test splits; we do
not). Its prompt is adapt.py's pass-1 prompt (tasks/cls.py: classification_messages).

  python -m t2jax.train --config configs/cls.py --workdir runs/cls [--config.steps=40]
  python -m t2jax.train --config configs/cls.py --config.task_args.sources=math,code ...

The assistant turn is prefilled with "\\boxed{" (tasks/cls.py: ANSWER_PREFIX), so a rollout
only names the label and closes the brace. The base model rarely names "reasoning" (p ≈ 0.01 on
reasoning prompts), so a group of four samples is almost always all wrong there and a per-group
baseline gives it no gradient; the batch-mean baseline still pushes the wrong labels down.
Measured here with --config.steps=16 --config.eval_every=8 --config.eval_size=40 (50 min on
2 busy cores): greedy label accuracy val 0 → 70 %, test 0 → 67 % (the base model answers
"CATEGORY}"); as the cls_expert of configs/adapt.py it dispatched 96/96 test prompts right.
"""

import os

import ml_collections

from t2jax.config_defaults import base_config, config_module

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = "math,code,reasoning"


def _prompt_args(source) -> dict:
  return {k: v for k, v in source.task_args.to_dict().items() if not k.startswith("reward_")}


def get_config():
  c = base_config()
  c.task = "cls"
  c.task_args.sources = SOURCES  # each source task's name is a label (+ "other")
  c.task_args.per_source = 200  # prompts per label over cls train/val/test (same count per label)
  c.task_args.val_fraction = 0.1
  c.task_args.test_fraction = 0.1
  c.task_args.seed = 0  # which train prompts of each source are drawn
  # task_args of each source task, by name: as configs/<source>.py trains its expert, so the
  # classifier sees only the experts' own training prompts (e.g. only the reasoning families
  # configs/reasoning.py trains on, never the one held out as an unseen target task)
  # (rewards do not change a prompt: a source task's reward settings are left out, so that
  # changing them does not make the classifier a different run)
  c.task_args.source_args = ml_collections.ConfigDict({
      name: _prompt_args(config_module(os.path.join(_HERE, f"{name}.py")).get_config())
      for name in SOURCES.split(",")})
  c.steps = 40
  c.batch_size = 16
  c.samples_per_prompt = 4
  c.microbatches = 4  # 64 rollouts of ~250-token prompts: one slice reached 12.8 GB here
  c.max_new_tokens = 8  # after the prefilled "\boxed{": the label, "}" and the end of turn
  c.temperature = 1.0
  c.baseline = "batch_mean"
  c.kl = "exact"
  c.kl_coef = 0.01
  c.lr = 5e-3
  c.schedule = "cosine"
  c.eval_every = 10
  c.eval_size = 60  # cls val holds per_source · val_fraction records per label
  c.test_size = 0
  return c
