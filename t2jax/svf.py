"""Singular Value Fine-tuning: W = U diag(s) Vᵀ, and an expert z rescales s.

For a targeted projection with kernel K = Wᵀ ([in n, out m]) we keep, per layer (factors and
z are lists with one {block: {name: ...}} dict per layer, like params["layers"]),
  v [n, r] (= V_r), s [r], ut [r, m] (= U_rᵀ), s_total [] (sum of ALL singular values),
so K = v diag(s) ut when r = min(n, m). An expert gives, per matrix, scaled singular values
sz = c·s·f(z) and a scalar c (c = 1 except for the `paper` parametrisation, whose
nuclear-norm rescaling is c = Σs / Σ(s·f(z))). The adapted kernel is
  K' = c·K + v diag(sz − c·s) ut                         (exact: z at identity gives K' = K)
and for r = min(n, m) also K' = v diag(sz) ut, which needs no K at all.

Compute modes (chosen in `choose_mode`, the one place that decides):
  materialised: K' built once per z (n·r·m flops), then the plain dense product. For a z
    shared by many tokens: training steps, single-expert generation.
  factored: y = ((x v) ⊙ sz_row) ut per row; a different z per row of the batch, no K' kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import atomic
from t2jax.cache import cache_dir
from t2jax.models import llama

DEFAULT_TARGETS = r"mlp/(gate|up|down)_proj"  # what the official code trains
PARAMETRISATIONS = ("scale", "paper")
MODES = ("auto", "materialised", "factored")


class SVFError(ValueError):
  """An expert or decomposition that does not fit the model it is used with."""


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


def hf_module_name(block: str, name: str, layer: int) -> str:
  return f"model.layers.{layer}.{block}.{name}.weight"


# ---------------------------------------------------------------------------------------------
# Decomposition (offline, cached on disk).


@dataclasses.dataclass(frozen=True, eq=False)
class Decomposition:
  """factors[layer][block][name] = {"v": [n, r], "s": [r], "ut": [r, m], "s_total": []}."""
  factors: list
  fingerprint: str
  targets: str
  rank: int | None

  def modules(self) -> list[tuple[str, str]]:
    return [(block, name) for block in sorted(self.factors[0])
            for name in sorted(self.factors[0][block])]


def _cache_dir(fingerprint: str, targets: str, rank: int | None) -> str:
  key = hashlib.sha256(f"{fingerprint}|{targets}|{rank}".encode()).hexdigest()[:16]
  return os.path.join(cache_dir("svd"), f"{fingerprint}-{key}")


def _svd_one(kernel_nxm: np.ndarray, r: int) -> dict[str, np.ndarray]:
  # float64 LAPACK: the factored product then reproduces the f32 kernel to round-off.
  u, s, vt = np.linalg.svd(np.asarray(kernel_nxm, np.float64).T, full_matrices=False)
  return {"v": vt[:r].T, "s": s[:r], "ut": u[:, :r].T, "s_total": np.sum(s)}


def decompose(model, targets: str | None = None, rank: int | None = None, *,
              cache: bool = True, progress: bool = True) -> Decomposition:
  """SVD (float32 results) of every targeted kernel of every layer; loaded from
  ~/.cache/t2jax/svd when this (fingerprint, targets, rank) was decomposed before."""
  targets = targets or DEFAULT_TARGETS
  if rank is not None and rank < 1:
    raise SVFError(f"rank must be >= 1 or None (full); got {rank}.")
  memo = model.cache
  key = ("decomposition", targets, rank)
  if key in memo:
    return memo[key]
  modules = target_modules(model.params, targets)
  path = _cache_dir(model.fingerprint, targets, rank)
  factors = None
  if cache and os.path.isfile(os.path.join(path, "meta.json")):
    factors = _load_factors(path, modules, len(model.params["layers"]))
  if factors is None:
    factors = _compute_factors(model.params, modules, rank, progress)
    if cache:
      _save_factors(path, factors, dict(fingerprint=model.fingerprint, targets=targets,
                                        rank=rank))
  dec = Decomposition(factors=jax.tree.map(jnp.asarray, factors), fingerprint=model.fingerprint,
                      targets=targets, rank=rank)
  memo[key] = dec
  return dec


def _compute_factors(params: dict, modules, rank, progress: bool) -> list:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  factors: list = [{} for _ in params["layers"]]
  bar = tqdm(total=len(modules) * len(factors), desc="SVD", unit="matrix", disable=not progress)
  for block, name in modules:
    for layer, p in enumerate(params["layers"]):
      kernel = np.asarray(p[block][name]["kernel"], np.float32)
      parts = _svd_one(kernel, module_rank(kernel.shape, rank))
      factors[layer].setdefault(block, {})[name] = {k: np.asarray(v, np.float32)
                                                   for k, v in parts.items()}
      bar.update()
  bar.close()
  return factors


def _save_factors(path: str, factors: list, meta: dict) -> None:
  """One file per (module, part), layers stacked; written atomically."""
  try:
    with atomic.write_dir(path) as tmp:
      for block, names in factors[0].items():
        for name, parts in names.items():
          for part in parts:
            np.save(os.path.join(tmp, f"{block}.{name}.{part}.npy"),
                    np.stack([f[block][name][part] for f in factors]))
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
  except OSError:
    pass  # a read-only cache only costs the next run the SVD time


def _load_factors(path: str, modules, num_layers: int) -> list | None:
  """The cached factors, or None when a file is damaged (a warning names it): the cache is
  only derived data, so it is computed again."""
  factors: list = [{} for _ in range(num_layers)]
  for block, name in modules:
    parts = {}
    for part in ("v", "s", "ut", "s_total"):
      file = os.path.join(path, f"{block}.{name}.{part}.npy")
      try:
        parts[part] = np.load(file, mmap_mode="r")
        if parts[part].shape[:1] != (num_layers,):
          raise ValueError(f"shape {parts[part].shape}, not {num_layers} layers")
      except (OSError, ValueError) as e:
        warnings.warn(f"SVD cache file {file} cannot be read ({e}); decomposing again.")
        return None
    for layer in range(num_layers):
      factors[layer].setdefault(block, {})[name] = {k: v[layer] for k, v in parts.items()}
  return factors


# ---------------------------------------------------------------------------------------------
# Parametrisations: z → (sz, c).


def scaled_singular_values(z: jnp.ndarray, s: jnp.ndarray, s_total: jnp.ndarray,
                           parametrisation: str, max_mult: float):
  """z, s: [..., r]; s_total: [...]. Returns sz = c·s·f(z) [..., r] and c [...]."""
  if parametrisation == "scale":
    return s * z, jnp.ones(z.shape[:-1], s.dtype)
  if parametrisation == "paper":
    f = jax.nn.sigmoid(z) * max_mult
    # keep the nuclear norm: Σ over all singular values, the untouched tail included
    adapted_total = s_total - jnp.sum(s, -1) + jnp.sum(s * f, -1)
    c = s_total / adapted_total
    return c[..., None] * s * f, c
  raise SVFError(f"parametrisation {parametrisation!r} is unknown; use one of "
                 f"{PARAMETRISATIONS}.")


def init_z(shape: tuple[int, ...], parametrisation: str, rng: np.random.Generator,
           init_noise: float = 0.0) -> np.ndarray:
  """`scale`: ones (f(z) = z, exactly the base model). `paper`: 0.1 + init_noise·N(0, 1).
  The official code draws init_noise = 0.01, which moves every singular value by ~0.5 % and
  the default model's logits by ~2; z needs no symmetry breaking (each direction gets its own
  gradient), so the default is 0: with the nuclear-norm rescale, W' = W at init."""
  if parametrisation == "scale":
    return (1.0 + init_noise * rng.standard_normal(shape)).astype(np.float32)
  if parametrisation == "paper":
    return (0.1 + init_noise * rng.standard_normal(shape)).astype(np.float32)
  raise SVFError(f"parametrisation {parametrisation!r} is unknown; use one of "
                 f"{PARAMETRISATIONS}.")


