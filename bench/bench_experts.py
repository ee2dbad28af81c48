"""The experts a bench runs with: the ones given as label=DIR, and for math, code and reasoning
not given an expert whose z is drawn around the identity (so a bench needs no trained run)."""

from __future__ import annotations

import dataclasses

import numpy as np


def load_or_draw(model, spec: str) -> tuple[dict, dict]:
  """(label → Expert, label → its DIR or "random") for `spec` ("label=DIR,..." or ""): the
  given experts in spec order, then the drawn ones."""
  # pylint: disable=import-outside-toplevel
  import t2jax
  from t2jax import adapt_eval

  dirs = adapt_eval.parse_experts(spec) if spec else {}
  rng = np.random.default_rng(0)
  experts = {}
  for name in list(dirs) + [n for n in ("math", "code", "reasoning") if n not in dirs]:
    if name in dirs:
      experts[name] = t2jax.Expert.load(dirs[name])
      continue
    e = t2jax.Expert.init(model, name=name)
    experts[name] = dataclasses.replace(e, z={k: (v * (1 + 0.05 * rng.standard_normal(
        v.shape))).astype(np.float32) for k, v in e.z.items()})
  return experts, {n: dirs.get(n, "random") for n in experts}
