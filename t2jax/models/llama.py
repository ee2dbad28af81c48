"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) as flax.nnx modules.

    Llama
      embed_tokens   Embed         embedding [V, D]
      layers[i]      DecoderLayer
        input_layernorm             RMSNorm    weight [D]
        self_attn    Attention     {q,k,v,o}_proj      Linear  kernel [in, out] (+ bias [out])
        post_attention_layernorm    RMSNorm    weight [D]
        mlp          MLP           {gate,up,down}_proj Linear  kernel [in, out]
      norm           RMSNorm       weight [D]
      lm_head        Linear | None kernel [D, V]   (None when embeddings are tied)

Every weight is a `Frozen` variable: an input of the jitted programs, never differentiated and
never handed to an optimizer (SVF's z, the only `nnx.Param`, is added by `t2jax.svf.apply`).
Kernels are stored [in, out] (HF's weight transposed) so a projection is `x @ kernel`.

The loaders (t2jax/weights) build a plain params dict in the same layout, with a leaf where a
module above has its one variable (`embed_tokens` [V, D], `norm` [D], `lm_head` [D, V],
`layers[i]/input_layernorm` [D], `layers[i]/<block>/<proj>/{kernel,bias}`): that dict is what
`Model.params`, the partition rules and the expert files name. `Llama.from_params` wraps its
arrays (no copy) and `to_params` gives the dict back; `forward` and `lm_head` are the thin
functional entry points over the modules.

Layers unrolled or scanned (`scan_enabled`, config.scan_layers): on the CPU backend XLA copies
each layer's dynamic slice of a stacked weight before the matmul, which measured 25 % of a
decode step (bench/ and the closing note of the SVF issue), so there the layers stay separate
buffers in a Python loop; on TPU/GPU `stack_layers` puts every weight on a leading layer axis
and one layer's program runs under `lax.scan`, so compile time and program size do not grow
with depth. The KV cache follows: a list of per-layer arrays, or one [L, ...] array.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.nnx as nnx
import flax.struct
import jax
import jax.numpy as jnp

from t2jax import sharding
from t2jax.models import rope
from t2jax.models.config import ModelConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
NEG_INF = -1e30  # finite: a fully masked (padding) query row stays NaN-free


class Frozen(nnx.Variable):
  """A base weight (or an SVD factor): a constant input of the programs, never trained."""


class Shared(Frozen):
  """A frozen input every layer of a scanned model reads whole, not sliced per layer (the
  per-row flags of factored SVF)."""


@flax.struct.dataclass
class KVCache:
  """Per layer keys [B, KVH, K, S] and values [B, KVH, S, K]: (batch, kv-head) lead so
  attention's batched dots read the cache in place, and each dot contracts over its operand's
  major axis (q·K over K, p·V over S). Keys stored [K, S]: the CPU backend's q·Kᵀ against
  [S, K] keys ran at a fifth of the speed of the p·V product over the same bytes."""
  k: list[jnp.ndarray]  # [B, KVH, K, S] per layer
  v: list[jnp.ndarray]  # [B, KVH, S, K] per layer

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype,
            stacked: bool = False) -> "KVCache":
    """Empty cache; `stacked`: one [L, ...] array each for keys and values (scanned layers)."""
    kd, g, n = cfg.head_dim, cfg.num_kv_heads, cfg.num_layers
    if stacked:
      return cls(k=jnp.zeros((n, batch, g, kd, length), dtype),
                 v=jnp.zeros((n, batch, g, length, kd), dtype))
    return cls(k=[jnp.zeros((batch, g, kd, length), dtype) for _ in range(n)],
               v=[jnp.zeros((batch, g, length, kd), dtype) for _ in range(n)])

  @property
  def slots(self) -> int:
    return self.v[0].shape[-2]

  def grow(self, batch: int, slots: int) -> "KVCache":
    """A batch-1 cache broadcast to `batch` rows, with empty slots appended up to `slots`."""
    pad = slots - self.slots

    def grown(x, slot_axis):  # [..., B, KVH, ·, ·]
      x = jnp.broadcast_to(x, (*x.shape[:-4], batch, *x.shape[-3:]))
      widths = [(0, 0)] * x.ndim
      widths[slot_axis] = (0, pad)
      return jnp.pad(x, widths)

    if isinstance(self.k, list):
      return KVCache(k=[grown(x, -1) for x in self.k], v=[grown(x, -2) for x in self.v])
    return KVCache(k=grown(self.k, -1), v=grown(self.v, -2))


# ---------------------------------------------------------------------------------------------
# Modules.


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); the one place a projection's weights are read, so an adapter
  (t2jax.svf) is a module swapped in for it."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None = None):
    self.kernel = Frozen(kernel)
    self.bias = Frozen(bias) if bias is not None else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    return y + self.bias[...] if self.bias is not None else y


