"""PROJECTED times: a roofline over XLA's cost analysis of each compiled program. Nothing
is measured; the figures say how fast a step could run if every chip were bound only by its
bf16 peak or its HBM bandwidth, to compare configs and topologies before paying for one."""

from __future__ import annotations

# Per chip (one JAX device on these kinds), by `device_kind`: (bf16 peak FLOP/s, HBM bytes/s),
# from the key-specification tables of Google's Cloud TPU docs:
#   v4  https://cloud.google.com/tpu/docs/v4   275 TFLOPs, 1200 GBps
#   v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOPs,  819 GBps
#   v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOPs, 2765 GBps
#   v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOPs, 1638 GBps
PEAKS = {
    "TPU v4": (275e12, 1200e9),
    "TPU v5 lite": (197e12, 819e9),
    "TPU v5": (459e12, 2765e9),  # v5p
    "TPU v6 lite": (918e12, 1638e9),
}

ASSUMPTION = ("roofline per chip: a program takes max(flops / bf16 peak FLOP/s, bytes accessed / "
              "HBM bandwidth), its flops and bytes from XLA's cost_analysis() of the program "
              "one device runs; collectives, host work, launch overhead and imperfect overlap "
              "are not counted, and float32 matmuls run below the bf16 peak")


def costs(compiled) -> tuple[float, float, str]:
  """(flops, bytes accessed, "") per device from `compiled.cost_analysis()`, which is a dict,
  or a list of one dict per program in older jax; (0, 0, why) when a figure is missing."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  # a backend without a cost model
    return 0.0, 0.0, f"cost_analysis() failed: {e}"
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  missing = [k for k in ("flops", "bytes accessed") if k not in analysis]
  if missing:
    return 0.0, 0.0, (f"cost_analysis() has no {' or '.join(repr(k) for k in missing)} "
                      f"(fields: {sorted(analysis)[:8]})")
  return float(analysis["flops"]), float(analysis["bytes accessed"]), ""


def seconds(flops: float, bytes_accessed: float, peak: tuple[float, float]) -> float:
  peak_flops, hbm_bytes_per_s = peak
  return max(flops / peak_flops, bytes_accessed / hbm_bytes_per_s)


def project(program_costs: dict[str, tuple[float, float]], device_kind: str, rows: int,
            source: str, skipped: dict[str, str] | None = None) -> dict:
  """The PROJECTED part of the report from (flops, bytes accessed) per device of each program.
  The decode program's while loop is counted once by XLA, so its cost is one step: one new
  token for each of the `rows` rows of the batch, which every chip runs in parallel.
  `skipped`: program name → why it has no projection (the report prints each)."""
  skipped = dict(skipped or {})
  peak = PEAKS.get(device_kind)
  if peak is None:
    return {"error": f"no bf16 peak and HBM bandwidth known for {device_kind!r} "
                     f"(t2jax/compile/roofline.py PEAKS has {sorted(PEAKS)})"}
  if not program_costs:
    whys = "; ".join(f"{name}: {why}" for name, why in skipped.items())
    return {"error": f"no program has costs ({source})" + (f": {whys}" if whys else ""),
            "skipped": skipped}
  per = {name: {"flops": f, "bytes_accessed": b, "seconds": seconds(f, b, peak),
                "bound": "compute" if f / peak[0] >= b / peak[1] else "memory"}
         for name, (f, b) in program_costs.items()}
  out = {"assumption": ASSUMPTION, "costs_from": source, "peak_flops_per_s": peak[0],
         "hbm_bytes_per_s": peak[1], "programs": per, "skipped": skipped}
  if "update" in per:
    out["update_step_s"] = per["update"]["seconds"]
  if "decode" in per:
    out["decode_step_s"] = per["decode"]["seconds"]
    out["decode_tokens_per_s"] = rows / out["decode_step_s"]
  return out


def format_projection(proj: dict) -> list[str]:
  """The report's PROJECTED lines."""
  if "error" in proj:
    return [f"PROJECTED: not available: {proj['error']}"]
  lines = [f"PROJECTED, not measured ({proj['assumption']}; bf16 peak "
           f"{proj['peak_flops_per_s'] / 1e12:g} TFLOP/s, HBM {proj['hbm_bytes_per_s'] / 1e9:g} "
           f"GB/s per chip; costs from {proj['costs_from']})",
           "per chip         GFLOP       GB        ms  bound"]
  for name, p in proj["programs"].items():
    lines.append(f"{name:<15} {p['flops'] / 1e9:>6.1f}  {p['bytes_accessed'] / 1e9:>7.3f}  "
                 f"{p['seconds'] * 1e3:>8.3f}  {p['bound']}")
  for name, why in proj.get("skipped", {}).items():
    lines.append(f"{name:<15} not projected: {why}")
  if "update_step_s" in proj:
    lines.append(f"PROJECTED update step {proj['update_step_s'] * 1e3:.3f} ms")
  if "decode_step_s" in proj:
    lines.append(f"PROJECTED decode step {proj['decode_step_s'] * 1e3:.3f} ms, "
                 f"{proj['decode_tokens_per_s']:,.0f} tokens/s")
  return lines
