"""Which matrices SVF adapts, at what rank, and how their z are named and laid out.

The one place that resolves the default targets, checks a rank, and maps between the two
layouts of z: keyed by HF parameter name ("model.layers.3.mlp.up_proj.weight": [r], how an
Expert stores it and the official code names it) and the per-layer tree the model code takes
([layer]{block: {name: [r]}}, the layout of params["layers"])."""

from __future__ import annotations

import re
from typing import Any, Iterator

import flax.nnx as nnx

DEFAULT_TARGETS = r"mlp/(gate|up|down)_proj"  # what the official code trains


class SVFError(ValueError):
  """An expert or decomposition that does not fit the model it is used with."""


def resolve(targets: str | None) -> str:
  """`targets`, or DEFAULT_TARGETS where it is None or "" (a config's default)."""
  return targets or DEFAULT_TARGETS


def check_rank(rank: int | None) -> int | None:
  if rank is not None and rank < 1:
    raise SVFError(f"rank must be >= 1 or None (full); got {rank}.")
  return rank


def from_config(cfg) -> tuple[str, int | None]:
  """(targets, rank) of a run config, whose targets "" and rank 0 mean the defaults."""
  return resolve(cfg.targets), check_rank(cfg.rank or None)


def target_modules(params: dict, targets: str) -> list[tuple[str, str]]:
  """(block, name) of every projection whose path 'layers/<block>/<name>' matches `targets`."""
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise SVFError(f"targets {targets!r} is not a valid regex: {e}") from None
  layer = params["layers"][0]
  paths = [(block, name) for block in sorted(layer) if isinstance(layer[block], dict)
           for name in sorted(layer[block])]
  found = [(b, n) for b, n in paths if pattern.search(f"layers/{b}/{n}")]
  if not found:
    raise SVFError(f"targets {targets!r} match no projection; paths are "
                   f"{[f'layers/{b}/{n}' for b, n in paths]}.")
  return found


def module_rank(kernel_shape: tuple[int, ...], rank: int | None) -> int:
  """Rank kept for a kernel [n, m]: min(n, m), or `rank` if smaller."""
  full = min(kernel_shape[-2:])
  return full if rank is None else min(int(rank), full)


def targeted(params: dict, targets: str,
             rank: int | None) -> Iterator[tuple[str, str, int, tuple[int, int], int]]:
  """(block, name, layer, kernel shape (n, m), kept rank r) of every targeted matrix of
  per-layer params (concrete or abstract), one projection over all layers, then the next."""
  for block, name in target_modules(params, targets):
    for layer, p in enumerate(params["layers"]):
      shape = tuple(p[block][name]["kernel"].shape)
      yield block, name, layer, shape, module_rank(shape, rank)


def hf_module_name(block: str, name: str, layer: int) -> str:
  return f"model.layers.{layer}.{block}.{name}.weight"


def hf_from_tree(z_tree: list) -> dict[str, Any]:
  """A per-layer z tree → {HF parameter name: z}."""
  return {hf_module_name(block, name, layer): z
          for layer, z_layer in enumerate(z_tree)
          for block, names in z_layer.items() for name, z in names.items()}


def tree_from_hf(z: dict[str, Any], params: dict, targets: str) -> list:
  """{HF parameter name: z} → the per-layer z tree of the projections `targets` picks in
  per-layer `params` (a name it lacks raises KeyError; check the expert first)."""
  modules = target_modules(params, targets)
  tree: list = [{} for _ in params["layers"]]
  for layer, z_layer in enumerate(tree):
    for block, name in modules:
      z_layer.setdefault(block, {})[name] = z[hf_module_name(block, name, layer)]
  return tree


def hf_from_state(z_state) -> dict:
  """nnx.state(model, nnx.Param) of an SVF model (svf.apply) → {HF parameter name: z}."""
  out = {}
  for path, leaf in nnx.to_flat_state(z_state):
    if path[0] != "layers" or path[-1] != "z" or len(path) not in (4, 5):
      raise SVFError(f"{'/'.join(map(str, path))} is not an SVF z.")
    if len(path) == 5:  # layers/<i>/<block>/<name>/z
      out[hf_module_name(path[2], path[3], int(path[1]))] = leaf[...]
    else:  # a scanned model: layers/<block>/<name>/z, [L, r]
      for i, z in enumerate(leaf[...]):
        out[hf_module_name(path[1], path[2], i)] = z
  return out
