"""Reads HF safetensors checkpoints (single file or sharded) as numpy views, without torch.

The format is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian data; we memory-map it so only the tensor being
converted is ever paged in.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from t2jax.weights.layout import WeightsError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def checkpoint_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise WeightsError(f"{index}: no weight_map.")
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise WeightsError(f"{index} lists shards that are missing: {absent}.")
    return files
  if os.path.isfile(single):
    return [single]
  raise WeightsError(
      f"{path}: no model.safetensors or model.safetensors.index.json. t2jax reads safetensors "
      "only (convert .bin checkpoints with `save_pretrained(..., safe_serialization=True)`).")


def read_file(file: str) -> Iterator[tuple[str, np.ndarray]]:
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise WeightsError(f"{file}: truncated safetensors file.")
    (header_len,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise WeightsError(f"{file}: corrupt safetensors header.") from None
  header.pop("__metadata__", None)
  data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
  for name, info in header.items():
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    if end > data.size:
      raise WeightsError(f"{file}: tensor {name!r} extends past the end of the file.")
    yield name, data[start:end].view(dtype).reshape(info["shape"])


def read_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray]]:
  for file in checkpoint_files(path):
    yield from read_file(file)
