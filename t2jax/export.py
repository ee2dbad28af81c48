"""Command line: an expert baked into the model's weights as a Hugging Face checkpoint.

  python -m t2jax.export --expert DIR --out OUTDIR [--model SRC] [--force]
      [--dtype float32|bfloat16|float16]
  python -m t2jax.export --experts math=DIR1,code=DIR2 --alpha FILE_OR_WEIGHTS --out OUTDIR ...
  python -m t2jax.export --expert DIR --z-only --out FILE.safetensors

--expert is an SVF expert or a LoRA expert saved by t2jax.train; --experts with --alpha is a
few-shot/CEM mixture (--alpha: the JSON file adapt.save_alpha wrote, or one weight per expert,
e.g. 0.7,0.3). --model is the expert's base model: an HF directory, a .gguf file, or the
embedded SmolLM2-135M-Instruct (default); it is loaded in float32 and the expert merged there,
so --dtype rounds each weight once.

OUTDIR holds config.json, model.safetensors (above 2 GB: model-0000i-of-0000n.safetensors
shards with model.safetensors.index.json), the tokenizer files with their chat template,
generation_config.json and t2jax_export.json (source model and fingerprint, the expert and
its metrics, the mixture's weights, dtype, t2jax version). Only the targeted kernels differ
from the base model's. Serving stacks (vLLM, TGI, transformers) load it like any checkpoint:
`AutoModelForCausalLM.from_pretrained(OUTDIR)`, no t2jax needed. An existing non-empty OUTDIR
is refused unless --force; the new directory is written beside it and swapped in whole, so an
interrupted export never leaves a partial one or destroys the old one.

--z-only writes just the SVF expert's z: one safetensors file keyed by HF parameter name
("model.layers.N.mlp.gate_proj.weight" → [r]) with the expert's settings in its metadata
(`load_z` reads it back). A LoRA expert has no z: export it in full.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import operator
import os
import struct
import sys
from typing import Any, Callable

import ml_dtypes
import numpy as np

from t2jax import adapt, atomic, lora
from t2jax import expert as expert_lib
from t2jax.expert import Expert
from t2jax.models import llama
from t2jax.models.config import ModelConfig, from_hf_dict
from t2jax.weights.layout import expected_tensors, param_path

FORMAT, Z_FORMAT = "t2jax-export/1", "t2jax-z/1"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SHARD_BYTES = 2 * 10**9  # HF counts shard sizes in decimal GB
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}


class ExportError(ValueError):
  """An export t2jax refuses; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The merged weights.


def mixture(experts: dict[str, Expert], alpha, matrices=(), name: str = "mixture") -> Expert:
  """The SVF mixture Σ_k α_k z_k of experts keyed by label, as adapt.mix forms it (α projected
  onto the simplex; [K] or per matrix [K, M] with columns named by `matrices`). Its
  metrics["mixture"] holds the weights used, by label."""
  if any(not isinstance(e, Expert) for e in experts.values()):
    raise ExportError("a mixture mixes SVF experts' z; LoRA experts cannot be mixed.")
  named = [dataclasses.replace(e, name=label) for label, e in experts.items()]
  mixed = adapt.mix(named, alpha, matrices, name=name)
  if matrices:  # per-matrix weights are lists in this column order
    mixed = dataclasses.replace(mixed, metrics={**mixed.metrics,
                                                "mixture_matrices": list(matrices)})
  return mixed


def merged_params(model, expert) -> dict:
  """model.params with `expert` (an SVF Expert, a LoRAExpert, or None for the base model)
  merged into the targeted kernels; every other leaf is the model's own."""
  if expert is None:
    return model.params
  if not isinstance(expert, (Expert, lora.LoRAExpert)):
    raise TypeError(f"expert must be a t2jax.Expert or LoRAExpert, not {type(expert).__name__}.")
  expert.check(model)
  # the weights model.logits(tokens, expert) runs, so the two agree to round-off
  return expert_lib.bind(model, expert, 1, "materialised")[0]


def _leaf(params: dict, name: str):
  path, layer, _ = param_path(name)
  get = lambda tree, keys: functools.reduce(operator.getitem, keys, tree)
  if layer is None:
    return get(params, path)
  layers = params["layers"]
  if llama.is_stacked(layers):  # a scanned model: [L, ...] leaves
    return get(layers, path[1:])[layer]
  return get(layers[layer], path[1:])


