"""`python -m t2jax.compile --config CONFIG --topology v5e:4x4 [--config.model=llama3_8b] ...`

Says, before paying for a pod, whether a training config fits on a TPU topology. Nothing is
loaded: params, SVD factors, z and the optimizer state are abstract (shapes, dtypes and the
shardings `t2jax.sharding` gives them on the config's mesh), and the programs one training
step runs are compiled ahead of time for the topology by libtpu on this (CPU) machine:

  update       trainer.train_step: loss, gradient in z, optimizer (B·G rollouts)
  materialise  svf.materialise: the rollout params W' for the current z
  prefill      sampling.prefill of B·G rows, cache P + C rounded as sampling.run does
  decode       sampling.decode (the while loop over C new tokens)

They are the programs training runs: t2jax.programs builds them, with their shardings and
abstract inputs, for both.

Per device, from XLA's buffer assignment (`compiled.memory_analysis()`):

  total = XLA peak + other live
  XLA peak = the most bytes live at one moment of the program: its arguments and outputs
             (a donated argument that becomes an output counted once), the temporaries live
             at that moment, the generated code
  other live = buffers the training loop keeps on the device beside the program without
             passing them to it: while sampling, the base params, SVD factors and train state

The plain sum arguments + outputs − aliased + temporaries + code is an upper bound (`bound` in
the JSON): XLA lays temporaries that are never live together over the same bytes, and on big
programs the sum overstates the peak by a quarter (8B update on v5e:4x4: 18.1 vs 13.9 GiB,
which XLA compiled for a 15.75 GiB device). The peak is the number XLA's own out-of-memory
check uses; a program fits when its total is at most what XLA lets a program use on the device
(`usable_hbm`: 15.75 of v5e's 16 GiB). A program XLA refuses to compile for lack of HBM does
not fit; the report shows XLA's message and the size in it: "Used X of Y hbm" is a peak, "total
memory required for HLO temporaries (X)" (a check made before XLA lays buffers out) a sum like
the bound. Exit status: 0 all fit, 1 something does not fit, 2 a usage error.

Layers follow config.scan_layers, "auto" resolved for the TPU: stacked and run under lax.scan,
so a program's size and compile time do not grow with depth (`--config.scan_layers=False`
compiles them unrolled, as a CPU run executes them).
A model too big to compile whole on this host (layers unrolled): `--layers N` compiles
its first N decoder layers (PARTIAL), `--extrapolate A,B` compiles the first A and the first B
and reports the whole model with every size grown by the per-layer cost (EXTRAPOLATED: an
estimate; on the default model each program's total came within -11 % / +74 % of the whole
compile, params, factors and arguments exactly).

  python -m t2jax.compile --config configs/math.py --topology v5e:2x2
  python -m t2jax.compile --config configs/math.py --topology v5e:4x4 \
      --config.model=llama3_8b --config.dtype=bfloat16 --config.mesh=fsdp:-1 \
      --config.batch_size=64 --config.max_new_tokens=512 --prompt_len=256 \
      --config.microbatches=8 --config.remat=True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from t2jax import programs as programs_lib
from t2jax import run_setup, sampling, sharding, svf
from t2jax import targets as targets_lib
from t2jax.models import llama, presets
from t2jax.models.config import ModelConfig
from t2jax.weights import layout

GIB = 2**30
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
PRESET_PROMPT_LEN = 256  # --prompt_len=0 for a model without a tokenizer to measure prompts


class CompileUsageError(ValueError):
  """A topology, model or shape the command cannot plan for; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: list
  device_kind: str
  hbm_bytes: int  # what XLA lets one program use on a device
  nominal_hbm_bytes: int  # the device's HBM (0: not in HBM_GIB)


_SIZE = r"([\d.]+)([KMGT])"


def _bytes(number: str, unit: str) -> int:
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
    m = re.search(r"exceeds available HBM \(" + _SIZE + r"\)", str(e))
    return _bytes(*m.groups()) if m else None
  return None


