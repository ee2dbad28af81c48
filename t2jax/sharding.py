"""The device mesh (named axes data, fsdp, tensor) and the one partition-rule table.

Params, SVD factors and the sampler's KV cache are placed by `PARTITION_RULES`: an ordered
list of (regex over the "/"-joined pytree path, PartitionSpec); the first match wins and a path
no rule matches is an error, so a new parameter never ends up replicated by accident; so is a
mesh axis that does not divide the dimension its rule puts it on (UNEVEN_OK names the one
exception). z and the optimizer state are tiny and replicated.

Batches are split over the batch axes (data × fsdp). With several processes, each holds the
rows of its own devices: `process_rows` says which slice of the global batch that is,
`global_batch` assembles the global arrays from every process's rows and `local_rows` reads a
process's rows back. Activations follow the batch: a program built for a mesh passes it to the
model explicitly, which keeps each layer's input split over the batch axes (`constrain_rows`);
left to XLA's propagation, FSDP-sharded weights can pull it into running the whole batch on
every device.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch axis is split over every data-parallel device

# Kernels are [in, out]: "column" projections split out over tensor, "row" projections split
# in over tensor; fsdp takes the other dimension. SVD factors follow their kernel, v [in, r]
# like the kernel's rows and ut [r, out] like its columns, with fsdp on the rank dimension
# where the kernel's fsdp dimension is not theirs: at full rank the factors outweigh the
# kernels, and a factor left whole on every fsdp device would not fit beside an 8B model.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"embed_tokens$", P("tensor", "fsdp")),
    (r"lm_head$", P("fsdp", "tensor")),
    (r"(q|k|v|gate|up)_proj/kernel$", P("fsdp", "tensor")),
    (r"(o|down)_proj/kernel$", P("tensor", "fsdp")),
    (r"(q|k|v|gate|up)_proj/bias$", P("tensor")),
    (r"(o|down)_proj/bias$", P()),
    (r"(q|k|v|gate|up)_proj/v$", P("fsdp", None)),
    (r"(q|k|v|gate|up)_proj/ut$", P("fsdp", "tensor")),
    (r"(o|down)_proj/v$", P("tensor", "fsdp")),
    (r"(o|down)_proj/ut$", P(None, "fsdp")),
    (r"_proj/(s|s_total)$", P()),
    (r"(layernorm|norm)$", P()),
    # sampling.DecodeState's KV cache (llama.KVCache, [B, KVH, ·, ·] per layer): rows over the
    # batch axes, kv-heads over tensor like the k/v projections that fill them
    (r"^cache/(k|v)(/\d+)?$", P(BATCH, "tensor", None, None)),
]
# Trees stacked over layers for a scanned model (llama.stack_layers, svf.stack_layers, a
# stacked KV cache): their leaves carry a leading layer axis, never split, before the
# dimensions the rules above describe.
STACKED = r"^(layers/[a-z]|self_attn/|mlp/|cache/(k|v)$)"
# (regex, axis): where `axis` does not divide a dimension of a matching path, the dimension
# stays whole (logged once) instead of being an error. Only the KV cache's kv-heads over
# tensor: GQA models have fewer kv heads than a tensor axis may have devices (SmolLM2: 3), and
# each tensor device then holds every kv head, the Megatron answer; the k/v kernels that fill
# the cache still have to split.
UNEVEN_OK: list[tuple[str, str]] = [(r"^cache/(k|v)(/\d+)?$", "tensor")]


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
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _axis_size(mesh: Mesh, axis) -> int:
  return int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The first rule matching `path`. An axis that does not divide its dimension is an error
  (MeshError), except where UNEVEN_OK lets the dimension stay whole."""
  lead = 1 if re.search(STACKED, path) and shape else 0  # the unsplit layer axis
  pattern, spec = _rule(path, shape)
  axes = (tuple(spec) + (None,) * len(shape))[:len(shape) - lead]
  out = [None] * lead
  for i, axis in enumerate(axes, lead):
    if axis is not None and shape[i] % _axis_size(mesh, axis):
      axis = _uneven(path, shape, i, axis, f"rule {pattern!r} → {spec}", mesh)
    out.append(axis)
  return P(*out)