class Embed(nnx.Module):
  def __init__(self, embedding_VxD: jax.Array):
    self.embedding = Frozen(embedding_VxD)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    return self.embedding[...][tokens_BxT]

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    """Tied head: contract against the table without materialising its transpose."""
    return jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding[...])


class RMSNorm(nnx.Module):
  def __init__(self, weight_D: jax.Array, eps: float):
    self.weight = Frozen(weight_D)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


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


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, q_proj: Linear, k_proj: Linear, v_proj: Linear,
               o_proj: Linear):
    self.cfg = cfg
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj

  def __call__(self, h_BxTxD, positions_BxT, k_cache, v_cache, write_index, visible_BxTxS):
    """Attention over the cache, this call's K/V written at slot write_index first. Returns
    the output [B, T, D] and the layer's updated cache."""
    b, t, _ = h_BxTxD.shape
    n_h, n_kv, kd = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
    inv_freq = rope.inv_frequencies(self.cfg)
    q = self.q_proj(h_BxTxD).reshape(b, t, n_h, kd)
    k = self.k_proj(h_BxTxD).reshape(b, t, n_kv, kd)
    v = self.v_proj(h_BxTxD).reshape(b, t, n_kv, kd)
    q = rope.apply_rope(q, positions_BxT, inv_freq)
    k = rope.apply_rope(k, positions_BxT, inv_freq)
    k_new = k.transpose(0, 2, 3, 1).astype(k_cache.dtype)  # [B, KVH, K, T]
    v_new = v.transpose(0, 2, 1, 3).astype(v_cache.dtype)  # [B, KVH, T, K]
    zero, at = jnp.zeros((), jnp.int32), jnp.asarray(write_index, jnp.int32)
    if at.ndim == 0:  # one slot for the whole (left-padded) batch: the sampler's path
      k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (zero, zero, zero, at))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (zero, zero, at, zero))
    else:  # a slot per row [B] (continuous batching: every row at its own length)
      row = lambda c, x, i, axis: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis)
      k_cache = jax.vmap(functools.partial(row, axis=2))(k_cache, k_new, at)
      v_cache = jax.vmap(functools.partial(row, axis=1))(v_cache, v_new, at)
    out = _attention(q, k_cache, v_cache, visible_BxTxS)
    return self.o_proj(out), k_cache, v_cache


class MLP(nnx.Module):
  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, h_BxTxD):
    return self.down_proj(jax.nn.silu(self.gate_proj(h_BxTxD)) * self.up_proj(h_BxTxD))


class DecoderLayer(nnx.Module):
  def __init__(self, input_layernorm: RMSNorm, self_attn: Attention,
               post_attention_layernorm: RMSNorm, mlp: MLP):
    self.input_layernorm, self.self_attn = input_layernorm, self_attn
    self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

  def __call__(self, x_BxTxD, k_cache, v_cache, positions_BxT, write_index, visible_BxTxS):
    """Attention, then the MLP, each on the normed residual stream. Returns the new stream
    and the layer's updated cache."""
    out, k_cache, v_cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT,
                                           k_cache, v_cache, write_index, visible_BxTxS)
    x_BxTxD = x_BxTxD + out
    x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
    return x_BxTxD, k_cache, v_cache


