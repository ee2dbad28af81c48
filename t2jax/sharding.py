"""The device mesh (named axes data, fsdp, tensor) and the one partition-rule table.

Params, SVD factors and everything else are placed by `PARTITION_RULES`: an ordered list of
(regex over the "/"-joined pytree path, PartitionSpec); the first match wins and a path no rule
matches is an error, so a new parameter never ends up replicated by accident. z and the
optimizer state are tiny and replicated.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch axis is split over every data-parallel device

# Kernels are [in, out]: "column" projections split out over tensor, "row" projections split
# in over tensor; fsdp takes the other dimension. SVD factors follow their kernel:
# v [in, r] like the kernel's rows, ut [r, out] like its columns.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"embed_tokens$", P("tensor", "fsdp")),
    (r"lm_head$", P("fsdp", "tensor")),
    (r"(q|k|v|gate|up)_proj/kernel$", P("fsdp", "tensor")),
    (r"(o|down)_proj/kernel$", P("tensor", "fsdp")),
    (r"(q|k|v|gate|up)_proj/bias$", P("tensor")),
    (r"(o|down)_proj/bias$", P()),
    (r"(q|k|v|gate|up)_proj/v$", P("fsdp", None)),
    (r"(q|k|v|gate|up)_proj/ut$", P(None, "tensor")),
    (r"(o|down)_proj/v$", P("tensor", None)),
    (r"(o|down)_proj/ut$", P(None, "fsdp")),
    (r"_proj/(s|s_total)$", P()),
    (r"(layernorm|norm)$", P()),
]


class MeshError(ValueError):
  """A mesh string the devices cannot satisfy."""


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """'data:-1,fsdp:1,tensor:1' → axis sizes; one -1 takes the remaining devices."""
  sizes: dict[str, int] = {}
  for part in filter(None, (s.strip() for s in spec.split(","))):
    name, _, value = part.partition(":")
    if name not in AXES or not value.lstrip("-").isdigit():
      raise MeshError(f"mesh entry {part!r} is not 'axis:size' with axis in {AXES}.")
    sizes[name] = int(value)
  sizes = {a: sizes.get(a, 1) for a in AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise MeshError(f"mesh {spec!r}: sizes must be >= 1, with at most one -1.")
  fixed = int(np.prod([n for n in sizes.values() if n != -1]))
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh {spec!r}: {num_devices} devices do not divide by {fixed}.")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise MeshError(f"mesh {spec!r} needs {int(np.prod(list(sizes.values())))} devices; "
                    f"there are {num_devices}. Use -1 for one axis to take the rest.")
  return sizes


def make_mesh(spec: str, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh(spec, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The first rule matching `path`; axes that do not divide the dimension are dropped."""
  for pattern, spec in PARTITION_RULES:
    if re.search(pattern, path):
      out = []
      for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axis if axis is None or dim % mesh.shape[axis] == 0 else None)
      return P(*out)
  raise MeshError(f"no partition rule matches parameter {path!r} (shape {shape}); add one to "
                  "t2jax.sharding.PARTITION_RULES.")


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a params / factors pytree, by PARTITION_RULES."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), np.shape(x), mesh)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data × fsdp."""
  return NamedSharding(mesh, P(BATCH))
