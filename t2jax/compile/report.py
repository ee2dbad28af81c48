"""What XLA says of each compiled program (`memory_analysis()`, and `cost_analysis()` for
roofline.py), a whole model extrapolated from two partial compiles, and the text report."""

from __future__ import annotations

import dataclasses
import re
import time

from t2jax import programs as programs_lib
from t2jax.compile import GIB, roofline
from t2jax.compile.topology import SIZE, xla_bytes


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
  flops: float = 0.0  # per device, from XLA's cost_analysis(): a loop body counted once
  bytes_accessed: float = 0.0
  cost_error: str = ""  # why flops and bytes_accessed are missing

  def fits(self, hbm: int) -> bool:
    return not self.error and self.total <= hbm


# "Ran out of memory on HBM, the total memory required for HLO temporaries (33.83G) exceeds
# available HBM (15.75G)" / "Used 15.85G of 15.75G hbm. Exceeded hbm capacity by 109.20M."
_OOM = (re.compile(r"\(" + SIZE + r"\) exceeds available HBM"),
        re.compile(r"Used " + SIZE + r" of [\d.]+[KMGT] hbm"))


def _oom_bytes(message: str) -> int | None:
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      return xla_bytes(*m.groups())
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
  rep.flops, rep.bytes_accessed, rep.cost_error = roofline.costs(compiled)
  return rep, compiled


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



def gib(x: int) -> str:
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
      f"{gib(out['nominal_hbm_bytes'])} GiB HBM each ({gib(out['hbm_bytes'])} usable by XLA);"
      f" mesh {mesh}",
      *[f"rule      {r} (--rule, before PARTITION_RULES)" for r in out.get("extra_rules", [])],
      f"step      {s['batch']} prompts × {s['samples']} samples = {s['batch'] * s['samples']} "
      f"rows; prompt {s['prompt_len']} tokens ({s['prompt_len_from']}), {s['max_new']} new, "
      f"cache {s['cache_len']}; update in {out['microbatches']} microbatch(es)"
      + (", layers rematerialised (config.remat)" if out["remat"] else "")
      + ("; layers scanned (config.scan_layers)" if out.get("scanned") else "; layers unrolled"),
      "resident  " + ", ".join(f"{k} {gib(v)}" for k, v in out["resident_bytes"].items())
      + " GiB per device",
      "",
      "GiB per device  arguments  outputs  aliased  temporaries  code  XLA peak  other live"
      "    total   usable  fits  compile s",
  ]
  for r in out["programs"]:
    if r["error"]:
      cols = f"{'':>9}  {'':>7}  {'':>7}  {'':>11}  {'':>4}  {'':>8}  {gib(r['other_live']):>10}"
    else:
      cols = (f"{gib(r['argument']):>9}  {gib(r['output']):>7}  {gib(r['alias']):>7}  "
              f"{gib(r['temp']):>11}  {gib(r['code']):>4}  {gib(r['peak']):>8}  "
              f"{gib(r['other_live']):>10}")
    lines.append(f"{r['name']:<15} {cols}  {gib(r['total']):>7}  {gib(out['hbm_bytes']):>7}"
                 f"  {'yes' if r['fits'] else 'NO':>4}  {r['compile_s']:>9.1f}")
  for r in out["programs"]:
    if r["error"]:
      lines.append(f"{r['name']}: {r['error']}")
  if not out["fits"]:
    lines.append("largest resident tensors per device (all layers):")
    lines += [f"  {e['tree']} {e['path']}: {gib(e['bytes'])} GiB, {e['spec']}"
              for e in out["largest_resident"]]
  lines.append("")
  lines.append("total = XLA peak (arguments, outputs and the temporaries live at one moment) + "
               "other live (params, factors, state resident while sampling)")
  if "projected" in out:
    lines += ["", *roofline.format_projection(out["projected"]), ""]
  verdict = "fits" if out["fits"] else "does NOT fit"
  lines.append(f"{verdict} on {out['topology']}")
  return "\n".join(lines)
