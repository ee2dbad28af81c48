"""HF parameter names ↔ t2jax params paths, and assembly of a params pytree from a stream
of HF-named tensors without holding two full copies of the model."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from t2jax.models.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class WeightsError(ValueError):
  """A checkpoint whose tensors do not match its config; the message names the tensor."""


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF name → HF shape ([out, in] for projections) of every tensor the config needs."""
  d, f, kd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q_out, kv_out = cfg.num_heads * kd, cfg.num_kv_heads * kd
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  proj = {
      "self_attn.q_proj": (q_out, d, cfg.qkv_bias), "self_attn.k_proj": (kv_out, d, cfg.qkv_bias),
      "self_attn.v_proj": (kv_out, d, cfg.qkv_bias), "self_attn.o_proj": (d, q_out, cfg.o_bias),
      "mlp.gate_proj": (f, d, cfg.mlp_bias), "mlp.up_proj": (f, d, cfg.mlp_bias),
      "mlp.down_proj": (d, f, cfg.mlp_bias),
  }
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    shapes[pre + "input_layernorm.weight"] = (d,)
    shapes[pre + "post_attention_layernorm.weight"] = (d,)
    for name, (out, inp, bias) in proj.items():
      shapes[f"{pre}{name}.weight"] = (out, inp)
      if bias:
        shapes[f"{pre}{name}.bias"] = (out,)
  return shapes


def param_path(hf_name: str) -> tuple[tuple[str, ...], int | None, bool]:
  """HF name → (params path, layer index or None, transpose?)."""
  if hf_name == "model.embed_tokens.weight":
    return ("embed_tokens",), None, False
  if hf_name == "model.norm.weight":
    return ("norm",), None, False
  if hf_name == "lm_head.weight":
    return ("lm_head",), None, True
  m = _LAYER.match(hf_name)
  if not m:
    raise WeightsError(f"unexpected tensor {hf_name!r}")
  layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
  if module.endswith("layernorm"):
    return ("layers", module), layer, False
  leaf = "kernel" if kind == "weight" else "bias"
  return ("layers", *module.split("."), leaf), layer, kind == "weight"


def hf_name(path: tuple[str, ...], layer: int | None) -> str:
  """Inverse of `param_path` for weights: ('layers','mlp','gate_proj','kernel'), 3 →
  'model.layers.3.mlp.gate_proj.weight'."""
  if path == ("embed_tokens",):
    return "model.embed_tokens.weight"
  if path == ("norm",):
    return "model.norm.weight"
  if path == ("lm_head",):
    return "lm_head.weight"
  *module, leaf = path[1:]
  if not module:  # a layernorm
    return f"model.layers.{layer}.{leaf}.weight"
  return f"model.layers.{layer}.{'.'.join(module)}.{'weight' if leaf == 'kernel' else 'bias'}"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _sample_digest(arr: np.ndarray) -> bytes:
  flat = arr.reshape(-1)
  step = max(1, flat.size // 4096)
  return hashlib.sha256(np.asarray(flat[::step], np.float32).tobytes()).digest()


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype,
             source: str) -> tuple[dict, str]:
  """Builds params from (HF name, array in HF orientation) pairs, converting each tensor to
  `dtype` as it arrives. Returns (params, fingerprint) where the fingerprint is a content hash
  (config + a sample of every tensor) that identifies the checkpoint independent of dtype."""
  expected = expected_tensors(cfg)
  np_dtype = jnp.dtype(dtype)
  host: dict = {}
  stacked: dict[tuple[str, ...], np.ndarray] = {}
  seen: set[str] = set()
  digests: dict[str, bytes] = {}
  for name, arr in tensors:
    if name not in expected:
      if name.endswith("rotary_emb.inv_freq"):
        continue  # old HF checkpoints saved this buffer; it is recomputed
      if name == "lm_head.weight" and cfg.tie_word_embeddings:
        continue  # state_dict savers write the tied copy too; tied means embed_tokens is used
      raise WeightsError(f"{source}: tensor {name!r} is not part of a {cfg.model_type} model "
                         "with this config (check config.json matches the weights).")
    if tuple(arr.shape) != expected[name]:
      raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, the config "
                         f"implies {expected[name]}.")
    digests[name] = _sample_digest(arr)
    path, layer, transpose = param_path(name)
    value = arr.T if transpose else arr
    if layer is None:
      _set(host, path, np.asarray(value, dtype=np_dtype))
    else:
      if path not in stacked:
        stacked[path] = np.empty((cfg.num_layers, *value.shape), np_dtype)
        _set(host, path, stacked[path])
      stacked[path][layer] = value
    seen.add(name)
  missing = sorted(set(expected) - seen)
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise WeightsError(f"{source}: missing tensors {missing[:5]}{more}.")
  # The config's architecture fields, not its stop tokens, identify the model.
  fingerprint = hashlib.sha256(repr(dataclasses.replace(cfg, eos_token_ids=())).encode())
  for name in sorted(digests):
    fingerprint.update(name.encode() + digests[name])
  # Move leaf by leaf and drop each host copy at once: peak memory ≈ one model + one leaf.
  return _to_device(host), fingerprint.hexdigest()[:16]


def _to_device(tree: dict) -> dict:
  out = {}
  for key in list(tree):
    value = tree.pop(key)
    out[key] = _to_device(value) if isinstance(value, dict) else jax.device_put(value)
    del value
  return out
