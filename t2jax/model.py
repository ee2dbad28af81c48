"""`Model` (config + params + tokenizer) and `load_model`, the entry to everything else."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from t2jax import tokenizer as tokenizer_lib
from t2jax import weights
from t2jax.models import llama
from t2jax.models.config import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  config: ModelConfig
  params: dict
  tokenizer: Any  # a transformers tokenizer, or None for a directory without one
  fingerprint: str  # content hash of config + weights; experts are tied to it
  source: str
  # derived data (SVD factors, materialised experts) memoised per model; never saved
  cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    ids = list(self.config.eos_token_ids)
    if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
      ids.append(int(self.tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))

  @property
  def pad_id(self) -> int:
    pad = getattr(self.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else (self.eos_ids or (0,))[0]

  def check_tokens(self, token_ids, what: str = "token_ids") -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
      raise ValueError(f"{what} must be a non-empty int array [batch, time]; got shape "
                       f"{arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{what} must hold integer token ids; got dtype {arr.dtype}.")
    if arr.min() < 0 or arr.max() >= self.config.vocab_size:
      raise ValueError(f"{what} holds ids outside [0, {self.config.vocab_size}).")
    if arr.shape[1] > self.config.max_length:
      raise ValueError(f"{what} has {arr.shape[1]} tokens; this model computes at most "
                       f"{self.config.max_length} (context or sliding window).")
    return arr.astype(np.int32)

  def logits(self, token_ids, expert=None, *, svf_mode: str = "auto") -> jnp.ndarray:
    """token_ids int [B, T] (no padding) → float32 logits [B, T, vocab]. `expert`: None, one
    t2jax.Expert for every row, or a list of Expert-or-None per row."""
    from t2jax import expert as expert_lib  # pylint: disable=import-outside-toplevel

    arr = self.check_tokens(token_ids)
    params, adapters, _ = expert_lib.bind(self, expert, arr.shape[0], svf_mode)
    return _logits(params, arr, np.ones(arr.shape, bool), adapters, cfg=self.config)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params, tokens_BxT, mask_BxT, adapters, *, cfg):
  chex.assert_equal_shape([tokens_BxT, mask_BxT])
  logits_BxTxV = llama.full_logits(params, tokens_BxT, mask_BxT, cfg=cfg, adapters=adapters)
  chex.assert_shape(logits_BxTxV, (*tokens_BxT.shape, cfg.vocab_size))
  chex.assert_type(logits_BxTxV, jnp.float32)
  return logits_BxTxV


def load_model(source: str | None = None, *, dtype: str = "float32") -> Model:
  """Loads the embedded default (None or 'smollm2-135m-instruct'), an HF checkpoint directory
  (safetensors) or a .gguf file, with params in `dtype` (float32 | bfloat16 | float16)."""
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
  path = weights.resolve(source)
  cfg, params, fingerprint = weights.load(path, _DTYPES[dtype])
  tok = tokenizer_lib.load_tokenizer(path)
  return Model(config=cfg, params=params, tokenizer=tok, fingerprint=fingerprint, source=path)
