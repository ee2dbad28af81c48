"""SVF targets: default resolution, rank checks, and the HF-name ↔ per-layer z layouts."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from t2jax import targets as targets_lib
from t2jax.targets import SVFError


def _params(layers: int = 2) -> dict:
  """A per-layer params tree with kernels [in, out] of distinct shapes (no weights needed)."""
  kernel = lambda n, m: {"kernel": np.zeros((n, m), np.float32)}
  return {"embed": kernel(9, 4), "layers": [
      {"input_layernorm": {"scale": np.ones(4)},
       "mlp": {"down_proj": kernel(6, 4), "gate_proj": kernel(4, 6), "up_proj": kernel(4, 6)},
       "self_attn": {"o_proj": kernel(4, 4), "q_proj": kernel(4, 4)}}
      for _ in range(layers)]}


def test_config_defaults_resolve():
  cfg = ml_collections.ConfigDict({"targets": "", "rank": 0})
  assert targets_lib.from_config(cfg) == (targets_lib.DEFAULT_TARGETS, None)
  cfg = ml_collections.ConfigDict({"targets": "self_attn/q_proj", "rank": 3})
  assert targets_lib.from_config(cfg) == ("self_attn/q_proj", 3)
  with pytest.raises(SVFError, match="rank must be >= 1"):
    targets_lib.from_config(ml_collections.ConfigDict({"targets": "", "rank": -2}))


def test_targeted_matrices_and_ranks():
  got = list(targets_lib.targeted(_params(), targets_lib.DEFAULT_TARGETS, rank=5))
  # one projection over every layer, then the next; rank capped by the kernel's min(n, m)
  assert [(b, n, layer, r) for b, n, layer, _, r in got] == [
      ("mlp", "down_proj", 0, 4), ("mlp", "down_proj", 1, 4),
      ("mlp", "gate_proj", 0, 4), ("mlp", "gate_proj", 1, 4),
      ("mlp", "up_proj", 0, 4), ("mlp", "up_proj", 1, 4)]
  assert got[0][3] == (6, 4)
  assert [r for *_, r in targets_lib.targeted(_params(), "q_proj", rank=3)] == [3, 3]
  with pytest.raises(SVFError, match="match no projection"):
    targets_lib.target_modules(_params(), "v_proj")


def test_hf_names_round_trip():
  params = _params(layers=3)
  tree = targets_lib.tree_from_hf(
      {targets_lib.hf_module_name(b, n, layer): np.full(r, layer, np.float32)
       for b, n, layer, _, r in targets_lib.targeted(params, r"(q|up)_proj", None)},
      params, r"(q|up)_proj")
  assert [sorted(t) for t in tree] == [["mlp", "self_attn"]] * 3
  assert tree[2]["self_attn"]["q_proj"].tolist() == [2.0] * 4
  names = targets_lib.hf_from_tree(tree)
  assert sorted(names) == sorted(
      f"model.layers.{i}.{p}.weight" for i in range(3) for p in ("mlp.up_proj",
                                                                  "self_attn.q_proj"))
  assert targets_lib.tree_from_hf(names, params, r"(q|up)_proj")[1]["mlp"]["up_proj"] is \
      names["model.layers.1.mlp.up_proj.weight"]