# ---------------------------------------------------------------------------------------------
# Compute modes.


def choose_mode(per_row: bool, mode: str = "auto") -> str:
  """The one place that picks how SVF is computed. One z for the whole batch: build K' once
  (materialised; thousands of tokens amortise n·r·m). A z per row: factored."""
  if mode not in MODES:
    raise SVFError(f"SVF mode {mode!r} is unknown; use one of {MODES}.")
  if mode != "auto":
    return mode
  return "factored" if per_row else "materialised"


def materialise(params: dict, factors: list, z_tree: list, *, parametrisation: str,
                max_mult: float) -> dict:
  """Params with every targeted kernel replaced by K' for one z (z_tree[layer][block][name]:
  [r]). Pure and differentiable in z; params and factors are never differentiated."""
  layers = []
  for p_layer, f_layer, z_layer in zip(params["layers"], factors, z_tree):
    p_layer = dict(p_layer)
    for block, names in f_layer.items():
      p_layer[block] = dict(p_layer[block])
      for name, f in names.items():
        f = jax.tree.map(jax.lax.stop_gradient, f)
        p = p_layer[block][name]
        kernel = jax.lax.stop_gradient(p["kernel"])
        sz, c = scaled_singular_values(z_layer[block][name], f["s"], f["s_total"],
                                       parametrisation, max_mult)
        update = (f["v"] * (sz - c * f["s"])) @ f["ut"]
        p_layer[block][name] = {**p, "kernel": (c * kernel + update).astype(kernel.dtype)}
    layers.append(p_layer)
  return {**params, "layers": layers}


