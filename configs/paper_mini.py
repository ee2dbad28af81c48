"""The paper's Tables 1 and 2 in miniature, on the embedded default model, on a 2-core CPU:

  python -m t2jax.reproduce --config configs/paper_mini.py --workdir runs/paper
  make reproduce                     # the same, into runs/paper

Trains the math, code and reasoning experts, the classification expert and the math LoRA
baselines (each as its own config file trains it, with the overrides below), then writes
Table 1 (each expert vs base on its own task's test split, 256 records, the LoRA rows beside
the math expert) and Table 2 (configs/adapt.py: base, each expert,
prompt, cls_expert and few_shot on the unseen targets math_word, HumanEval and the held-out
reasoning family), with 95 % bootstrap intervals. Rerun the same command after an
interruption: finished experts and evaluation cells are kept, an interrupted expert resumes
from its last checkpoint.

The paper (Llama-3-8B-Instruct): experts on GSM8K, MBPP-Pro, ARC-Easy; unseen MATH, HumanEval,
ARC-Challenge. Here the model is 60× smaller and the data procedural (see README).
"""

import os

import ml_collections

from t2jax.config_defaults import config_module

_HERE = os.path.dirname(os.path.abspath(__file__))


def _expert(config: str, prior_step_s: float, prior_eval_s: float, label: str = "",
            **overrides):
  """A training run: its config file, the overrides of its keys (task_args may gain keys),
  priors for the time-left estimate before the run has measured its own pace, and for a
  baseline the label of the expert whose task it is scored on."""
  return ml_collections.ConfigDict({"config": config, "overrides": overrides,
                                    "prior_step_s": prior_step_s,
                                    "prior_eval_s": prior_eval_s, "label": label})


def get_config():
  # evaluation: configs/adapt.py's target tasks and strategies (Table 2)
  c = config_module(os.path.join(_HERE, "adapt.py")).get_config()
  # experts by label (each label names the target task its prompts are dispatched to)
  c.train = ml_collections.ConfigDict({
      "math": _expert("math.py", 30, 120),
      # 256 test problems (Table 1); 20 steps of 8 prompts keep the run near 50 min here
      "code": _expert("code.py", 150, 600, steps=20, batch_size=8, eval_every=10,
                      eval_size=64, test_size=0, task_args={"test_size": 256}),
      "reasoning": _expert("reasoning.py", 80, 300, test_size=0,
                           task_args={"test_size": 256}),
  })
  # the paper's LoRA baselines for the math expert (Table 1: LoRA by next-token prediction;
  # Table 4: LoRA by the policy gradient), scored beside it as rows "ROW" on math
  c.baselines_train = ml_collections.ConfigDict({
      "lora_sft": _expert("math_lora_sft.py", 2, 120, label="math"),
      "lora_rl": _expert("math_lora_rl.py", 30, 120, label="math"),
  })
  # the classification expert (cls_expert strategy); config "" skips it
  c.cls = _expert("cls.py", 150, 300, steps=16, eval_every=8, eval_size=40)
  # few_shot: the 135M model solves almost none of 8 shots (accuracy gave CEM no signal: the
  # score at the mean stayed 0 on math_word and HumanEval), so rank by log p(reference)
  c.few_shot.objective = "loglik"
  c.own_size = 256  # Table 1: test records of each expert's own task (0 = all)
  # time-left estimate before any cell has measured the pace: seconds per record·new token
  c.prior_eval_s_per_unit = 0.004
  return c
