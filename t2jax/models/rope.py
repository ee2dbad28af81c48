"""Rotary position embeddings (HF `rotate_half` layout) with the Llama scaling variants."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from t2jax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[head_dim // 2] float32, computed in float32 as HF does so logits match to 1e-5."""
  dim = cfg.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  scaling = cfg.rope_scaling_dict
  kind = scaling.get("rope_type")
  if kind == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "freq_factors":  # llama.cpp stores llama3 scaling as per-frequency divisors
    return (inv_freq / np.asarray(scaling["factors"], np.float32)).astype(np.float32)
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x_BxTxHxK: jnp.ndarray, positions_BxT: jnp.ndarray,
               inv_freq: np.ndarray) -> jnp.ndarray:
  freqs_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
  cos = jnp.cos(emb_BxTxK)[:, :, None, :].astype(x_BxTxHxK.dtype)
  sin = jnp.sin(emb_BxTxK)[:, :, None, :].astype(x_BxTxHxK.dtype)
  half = x_BxTxHxK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxHxK[..., half:], x_BxTxHxK[..., :half]], axis=-1)
  return x_BxTxHxK * cos + rotated * sin
