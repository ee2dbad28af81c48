"""Pass-1 vs pass-2 wall time of two-pass generation (adapt.two_pass_generate, strategy
"prompt") on the math suite, warm (each shape compiled before it is timed).

    python bench/two_pass.py                                   # experts drawn at random
    python bench/two_pass.py --experts math=runs/math/expert   # code, reasoning drawn
    python bench/two_pass.py --experts math=runs/math/expert,code=runs/code/expert,\\
        reasoning=runs/reasoning/expert --new-tokens 16,256
    python bench/two_pass.py --suite cot --experts math=runs/math_cot/expert

Pass 1 costs the same whatever the experts hold: it scores labels with the base model. Pass 2
depends on them only through when rows stop (EOS): each run reports the mean tokens pass 2
generated. `--suite cot` is configs/adapt.py:cot's step-by-step math suite (the paper's MATH
setting in miniature; pair it with an expert from configs/math_cot.py). `--new-tokens` lists
pass 2's limits (default: the suite's own, 16 direct, 160 step by step); longer ones show the
ratio where generation dominates. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import bench_experts  # beside this script


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--experts", default="",
                 help="label=DIR,...; math, code and reasoning not given are drawn at random")
  p.add_argument("--size", type=int, default=32, help="math test prompts (one batch)")
  p.add_argument("--suite", default="own", choices=("own", "cot"),
                 help="configs/adapt.py's math suite on the math task: direct answers (own), "
                      "or cot (step by step)")
  p.add_argument("--new-tokens", default="",
                 help="comma-separated pass-2 limits; default: the suite's own")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()

  import numpy as np  # pylint: disable=import-outside-toplevel

  import t2jax  # pylint: disable=import-outside-toplevel
  from t2jax import adapt, adapt_eval  # pylint: disable=import-outside-toplevel
  from t2jax.config_defaults import config_module  # pylint: disable=import-outside-toplevel
  from t2jax.tasks import make_task  # pylint: disable=import-outside-toplevel

  model = t2jax.load_model()
  experts, sources = bench_experts.load_or_draw(model, args.experts)
  adapt_cfg = config_module(  # the math suite as configs/adapt.py sets it
      os.path.join(os.path.dirname(__file__), "..", "configs", "adapt.py")).get_config(args.suite)
  task = make_task("math", adapt_cfg.task_args["math"].to_dict())
  chats = [task.messages(r) for r in task.records("test")[:args.size]]

  runs = {}
  limits = args.new_tokens or str(adapt_cfg.max_new_tokens["math"])
  for new in (int(x) for x in limits.split(",")):
    times = []
    for _ in range(args.reps + 1):  # the first call compiles
      out, weights, t = adapt.two_pass_generate(model, chats, experts, strategy="prompt",
                                                max_new_tokens=new, batch_size=len(chats))
      times.append(t)
    best1 = min(t["pass1_s"] for t in times[1:])
    best2 = min(t["pass2_s"] for t in times[1:])
    runs[f"new_{new}"] = {
        "pass1_s": round(best1, 3), "pass2_s": round(best2, 3),
        "pass1_fraction": round(best1 / best2, 3),
        "pass2_tokens_mean": round(float(np.mean([len(x) for x in out.token_ids])), 1),
        "dispatch": {lab: sum(adapt_eval.chosen_label(w) == lab for w in weights)
                     for lab in list(experts) + ["other"]}}
  print(json.dumps({"suite": args.suite or "direct", "prompts": len(chats),
                    "experts": sources,
                    "machine": f"{platform.machine()} {os.cpu_count()} cpus", "runs": runs},
                   indent=1))


if __name__ == "__main__":
  main()
