"""The programs of one training step compiled for a topology, on abstract state: the report
as a dict (see t2jax/compile/__init__.py for what its figures mean)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from t2jax import programs as programs_lib
from t2jax import run_setup, sampling, sharding, svf
from t2jax import targets as targets_lib
from t2jax.compile import CompileUsageError, roofline
from t2jax.compile.abstract import (abstract_factors, abstract_params, largest_leaves,
                                    per_device_bytes)
from t2jax.compile.report import Report, compile_program, gib
from t2jax.compile.topology import Topology
from t2jax.models import llama, presets

PRESET_PROMPT_LEN = 256  # --prompt_len=0 for a model without a tokenizer to measure prompts


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
           f"{gib(sum(resident.values()))} GiB per device")
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


def projection(cfg, topo: Topology, out: dict, programs: str = "all") -> dict:
  """The PROJECTED times (roofline.project) of the programs in `out`, a report of `plan` or
  `extrapolate` for `cfg`. XLA's cost_analysis() counts a loop body once: a scanned layer
  stack as one layer, the update's microbatch loop as one microbatch. Unless `out` compiled
  unrolled layers in one microbatch, the costs come from two more compiles, of the model cut to
  1 and 2 unrolled layers with the update in one microbatch, grown linearly to out's layers."""
  rows = out["shapes"]["batch"] * out["shapes"]["samples"]
  if all(p["error"] for p in out["programs"]):
    return {"error": "no program compiled"}
  if not out["scanned"] and out["microbatches"] == 1 and not out.get("extrapolated_from"):
    own = {p["name"]: (p["flops"], p["bytes_accessed"]) for p in out["programs"]
           if not p["error"] and not p["cost_error"]}
    return roofline.project(own, topo.device_kind, rows, "the compiled programs")
  unrolled = ml_collections.ConfigDict({**cfg.to_dict(), "scan_layers": False,
                                        "microbatches": 1})
  cuts = [plan(unrolled, topo, out["shapes"]["prompt_len"], programs, n)
          for n in (1, 2)[:out["full_layers"]]]
  layers, grown, skipped = out["layers"], {}, {}
  for at_1, at_2 in zip(cuts[0]["programs"], cuts[-1]["programs"]):
    failed = [(n, c) for n, c in ((1, at_1), (2, at_2)) if c["error"] or c["cost_error"]]
    if failed:  # said in the report: a program silently missing reads as "not asked for"
      n, c = failed[0]
      skipped[at_1["name"]] = (f"its {n}-layer cut (unrolled, one microbatch of "
                               f"{rows} rows) " + (f"did not compile: {c['error']}" if c["error"]
                                                   else f"has no costs: {c['cost_error']}"))
      continue
    grow = lambda k: at_1[k] + (layers - 1) * (at_2[k] - at_1[k])  # exact: unrolled is linear
    grown[at_1["name"]] = (grow("flops"), grow("bytes_accessed"))
  source = (f"compiles of the first 1 and 2 decoder layers, unrolled, update in one "
            f"microbatch, grown to {layers} layers")
  proj = roofline.project(grown, topo.device_kind, rows, source, skipped=skipped)
  proj["cuts"] = [{p["name"]: {"flops": p["flops"], "bytes_accessed": p["bytes_accessed"]}
                   for p in c["programs"]} for c in cuts]
  return proj
