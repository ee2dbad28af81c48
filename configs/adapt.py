"""Adaptation evaluation: on each task's test split, the base model, each single expert and
the three two-pass strategies (prompt, cls_expert, few_shot CEM), with pass-1 and pass-2 wall
times. Experts come from `python -m t2jax.train` runs (configs/math.py, configs/cls.py, ...).

  python -m t2jax.evaluate --config configs/adapt.py \
      --config.experts=math=DIR,code=DIR,reasoning=DIR --config.cls_expert=DIR \
      --config.eval_size=N --config.few_shot.iterations=K --workdir W

`--config configs/adapt.py:cot` scores math step by step, as configs/math_cot.py trains its
expert (the paper's MATH setting in miniature: long written answers); the default math suite
answers directly, as configs/math.py trains.
"""

import os

import ml_collections

from t2jax.config_defaults import config_module

_SUITES = ("", "cot")


def get_config(suite: str = ""):
  if suite not in _SUITES:
    raise ValueError(f"configs/adapt.py:{suite}: unknown math suite; use configs/adapt.py "
                     "(direct answers) or configs/adapt.py:cot (step by step).")
  c = ml_collections.ConfigDict()
  # model (the one every expert was trained on; a mismatch is an error)
  c.model = ""  # "" = the embedded SmolLM2-135M-Instruct; or an HF directory / .gguf file
  c.dtype = "float32"
  # experts
  c.experts = ""  # "label=DIR,...": one expert per task label, e.g. math=runs/math/expert
  c.cls_expert = ""  # classification expert dir (configs/cls.py); "" skips cls_expert
  # evaluation
  c.tasks = "math,code,reasoning"  # target tasks, scored on their test splits
  # task name → task_args: the settings each expert was trained with (configs/math.py)
  c.task_args = ml_collections.ConfigDict({"math": {"level": 2, "system_prompt": ""}})
  c.strategies = "base,experts,prompt,cls_expert,few_shot"  # what to score
  c.eval_size = 128  # test records per task (0 = all)
  c.eval_batch_size = 64  # rows per pass-2 batch (and per pass-1 batch)
  c.calibrated = True  # divide p(label) by p(label | content-free question) (adapt.calibrate)
  c.threshold = 0.0  # max p(label) below this → p-weighted mixture of all experts (0 = off)
  # per task, as each expert was trained (official: 512, 1024 for MATH)
  c.max_new_tokens = ml_collections.ConfigDict({"math": 16, "code": 128, "reasoning": 64})
  if suite == "cot":
    cot = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_cot.py"))
    c.task_args.math.system_prompt = cot.SYSTEM_PROMPT
    c.max_new_tokens.math = cot.MAX_NEW_TOKENS
  # few-shot CEM over α (official: population 32, 6 elites, std 0.5, one α per expert per matrix)
  c.few_shot = ml_collections.ConfigDict()
  c.few_shot.shots = 8  # records of the target task; never from its test split
  c.few_shot.split = "val"  # train | val
  c.few_shot.population = 32
  c.few_shot.elites = 6
  c.few_shot.iterations = 10
  c.few_shot.init_std = 0.5
  c.few_shot.per_matrix = False  # one α per expert (False) or per expert per targeted matrix
  c.few_shot.objective = "accuracy"  # accuracy | reward
  c.mesh = "data:-1,fsdp:1,tensor:1"
  c.seed = 0
  return c