def topology(name: str, hbm_gib: float = 0.0) -> Topology:
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


# ---------------------------------------------------------------------------------------------
# Abstract state: shapes and dtypes only.


def abstract_params(cfg: ModelConfig, dtype) -> dict:
  """ShapeDtypeStructs in exactly the tree `weights.layout.assemble` builds from a checkpoint
  (its names, paths and [in, out] kernels), every leaf in `dtype`."""
  params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
  for name, shape in layout.expected_tensors(cfg).items():
    path, layer, transpose = layout.param_path(name)
    node = params if layer is None else params["layers"][layer]
    keys = path if layer is None else path[1:]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(reversed(shape)) if transpose else shape, dtype)
  return params


def abstract_factors(params: dict, targets: str, rank: int | None) -> list:
  """The float32 factors `svf.decompose` returns: per layer {block: {name: {v [n, r], s [r],
  ut [r, m], s_total []}}}."""
  factors: list = [{} for _ in params["layers"]]
  for block, name, layer, (n, m), r in targets_lib.targeted(params, targets, rank):
    factors[layer].setdefault(block, {})[name] = {
        "v": jax.ShapeDtypeStruct((n, r), jnp.float32),
        "s": jax.ShapeDtypeStruct((r,), jnp.float32),
        "ut": jax.ShapeDtypeStruct((r, m), jnp.float32),
        "s_total": jax.ShapeDtypeStruct((), jnp.float32)}
  return factors


def largest_leaves(trees: dict, top: int = 4) -> list[dict]:
  """The `top` biggest per-device holdings, layers summed: which tensor to shard next."""
  groups: dict = {}
  for kind, tree in trees.items():
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      name = re.sub(r"^(layers/)?\d+/", "layers/*/", name)
      entry = groups.setdefault((kind, name), {"tree": kind, "path": name, "bytes": 0,
                                               "spec": str(x.sharding.spec)})
      entry["bytes"] += per_device_bytes(x)
  return sorted(groups.values(), key=lambda e: -e["bytes"])[:top]


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Compiling one program.


@dataclasses.dataclass
class Report:
  name: str
  what: str
  compile_s: float
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  code: int = 0
  peak: int = 0  # XLA's
  bound: int = 0  # arguments + outputs - alias + temp + code
  other_live: int = 0
  total: int = 0  # peak + other_live
  error: str = ""  # XLA refused the program (out of HBM): `total` is what it asked for

  def fits(self, hbm: int) -> bool:
    return not self.error and self.total <= hbm


# "Ran out of memory on HBM, the total memory required for HLO temporaries (33.83G) exceeds
# available HBM (15.75G)" / "Used 15.85G of 15.75G hbm. Exceeded hbm capacity by 109.20M."
_OOM = (re.compile(r"\(" + _SIZE + r"\) exceeds available HBM"),
        re.compile(r"Used " + _SIZE + r" of [\d.]+[KMGT] hbm"))


def _oom_bytes(message: str) -> int | None:
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      return _bytes(*m.groups())
  return None


def compile_program(name: str, what: str, program: programs_lib.Program, other_live: int = 0):
  """(Report, compiled or None): `program` compiled on its abstract inputs. A program XLA
  rejects for lack of HBM is reported, not raised."""
  t0 = time.perf_counter()
  try:
    compiled = program.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: RESOURCE_EXHAUSTED
    needed = _oom_bytes(str(e))
    if needed is None:
      raise
    first = next((ln for ln in str(e).splitlines() if "HBM" in ln or "hbm" in ln), str(e))
    return Report(name, what, time.perf_counter() - t0, other_live=other_live,
                  total=needed + other_live, error="XLA: " + first.strip()[:300]), None
  mem = compiled.memory_analysis()
  rep = Report(name, what, time.perf_counter() - t0, argument=mem.argument_size_in_bytes,
               output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
               temp=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes,
               other_live=other_live)
  rep.bound = rep.argument + rep.output - rep.alias + rep.temp + rep.code
  rep.peak = getattr(mem, "peak_memory_in_bytes", 0) or rep.bound
  rep.total = rep.peak + rep.other_live
  return rep, compiled


