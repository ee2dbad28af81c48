"""Model configurations without weights: published HF `config.json` files, for planning.

`t2jax.compile` sizes a training run from a config alone, so a user can ask whether
Llama-3-70B fits a pod before downloading it. A preset is the checkpoint's `config.json`
verbatim (the Instruct variants, as the paper uses); `model_config` also reads the config of
an HF directory or a GGUF file (metadata only, no tensor is dequantised) and of the embedded
default model.
"""

from __future__ import annotations

import os
from typing import Any

from t2jax.models.config import ModelConfig, from_hf_dict, from_hf_dir

# meta-llama/Meta-Llama-3-8B-Instruct: 8.03B parameters.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128009, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 128256,
}
# meta-llama/Meta-Llama-3-70B-Instruct: 70.6B parameters.
LLAMA3_70B = {
    **LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8,
}
# mistralai/Mistral-7B-Instruct-v0.3: 7.25B parameters, no sliding window (v0.1 had 4096).
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32768,
}
# Qwen/Qwen2.5-7B-Instruct: 7.62B parameters, q/k/v biases.
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 152064,
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama3_8b": LLAMA3_8B,
    "llama3_70b": LLAMA3_70B,
    "mistral_7b": MISTRAL_7B,
    "qwen2_5_7b": QWEN2_5_7B,
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(name)
  return from_hf_dict(PRESETS[name], where=f"preset {name}")


def model_config(source: str | None) -> tuple[ModelConfig, str]:
  """(config, description) for a preset name, "" / None / 'smollm2-135m-instruct' (the
  embedded default), an HF checkpoint directory or a .gguf file. Reads no weights."""
  from t2jax import weights  # pylint: disable=import-outside-toplevel
  from t2jax.weights import gguf_io  # pylint: disable=import-outside-toplevel

  if source in PRESETS:
    return preset(source), f"preset {source}"
  if (source and not os.path.exists(os.path.expanduser(source))
      and source != weights.DEFAULT_MODEL):
    raise FileNotFoundError(
        f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing HF "
        "checkpoint directory or .gguf file.")
  path = weights.resolve(source or None)
  if os.path.isdir(path):
    return from_hf_dir(path), path
  cfg, _ = gguf_io.load(path)  # tensors are a lazy iterator: nothing is dequantised
  return cfg, (weights.DEFAULT_MODEL if not source else path)
