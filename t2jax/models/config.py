"""Model configuration for the Llama family, read from HF `config.json` or GGUF metadata.

One frozen, hashable dataclass so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `model_type` values this decoder computes exactly. Anything else is refused at load.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# GGUF `general.architecture` → HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


class ConfigError(ValueError):
  """A checkpoint's configuration that t2jax cannot run; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_word_embeddings: bool
  qkv_bias: bool = False  # Qwen2; Llama with attention_bias=True
  o_bias: bool = False  # Llama with attention_bias=True
  mlp_bias: bool = False
  # RoPE scaling as a sorted tuple of (key, value) so the config stays hashable; () = none.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  # Mistral's sliding window; None = full attention. Sequences longer than it are refused.
  sliding_window: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  bos_token_id: int | None = None

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling)

  @property
  def max_length(self) -> int:
    """Longest sequence (prompt + generated) this config computes exactly."""
    if self.sliding_window is not None:
      return min(self.max_position_embeddings, self.sliding_window)
    return self.max_position_embeddings

  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * per_layer + d + head


def _as_id_tuple(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _rope_scaling(cfg: dict[str, Any], where: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
  """(rope_theta, scaling) from either the old (`rope_theta` + `rope_scaling`) or the
  transformers ≥ 5 (`rope_parameters`) spelling."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or params)
  theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type in (None, "default"):
    return theta, ()
  if rope_type == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
      raise ConfigError(f"{where}: rope_scaling of type llama3 lacks {missing}.")
    return theta, (("rope_type", "llama3"),) + tuple(sorted((k, float(scaling[k])) for k in keys))
  if rope_type == "linear":
    return theta, (("factor", float(scaling["factor"])), ("rope_type", "linear"))
  raise ConfigError(
      f"{where}: rope scaling type {rope_type!r} is not supported (supported: default, linear, "
      "llama3). Use a checkpoint without it or add it to t2jax/models/rope.py.")


def from_hf_dict(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    archs = cfg.get("architectures")
    raise ConfigError(
        f"{where}: model_type {model_type!r} (architectures {archs}) is not supported; t2jax "
        f"runs the Llama family: {', '.join(SUPPORTED_MODEL_TYPES)}.")
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu).")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in cfg:
      raise ConfigError(f"{where}: required key {key!r} is missing.")
  heads = int(cfg["num_attention_heads"])
  kv_heads = int(cfg.get("num_key_value_heads") or heads)
  if heads % kv_heads:
    raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                      f"num_key_value_heads={kv_heads}.")
  head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
  theta, scaling = _rope_scaling(cfg, where)
  sliding = None
  if model_type == "mistral":
    sliding = cfg.get("sliding_window")
  elif model_type == "qwen2" and cfg.get("use_sliding_window"):
    raise ConfigError(f"{where}: Qwen2 with use_sliding_window=true needs sliding-window "
                      "attention, which t2jax does not implement.")
  attention_bias = bool(cfg.get("attention_bias", False))
  return ModelConfig(
      model_type=model_type,
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=int(head_dim),
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or attention_bias,
      o_bias=attention_bias,
      mlp_bias=bool(cfg.get("mlp_bias", False)),
      rope_scaling=scaling,
      sliding_window=int(sliding) if sliding else None,
      eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
      bos_token_id=cfg.get("bos_token_id"),
  )


def from_hf_dir(path: str) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConfigError(f"{path}: no config.json; an HF checkpoint directory needs one.")
  with open(cfg_path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{cfg_path}: not valid JSON ({e}).") from None
  config = from_hf_dict(cfg, where=cfg_path)
  gen_path = os.path.join(path, "generation_config.json")
  if os.path.isfile(gen_path):  # generation_config may list extra stop tokens (Llama 3 chat)
    with open(gen_path) as f:
      gen = json.load(f)
    extra = _as_id_tuple(gen.get("eos_token_id"))
    ids = tuple(dict.fromkeys(config.eos_token_ids + extra))
    config = dataclasses.replace(config, eos_token_ids=ids)
  return config


def from_gguf_fields(fields: dict[str, Any], where: str, has_output: bool,
                     vocab_size: int) -> ModelConfig:
  """`fields`: GGUF metadata as plain python values (see weights/gguf.py)."""
  arch = fields.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported; t2jax reads "
                      f"{sorted(GGUF_ARCHITECTURES)}.")

  def get(key, default=None):
    value = fields.get(f"{arch}.{key}", default)
    if value is None:
      raise ConfigError(f"{where}: GGUF metadata {arch}.{key} is missing.")
    return value

  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  head_dim = int(fields.get(f"{arch}.attention.key_length") or hidden // heads)
  eos = fields.get("tokenizer.ggml.eos_token_id")
  scaling = ()
  if fields.get(f"{arch}.rope.scaling.type") == "linear":
    scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
  return ModelConfig(
      model_type=GGUF_ARCHITECTURES[arch],
      vocab_size=int(fields.get(f"{arch}.vocab_size") or vocab_size),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or heads),
      head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length")),
      tie_word_embeddings=not has_output,
      qkv_bias=arch == "qwen2",
      rope_scaling=scaling,
      eos_token_ids=_as_id_tuple(eos),
      bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
  )