# ---------------------------------------------------------------------------------------------
# The plan.


def _auto_prompt_len(cfg, source: str) -> tuple[int, str]:
  """The bucket of the task's longest train prompt when the model has a tokenizer; else 256."""
  from t2jax import tokenizer as tokenizer_lib, weights  # pylint: disable=import-outside-toplevel
  from t2jax.tasks import make_task  # pylint: disable=import-outside-toplevel

  if source.startswith("preset "):
    return PRESET_PROMPT_LEN, "a preset has no tokenizer; set --prompt_len"
  try:
    tok = tokenizer_lib.load_tokenizer(weights.resolve(cfg.model or None))
    task = make_task(cfg.task, cfg.task_args.to_dict())
    records = run_setup.eval_subset(task.records("train"), 512)
    prompts = tokenizer_lib.encode_chats(tok, [task.messages(r) for r in records])
  except Exception as e:  # pylint: disable=broad-except  # no tokenizer, no data files, ...
    return PRESET_PROMPT_LEN, f"task prompts unavailable: {e}"
  longest = max(len(p) for p in prompts)
  return sampling.bucket_length(longest), (f"bucket of the longest of {len(prompts)} "
                                           f"{cfg.task} prompts, {longest} tokens")


def parse_rule(text: str) -> tuple[str, P]:
  """'REGEX=AXES' → a partition rule; AXES lists one mesh axis per dimension, comma-separated,
  '-' for none and '+' to join axes: 'mlp/(gate|up)_proj/ut$=fsdp,tensor'."""
  pattern, sep, axes = text.rpartition("=")
  if not sep or not pattern:
    raise CompileUsageError(f"--rule {text!r} is not 'REGEX=AXES' "
                            "(e.g. 'up_proj/ut$=fsdp,tensor').")
  try:
    re.compile(pattern)
  except re.error as e:
    raise CompileUsageError(f"--rule {text!r}: bad regex ({e}).") from None
  spec = []
  for dim in axes.split(","):
    names = tuple(a for a in dim.strip().split("+") if a not in ("", "-", "none"))
    bad = [a for a in names if a not in sharding.AXES]
    if bad:
      raise CompileUsageError(f"--rule {text!r}: {bad} are not mesh axes {sharding.AXES}.")
    spec.append(None if not names else names[0] if len(names) == 1 else names)
  return pattern, P(*spec)


PROGRAMS = ("update", "materialise", "prefill", "decode")
PROGRAM_SETS = ("all", "update", "sampler")