def hf_tensor(params: dict, name: str, dtype: str = "float32") -> np.ndarray:
  """One HF-named tensor of params in HF orientation (projections [out, in]: our kernels
  are [in, out])."""
  _, _, transpose = param_path(name)
  arr = np.asarray(_leaf(params, name))
  return np.ascontiguousarray(arr.T if transpose else arr, dtype=DTYPES[dtype])


def merged_state_dict(model, expert, dtype: str = "float32") -> dict[str, np.ndarray]:
  """{HF name: numpy array} of the merged model: every tensor a transformers checkpoint of
  this config holds (no lm_head when the embeddings are tied), in `dtype`."""
  _check_dtype(dtype)
  params = merged_params(model, expert)
  return {name: hf_tensor(params, name, dtype)
          for name in expected_tensors(model.config)}


# ---------------------------------------------------------------------------------------------
# config.json and generation_config.json.


def _ids(ids: tuple[int, ...]):
  return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def _rope(cfg: ModelConfig) -> dict[str, Any] | None:
  scaling = cfg.rope_scaling_dict
  kind = scaling.get("rope_type")
  if kind is None:
    return None
  if kind == "freq_factors":
    raise ExportError(
        f"{cfg.model_type} with llama3 rope scaling read from a GGUF file (per-frequency "
        "factors) has no exact HF config: export from the model's HF checkpoint directory.")
  out = {"rope_type": kind, **{k: v for k, v in scaling.items() if k != "rope_type"}}
  if "original_max_position_embeddings" in out:  # an int in HF configs; ours holds a float
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
  return out


def hf_config(cfg: ModelConfig, dtype: str = "float32", pad_id: int | None = None) -> dict:
  """The config.json transformers reads back as exactly `cfg` (refused where none does)."""
  if cfg.model_type not in _ARCHITECTURES:
    raise ExportError(f"model_type {cfg.model_type!r} cannot be exported; t2jax exports "
                      f"{sorted(_ARCHITECTURES)}.")
  rope = _rope(cfg)
  out = {
      "architectures": [_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      # both spellings: transformers < 5 and most serving stacks read rope_theta/rope_scaling,
      # transformers >= 5 rope_parameters
      "rope_theta": cfg.rope_theta, "rope_scaling": rope,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **(rope or {})},
      "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": _ids(cfg.eos_token_ids),
      "pad_token_id": pad_id, "torch_dtype": dtype, "dtype": dtype,
  }
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  elif cfg.model_type == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  else:  # qwen2: q/k/v biases are implied by the architecture
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  # Every field must come back: a model HF would build differently is refused, not exported.
  back = from_hf_dict(out, where="exported config.json")
  if back != cfg:
    diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name))
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(back, f.name)}
    raise ExportError(f"this {cfg.model_type} model has no exact HF config: {diff} "
                      "(ours, HF's) would differ.")
  return out


def generation_config(cfg: ModelConfig, pad_id: int | None) -> dict:
  # transformers stops generation at every eos listed here (Llama 3 chat lists several)
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": _ids(cfg.eos_token_ids),
          "pad_token_id": pad_id}


# ---------------------------------------------------------------------------------------------
# Safetensors, streamed: the header comes from the shapes, then one tensor at a time goes
# from the device to the file, so the host never holds a second copy of the model.


def _write_safetensors(path: str, shapes: dict[str, tuple[int, ...]], dtype: str,
                       get: Callable[[str], np.ndarray], metadata: dict[str, str]) -> int:
  """Writes the tensors `shapes` names (in that order), each fetched by `get(name)` as it is
  written; returns the bytes of tensor data."""
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for name, shape in shapes.items():
    size = int(np.prod(shape, dtype=np.int64)) * itemsize
    header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name, shape in shapes.items():
      arr = get(name)
      if arr.shape != tuple(shape) or arr.dtype != DTYPES[dtype]:
        raise ExportError(f"tensor {name}: {arr.dtype}{arr.shape}, expected {dtype}{shape}.")
      f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    f.flush()
    os.fsync(f.fileno())
  return offset


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int,
            shard_bytes: int) -> list[list[str]]:
  """Names in order, cut into groups of at most shard_bytes (a bigger tensor alone)."""
  groups: list[list[str]] = [[]]
  size = 0
  for name, shape in shapes.items():
    n = int(np.prod(shape, dtype=np.int64)) * itemsize
    if groups[-1] and size + n > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += n
  return groups


