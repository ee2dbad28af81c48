"""Accuracy of the base model or an expert on a task split, with greedy decoding; with an
adaptation config (configs/adapt.py), the two-pass table of t2jax/adapt_eval.py.

  python -m t2jax.evaluate --config configs/math.py --split test [--expert runs/math/expert]
  python -m t2jax.evaluate --config configs/adapt.py --config.experts=math=DIR,... --workdir W
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import jax
import numpy as np

from t2jax import sampling, sharding


def score(params: dict, prompts: Sequence[list[int]], records: Sequence[dict], *, task, model,
          max_new_tokens: int, batch_size: int, mesh=None) -> dict[str, float]:
  """Greedy completions for every record (prompts: its token ids, records in the same order);
  returns accuracy, mean reward and count. `params` may hold a materialised expert.

  With a `mesh` (params placed on it), every process passes all records: each batch is split
  over the mesh's batch axes, each process scores its rows and the sums are shared."""
  sampler = sampling.Sampler(temperature=0.0, eos_ids=model.eos_ids)
  index, count = (0, 1) if mesh is None else sharding.process_rows(mesh, batch_size)
  per = batch_size // count
  prompt_len = sampling.bucket_length(max(len(p) for p in prompts))  # agreed by every process
  totals = np.zeros(2)  # correct, reward over this process's real rows
  for start in range(0, len(records), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # one shape per eval: pad the last batch
    lo = index * per
    tokens, _ = sampling.run(params, chunk[lo:lo + per], cfg=model.config, sampler=sampler,
                             max_new=max_new_tokens, pad_id=model.pad_id, mesh=mesh,
                             prompt_len=prompt_len)
    mine = range(lo, min(lo + per, real))
    for i, ids in zip(mine, sampling.completion_ids(tokens[:len(mine)], model.eos_ids)):
      text = model.tokenizer.decode(ids, skip_special_tokens=True)
      rec = records[start + i]
      totals += (task.correct(rec, text), task.reward(rec, text))
  if mesh is not None:
    totals = sharding.batch_sum(totals, mesh, batch_size)
  return {"accuracy": float(totals[0] / len(records)), "reward": float(totals[1] / len(records)),
          "count": len(records)}


def _evaluate(f) -> dict:
  import t2jax  # pylint: disable=import-outside-toplevel
  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  expert = t2jax.load_expert(f.expert) if f.expert else None
  cfg = run_setup.for_expert(f.config, expert)
  setup = run_setup.prepare(cfg)
  records = run_setup.eval_subset(setup.task.records(f.split), f.limit)
  setup.place(sharding.make_mesh(cfg.mesh))
  params = setup.params
  if f.expert:
    params = setup.adapted_params(setup.load_expert(f.expert))
  result = score(params, setup.encode(records), records, task=setup.task, model=setup.model,
                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                 mesh=setup.mesh)
  return {"split": f.split, "expert": f.expert, **result}


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")
  flags.DEFINE_string("expert", None, "expert directory (default: the base model)")
  flags.DEFINE_string("split", "test", "train | val | test")
  flags.DEFINE_integer("limit", 0, "evaluate N records drawn as training does (0 = all)")
  flags.DEFINE_string("workdir", None, "adaptation configs: where results.json/.md/.png go")
  flags.mark_flag_as_required("config")

  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  def run(f):
    if "experts" in f.config:  # an adaptation config: the two-pass table
      from t2jax import adapt_eval  # pylint: disable=import-outside-toplevel
      if not f.workdir:
        raise ValueError("an adaptation config (configs/adapt.py) needs --workdir for "
                         "results.json, results.md and results.png.")
      adapt_eval.run(f.config, f.workdir)
      return
    result = _evaluate(f)
    if jax.process_index() == 0:
      print(json.dumps(result))

  return run_setup.run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
