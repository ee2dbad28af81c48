"""LoRA, the paper's baseline: a targeted kernel K [in n, out m] becomes K + (alpha/r)·A B with
A [n, r], B [r, m] trained and K frozen (Hu et al. 2021; the paper's Table 1 and Table 4).

Like SVF (t2jax/svf.py) it is a module transform: `apply` swaps each targeted `llama.Linear`
for a `LoRALinear` whose A and B are the model's only nnx.Params, and the factors live in a
per-layer tree [layer]{block: {name: {"a": [n, r], "b": [r, m]}}} (stacked [L, ...] for a
scanned model), the layout of params["layers"]. Two ways to compute it:
  unmerged (training): y = x K + (alpha/r)·(dropout(x) A) B, so dropout acts on the LoRA
    input as in PEFT;
  merged (sampling, evaluation, export): K' = K + (alpha/r)·A B once, then the plain product.

Init as PEFT: A ~ U(-1/√n, 1/√n) (kaiming-uniform with a = √5), B = 0, so a new expert is the
base model exactly.

A wrapper of ours, the pattern of svf.SVFLinear, rather than qwix's LoraProvider: qwix creates
A and B lazily by intercepting the first dot_general a module runs, and draws dropout from
nnx.Rngs state held in the model, while every program here rebuilds the modules from a params
dict (llama.build, split outside, merged inside) and a run's randomness must be a function of
its key and step for exact resume. A `LoRAExpert` is the saved artefact: the factors keyed by HF parameter
name plus what ties them to one model, written as PEFT names them (adapter_model.safetensors
with `base_model.model.<name>.lora_A.weight` [r, n] and `lora_B.weight` [m, r], and an
adapter_config.json) beside t2jax's expert.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.nnx as nnx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t2jax import atomic, svf
from t2jax.models import llama
from t2jax.targets import SVFError, hf_module_name, resolve, targeted, tree_from_hf

FORMAT = "t2jax-lora/1"
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_DROPOUT = 16, 32.0, 0.05  # the paper's settings
_META, _TENSORS, _PEFT_CONFIG = "expert.json", "adapter_model.safetensors", "adapter_config.json"


def check_settings(rank: int, alpha: float, dropout: float) -> None:
  if int(rank) < 1:
    raise SVFError(f"LoRA rank must be >= 1; got {rank}.")
  if alpha <= 0:
    raise SVFError(f"LoRA alpha must be > 0; got {alpha}.")
  if not 0.0 <= dropout < 1.0:
    raise SVFError(f"LoRA dropout must be in [0, 1); got {dropout}.")


def init_factors(params: dict, targets: str, rank: int, seed: int = 0) -> dict[str, dict]:
  """{HF parameter name: {"a": [n, r], "b": [r, m]}} for every targeted matrix of per-layer
  params: A as PEFT draws it, B zero (the base model exactly)."""
  rng = np.random.default_rng(seed)
  out = {}
  for block, name, layer, (n, m), _ in targeted(params, resolve(targets), None):
    r = int(rank)
    bound = 1.0 / np.sqrt(n)
    out[hf_module_name(block, name, layer)] = {
        "a": rng.uniform(-bound, bound, (n, r)).astype(np.float32),
        "b": np.zeros((r, m), np.float32)}
  return out


def num_params(factors: dict[str, dict]) -> int:
  """Trainable parameters: r·(n + m) per targeted matrix."""
  return int(sum(np.size(f["a"]) + np.size(f["b"]) for f in factors.values()))


# ---------------------------------------------------------------------------------------------
# The module transform.


class LoRALinear(nnx.Module):
  """y = x K (+ bias) + scale·(dropout(x) A) B. K and bias are Frozen; a [n, r] and b [r, m]
  are the only nnx.Params. `key` (Frozen raw key data, uint32 [2]; None = no dropout) draws
  the dropout mask of each call."""

  def __init__(self, base: llama.Linear, a: jax.Array, b: jax.Array, *, scale: float,
               dropout: float = 0.0, key: jax.Array | None = None):
    self.kernel = llama.Frozen(base.kernel.get_value())
    self.bias = llama.Frozen(base.bias.get_value()) if base.bias is not None else None
    self.a, self.b = nnx.Param(a), nnx.Param(b)
    self.key = llama.Frozen(key) if key is not None and dropout > 0 else None
    self.scale, self.dropout = float(scale), float(dropout)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ jax.lax.stop_gradient(self.kernel[...])
    h = x
    if self.key is not None:
      keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key[...]), 1.0 - self.dropout,
                                  x.shape)
      h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    low = h @ self.a[...].astype(x.dtype)
    y = y + (self.scale * low) @ self.b[...].astype(x.dtype)
    return y + self.bias[...] if self.bias is not None else y


def apply(model: llama.Llama, factors, *, scale: float, dropout: float = 0.0,
          key: jax.Array | None = None) -> llama.Llama:
  """Swaps (in place; returned) every Linear the factors tree names for a LoRALinear.
  factors: [layer]{block: {name: {"a", "b"}}}, stacked over layers for a scanned model.
  key: a jax.random key for dropout (None: no dropout); each matrix of each layer draws
  its own masks from it."""
  if model.scanned != llama.is_stacked(factors):
    raise SVFError("a scanned model needs LoRA factors stacked over layers, an unrolled one a "
                   "list per layer.")
  layers = svf.per_layer(model.layers if model.scanned else list(model.layers))
  f_layers = svf.per_layer(factors)
  if len(f_layers) != len(layers):
    raise SVFError(f"LoRA factors cover {len(f_layers)} layers; the model has {len(layers)}.")
  if key is not None and not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # raw uint32 [2] key data (TrainState.rng)
  index = 0
  for i, (layer, f_layer) in enumerate(zip(layers, f_layers)):
    for block in sorted(f_layer):
      parent = getattr(layer, block)
      for name in sorted(f_layer[block]):
        base, f = getattr(parent, name), f_layer[block][name]
        if not isinstance(base, llama.Linear):
          raise SVFError(f"layers/{i}/{block}/{name} is a {type(base).__name__}, not a plain "
                         "Linear: LoRA is applied once, to the base model.")
        k = None
        if key is not None and dropout > 0:
          k = jax.random.fold_in(key, index)
          if model.scanned:  # one key per layer, sliced by the scan like the factors
            k = jax.random.split(k, np.shape(f["a"])[0])
          k = jax.random.key_data(k)
        index += 1
        setattr(parent, name, LoRALinear(base, f["a"], f["b"], scale=scale, dropout=dropout,
                                         key=k))
  return model


@flax.struct.dataclass
class Adapters:
  """LoRA for `llama.forward(..., adapters=)`: attaches unmerged LoRALinear modules (with
  dropout when `key` is given), so the gradient reaches A and B through the forward."""
  factors: Any
  key: Any = None  # a jax.random key, or None for no dropout
  scale: float = flax.struct.field(pytree_node=False, default=2.0)
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)

  def attach(self, model: llama.Llama) -> None:
    apply(model, self.factors, scale=self.scale, dropout=self.dropout, key=self.key)


def materialise(params: dict, factors, *, scale: float) -> dict:
  """params with every targeted kernel replaced by K + scale·A B (in the kernel's dtype).
  Pure and differentiable in the factors; params are never differentiated."""
  def merged(k, f):
    k = jax.lax.stop_gradient(k)
    delta = scale * jnp.matmul(f["a"].astype(jnp.float32), f["b"].astype(jnp.float32))
    return (k.astype(jnp.float32) + delta).astype(k.dtype)

  # kernels is a prefix of factors: each kernel meets its {"a", "b"}
  return svf.with_kernels(params, jax.tree.map(merged, svf.targeted_kernels(params, factors),
                                               factors))


materialise_jit = jax.jit(materialise, static_argnames=("scale",))


# ---------------------------------------------------------------------------------------------
# The artefact.


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAExpert:
  factors: dict[str, dict[str, np.ndarray]]  # HF weight name → {"a": [n, r], "b": [r, m]}
  fingerprint: str  # Model.fingerprint of the model it was made for
  targets: str
  rank: int
  alpha: float = DEFAULT_ALPHA
  dropout: float = DEFAULT_DROPOUT  # used in training only
  name: str = "lora"
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  @property
  def num_params(self) -> int:
    return num_params(self.factors)

  @classmethod
  def init(cls, model, *, targets: str | None = None, rank: int = DEFAULT_RANK,
           alpha: float = DEFAULT_ALPHA, dropout: float = DEFAULT_DROPOUT, seed: int = 0,
           name: str = "lora") -> "LoRAExpert":
    check_settings(rank, alpha, dropout)
    targets = resolve(targets)
    return cls(factors=init_factors(model.params, targets, rank, seed),
               fingerprint=model.fingerprint, targets=targets, rank=int(rank),
               alpha=float(alpha), dropout=float(dropout), name=name)

  def check(self, model) -> None:
    """Raises SVFError saying exactly why this expert does not fit `model`."""
    if self.fingerprint != model.fingerprint:
      raise SVFError(f"LoRA expert {self.name!r} was made for model {self.fingerprint}, not "
                     f"for {model.source} (fingerprint {model.fingerprint}).")
    want = {hf_module_name(block, name, layer): (n, m)
            for block, name, layer, (n, m), _ in targeted(model.params, self.targets, None)}
    missing, extra = sorted(set(want) - set(self.factors)), sorted(set(self.factors) - set(want))
    if missing or extra:
      raise SVFError(f"LoRA expert {self.name!r} does not cover targets {self.targets!r}: "
                     f"missing {missing[:3]}, unexpected {extra[:3]}.")
    for k, (n, m) in want.items():
      got = (np.shape(self.factors[k]["a"]), np.shape(self.factors[k]["b"]))
      if got != ((n, self.rank), (self.rank, m)):
        raise SVFError(f"LoRA expert {self.name!r}: {k} has A {got[0]}, B {got[1]}; rank "
                       f"{self.rank} on this model needs A {(n, self.rank)}, B "
                       f"{(self.rank, m)}.")

  def tree(self, model) -> list:
    """The factors as [layer]{block: {name: {"a", "b"}}}, checked against model."""
    self.check(model)
    return tree_from_hf(self.factors, model.params, self.targets)

  def save(self, path: str) -> None:
    """expert.json (t2jax), adapter_config.json + adapter_model.safetensors (PEFT's names and
    layouts); written beside `path`, then swapped in."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    tensors = {}
    for k, f in self.factors.items():
      peft = "base_model.model." + k.removesuffix(".weight")
      tensors[f"{peft}.lora_A.weight"] = np.ascontiguousarray(np.asarray(f["a"], np.float32).T)
      tensors[f"{peft}.lora_B.weight"] = np.ascontiguousarray(np.asarray(f["b"], np.float32).T)
    modules = sorted({k.split(".")[-2] for k in self.factors})
    with atomic.write_dir(path) as tmp:
      save_file(tensors, os.path.join(tmp, _TENSORS))
      meta = {"format": FORMAT, "name": self.name, "fingerprint": self.fingerprint,
              "targets": self.targets, "rank": self.rank, "alpha": self.alpha,
              "dropout": self.dropout, "num_params": self.num_params, "metrics": self.metrics}
      with open(os.path.join(tmp, _META), "w") as f:
        json.dump(meta, f, indent=1, default=float)
      peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                     "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                     "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
                     "layers_to_transform": sorted({int(k.split(".")[2])
                                                    for k in self.factors})}
      with open(os.path.join(tmp, _PEFT_CONFIG), "w") as f:
        json.dump(peft_config, f, indent=1)

  @classmethod
  def load(cls, path: str) -> "LoRAExpert":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    from t2jax.expert import reading  # pylint: disable=import-outside-toplevel
    meta_path, tensor_path = os.path.join(path, _META), os.path.join(path, _TENSORS)
    if not os.path.isfile(meta_path) or not os.path.isfile(tensor_path):
      raise FileNotFoundError(f"{path} is not a LoRA expert directory (needs {_META} and "
                              f"{_TENSORS}).")
    with reading(meta_path), open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise SVFError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}.")
    with reading(tensor_path):
      tensors = load_file(tensor_path)
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
      module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
      factors.setdefault(module + ".weight", {})[
          {"A.weight": "a", "B.weight": "b"}[part]] = np.ascontiguousarray(value.T)
    return cls(factors=factors, fingerprint=meta["fingerprint"], targets=meta["targets"],
               rank=int(meta["rank"]), alpha=float(meta["alpha"]),
               dropout=float(meta["dropout"]), name=meta["name"],
               metrics=meta.get("metrics", {}))


def merged_params(model, expert: LoRAExpert) -> dict:
  """model.params with the expert merged into its targeted kernels (K + alpha/r·A B)."""
  return materialise_jit(model.params, jax.tree.map(jnp.asarray, expert.tree(model)),
                         scale=expert.scale)
