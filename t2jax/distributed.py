"""Joining JAX's multi-process runtime: one call at the start of every entry point.

A process joins when it was started as one of several:
  - by `launch/local_multiprocess.sh` (or any launcher) that sets JAX_COORDINATOR_ADDRESS,
    T2JAX_NUM_PROCESSES and T2JAX_PROCESS_ID;
  - on a TPU pod, a SLURM allocation, Kubernetes or MPI with T2JAX_DISTRIBUTED=1: JAX detects
    the coordinator, process count and id itself (launch/tpu_pod.sh, launch/slurm_gpu.sbatch).
Otherwise it is a no-op and the run is single-process.

A process that dies is noticed by the coordination service when its heartbeats stop
(T2JAX_HEARTBEAT_S, default 30 s); the others are then stopped with an error from JAX that
names the missing task, instead of waiting forever in a collective.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


class DistributedError(RuntimeError):
  """The multi-process environment is inconsistent; the message names the variable."""


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"environment variable {name}={value!r} is not an integer.") from None


def requested() -> bool:
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get(
      "T2JAX_DISTRIBUTED", "0") not in ("", "0")


def initialize() -> None:
  """Joins the runtime if this process was launched as one of several (see the module doc)."""
  if not requested() or jax.distributed.is_initialized():
    return
  num, pid = _int_env("T2JAX_NUM_PROCESSES"), _int_env("T2JAX_PROCESS_ID")
  if (num is None) != (pid is None):
    raise DistributedError("set both T2JAX_NUM_PROCESSES and T2JAX_PROCESS_ID, or neither "
                           "(to let JAX detect them on a TPU pod / SLURM).")
  if num is not None and not 0 <= pid < num:
    raise DistributedError(f"T2JAX_PROCESS_ID={pid} is not in [0, T2JAX_NUM_PROCESSES={num}).")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    # CPU devices of different processes talk over gloo (TCP); the default has no collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = _int_env("T2JAX_HEARTBEAT_S") or 30
  jax.distributed.initialize(
      coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
      num_processes=num, process_id=pid, heartbeat_timeout_seconds=heartbeat,
      initialization_timeout=_int_env("T2JAX_INIT_TIMEOUT_S") or 300)


# Files in the workdir (base scores, the best expert) are written by process 0 alone, and on a
# pod each worker has its own disk; what those files decide is sent from process 0 to all, so
# every process takes the same branch into the same collectives.
def json_from_lead(value: Any) -> Any:
  """Process 0's `value` (anything JSON holds) on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else (
      np.zeros(0, np.uint8))
  size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  buf = np.zeros(size, np.uint8)
  buf[:data.size] = data
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def arrays_from_lead(tree: Any) -> Any:
  """Process 0's pytree of host arrays on every process (the others pass one of the same
  structure and shapes)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