def targeted_kernels(params: dict, factors: list) -> list:
  """The kernels SVF rescales, [layer][block][name] like the factors."""
  return [{block: {name: p_layer[block][name]["kernel"] for name in names}
           for block, names in f_layer.items()}
          for p_layer, f_layer in zip(params["layers"], factors)]


def with_kernels(params: dict, kernels: list) -> dict:
  """Params with the targeted kernels replaced (the inverse of targeted_kernels)."""
  layers = []
  for p_layer, k_layer in zip(params["layers"], kernels):
    p_layer = dict(p_layer)
    for block, names in k_layer.items():
      p_layer[block] = {**p_layer[block], **{
          name: {**p_layer[block][name], "kernel": k} for name, k in names.items()}}
    layers.append(p_layer)
  return {**params, "layers": layers}


# Jitted once here: the entry points (expert binding, rollouts, evaluation) share its compile cache.
materialise_jit = jax.jit(materialise, static_argnames=("parametrisation", "max_mult"))


def row_adapters(factors: list, z_rows: list, *, parametrisation: str, max_mult: float) -> list:
  """Per-layer adapters for `factored_linear`: z_rows[layer][block][name] is [B, r]."""
  out = []
  for f_layer, z_layer in zip(factors, z_rows):
    a_layer: dict = {}
    for block, names in f_layer.items():
      for name, f in names.items():
        sz, c = scaled_singular_values(z_layer[block][name], f["s"], f["s_total"][None],
                                       parametrisation, max_mult)
        a_layer.setdefault(block, {})[name] = {"v": f["v"], "ut": f["ut"], "s": f["s"],
                                               "sz": sz, "c": c}
    out.append(a_layer)
  return out


def factored_linear(x: jnp.ndarray, p: dict, a: Any) -> jnp.ndarray:
  """x [B, T, n] with a per-row adapter a = {v [n, r], ut [r, m], s [r], sz [B, r], c [B]}."""
  if a is None:
    return llama.plain_linear(x, p)
  v, ut, sz = a["v"].astype(x.dtype), a["ut"].astype(x.dtype), a["sz"].astype(x.dtype)
  low_BxTxR = x @ v
  full_rank = v.shape[-1] == min(v.shape[0], ut.shape[-1])
  if full_rank:  # K' = v diag(sz) ut exactly: the dense kernel is never read
    y = (low_BxTxR * sz[:, None, :]) @ ut
  else:
    c = a["c"].astype(x.dtype)[:, None, None]
    delta = (sz - a["c"][:, None] * a["s"]).astype(x.dtype)
    y = c * (x @ p["kernel"]) + (low_BxTxR * delta[:, None, :]) @ ut
  return y + p["bias"] if "bias" in p else y
