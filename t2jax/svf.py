"""Singular Value Fine-tuning: W = U diag(s) Vᵀ, and an expert z rescales s.

For a targeted projection with kernel K = Wᵀ ([in n, out m]) we keep, per layer (factors and
z are lists with one {block: {name: ...}} dict per layer, like params["layers"]),
  v [n, r] (= V_r), s [r], ut [r, m] (= U_rᵀ), s_total [] (sum of ALL singular values),
so K = v diag(s) ut when r = min(n, m). An expert gives, per matrix, scaled singular values
sz = c·s·f(z) and a scalar c (c = 1 except for the `paper` parametrisation, whose
nuclear-norm rescaling is c = Σs / Σ(s·f(z))). The adapted kernel is
  K' = c·K + v diag(sz − c·s) ut                         (exact: z at identity gives K' = K)
and for r = min(n, m) also K' = v diag(sz) ut, which needs no K at all.

SVF is a module transform: `apply` swaps each targeted `llama.Linear` of an NNX model for an
`SVFLinear` holding K, v, s, ut (Frozen) and z (the model's only nnx.Param), so
`nnx.state(model, nnx.Param)` is exactly an expert's z (`targets.hf_from_state` names it as
Expert.z does).

Compute modes (chosen in `choose_mode`, the one place that decides):
  materialised: K' built once per z (n·r·m flops), then the plain dense product (`merged`
    swaps plain Linear modules over K' back in). For a z shared by many tokens: training
    steps, single-expert generation.
  factored: y = ((x v) ⊙ sz_row) ut per row; a different z per row of the batch, no K' kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

import flax.nnx as nnx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t2jax import atomic
from t2jax.cache import cache_dir
from t2jax.models import llama
from t2jax.targets import SVFError, check_rank, module_rank, resolve, target_modules

PARAMETRISATIONS = ("scale", "paper")
MODES = ("auto", "materialised", "factored")


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
  targets, rank = resolve(targets), check_rank(rank)
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


# ---------------------------------------------------------------------------------------------
# SVF as a module transform: targeted Linear modules swapped for SVFLinear.


class SVFLinear(nnx.Module):
  """A projection whose top-r singular values are rescaled by z. The base kernel, bias and
  the factors v [n, r], s [r], ut [r, m], s_total [] are Frozen; z is the module's only
  nnx.Param: [r] (one expert) or [B, r] (a z per batch row, factored mode only).

  mode "materialised": K' = c·K + v diag(sz − c·s) ut per call, then the dense product;
  "factored": y = ((x v) ⊙ sz_row) ut (+ c·x K below full rank), K' never built.
  rows_on [B] (factored, optional): rows where False compute the base projection exactly.
  """

  def __init__(self, base: llama.Linear, f: dict, z: jax.Array, *, parametrisation: str,
               max_mult: float, mode: str, rows_on: jax.Array | None = None):
    if mode not in ("materialised", "factored"):
      raise SVFError(f"SVFLinear mode {mode!r}: use 'materialised' or 'factored'.")
    self.kernel = llama.Frozen(base.kernel.get_value())
    self.bias = llama.Frozen(base.bias.get_value()) if base.bias is not None else None
    self.v, self.s = llama.Frozen(f["v"]), llama.Frozen(f["s"])
    self.ut, self.s_total = llama.Frozen(f["ut"]), llama.Frozen(f["s_total"])
    self.z = nnx.Param(z)
    self.rows_on = llama.Shared(rows_on) if rows_on is not None else None
    self.parametrisation, self.max_mult, self.mode = parametrisation, max_mult, mode

  def scaled(self) -> tuple[jax.Array, jax.Array]:
    """sz = c·s·f(z) [..., r] and c [...] (z's leading axes), factors never differentiated."""
    s, s_total = jax.lax.stop_gradient(self.s[...]), jax.lax.stop_gradient(self.s_total[...])
    z = self.z[...]
    if s_total.ndim < z.ndim - 1:  # a z per batch row ([B, r]) of one layer's matrix
      s_total = s_total[None]
    return scaled_singular_values(z, s, s_total, self.parametrisation, self.max_mult)

  def adapted_kernel(self) -> jax.Array:
    """K' for a z of shape [r], or [L, r] with every factor stacked over layers likewise
    (a scanned model); differentiable in z only."""
    kernel = jax.lax.stop_gradient(self.kernel[...])
    v, s, ut = (jax.lax.stop_gradient(x[...]) for x in (self.v, self.s, self.ut))
    sz, c = self.scaled()

    def build(kernel, v, s, ut, sz, c):
      return (c * kernel + (v * (sz - c * s)[None, :]) @ ut).astype(kernel.dtype)

    if kernel.ndim == 3:  # one layer at a time: a device gathers one layer's factors, not all
      return jax.lax.map(lambda a: build(*a), (kernel, v, s, ut, sz, c))
    return build(kernel, v, s, ut, sz, c)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == "materialised":
      y = x @ self.adapted_kernel()
    else:
      y = self._factored(x)
    return y + self.bias[...] if self.bias is not None else y

  def _factored(self, x_BxTxN: jax.Array) -> jax.Array:
    sz, c = self.scaled()
    s = self.s[...]
    if sz.ndim == 1:
      sz, c = sz[None], c[None]
    if self.rows_on is not None:  # rows without an expert: the base weights exactly
      on_B = self.rows_on[...]
      sz = jnp.where(on_B[:, None], sz, s[None, :])
      c = jnp.where(on_B, c, 1.0)
    v, ut = self.v[...].astype(x_BxTxN.dtype), self.ut[...].astype(x_BxTxN.dtype)
    low_BxTxR = x_BxTxN @ v
    if v.shape[-1] == min(v.shape[0], ut.shape[-1]):  # K' = v diag(sz) ut: K is never read
      return (low_BxTxR * sz.astype(x_BxTxN.dtype)[:, None, :]) @ ut
    delta = (sz - c[:, None] * s).astype(x_BxTxN.dtype)
    c = c.astype(x_BxTxN.dtype)[:, None, None]
    return c * (x_BxTxN @ self.kernel[...]) + (low_BxTxR * delta[:, None, :]) @ ut


def apply(model: llama.Llama, *, targets: str | None = None, rank: int | None = None,
          parametrisation: str = "scale", max_mult: float = 2.0, mode: str = "materialised",
          factors: list | None = None, z: list | None = None,
          rows_on: jax.Array | None = None) -> llama.Llama:
  """Swaps every targeted Linear of `model` (in place; returned) for an SVFLinear.

  factors: from `decompose` (cached on disk); None decomposes the model's kernels here (SVD
  of `targets` at `rank`; needs concrete arrays). z: [layer]{block: {name: [r] or [B, r]}}
  (an Expert's z_tree), None for the identity init of the parametrisation.
  Afterwards `nnx.state(model, nnx.Param)` is exactly z, one leaf per targeted matrix."""
  if parametrisation not in PARAMETRISATIONS:
    raise SVFError(f"parametrisation {parametrisation!r} is unknown; use one of "
                   f"{PARAMETRISATIONS}.")
  if factors is None:
    rank = check_rank(rank)
    params = llama.unstack_layers(llama.to_params(model))
    factors = jax.tree.map(jnp.asarray, _compute_factors(
        params, target_modules(params, resolve(targets)), rank, progress=False))
    factors = stack_layers(factors) if model.scanned else factors
  if model.scanned != llama.is_stacked(factors):
    raise SVFError("a scanned model needs factors stacked over layers (svf.stack_layers), an "
                   "unrolled one a list per layer.")
  layers = per_layer(model.layers if model.scanned else list(model.layers))
  if len(per_layer(factors)) != len(layers):
    raise SVFError(f"factors cover {len(factors)} layers; the model has {len(layers)}.")
  z_layers = per_layer(z) if z is not None else None
  for i, (layer, f_layer) in enumerate(zip(layers, per_layer(factors))):
    for block, names in f_layer.items():
      parent = getattr(layer, block)
      for name, f in names.items():
        base = getattr(parent, name)
        if not isinstance(base, llama.Linear):
          raise SVFError(f"layers/{i}/{block}/{name} is a {type(base).__name__}, not a plain "
                         "Linear: SVF is applied once, to the base model.")
        z_m = (z_layers[i][block][name] if z is not None else
               jnp.asarray(init_z(np.shape(f["s"]), parametrisation, np.random.default_rng(0))))
        setattr(parent, name, SVFLinear(base, f, z_m, parametrisation=parametrisation,
                                        max_mult=max_mult, mode=mode, rows_on=rows_on))
  return model


def per_layer(tree) -> list:
  """A per-layer list (params["layers"], factors, z) as a list; a stacked tree as a list of
  one whose leaves carry the layer axis."""
  return [tree] if llama.is_stacked(tree) else list(tree)


def _like(like, items: list):
  return items[0] if llama.is_stacked(like) else items


def stack_layers(tree: list):
  """Per-layer factors or z ([layer]{block: {name: ...}}) stacked over a leading layer axis,
  for a scanned model; unchanged if stacked already."""
  if llama.is_stacked(tree):
    return tree
  return jax.tree.map(lambda *xs: jnp.stack(xs), *tree)


def unstack_layers(tree) -> list:
  if not llama.is_stacked(tree):
    return list(tree)
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def svf_modules(model: llama.Llama):
  """(layer, block, name, parent, SVFLinear) of every swapped projection, in layer order
  (a scanned model: one entry per matrix, layer 0, its variables stacked over layers)."""
  for i, layer in enumerate(per_layer(model.layers if model.scanned else list(model.layers))):
    for block, names in (("self_attn", llama.ATTN_PROJ), ("mlp", llama.MLP_PROJ)):
      parent = getattr(layer, block)
      for name in names:
        m = getattr(parent, name)
        if isinstance(m, SVFLinear):
          yield i, block, name, parent, m


def merged(model: llama.Llama) -> llama.Llama:
  """Every SVFLinear replaced (in place; returned) by a plain Linear over K': materialised
  once for a z shared by every row (differentiable in z), then plain dense products."""
  for _, _, name, parent, m in list(svf_modules(model)):
    setattr(parent, name, llama.Linear(m.adapted_kernel(),
                                       m.bias[...] if m.bias is not None else None))
  return model


def z_tree(model: llama.Llama) -> list:
  """The z of an SVF model as [layer]{block: {name: z}} (the layout of Expert.z_tree)."""
  tree: list = [{} for _ in range(1 if model.scanned else len(model.layers))]
  for i, block, name, _, m in svf_modules(model):
    tree[i].setdefault(block, {})[name] = m.z[...]
  return unstack_layers(tree[0]) if model.scanned else tree


def materialise(params: dict, factors: list, z_tree: list, *, parametrisation: str,
                max_mult: float) -> dict:
  """Params with every targeted kernel replaced by K' for one z (z_tree[layer][block][name]:
  [r]), each computed by the SVFLinear `apply` would swap in. Pure and differentiable in z;
  params and factors are never differentiated."""
  kernels = []
  for p_layer, f_layer, z_layer in zip(per_layer(params["layers"]), per_layer(factors),
                                       per_layer(z_tree)):
    kernels.append({block: {name: SVFLinear(
        llama.Linear(p_layer[block][name]["kernel"]), f, z_layer[block][name],
        parametrisation=parametrisation, max_mult=max_mult, mode="materialised",
    ).adapted_kernel() for name, f in names.items()} for block, names in f_layer.items()})
  return with_kernels(params, _like(params["layers"], kernels))


def targeted_kernels(params: dict, factors: list) -> list:
  """The kernels SVF rescales, [layer][block][name] like the factors."""
  return _like(params["layers"], [
      {block: {name: p_layer[block][name]["kernel"] for name in names}
       for block, names in f_layer.items()}
      for p_layer, f_layer in zip(per_layer(params["layers"]), per_layer(factors))])


def with_kernels(params: dict, kernels: list) -> dict:
  """Params with the targeted kernels replaced (the inverse of targeted_kernels)."""
  layers = []
  for p_layer, k_layer in zip(per_layer(params["layers"]), per_layer(kernels)):
    p_layer = dict(p_layer)
    for block, names in k_layer.items():
      p_layer[block] = {**p_layer[block], **{
          name: {**p_layer[block][name], "kernel": k} for name, k in names.items()}}
    layers.append(p_layer)
  return {**params, "layers": _like(params["layers"], layers)}


# Jitted once here: the entry points (expert binding, rollouts, evaluation) share its compile cache.
materialise_jit = jax.jit(materialise, static_argnames=("parametrisation", "max_mult"))


@flax.struct.dataclass
class RowAdapters:
  """A z per batch row for `llama.forward(..., adapters=)`: attaches factored SVFLinear
  modules. z_rows[layer][block][name] [B, r]; rows_on [B]: False rows run the base model."""
  factors: list
  z_rows: list
  rows_on: jax.Array
  parametrisation: str = flax.struct.field(pytree_node=False, default="scale")
  max_mult: float = flax.struct.field(pytree_node=False, default=2.0)

  def attach(self, model: llama.Llama) -> None:
    apply(model, factors=self.factors, z=self.z_rows, rows_on=self.rows_on, mode="factored",
          parametrisation=self.parametrisation, max_mult=self.max_mult)