def _call_layer(layer: DecoderLayer, *args):
  return layer(*args)


class Llama(nnx.Module):
  """layers: a list of DecoderLayer (unrolled), or one DecoderLayer whose weights are stacked
  on a leading layer axis, run under lax.scan (see `scan_enabled`)."""

  def __init__(self, cfg: ModelConfig, embed_tokens: Embed,
               layers: list[DecoderLayer] | DecoderLayer, norm: RMSNorm, lm_head: Linear | None):
    self.cfg = cfg
    self.embed_tokens = embed_tokens
    self.scanned = isinstance(layers, DecoderLayer)
    self.layers = layers if self.scanned else nnx.List(layers)
    self.norm = norm
    self.lm_head = lm_head

  @classmethod
  def from_params(cls, cfg: ModelConfig, params: dict) -> "Llama":
    """The modules over a params dict's arrays (no copy); leaves may be ShapeDtypeStructs.
    params["layers"]: a list of per-layer dicts, or one dict of stacked [L, ...] leaves
    (`stack_layers`) for a scanned model."""
    linear = lambda p: Linear(p["kernel"], p.get("bias"))
    eps = cfg.rms_norm_eps
    layer = lambda p: DecoderLayer(
        RMSNorm(p["input_layernorm"], eps),
        Attention(cfg, *(linear(p["self_attn"][n]) for n in ATTN_PROJ)),
        RMSNorm(p["post_attention_layernorm"], eps),
        MLP(*(linear(p["mlp"][n]) for n in MLP_PROJ)))
    stacked = is_stacked(params["layers"])
    layers = layer(params["layers"]) if stacked else [layer(p) for p in params["layers"]]
    head = Linear(params["lm_head"]) if "lm_head" in params else None
    return cls(cfg, Embed(params["embed_tokens"]), layers, RMSNorm(params["norm"], eps), head)

  @property
  def dtype(self):
    return self.embed_tokens.embedding.dtype

  def empty_cache(self, batch: int, length: int) -> KVCache:
    return KVCache.zeros(self.cfg, batch, length, self.dtype, stacked=self.scanned)

  def __call__(self, tokens_BxT, positions_BxT, cache: KVCache, write_index, key_valid_BxS, *,
               visible_BxTxS=None, remat: bool = False,
               mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """See `forward`."""
    t = tokens_BxT.shape[1]
    s = cache.slots
    x = self.embed_tokens(tokens_BxT)
    if visible_BxTxS is None and jnp.ndim(write_index) == 0:
      query_slot_T = write_index + jnp.arange(t)
      visible_BxTxS = (jnp.arange(s)[None, :] <= query_slot_T[:, None])[None]
    elif visible_BxTxS is None:  # a write slot per row
      query_slot_BxT = jnp.asarray(write_index)[:, None] + jnp.arange(t)
      visible_BxTxS = jnp.arange(s)[None, None, :] <= query_slot_BxT[:, :, None]
    # applied to an explicit mask too: a padded key is never visible, whatever the caller built
    visible_BxTxS = visible_BxTxS & key_valid_BxS[:, None]
    rest = (positions_BxT, write_index, visible_BxTxS)
    if self.scanned:
      graphdef, shared, stacked = nnx.split(self.layers, Shared, ...)

      def body(x, xs):  # one layer: its slice of the stacked state and of the cache
        layer_state, k_cache, v_cache = xs
        x = sharding.constrain_rows(x, mesh)
        layer = nnx.merge(graphdef, shared, layer_state)
        x, k_cache, v_cache = layer(x, k_cache, v_cache, *rest)
        return x, (k_cache, v_cache)

      body = jax.checkpoint(body) if remat else body
      x, (k_out, v_out) = jax.lax.scan(body, x, (stacked, cache.k, cache.v))
      return self.norm(x), KVCache(k=k_out, v=v_out)
    call = nnx.remat(_call_layer) if remat else _call_layer
    k_out, v_out = [], []
    for i, layer in enumerate(self.layers):
      x = sharding.constrain_rows(x, mesh)  # the saved (remat) input of each layer, rows split
      x, k_cache, v_cache = call(layer, x, cache.k[i], cache.v[i], *rest)
      k_out.append(k_cache)
      v_out.append(v_cache)
    return self.norm(x), KVCache(k=k_out, v=v_out)

  def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """Hidden states → float32 logits [B, T, V]."""
    if self.lm_head is not None:
      logits = self.lm_head(hidden_BxTxD)
    else:
      logits = self.embed_tokens.attend(hidden_BxTxD)
    return logits.astype(jnp.float32)


def to_params(model: Llama) -> dict:
  """The params dict of a model's (plain Linear) modules: the inverse of from_params."""
  linear = lambda m: ({"kernel": m.kernel[...]} if m.bias is None
                      else {"kernel": m.kernel[...], "bias": m.bias[...]})
  layers = [{"input_layernorm": layer.input_layernorm.weight[...],
             "self_attn": {n: linear(getattr(layer.self_attn, n)) for n in ATTN_PROJ},
             "post_attention_layernorm": layer.post_attention_layernorm.weight[...],
             "mlp": {n: linear(getattr(layer.mlp, n)) for n in MLP_PROJ}}
            for layer in ([model.layers] if model.scanned else model.layers)]
  params = {"embed_tokens": model.embed_tokens.embedding[...],
            "layers": layers[0] if model.scanned else layers,
            "norm": model.norm.weight[...]}
  if model.lm_head is not None:
    params["lm_head"] = model.lm_head.kernel[...]
  return params


def is_stacked(layers) -> bool:
  """A "layers" entry (of params, SVD factors or z) stacked for scanning: one tree of
  [L, ...] leaves instead of a list with one tree per layer."""
  return not isinstance(layers, (list, tuple))


def stack_layers(params: dict) -> dict:
  """params with the per-layer list stacked into one tree of [L, ...] leaves (a copy)."""
  if is_stacked(params["layers"]):
    return params
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def unstack_layers(params: dict) -> dict:
  """The inverse of stack_layers."""
  layers = params["layers"]
  if not is_stacked(layers):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]}


