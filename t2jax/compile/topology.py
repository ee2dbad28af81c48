"""A TPU topology's compile-only devices (libtpu describes them; none is opened) and the HBM
XLA lets one program use on each."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from t2jax.compile import GIB, CompileUsageError

# Nominal HBM per JAX device, by `device_kind`, for the report; fitting is judged against the
# (slightly smaller) size XLA itself allows a program, see `usable_hbm`. A device is a chip,
# except on v2, v3 and 7x where JAX sees each of a chip's two TensorCores as a device with half
# the chip's HBM. (v4's two cores run as one "megacore" device, as the topology is built below.)
HBM_GIB = {
    "TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 96,  # v5p
    "TPU v6 lite": 32, "TPU7x": 96,
}
# libtpu reads these when it loads; without them it probes a metadata server for a TPU VM's
# identity and prints warnings. setdefault: on a TPU VM the real values win.
# ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes a machine-wide lock file, which would stop a second
# compile (or a test run beside one) although none of them opens a TPU.
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: list
  device_kind: str
  hbm_bytes: int  # what XLA lets one program use on a device
  nominal_hbm_bytes: int  # the device's HBM (0: not in HBM_GIB)


SIZE = r"([\d.]+)([KMGT])"  # a size in XLA's messages: "15.75G" (binary units)


def xla_bytes(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** ("KMGT".index(unit) + 1))


def usable_hbm(device) -> int | None:
  """The HBM XLA lets a program use on `device` (16 GiB v5e: 15.75 GiB), read from the error
  it raises for a program with a 1 TiB output; None if the message is not understood."""
  mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
  probe = jax.jit(lambda: jnp.zeros((2**40,), jnp.int8),
                  out_shardings=jax.sharding.NamedSharding(mesh, P()))
  try:
    probe.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: RESOURCE_EXHAUSTED
    m = re.search(r"exceeds available HBM \(" + SIZE + r"\)", str(e))
    return xla_bytes(*m.groups()) if m else None
  return None


def describe(name: str, hbm_gib: float = 0.0) -> Topology:
  """The compile-only devices of a TPU topology such as 'v5e:4x4' (16 chips) or 'v4:2x2x1'."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)

  def devices(**kwargs):
    try:
      return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except RuntimeError as e:  # JaxRuntimeError is one
      if "not installed" in str(e):
        raise CompileUsageError("compiling for a TPU needs libtpu: pip install 't2jax[tpu]'.") \
            from None
      first = str(e).splitlines()[0][:200]
      if "INVALID_ARGUMENT" not in first:
        raise CompileUsageError(f"libtpu cannot describe topology {name!r}: {first}") from None
      raise CompileUsageError(
          f"topology {name!r} is not one libtpu knows ({first}). Use '<version>:<chips per "
          "axis>', e.g. v5e:2x2, v5e:4x4, v6e:2x4, v4:2x2x1, v5p:2x4x4.") from None

  devs = devices()
  if devs[0].device_kind == "TPU v4":  # two cores per chip; JAX on a v4 VM runs megacore
    devs = devices(chip_config_name="megacore")
  kind = devs[0].device_kind
  nominal = int(HBM_GIB.get(kind, 0) * GIB)
  usable = int(hbm_gib * GIB) if hbm_gib > 0 else usable_hbm(devs[0]) or nominal
  if not usable:
    raise CompileUsageError(f"the HBM of a {kind!r} device is not known here; pass "
                            "--hbm_gib=<GiB per device>.")
  return Topology(name=name, devices=list(devs), device_kind=kind, hbm_bytes=usable,
                  nominal_hbm_bytes=nominal)