def _rule(path: str, shape: tuple[int, ...]) -> tuple[str, P]:
  for pattern, spec in PARTITION_RULES:
    if re.search(pattern, path):
      return pattern, spec
  raise MeshError(f"no partition rule matches parameter {path!r} (shape {shape}); add one to "
                  "t2jax.sharding.PARTITION_RULES.")


def _uneven(path: str, shape: tuple[int, ...], i: int, axis: str, rule: str, mesh: Mesh):
  """None (dimension i whole) where UNEVEN_OK allows it; otherwise the error."""
  size = _axis_size(mesh, axis)
  if any(ok == axis and re.search(pattern, path) for pattern, ok in UNEVEN_OK):
    _log_uneven(path.split("/")[0], shape[i], axis, size)
    return None
  raise MeshError(
      f"parameter {path!r} of shape {shape}: dimension {i} ({shape[i]}) does not split over "
      f"mesh axis {axis!r} of size {size} ({rule}). Choose a mesh whose {axis!r} size divides "
      f"{shape[i]}, or put a rule for this path that leaves the dimension whole before "
      "t2jax.sharding.PARTITION_RULES (python -m t2jax.compile --rule).")


@functools.lru_cache(maxsize=None)
def _log_uneven(tree: str, dim: int, axis: str, size: int) -> None:  # once per case
  logging.getLogger(__name__).warning(
      "%s: a dimension of %d does not split over mesh axis %r of size %d; it is kept whole on "
      "every %r device (sharding.UNEVEN_OK).", tree, dim, axis, size, axis)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a params / factors pytree, by PARTITION_RULES."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), np.shape(x), mesh)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data × fsdp."""
  return NamedSharding(mesh, P(BATCH))


def constrain_rows(x_BxN: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside a program traced for `mesh`: x split over the batch axes by its leading
  dimension. Unchanged for mesh None (single-device callers) or where the rows do not split
  evenly over the batch devices."""
  if mesh is None or x_BxN.shape[0] % batch_devices(mesh):
    return x_BxN
  return jax.lax.with_sharding_constraint(x_BxN, batch_sharding(mesh))


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: a global batch must be a multiple of this."""
  return _axis_size(mesh, BATCH)


def process_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
  """(index, count): this process holds rows [index·n, (index+1)·n) of a batch of
  `global_rows`, n = global_rows // count. Processes that share their rows (a batch axis of
  size 1 across them) get the same index."""
  if global_rows % batch_devices(mesh):
    raise MeshError(f"a batch of {global_rows} rows does not split over the "
                    f"{batch_devices(mesh)} batch devices (data × fsdp) of the mesh "
                    f"{dict(mesh.shape)}; use a multiple of {batch_devices(mesh)}.")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  starts = sorted({idx[0].indices(global_rows)[0] for idx in index_map.values()})
  stops = sorted({idx[0].indices(global_rows)[1] for idx in index_map.values()})
  lo, hi = starts[0], stops[-1]
  if hi - lo != sum(b - a for a, b in zip(starts, stops)) or global_rows % (hi - lo):
    raise MeshError(f"this process's batch rows {list(zip(starts, stops))} are not one "
                    "contiguous block; build the mesh with sharding.make_mesh, which keeps "
                    "each process's devices together.")
  return lo // (hi - lo), global_rows // (hi - lo)


def global_batch(tree: Any, mesh: Mesh) -> Any:
  """This process's rows (numpy, leading batch dimension) → global arrays split over the batch
  axes; every process calls it with its own rows."""
  rows = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows, np.asarray(x)),
                      tree)


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global array with a leading batch dimension, as numpy (the
  inverse of `global_batch`, whatever sharding the array ended up with)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  index, count = process_rows(mesh, full.shape[0])
  n = full.shape[0] // count
  return full[index * n:(index + 1) * n]


def batch_sum(x: np.ndarray, mesh: Mesh, global_rows: int) -> np.ndarray:
  """Sums over the global batch of host values each process computed over its own rows (see
  process_rows); rows held by several processes count once."""
  x = np.asarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  _, count = process_rows(mesh, global_rows)
  total = np.asarray(multihost_utils.process_allgather(x), np.float64).sum(axis=0)
  return total * count / jax.process_count()
