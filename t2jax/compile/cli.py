"""The command line of `python -m t2jax.compile`: flags, --rule and --extrapolate parsed, the
plan run, the report printed (and written as JSON); exit 1 when something does not fit."""

from __future__ import annotations

import json
import re
import sys

import jax
from jax.sharding import PartitionSpec as P

from t2jax import run_setup, sharding
from t2jax.compile import CompileUsageError, plan, report, topology
from t2jax.models import presets


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
  flags.DEFINE_enum("programs", "all", plan.PROGRAM_SETS, "compile all programs, only the "
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
    topo = topology.describe(f.topology, f.hbm_gib)
    rules = [parse_rule(r) for r in f.rule]
    sharding.PARTITION_RULES[:0] = rules  # this process only: first match wins
    if f.extrapolate:
      cuts = _cuts(f.extrapolate, f.layers, f.config)
      out = report.extrapolate(*(plan.plan(f.config, topo, f.prompt_len, f.programs, n)
                                 for n in cuts))
    else:
      out = plan.plan(f.config, topo, f.prompt_len, f.programs, f.layers)
    out["projected"] = plan.projection(f.config, topo, out, f.programs)
    out["extra_rules"] = [f"{pattern} → {spec}" for pattern, spec in rules]
    out["config"] = config_flags.get_config_filename(f["config"])
    print(report.format_report(out), flush=True)
    if f.json:
      with open(f.json, "w") as fh:
        json.dump(out, fh, indent=1)
    if not out["fits"]:
      sys.exit(1)

  return run_setup.run_cli(run, argv, errors=(ValueError, FileNotFoundError))
