"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) as pure functions over a params pytree.

Params layout: a list with one dict per layer, so every projection reads its own buffer.

    embed_tokens                 [V, D]
    layers[i]/input_layernorm    [D]
    layers[i]/self_attn/{q,k,v,o}_proj/kernel   [in, out]   (+ /bias [out] where present)
    layers[i]/post_attention_layernorm          [D]
    layers[i]/mlp/{gate,up,down}_proj/kernel    [in, out]
    norm                         [D]
    lm_head                      [D, V]   (absent when embeddings are tied)

Why not layers stacked on a leading axis under `lax.scan`: on the CPU backend XLA copies each
layer's dynamic slice of a stacked weight before the matmul, which measured 25 % of a decode
step (bench/ and the closing note of the SVF issue); the unrolled loop over separate buffers
reads every weight once, and the default model still compiles in seconds.

Kernels are stored [in, out] (HF's weight transposed) so a projection is `x @ kernel`.
Every projection goes through `linear(x, p, adapter)`: the model does not know about SVF;
an adapter (svf.py) replaces the dense product at call time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from t2jax import sharding
from t2jax.models import rope
from t2jax.models.config import ModelConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
NEG_INF = -1e30  # finite: a fully masked (padding) query row stays NaN-free

# (x [..., in], {"kernel": [in, out], "bias"?: [out]}, adapter or None) -> [..., out]
Linear = Callable[[jnp.ndarray, dict, Any], jnp.ndarray]


def plain_linear(x: jnp.ndarray, p: dict, adapter: Any = None) -> jnp.ndarray:
  del adapter
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


@flax.struct.dataclass
class KVCache:
  """Per layer keys [B, KVH, K, S] and values [B, KVH, S, K]: (batch, kv-head) lead so
  attention's batched dots read the cache in place, and each dot contracts over its operand's
  major axis (q·K over K, p·V over S). Keys stored [K, S]: the CPU backend's q·Kᵀ against
  [S, K] keys ran at a fifth of the speed of the p·V product over the same bytes."""
  k: list[jnp.ndarray]  # [B, KVH, K, S] per layer
  v: list[jnp.ndarray]  # [B, KVH, S, K] per layer

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
    kd, g = cfg.head_dim, cfg.num_kv_heads
    return cls(k=[jnp.zeros((batch, g, kd, length), dtype) for _ in range(cfg.num_layers)],
               v=[jnp.zeros((batch, g, length, kd), dtype) for _ in range(cfg.num_layers)])

  @property
  def slots(self) -> int:
    return self.v[0].shape[2]

  def grow(self, batch: int, slots: int) -> "KVCache":
    """A batch-1 cache broadcast to `batch` rows, with empty slots appended up to `slots`."""
    pad = slots - self.slots
    return KVCache(
        k=[jnp.pad(jnp.broadcast_to(x, (batch, *x.shape[1:])), ((0, 0),) * 3 + ((0, pad),))
           for x in self.k],
        v=[jnp.pad(jnp.broadcast_to(x, (batch, *x.shape[1:])),
                   ((0, 0), (0, 0), (0, pad), (0, 0))) for x in self.v])


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def _attention(q_BxTxHxK, k_BxGxKxS, v_BxGxSxK, visible_BxTxS):
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxGxKxS.shape[1]
  # GQA: query head h uses kv head h // (h/g); fold the group into the query-time axis
  q_BxGxRTxK = q_BxTxHxK.reshape(b, t, g, h // g, kd).transpose(0, 2, 3, 1, 4).reshape(
      b, g, (h // g) * t, kd)
  scores = jnp.einsum("bgqk,bgks->bgqs", q_BxGxRTxK, k_BxGxKxS).astype(jnp.float32)
  scores = scores.reshape(b, g, h // g, t, -1) * (kd ** -0.5)
  scores = jnp.where(visible_BxTxS[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxGxSxK.dtype)
  out = jnp.einsum("bgqs,bgsk->bgqk", probs.reshape(b, g, (h // g) * t, -1), v_BxGxSxK)
  return out.reshape(b, g, h // g, t, kd).transpose(0, 3, 1, 2, 4).reshape(b, t, h * kd)


def _layer(x_BxTxD, p: dict, a: dict, k_cache, v_cache, positions_BxT, write_index,
           visible_BxTxS, *, cfg: ModelConfig, linear: Linear):
  """One decoder layer: attention over the cache (this call's K/V written at write_index),
  then the MLP. Returns the new residual stream and the layer's updated cache."""
  b, t, _ = x_BxTxD.shape
  n_h, n_kv, kd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  inv_freq = rope.inv_frequencies(cfg)
  ad = lambda block, name: a.get(block, {}).get(name)
  h = rms_norm(x_BxTxD, p["input_layernorm"], cfg.rms_norm_eps)
  attn = p["self_attn"]
  q = linear(h, attn["q_proj"], ad("self_attn", "q_proj")).reshape(b, t, n_h, kd)
  k = linear(h, attn["k_proj"], ad("self_attn", "k_proj")).reshape(b, t, n_kv, kd)
  v = linear(h, attn["v_proj"], ad("self_attn", "v_proj")).reshape(b, t, n_kv, kd)
  q = rope.apply_rope(q, positions_BxT, inv_freq)
  k = rope.apply_rope(k, positions_BxT, inv_freq)
  zero, at = jnp.zeros((), jnp.int32), jnp.asarray(write_index, jnp.int32)
  k_cache = jax.lax.dynamic_update_slice(
      k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (zero, zero, zero, at))
  v_cache = jax.lax.dynamic_update_slice(
      v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (zero, zero, at, zero))
  out = _attention(q, k_cache, v_cache, visible_BxTxS)
  x_BxTxD = x_BxTxD + linear(out, attn["o_proj"], ad("self_attn", "o_proj"))
  h = rms_norm(x_BxTxD, p["post_attention_layernorm"], cfg.rms_norm_eps)
  mlp = p["mlp"]
  gate = linear(h, mlp["gate_proj"], ad("mlp", "gate_proj"))
  up = linear(h, mlp["up_proj"], ad("mlp", "up_proj"))
  x_BxTxD = x_BxTxD + linear(jax.nn.silu(gate) * up, mlp["down_proj"], ad("mlp", "down_proj"))
  return x_BxTxD, k_cache, v_cache


def forward(
    params: dict,
    tokens_BxT: jnp.ndarray,
    positions_BxT: jnp.ndarray,
    cache: KVCache,
    write_index: jnp.ndarray,
    key_valid_BxS: jnp.ndarray,
    *,
    cfg: ModelConfig,
    linear: Linear = plain_linear,
    adapters: list | None = None,
    remat: bool = False,
    visible_BxTxS: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, KVCache]:
  """Runs the decoder on T new tokens per row and writes their K/V at cache slots
  [write_index, write_index + T). Slot s is visible to the query at slot q iff s <= q and
  key_valid[b, s]. Returns the final-norm hidden states [B, T, D] and the updated cache.

  adapters: optional list with one pytree per layer (shaped like that layer's params, holding
  only the adapted projections), handed to `linear` per projection; None for the base model.
  remat: differentiated, keep only each layer's inputs and recompute the layer in the backward
  pass (jax.checkpoint): activation memory of one layer instead of all, for a second forward.
  visible_BxTxS: replaces the causal rule above with an explicit mask (several continuations
  of one context in one call, each seeing only itself: adapt's label scoring).
  """
  t = tokens_BxT.shape[1]
  s = cache.slots
  x = params["embed_tokens"][tokens_BxT]
  if visible_BxTxS is None:
    query_slot_T = write_index + jnp.arange(t)
    visible_BxTxS = ((jnp.arange(s)[None, :] <= query_slot_T[:, None])[None]
                     & key_valid_BxS[:, None])
  layer = functools.partial(_layer, cfg=cfg, linear=linear)
  if remat:
    layer = jax.checkpoint(layer)
  k_out, v_out = [], []
  for i, p in enumerate(params["layers"]):
    a = adapters[i] if adapters is not None else {}
    x = sharding.constrain_rows(x)  # the saved (remat) input of each layer, rows split
    x, k_cache, v_cache = layer(x, p, a, cache.k[i], cache.v[i], positions_BxT, write_index,
                                visible_BxTxS)
    k_out.append(k_cache)
    v_out.append(v_cache)
  x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
  return x, KVCache(k=k_out, v=v_out)


def lm_head(params: dict, hidden_BxTxD: jnp.ndarray) -> jnp.ndarray:
  """Hidden states → float32 logits [B, T, V]."""
  if "lm_head" in params:
    logits = hidden_BxTxD @ params["lm_head"]
  else:  # tied: contract against the embedding table without materialising its transpose
    logits = jnp.einsum("btd,vd->btv", hidden_BxTxD, params["embed_tokens"])
  return logits.astype(jnp.float32)


def positions_from_mask(mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """Left-padded rows: the first real token is position 0; padding gets 0 too."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def full_logits(params: dict, tokens_BxT: jnp.ndarray, mask_BxT: jnp.ndarray, *,
                cfg: ModelConfig, linear: Linear = plain_linear,
                adapters: list | None = None) -> jnp.ndarray:
  """Logits [B, T, V] of a (possibly left-padded) batch, no cache kept."""
  b, t = tokens_BxT.shape
  cache = KVCache.zeros(cfg, b, t, params["embed_tokens"].dtype)
  hidden, _ = forward(params, tokens_BxT, positions_from_mask(mask_BxT), cache,
                      jnp.zeros((), jnp.int32), mask_BxT.astype(bool), cfg=cfg, linear=linear,
                      adapters=adapters)
  return lm_head(params, hidden)
