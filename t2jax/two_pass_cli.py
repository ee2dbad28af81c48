"""The two-pass command-line flags shared by t2jax.generate, t2jax.serve and t2jax.export:
experts, strategy and the strategy's inputs, parsed and loaded in one place.

Its own module (not t2jax/generate.py) because importing the submodule t2jax.generate rebinds
the package's t2jax.generate (the function) to that module.
"""

from __future__ import annotations

import os


def add_two_pass_args(group):
  """The two-pass flags (experts, strategy and its inputs) of generate and serve."""
  group.add_argument("--experts", default=None, help="LABEL=DIR,... experts saved by t2jax.train")
  group.add_argument("--strategy", default="prompt", choices=("prompt", "cls_expert", "few_shot"))
  group.add_argument("--cls-expert", default=None, help="classification expert dir (cls_expert)")
  group.add_argument("--alpha", default=None, help="few_shot: a JSON file written by the adapt "
                     "evaluation, or one weight per expert in --experts order, e.g. 0.7,0.3")
  group.add_argument("--threshold", type=float, default=0.0, help="max p(label) below this → "
                     "the p-weighted mixture of all experts")
  return group


def load_two_pass(args) -> tuple[dict, dict]:
  """(experts by label, the strategy's keyword inputs: cls_expert or alpha and matrices) from
  the two-pass flags; ({}, {}) without --experts."""
  if not args.experts:
    for flag in ("cls_expert", "alpha"):
      if getattr(args, flag):
        raise ValueError(f"--{flag.replace('_', '-')} needs --experts.")
    return {}, {}
  import t2jax  # pylint: disable=import-outside-toplevel
  from t2jax import adapt_eval  # pylint: disable=import-outside-toplevel
  if args.strategy == "cls_expert" and not args.cls_expert:
    raise ValueError("--strategy cls_expert needs --cls-expert DIR.")
  if args.strategy == "few_shot" and not args.alpha:
    raise ValueError("--strategy few_shot needs --alpha (a file or weights).")
  experts = {k: t2jax.Expert.load(v) for k, v in adapt_eval.parse_experts(args.experts).items()}
  kw = {}
  if args.strategy == "cls_expert":
    kw["cls_expert"] = t2jax.Expert.load(args.cls_expert)
  if args.strategy == "few_shot":
    kw["alpha"], kw["matrices"] = parse_alpha(args.alpha, list(experts))
  return experts, kw


def parse_alpha(spec: str, names: list[str]):
  """--alpha as a file from adapt.save_alpha (its experts must be --experts, in order) or as
  comma-separated weights; returns (alpha, matrices)."""
  from t2jax import adapt  # pylint: disable=import-outside-toplevel
  if os.path.isfile(spec):
    alpha, saved, matrices = adapt.load_alpha(spec)
    if saved != names:
      raise ValueError(f"--alpha {spec} weights experts {saved}; --experts gives {names} (same "
                       "labels in the same order).")
    return alpha, matrices
  try:
    alpha = [float(x) for x in spec.split(",")]
  except ValueError:
    raise ValueError(f"--alpha {spec!r} is neither a file nor comma-separated numbers.") from None
  if len(alpha) != len(names):
    raise ValueError(f"--alpha has {len(alpha)} weights for {len(names)} experts {names}.")
  return alpha, ()


def mixture_text(weights: dict) -> str:
  """A mixture as `0.70·math + 0.30·code` (per-matrix weights named as such)."""
  if not weights:
    return "base model (other)"
  return " + ".join(f"{w:.2f}·{k}" if isinstance(w, float) else f"per-matrix·{k}"
                    for k, w in weights.items())