SCAN_SETTINGS = ("auto", True, False)


def scan_enabled(setting: Any = "auto", backend: str | None = None) -> bool:
  """config.scan_layers: True, False, or "auto": scanned on TPU and GPU, where one layer's
  program serves every layer (compile time and program size stay flat with depth), unrolled
  on CPU, where XLA copies each layer's slice of a stacked weight before its matmul."""
  if isinstance(setting, str) and setting.lower() in ("true", "false"):
    setting = setting.lower() == "true"
  if setting not in SCAN_SETTINGS:
    raise ValueError(f"scan_layers must be 'auto', True or False; got {setting!r}.")
  if setting == "auto":
    return (backend or jax.default_backend()) in ("tpu", "gpu", "cuda", "rocm")
  return bool(setting)


@functools.lru_cache(maxsize=16)
def _split_plan(cfg: ModelConfig, treedef) -> tuple[nnx.GraphDef, Any, list[int]]:
  """graphdef, the state's treedef and, per state leaf, the index of the input leaf it holds:
  the model built once over leaf indices instead of arrays."""
  params, adapters = jax.tree.unflatten(treedef, range(treedef.num_leaves))
  graphdef, state = nnx.split(build(cfg, params, adapters))
  order, state_def = jax.tree.flatten(state)
  return graphdef, state_def, order


