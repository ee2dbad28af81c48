"""config.adapter: what a run trains and how the model uses it, decided here and nowhere else.

  svf   the trainable tree is z, [r] per targeted matrix (t2jax/svf.py); `frozen` holds the
        SVD factors; the policy's forward runs on W' materialised once per step.
  lora  the trainable tree is {"a": [n, r], "b": [r, m]} per targeted matrix (t2jax/lora.py);
        `frozen` is None; the policy's forward runs unmerged LoRALinear modules, so LoRA
        dropout acts on their inputs.

Both trees are laid out like params["layers"] ([layer]{block: {name: ...}}, or stacked over
layers for a scanned model) and both have a merged form (`materialise`) that sampling and
evaluation run as plain dense weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import lora, svf, targets
from t2jax.models import llama

ADAPTERS = ("svf", "lora")


def check(adapter: str) -> str:
  if adapter not in ADAPTERS:
    raise ValueError(f"adapter {adapter!r} is unknown; use one of {ADAPTERS}.")
  return adapter


def materialise(params: dict, frozen, trainable, settings) -> dict:
  """params with the adapter merged into the targeted kernels (one trainable tree for every
  row). settings: an rl.RLSettings (adapter, parametrisation, max_mult, lora_scale)."""
  if settings.adapter == "lora":
    return lora.materialise(params, trainable, scale=settings.lora_scale)
  return svf.materialise(params, frozen, trainable, parametrisation=settings.parametrisation,
                         max_mult=settings.max_mult)


materialise_jit = jax.jit(materialise, static_argnames=("settings",))


def policy(params: dict, frozen, trainable, settings, key=None) -> tuple[dict, Any]:
  """(params, adapters) of the policy's differentiated forward (llama.forward(params, ...,
  adapters=adapters)). key: a jax.random key for LoRA dropout; None runs without it."""
  if settings.adapter == "lora":
    dropout = settings.lora_dropout if key is not None else 0.0
    return params, lora.Adapters(factors=trainable, key=key if dropout else None,
                                 scale=settings.lora_scale, dropout=dropout)
  return materialise(params, frozen, trainable, settings), None


def uses_dropout(settings) -> bool:
  """Whether the update needs a key (LoRA with dropout > 0)."""
  return settings.adapter == "lora" and settings.lora_dropout > 0


def trainable_like(cfg, params, frozen) -> Any:
  """The float32 trainable tree (ShapeDtypeStructs) of the run `cfg` over `params` (arrays or
  abstract, per layer or stacked): z [r] per matrix from the SVD factors' shapes, or LoRA's
  a [n, r] and b [r, m] from the targeted kernels' shapes ([L, ...] when stacked)."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if check(cfg.get("adapter", "svf")) == "svf":
    one = lambda f_layer: {b: {n: f32(*np.shape(f["s"])) for n, f in names.items()}
                           for b, names in f_layer.items()}
    return one(frozen) if llama.is_stacked(frozen) else [one(f) for f in frozen]
  r = int(cfg.lora_rank)
  stacked = llama.is_stacked(params["layers"])
  first = params["layers"] if stacked else params["layers"][0]
  modules = targets.target_modules({"layers": [first]}, targets.resolve(cfg.targets))

  def one(p_layer):
    out: dict = {}
    for block, name in modules:
      *lead, n, m = np.shape(p_layer[block][name]["kernel"])
      out.setdefault(block, {})[name] = {"a": f32(*lead, n, r), "b": f32(*lead, r, m)}
    return out

  return one(params["layers"]) if stacked else [one(p) for p in params["layers"]]