def _write_weights(directory: str, cfg: ModelConfig, params: dict, dtype: str,
                   shard_bytes: int) -> int:
  shapes = expected_tensors(cfg)
  groups = _shards(shapes, np.dtype(DTYPES[dtype]).itemsize, shard_bytes)
  get = lambda name: hf_tensor(params, name, dtype)
  meta = {"format": "pt"}  # transformers refuses safetensors files without it
  if len(groups) == 1:
    return _write_safetensors(os.path.join(directory, "model.safetensors"), shapes, dtype, get,
                              meta)
  total, weight_map = 0, {}
  for i, names in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    total += _write_safetensors(os.path.join(directory, file), {n: shapes[n] for n in names},
                                dtype, get, meta)
    weight_map.update(dict.fromkeys(names, file))
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return total


# ---------------------------------------------------------------------------------------------
# The export.


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ExportError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")


def check_out(out: str, force: bool, *, file: bool = False) -> None:
  """Refuses an `out` that would replace something without --force, or the wrong kind."""
  what = "--out (API: out)"
  if file:
    if os.path.isdir(out):
      raise ExportError(f"{what} {out} is a directory; --z-only writes one .safetensors file.")
    if not out.endswith(".safetensors"):
      raise ExportError(f"{what} {out}: the z-only form is a .safetensors file; name it so.")
    exists = os.path.exists(out)
  else:
    if os.path.exists(out) and not os.path.isdir(out):
      raise ExportError(f"{what} {out} is a file; an export is a directory.")
    exists = os.path.isdir(out) and bool(os.listdir(out))
  if exists and not force:
    raise ExportError(f"{out} exists and is not empty; pass --force (API: force=True) to "
                      "replace it (the old one goes only once the new one is complete).")


def _version() -> str:
  try:
    return importlib.metadata.version("t2jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _expert_meta(expert) -> dict[str, Any]:
  if expert is None:
    return {"kind": "none"}
  common = {"name": expert.name, "fingerprint": expert.fingerprint, "targets": expert.targets,
            "rank": expert.rank, "metrics": expert.metrics}
  if isinstance(expert, lora.LoRAExpert):
    return {"kind": "lora", **common, "alpha": expert.alpha}
  kind = "svf-mixture" if "mixture" in expert.metrics else "svf"
  return {"kind": kind, **common, "parametrisation": expert.parametrisation,
          "max_mult": expert.max_mult}


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  return float(x)  # numpy and jax scalars in metrics


def export(model, expert, out: str, *, dtype: str = "float32", force: bool = False,
           shard_bytes: int = SHARD_BYTES) -> str:
  """Writes `expert` (an SVF Expert, a mixture from `mixture`, a LoRAExpert, or None for the
  base model) merged into `model` as an HF checkpoint directory `out` (see the module doc).
  Returns out's absolute path."""
  _check_dtype(dtype)
  out = os.path.abspath(out)
  check_out(out, force)
  if os.path.realpath(out) == os.path.realpath(model.source):
    raise ExportError(f"--out {out} is the model being exported; choose another directory.")
  params = merged_params(model, expert)
  tok = model.tokenizer
  pad = None if tok is None or tok.pad_token_id is None else int(tok.pad_token_id)
  config = hf_config(model.config, dtype, pad)
  meta = {"format": FORMAT, "t2jax_version": _version(), "source": model.source,
          "source_fingerprint": model.fingerprint, "dtype": dtype,
          "expert": _expert_meta(expert),
          "mixture": None if expert is None else expert.metrics.get("mixture"),
          "tokenizer": tok is not None}
  with atomic.write_dir(out) as tmp:
    _write_weights(tmp, model.config, params, dtype, shard_bytes)
    for name, content in (("config.json", config),
                          ("generation_config.json", generation_config(model.config, pad)),
                          ("t2jax_export.json", meta)):
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, default=_json_default)
    if tok is not None:
      tok.save_pretrained(tmp)
  return out


# ---------------------------------------------------------------------------------------------
# The z-only form.


def export_z(expert: Expert, out: str, *, force: bool = False) -> str:
  """`expert`'s z as one safetensors file (HF name → [r], float32) with its settings in the
  file's metadata; `load_z` reads it back."""
  if not isinstance(expert, Expert):
    raise ExportError(f"--z-only writes an SVF expert's z; {getattr(expert, 'name', expert)!r} "
                      "is a LoRA expert: export it in full (drop --z-only).")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  out = os.path.abspath(out)
  check_out(out, force, file=True)
  meta = {"format": Z_FORMAT, "name": expert.name, "fingerprint": expert.fingerprint,
          "targets": expert.targets, "parametrisation": expert.parametrisation,
          # safetensors metadata holds strings only: the rest as JSON
          "rank": json.dumps(expert.rank), "max_mult": json.dumps(expert.max_mult),
          "metrics": json.dumps(expert.metrics, default=_json_default),
          "t2jax_version": _version()}
  z = {k: np.ascontiguousarray(v, np.float32) for k, v in expert.z.items()}
  atomic.write_file(out, lambda tmp: save_file(z, tmp, metadata=meta))
  return out