def plan(cfg, topo: Topology, prompt_len: int = 0, programs: str = "all",
         layers: int = 0) -> dict:
  """Compiles every program of one training step for `topo`; returns the report as a dict.
  layers > 0 compiles the model cut to its first `layers` decoder layers: the layers are
  unrolled, so compile time and host memory grow with them; two cuts give per-layer costs to
  extrapolate a model too big to compile on this host (the report says it is partial)."""
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    raise CompileUsageError(f"config.dtype {cfg.dtype!r} is not float32, bfloat16 or float16.")
  run_setup.check_config(cfg)
  microbatches = int(cfg.microbatches)
  settings = run_setup.rl_settings(cfg)
  model_cfg, source = presets.model_config(cfg.model or None)
  full_layers = model_cfg.num_layers
  if layers:
    if not 1 <= layers <= full_layers:
      raise CompileUsageError(f"--layers={layers}: the model has {full_layers} decoder layers; "
                              f"give 1..{full_layers} (0 = all).")
    model_cfg = dataclasses.replace(model_cfg, num_layers=layers)
  try:
    mesh = sharding.make_mesh(cfg.mesh, devices=topo.devices)
  except sharding.MeshError as e:
    raise CompileUsageError(f"config.mesh={cfg.mesh!r} does not fit topology {topo.name} "
                            f"({len(topo.devices)} devices): {e}") from None
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % shards:
    raise CompileUsageError(f"config.batch_size={cfg.batch_size} does not split over the "
                            f"{shards} batch shards (data × fsdp) of mesh {dict(mesh.shape)}.")
  if prompt_len > 0:
    p, p_note = sampling.bucket_length(prompt_len), "--prompt_len"
  else:
    p, p_note = _auto_prompt_len(cfg, source)
  shapes = programs_lib.Shapes.from_config(cfg, p)
  c = shapes.max_new
  if shapes.cache_len > model_cfg.max_length:
    raise CompileUsageError(f"prompt {p} + {c} new tokens exceeds the model's "
                            f"{model_cfg.max_length} positions.")

  dtype = jnp.dtype(cfg.dtype)
  targets, rank = targets_lib.from_config(cfg)
  params = abstract_params(model_cfg, dtype)
  factors = abstract_factors(params, targets, rank)
  # config.scan_layers "auto" resolves for the target (a TPU): layers stacked and scanned
  scanned = llama.scan_enabled(cfg.get("scan_layers", "auto"), backend="tpu")
  if scanned:
    params = jax.eval_shape(llama.stack_layers, params)
    factors = jax.eval_shape(svf.stack_layers, factors)
  progs = programs_lib.build(cfg, model_cfg, params, factors, mesh=mesh, shapes=shapes,
                             eos_ids=model_cfg.eos_token_ids)
  state, _, params, factors = progs.update.args
  resident = {"params": per_device_bytes(params), "factors": per_device_bytes(factors),
              "train_state": per_device_bytes(state)}
  largest = largest_leaves({"params": params, "factors": factors})
  b, n = shapes.batch, shapes.rows
  while_sampling = sum(resident.values())
  update = lambda: [compile_program(
      "update", f"train step on {b}×{shapes.samples} rollouts, {microbatches} microbatches",
      progs.update)[0]]
  rollout = lambda: [  # materialise → prefill → decode, each on the inputs the last one leaves
      compile_program("materialise", "rollout params W' for z", progs.materialise,
                      other_live=resident["train_state"])[0],
      compile_program("prefill", f"{n} rows × {p} prompt tokens, cache {shapes.cache_len}",
                      progs.prefill, other_live=while_sampling)[0],
      compile_program("decode", f"{n} rows × {c} new tokens", progs.decode,
                      other_live=while_sampling)[0]]

  if sum(resident.values()) > topo.hbm_bytes:  # no program can fit: say so without compiling
    why = (f"skipped: params, factors and train state alone take "
           f"{_gib(sum(resident.values()))} GiB per device")
    names = {"all": PROGRAMS, "update": PROGRAMS[:1], "sampler": PROGRAMS[1:]}[programs]
    reports = [Report(name, "", 0.0, other_live=sum(resident.values()),
                      total=sum(resident.values()), error=why) for name in names]
  else:
    reports = ((update() if programs in ("all", "update") else [])
               + (rollout() if programs in ("all", "sampler") else []))

  fits = all(r.fits(topo.hbm_bytes) for r in reports)
  return {
      "model": source, "params": model_cfg.num_params(), "dtype": cfg.dtype,
      "layers": model_cfg.num_layers, "full_layers": full_layers, "scanned": scanned,
      "targets": targets, "rank": rank,
      "topology": topo.name, "device_kind": topo.device_kind, "devices": len(topo.devices),
      "hbm_bytes": topo.hbm_bytes, "nominal_hbm_bytes": topo.nominal_hbm_bytes,
      "mesh": dict(mesh.shape), "microbatches": microbatches, "remat": settings.remat,
      "shapes": {**dataclasses.asdict(shapes), "cache_len": shapes.cache_len,
                 "prompt_len_from": p_note},
      "resident_bytes": resident, "largest_resident": largest,
      "programs": [{**dataclasses.asdict(r), "fits": r.fits(topo.hbm_bytes)} for r in reports],
      "fits": fits,
  }


