"""Abstract state: params and SVD factors as ShapeDtypeStructs (shapes and dtypes only, the
trees the loaders and svf.decompose build), and what their shardings leave on each device."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from t2jax import targets as targets_lib
from t2jax.models.config import ModelConfig
from t2jax.weights import layout


def abstract_params(cfg: ModelConfig, dtype) -> dict:
  """ShapeDtypeStructs in exactly the tree `weights.layout.assemble` builds from a checkpoint
  (its names, paths and [in, out] kernels), every leaf in `dtype`."""
  params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
  for name, shape in layout.expected_tensors(cfg).items():
    path, layer, transpose = layout.param_path(name)
    node = params if layer is None else params["layers"][layer]
    keys = path if layer is None else path[1:]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(reversed(shape)) if transpose else shape, dtype)
  return params


def abstract_factors(params: dict, targets: str, rank: int | None) -> list:
  """The float32 factors `svf.decompose` returns: per layer {block: {name: {v [n, r], s [r],
  ut [r, m], s_total []}}}."""
  factors: list = [{} for _ in params["layers"]]
  for block, name, layer, (n, m), r in targets_lib.targeted(params, targets, rank):
    factors[layer].setdefault(block, {})[name] = {
        "v": jax.ShapeDtypeStruct((n, r), jnp.float32),
        "s": jax.ShapeDtypeStruct((r,), jnp.float32),
        "ut": jax.ShapeDtypeStruct((r, m), jnp.float32),
        "s_total": jax.ShapeDtypeStruct((), jnp.float32)}
  return factors


def largest_leaves(trees: dict, top: int = 4) -> list[dict]:
  """The `top` biggest per-device holdings, layers summed: which tensor to shard next."""
  groups: dict = {}
  for kind, tree in trees.items():
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      name = re.sub(r"^(layers/)?\d+/", "layers/*/", name)
      entry = groups.setdefault((kind, name), {"tree": kind, "path": name, "bytes": 0,
                                               "spec": str(x.sharding.spec)})
      entry["bytes"] += per_device_bytes(x)
  return sorted(groups.values(), key=lambda e: -e["bytes"])[:top]


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total