def load_z(path: str) -> Expert:
  """The Expert `export_z` wrote to `path`."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  with expert_lib.reading(path), safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if meta.get("format") != Z_FORMAT:
      raise ExportError(f"{path}: format {meta.get('format')!r}, expected {Z_FORMAT!r} (a file "
                        "written by `python -m t2jax.export --z-only`).")
    z = {k: f.get_tensor(k) for k in f.keys()}
  return Expert(z=z, fingerprint=meta["fingerprint"], targets=meta["targets"],
                rank=json.loads(meta["rank"]), parametrisation=meta["parametrisation"],
                name=meta["name"], max_mult=json.loads(meta["max_mult"]),
                metrics=json.loads(meta["metrics"]))


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m t2jax.export",
                              description=__doc__.split("\n")[0])
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--expert", help="an SVF or LoRA expert directory saved by t2jax.train")
  which.add_argument("--experts", help="LABEL=DIR,... SVF experts to mix (needs --alpha)")
  p.add_argument("--alpha", help="mixture weights: a JSON file from the few-shot adapt "
                 "evaluation, or one weight per expert in --experts order, e.g. 0.7,0.3")
  p.add_argument("--out", required=True, help="the checkpoint directory (or, with --z-only, "
                 "the .safetensors file) to write")
  p.add_argument("--model", default=None, help="the experts' base model: HF checkpoint dir, "
                 ".gguf file, or smollm2-135m-instruct (default)")
  p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                 help="dtype of the written weights (default float32)")
  p.add_argument("--force", action="store_true", help="replace a non-empty --out")
  p.add_argument("--z-only", action="store_true", help="write only the SVF expert's z "
                 "(checked against --model only when --model is given)")
  return p.parse_args(argv)


def _experts_from_args(args):
  """(expert or mixture, a note for stderr or None)."""
  if args.expert:
    if args.alpha:
      raise ExportError("--alpha weights a mixture: give --experts LABEL=DIR,... with it.")
    return expert_lib.load_any(args.expert), None
  from t2jax import adapt_eval  # pylint: disable=import-outside-toplevel
  # the reading of --alpha that generate and serve use, so all take the same files and weights
  from t2jax.two_pass_cli import parse_alpha  # pylint: disable=import-outside-toplevel

  if not args.alpha:
    raise ExportError("--experts needs --alpha (a file from the few-shot evaluation, or "
                      "weights such as 0.7,0.3).")
  dirs = adapt_eval.parse_experts(args.experts)
  experts = {label: expert_lib.load_any(d) for label, d in dirs.items()}
  alpha, matrices = parse_alpha(args.alpha, list(experts))
  mixed = mixture(experts, alpha, matrices)
  note = None
  if not np.allclose(adapt.simplex(alpha), np.asarray(alpha, np.float64)):
    note = (f"note: --alpha is not on the simplex (w >= 0, sum 1); the mixture uses it "
            f"projected: {mixed.metrics['mixture']}")
  return mixed, note


def main(argv=None) -> int:
  args = parse_args(argv)
  import t2jax  # pylint: disable=import-outside-toplevel

  try:
    if args.z_only and args.dtype:
      raise ExportError("--dtype sets the merged weights' dtype; --z-only writes z in float32.")
    check_out(args.out, args.force, file=args.z_only)
    expert, note = _experts_from_args(args)
    if note:
      print(note, file=sys.stderr)
    if args.z_only:
      if args.model is not None:
        expert.check(t2jax.load_model(args.model))
      out = export_z(expert, args.out, force=args.force)
      print(f"wrote {out}: z of {len(expert.z)} matrices of {expert.name!r}")
      return 0
    model = t2jax.load_model(args.model, dtype="float32")
    expert.check(model)  # before the SVD: a wrong model is told at once
    if model.tokenizer is None:
      print(f"note: {model.source} has no tokenizer; the export has none either.",
            file=sys.stderr)
    out = export(model, expert, args.out, dtype=args.dtype or "float32", force=args.force)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}: {model.config.model_type} with {expert.name!r} merged, "
        f"{args.dtype or 'float32'}; load it with transformers.AutoModelForCausalLM."
        "from_pretrained")
  return 0


if __name__ == "__main__":
  sys.exit(main())
