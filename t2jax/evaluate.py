"""Accuracy of the base model or an expert on a task split, with greedy decoding.

  python -m t2jax.evaluate --config configs/math.py --split test [--expert runs/math/expert]
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from t2jax import sampling


def score(params: dict, prompts: Sequence[list[int]], records: Sequence[dict], *, task, model,
          max_new_tokens: int, batch_size: int) -> dict[str, float]:
  """Greedy completions for every record (prompts: its token ids, records in the same order);
  returns accuracy, mean reward and count. `params` may hold a materialised expert."""
  sampler = sampling.Sampler(temperature=0.0, eos_ids=model.eos_ids)
  correct, rewards = [], []
  for start in range(0, len(records), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # one shape per eval: pad the last batch
    tokens, _ = sampling.run(params, chunk, cfg=model.config, sampler=sampler,
                             max_new=max_new_tokens, pad_id=model.pad_id)
    for ids, rec in zip(sampling.completion_ids(tokens[:n], model.eos_ids),
                        records[start:start + n]):
      text = model.tokenizer.decode(ids, skip_special_tokens=True)
      correct.append(task.correct(rec, text))
      rewards.append(task.reward(rec, text))
  return {"accuracy": float(np.mean(correct)), "reward": float(np.mean(rewards)),
          "count": len(records)}


def _evaluate(f) -> dict:
  import t2jax  # pylint: disable=import-outside-toplevel
  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  cfg = f.config
  setup = run_setup.prepare(cfg)
  records = run_setup.eval_subset(setup.task.records(f.split), f.limit)
  params = setup.model.params
  if f.expert:
    params = setup.adapted_params(t2jax.Expert.load(f.expert).z_tree(setup.model))
  result = score(params, setup.encode(records), records, task=setup.task, model=setup.model,
                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
  return {"split": f.split, "expert": f.expert, **result}


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")
  flags.DEFINE_string("expert", None, "expert directory (default: the base model)")
  flags.DEFINE_string("split", "test", "train | val | test")
  flags.DEFINE_integer("limit", 0, "evaluate N records drawn as training does (0 = all)")
  flags.mark_flag_as_required("config")

  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  return run_setup.run_cli(lambda f: print(json.dumps(_evaluate(f))), argv)


if __name__ == "__main__":
  sys.exit(main())
