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
  """HF name → (params path, layer index or None, transpose?). A layer's path starts with
  "layers" and continues inside params["layers"][index]."""
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
  host: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
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
    value = np.asarray(arr.T if transpose else arr, dtype=np_dtype)
    # each tensor goes to the device as it arrives: at most one host copy is alive
    if layer is None:
      _set(host, path, jax.device_put(value))
    else:
      _set(host["layers"][layer], path[1:], jax.device_put(value))
    del value
    seen.add(name)
  missing = sorted(set(expected) - seen)
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise WeightsError(f"{source}: missing tensors {missing[:5]}{more}.")
  # The config's architecture fields, not its stop tokens, identify the model.
  fingerprint = hashlib.sha256(repr(dataclasses.replace(cfg, eos_token_ids=())).encode())
  for name in sorted(digests):
    fingerprint.update(name.encode() + digests[name])
  return host, fingerprint.hexdigest()[:16]
