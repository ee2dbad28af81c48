"""Reads llama.cpp GGUF files: metadata → ModelConfig, tensors dequantised to float32 with
HF names and HF layout (llama.cpp's q/k row permutation undone)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from t2jax.models.config import ModelConfig, from_gguf_fields
from t2jax.weights.layout import WeightsError

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _reader(path: str):
  import gguf  # pylint: disable=import-outside-toplevel

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on junk
    raise WeightsError(f"{path}: not a readable GGUF file ({e}).") from None


def _fields(reader) -> dict[str, Any]:
  out = {}
  for key, field in reader.fields.items():
    if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores"):
      continue  # large vocab arrays; the tokenizer is built by transformers
    try:
      out[key] = field.contents()
    except Exception:  # pylint: disable=broad-except
      continue
  return out


def hf_tensor_name(gguf_name: str) -> str | None:
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
    return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
  return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's convert_hf_to_gguf permute: it interleaves the two rotary halves of
  every head's rows; HF's rotate_half layout keeps them as contiguous halves."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def load(path: str) -> tuple[ModelConfig, Iterator[tuple[str, np.ndarray]]]:
  """(config, iterator of (HF name, float32 array)). Tensors are dequantised one at a time."""
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

  reader = _reader(path)
  fields = _fields(reader)
  names = {t.name for t in reader.tensors}
  vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if (
      "tokenizer.ggml.tokens" in reader.fields) else 0
  cfg = from_gguf_fields(fields, path, has_output="output.weight" in names, vocab_size=vocab)
  rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if rope_freqs is not None:  # llama3 scaling, stored as per-frequency divisors
    factors = tuple(float(x) for x in dequantize(rope_freqs.data, rope_freqs.tensor_type))
    cfg = dataclasses.replace(cfg, rope_scaling=(("factors", factors),
                                                 ("rope_type", "freq_factors")))
  permuted = fields.get("general.architecture") == "llama"

  def tensors():
    for t in reader.tensors:
      if t.name == "rope_freqs.weight":
        continue
      name = hf_tensor_name(t.name)
      if name is None:
        raise WeightsError(f"{path}: GGUF tensor {t.name!r} has no place in a "
                           f"{cfg.model_type} model.")
      try:
        arr = dequantize(t.data, t.tensor_type)
      except NotImplementedError:
        raise WeightsError(f"{path}: tensor {t.name!r} uses quantisation "
                           f"{t.tensor_type.name}, which the gguf package cannot "
                           "dequantise.") from None
      arr = np.asarray(arr, np.float32)
      if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
        arr = unpermute_qk(arr, cfg.num_heads)
      elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
        arr = unpermute_qk(arr, cfg.num_kv_heads)
      yield name, arr

  return cfg, tensors()