_SIZES = ("argument", "output", "alias", "temp", "code", "peak", "bound", "other_live", "total")


def extrapolate(small: dict, large: dict) -> dict:
  """The whole model's report from two partial ones (`plan` with layers a < b): every size
  grows linearly from b by (size_b − size_a) / (b − a) a layer, the cost of one more decoder
  layer. A program XLA refused at either cut cannot be extrapolated and counts as not fitting."""
  a, b, full = small["layers"], large["layers"], large["full_layers"]
  grow = lambda x, y: int(round(y + (y - x) * (full - b) / (b - a)))
  programs = []
  for p, q in zip(small["programs"], large["programs"]):
    if p["error"] or q["error"]:
      programs.append({**q, "error": q["error"] or p["error"], "fits": False})
      continue
    r = {**q, **{k: grow(p[k], q[k]) for k in _SIZES},
         "compile_s": p["compile_s"] + q["compile_s"]}
    programs.append({**r, "fits": r["total"] <= large["hbm_bytes"]})
  resident = {k: grow(small["resident_bytes"][k], v) for k, v in large["resident_bytes"].items()}
  params = grow(small["params"], large["params"])
  return {**large, "layers": full, "extrapolated_from": [a, b], "params": params,
          "resident_bytes": resident, "programs": programs,
          "fits": all(p["fits"] for p in programs)}


# ---------------------------------------------------------------------------------------------
# Output.


def _gib(x: int) -> str:
  return f"{x / GIB:.2f}"


def format_report(out: dict) -> str:
  s = out["shapes"]
  mesh = ",".join(f"{k}:{v}" for k, v in out["mesh"].items())
  lines = [
      f"model     {out['model']} ({out['params'] / 1e9:.2f}B params, {out['dtype']}); SVF "
      f"targets {out['targets']!r}, rank {out['rank'] or 'full'}"
      + (f"; PARTIAL: first {out['layers']} of {out['full_layers']} decoder layers (--layers)"
         if out["layers"] != out["full_layers"] else "")
      + ("; EXTRAPOLATED to {2} layers from compiles of the first {0} and {1} "
         "(--extrapolate)".format(*out["extrapolated_from"], out["full_layers"])
         if out.get("extrapolated_from") else ""),
      f"topology  {out['topology']}: {out['devices']} × {out['device_kind']}, "
      f"{_gib(out['nominal_hbm_bytes'])} GiB HBM each ({_gib(out['hbm_bytes'])} usable by XLA);"
      f" mesh {mesh}",
      *[f"rule      {r} (--rule, before PARTITION_RULES)" for r in out.get("extra_rules", [])],
      f"step      {s['batch']} prompts × {s['samples']} samples = {s['batch'] * s['samples']} "
      f"rows; prompt {s['prompt_len']} tokens ({s['prompt_len_from']}), {s['max_new']} new, "
      f"cache {s['cache_len']}; update in {out['microbatches']} microbatch(es)"
      + (", layers rematerialised (config.remat)" if out["remat"] else "")
      + ("; layers scanned (config.scan_layers)" if out.get("scanned") else "; layers unrolled"),
      "resident  " + ", ".join(f"{k} {_gib(v)}" for k, v in out["resident_bytes"].items())
      + " GiB per device",
      "",
      "GiB per device  arguments  outputs  aliased  temporaries  code  XLA peak  other live"
      "    total   usable  fits  compile s",
  ]
  for r in out["programs"]:
    if r["error"]:
      cols = f"{'':>9}  {'':>7}  {'':>7}  {'':>11}  {'':>4}  {'':>8}  {_gib(r['other_live']):>10}"
    else:
      cols = (f"{_gib(r['argument']):>9}  {_gib(r['output']):>7}  {_gib(r['alias']):>7}  "
              f"{_gib(r['temp']):>11}  {_gib(r['code']):>4}  {_gib(r['peak']):>8}  "
              f"{_gib(r['other_live']):>10}")
    lines.append(f"{r['name']:<15} {cols}  {_gib(r['total']):>7}  {_gib(out['hbm_bytes']):>7}"
                 f"  {'yes' if r['fits'] else 'NO':>4}  {r['compile_s']:>9.1f}")
  for r in out["programs"]:
    if r["error"]:
      lines.append(f"{r['name']}: {r['error']}")
  if not out["fits"]:
    lines.append("largest resident tensors per device (all layers):")
    lines += [f"  {e['tree']} {e['path']}: {_gib(e['bytes'])} GiB, {e['spec']}"
              for e in out["largest_resident"]]
  lines.append("")
  lines.append("total = XLA peak (arguments, outputs and the temporaries live at one moment) + "
               "other live (params, factors, state resident while sampling)")
  verdict = "fits" if out["fits"] else "does NOT fit"
  lines.append(f"{verdict} on {out['topology']}")
  return "\n".join(lines)