def split_params(cfg: ModelConfig, params: dict, adapters: Any = None
                 ) -> tuple[nnx.GraphDef, nnx.State]:
  """nnx.split(build(cfg, params, adapters)) without building the modules again for every
  call (a Python walk of a few hundred modules, a second on the default model): the plan is
  cached per (config, tree structure) and only the arrays are placed."""
  leaves, treedef = jax.tree.flatten((params, adapters))
  graphdef, state_def, order = _split_plan(cfg, treedef)
  return graphdef, jax.tree.unflatten(state_def, [leaves[i] for i in order])


# ---------------------------------------------------------------------------------------------
# Functional entry points over a params dict.


def build(cfg: ModelConfig, params: dict, adapters: Any = None) -> Llama:
  """The model over `params`, with `adapters` (e.g. svf.RowAdapters: anything with
  `attach(model)`) swapped into its projections."""
  model = Llama.from_params(cfg, params)
  if adapters is not None:
    adapters.attach(model)
  return model


def forward(
    params: dict,
    tokens_BxT: jnp.ndarray,
    positions_BxT: jnp.ndarray,
    cache: KVCache,
    write_index: jnp.ndarray,
    key_valid_BxS: jnp.ndarray,
    *,
    cfg: ModelConfig,
    adapters: Any = None,
    remat: bool = False,
    visible_BxTxS: jnp.ndarray | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jnp.ndarray, KVCache]:
  """Runs the decoder on T new tokens per row and writes their K/V at cache slots
  [write_index, write_index + T). Slot s is visible to the query at slot q iff s <= q and
  key_valid[b, s]. Returns the final-norm hidden states [B, T, D] and the updated cache.

  write_index: a scalar (every row writes at the same slot: left-padded batches), or [B], a
  slot per row (continuous batching, t2jax.engine: each row at its own length). The scalar
  path is the same program as before the per-row one existed.

  adapters: None for the base model, or modules to swap in (see `build`).
  remat: differentiated, keep only each layer's inputs and recompute the layer in the backward
  pass (jax.checkpoint): activation memory of one layer instead of all, for a second forward.
  visible_BxTxS: replaces the causal rule above with an explicit mask (several continuations
  of one context in one call, each seeing only itself: adapt's label scoring); key_valid still
  applies, so a padded slot stays invisible under any mask.
  mesh: the mesh the calling program is built for: each layer's input is kept split over its
  batch axes (sharding.constrain_rows); None leaves placement to XLA.
  """
  return build(cfg, params, adapters)(tokens_BxT, positions_BxT, cache, write_index,
                                      key_valid_BxS, visible_BxTxS=visible_BxTxS, remat=remat,
                                      mesh=mesh)


def lm_head(params: dict, hidden_BxTxD: jnp.ndarray) -> jnp.ndarray:
  """Hidden states → float32 logits [B, T, V]."""
  head = (Linear(params["lm_head"]) if "lm_head" in params
          else Embed(params["embed_tokens"]).attend)
  return head(hidden_BxTxD).astype(jnp.float32)


def positions_from_mask(mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """Left-padded rows: the first real token is position 0; padding gets 0 too."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def full_logits(params: dict, tokens_BxT: jnp.ndarray, mask_BxT: jnp.ndarray, *,
                cfg: ModelConfig, adapters: Any = None) -> jnp.ndarray:
  """Logits [B, T, V] of a (possibly left-padded) batch, no cache kept."""
  return model_logits(build(cfg, params, adapters), tokens_BxT, mask_BxT)


def model_logits(model: Llama, tokens_BxT: jnp.ndarray, mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """full_logits of a module."""
  b, t = tokens_BxT.shape
  cache = model.empty_cache(b, t)
  hidden, _ = model(tokens_BxT, positions_from_mask(mask_BxT), cache, jnp.zeros((), jnp.int32),
                    mask_BxT.astype(bool))
  return model.logits(hidden)
