"""Adaptation evaluation (the paper's Table 2): base, each single expert and the three two-pass
strategies (prompt, cls_expert, few_shot CEM) on target tasks NO expert or classifier trained
on, with 95 % bootstrap intervals, dispatch accuracy and pass-1 / pass-2 wall times. Experts
come from `python -m t2jax.train` runs (configs/math.py, code.py, reasoning.py, cls.py); the
whole pipeline, training included, is `python -m t2jax.reproduce --config configs/paper_mini.py`.

  python -m t2jax.evaluate --config configs/adapt.py \
      --config.experts=math=DIR,code=DIR,reasoning=DIR --config.cls_expert=DIR \
      [--config.baselines=lora_sft:math=DIR,lora_rl:math=DIR] \
      --config.eval_size=N --config.few_shot.iterations=K --workdir W

Target tasks (label = the expert their prompts belong to):
  math      → math_word: multi-step word problems (the math expert trained on two-digit sums)
  code      → humaneval: HumanEval's problems but a fixed few held out as few-shot shots (the
              code expert trained on procedural one-line functions)
  reasoning → reasoning with the question family the reasoning expert never trained on

`--config configs/adapt.py:own` scores the experts' own training tasks instead (test splits);
`:cot` does so with math answered step by step, as configs/math_cot.py trains its expert.
"""

import os

import ml_collections

from t2jax.config_defaults import config_module

_SUITES = ("", "own", "cot")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _config(name: str):
  return config_module(os.path.join(_HERE, name)).get_config()


def held_out_reasoning(train_kinds: str) -> str:
  """The reasoning question families a reasoning expert trained on `train_kinds` never saw."""
  from t2jax.tasks.reasoning import GENERATORS  # pylint: disable=import-outside-toplevel

  trained = {k.strip() for k in train_kinds.split(",") if k.strip()} or set(GENERATORS)
  held_out = sorted(set(GENERATORS) - trained)
  if not held_out:
    raise ValueError("configs/reasoning.py trains on every question family: none is left to "
                     "serve as the unseen reasoning task; set its task_args.kinds.")
  return ",".join(held_out)


def get_config(suite: str = ""):
  if suite not in _SUITES:
    raise ValueError(f"configs/adapt.py:{suite}: unknown math suite; use configs/adapt.py "
                     "(unseen target tasks), :own (the experts' own tasks) or :cot (own tasks, "
                     "math step by step).")
  c = ml_collections.ConfigDict()
  # model (the one every expert was trained on; a mismatch is an error)
  c.model = ""  # "" = the embedded SmolLM2-135M-Instruct; or an HF directory / .gguf file
  c.dtype = "float32"
  # experts
  c.experts = ""  # "label=DIR,...": one expert per task label, e.g. math=runs/math/expert
  # other experts scored beside them, each on its label's task only (not mixed): the paper's
  # LoRA baselines, e.g. lora_sft:math=runs/math_lora_sft/expert (configs/math_lora_sft.py)
  c.baselines = ""  # "ROW:LABEL=DIR,..."
  c.cls_expert = ""  # classification expert dir (configs/cls.py); "" skips cls_expert
  # target tasks: "label=task,..." (a bare name is its own label); settings keyed by label
  trained = {name: _config(f"{name}.py") for name in ("math", "code", "reasoning")}
  if suite:
    c.tasks = "math,code,reasoning"
    c.task_args = ml_collections.ConfigDict({n: t.task_args.to_dict() for n, t in trained.items()})
    c.max_new_tokens = ml_collections.ConfigDict({n: t.max_new_tokens
                                                  for n, t in trained.items()})
  else:
    c.tasks = "math=math_word,code=humaneval,reasoning=reasoning"
    # the reasoning target: the reasoning task as its expert trains it (prompt, answer
    # format), restricted to the families configs/reasoning.py leaves out of training (so out
    # of cls's prompts too); no train split (nothing trains on it), val gives CEM its shots
    reasoning_args = trained["reasoning"].task_args.to_dict()
    reasoning_args.update(kinds=held_out_reasoning(reasoning_args.get("kinds", "")),
                          train_size=0, val_size=64, test_size=256)
    c.task_args = ml_collections.ConfigDict({
        "math": {},
        "code": {"shots_held_out": 8},  # 156 problems scored; 8 fixed ones are CEM's shots
        "reasoning": reasoning_args})
    # official: 512 (1024 for MATH); HumanEval bodies run to ~200 tokens
    c.max_new_tokens = ml_collections.ConfigDict({
        "math": 64, "code": 256, "reasoning": trained["reasoning"].max_new_tokens})
  if suite == "cot":
    cot = config_module(os.path.join(_HERE, "math_cot.py"))
    c.task_args.math.system_prompt = cot.SYSTEM_PROMPT
    c.max_new_tokens.math = cot.MAX_NEW_TOKENS
  c.strategies = "base,experts,prompt,cls_expert,few_shot"  # what to score
  c.eval_size = 256  # test records per task (0 = all); HumanEval has 156 to score
  c.eval_batch_size = 32  # rows per pass-2 batch (and per pass-1 batch)
  # pass 1 (fidelity switches): "ours" (instruction + question in one user turn) or "official"
  # (the official code's system prompt, word for word); both score the labels after \boxed{
  c.dispatch_prompt = "ours"
  c.calibrated = True  # divide p(label) by p(label | content-free question) (adapt.calibrate)
  c.threshold = 0.0  # max p(label) below this → p-weighted mixture of all experts (0 = off)
  # few-shot CEM over α on the simplex (official: population 32, 6 elites, std 0.5, one α per
  # expert per matrix, 10-20 shots)
  c.few_shot = ml_collections.ConfigDict()
  c.few_shot.shots = 8  # records of the target task's train/val (HumanEval: the held-out 8)
  c.few_shot.split = "val"  # train | val
  c.few_shot.population = 16
  c.few_shot.elites = 4
  c.few_shot.iterations = 6
  c.few_shot.init_std = 0.5
  c.few_shot.per_matrix = False  # one α per expert (False) or per expert per targeted matrix
  # accuracy | reward (ties: the log-likelihood of the reference answer, the paper's rule) |
  # loglik (rank by that log-likelihood alone: no generation per candidate; a signal where a
  # small model solves no shot)
  c.few_shot.objective = "accuracy"
  # rows per forward pass of the tie rule's log p(reference): [rows, tokens, vocab] logits
  c.few_shot.loglik_batch_size = 16
  c.mesh = "data:-1,fsdp:1,tensor:1"
  c.seed = 0
  return c