def _cuts(values: list[str], layers: int, cfg) -> tuple[int, int]:
  """--extrapolate's two cuts, checked before anything is compiled."""
  if layers:
    raise CompileUsageError("give --layers or --extrapolate, not both.")
  try:
    a, b = (int(v) for v in values)
  except ValueError:
    raise CompileUsageError(f"--extrapolate takes two layer counts A,B (e.g. 2,4); got "
                            f"{','.join(values)!r}.") from None
  if not 0 < a < b:
    raise CompileUsageError(f"--extrapolate={a},{b}: give two cuts 0 < A < B.")
  full = presets.model_config(cfg.model or None)[0].num_layers
  if b >= full:
    raise CompileUsageError(f"--extrapolate={a},{b}: the model has {full} decoder layers; "
                            f"B must be below that (compile it whole instead).")
  return a, b


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, "
                      "v5p:4x4x4 (chips per axis)")
  flags.DEFINE_integer("prompt_len", 0, "prompt tokens P (rounded to a bucket); 0 = the "
                       "task's longest prompt for a model with a tokenizer, else 256")
  flags.DEFINE_enum("programs", "all", PROGRAM_SETS, "compile all programs, only the "
                    "update, or only the sampler's (materialise, prefill, decode)")
  flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB; 0 = by device kind")
  flags.DEFINE_multi_string("rule", [], "REGEX=AXES: a partition rule tried before "
                            "t2jax.sharding.PARTITION_RULES (repeatable), e.g. "
                            "'mlp/(gate|up)_proj/ut$=fsdp,tensor'")
  flags.DEFINE_string("json", None, "also write the report as JSON to this path")
  flags.DEFINE_integer("layers", 0, "compile only the first N decoder layers (0 = all): two "
                       "cuts give per-layer costs for a model too big to compile on this host")
  flags.DEFINE_list("extrapolate", [], "A,B: compile the first A and the first B decoder "
                    "layers and report the whole model by extrapolating the per-layer cost "
                    "(a model too big to compile on this host)")
  flags.mark_flags_as_required(["config", "topology"])

  def run(f):
    jax.config.update("jax_platforms", "cpu")  # the host side; TPUs are only compiled for
    topo = topology(f.topology, f.hbm_gib)
    rules = [parse_rule(r) for r in f.rule]
    sharding.PARTITION_RULES[:0] = rules  # this process only: first match wins
    if f.extrapolate:
      cuts = _cuts(f.extrapolate, f.layers, f.config)
      out = extrapolate(*(plan(f.config, topo, f.prompt_len, f.programs, n) for n in cuts))
    else:
      out = plan(f.config, topo, f.prompt_len, f.programs, f.layers)
    out["extra_rules"] = [f"{pattern} → {spec}" for pattern, spec in rules]
    out["config"] = config_flags.get_config_filename(f["config"])
    print(format_report(out), flush=True)
    if f.json:
      with open(f.json, "w") as fh:
        json.dump(out, fh, indent=1)
    if not out["fits"]:
      sys.exit(1)

  return run_setup.run_cli(run, argv, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(main())
