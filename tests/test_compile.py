"""`python -m t2jax.compile`: the report for the default config on a v5e slice, a config that
cannot fit, usage errors; and the abstract params and factors against what the loaders and
svf.decompose really build."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from t2jax import svf
from t2jax.compile import CompileUsageError, abstract, cli, roofline
from t2jax.models import presets

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU topology needs libtpu: pip install 't2jax[tpu]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def run_compile(*args: str, json_path: str | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         # XLA's least optimisation effort: a third less compile time on 2 cores; the memory
         # figures stay within ~10 % of the default effort's
         "JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1"}
  cmd = [sys.executable, "-m", "t2jax.compile", *args]
  if json_path:
    cmd.append(f"--json={json_path}")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("compile") / "report.json")
  proc = run_compile("--config", "configs/math.py", "--topology", "v5e:2x2", json_path=path)
  with open(path) as f:
    return proc, json.load(f)


@needs_libtpu
def test_default_config_fits_v5e_2x2(default_report):
  proc, out = default_report
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fits on v5e:2x2" in proc.stdout
  assert "WARNING" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
  assert out["device_kind"] == "TPU v5 lite" and out["devices"] == 4
  assert out["nominal_hbm_bytes"] == 16 * GIB
  assert out["hbm_bytes"] == pytest.approx(15.75 * GIB, rel=1e-3)  # what XLA lets a program use
  assert out["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert out["shapes"]["batch"] == 16 and out["shapes"]["samples"] == 4
  assert out["shapes"]["max_new"] == 16 and out["shapes"]["prompt_len"] % 16 == 0
  programs = {p["name"]: p for p in out["programs"]}
  assert list(programs) == ["update", "materialise", "prefill", "decode"]
  for name, p in programs.items():
    assert p["fits"] and not p["error"], name
    assert 0 < p["total"] < out["hbm_bytes"], name
    assert p["bound"] == p["argument"] + p["output"] - p["alias"] + p["temp"] + p["code"], name
    assert p["total"] == p["peak"] + p["other_live"], name
    assert p["peak"] >= p["argument"] + p["output"] - p["alias"], name
    assert f"\n{name} " in proc.stdout  # a table row

  # data-parallel mesh: every device holds all params (float32) and factors
  params_bytes = out["params"] * 4
  assert out["resident_bytes"]["params"] >= params_bytes
  assert programs["update"]["argument"] >= params_bytes + out["resident_bytes"]["factors"]
  # the donated train state (z and Adam's two moments) is aliased to the new one, whole: at
  # least its bytes (TPU tiles pad its [30, 576] leaves by ~19 %), and nothing else
  state_bytes = out["resident_bytes"]["train_state"]
  assert state_bytes <= programs["update"]["alias"] < 1.5 * state_bytes
  # the sampler reads W' (a full params copy) while params and factors stay resident
  assert programs["materialise"]["output"] >= params_bytes
  assert programs["prefill"]["argument"] >= params_bytes
  assert programs["prefill"]["other_live"] == sum(out["resident_bytes"].values())
  # decode's state (KV cache: layers × 2 × rows × kv heads × cache × head dim) is donated
  s = out["shapes"]
  cache = 30 * 2 * s["batch"] * s["samples"] * 3 * s["cache_len"] * 64 * 4 // 4
  assert programs["decode"]["alias"] >= cache
  assert programs["prefill"]["output"] >= cache


@needs_libtpu
def test_default_config_projects_step_times(default_report):
  """The PROJECTED roofline, recomputed by hand from the cost figures in the JSON: the costs
  of the 1- and 2-layer unrolled cuts grown to 30 layers, each program's time the larger of
  flops / 197 TFLOP/s and bytes / 819 GB/s (v5e), decode tokens/s the batch's 64 rows per
  decode step; and the flops of a forward pass, 2 per weight per token."""
  proc, out = default_report
  proj = out["projected"]
  assert "PROJECTED, not measured (roofline per chip" in proc.stdout
  assert (proj["peak_flops_per_s"], proj["hbm_bytes_per_s"]) == (197e12, 819e9)
  one, two = proj["cuts"]
  for name, p in proj["programs"].items():
    for key in ("flops", "bytes_accessed"):
      assert p[key] == one[name][key] + 29 * (two[name][key] - one[name][key]), (name, key)
    compute_s, memory_s = p["flops"] / 197e12, p["bytes_accessed"] / 819e9
    assert p["seconds"] == max(compute_s, memory_s), name
    assert p["bound"] == ("compute" if compute_s >= memory_s else "memory"), name
    assert f"\n{name} " in proc.stdout.split("PROJECTED, not measured")[1]
  assert proj["update_step_s"] == proj["programs"]["update"]["seconds"]
  assert proj["decode_step_s"] == proj["programs"]["decode"]["seconds"]
  assert proj["decode_tokens_per_s"] == pytest.approx(64 / proj["decode_step_s"], rel=1e-12)
  assert f"PROJECTED decode step {proj['decode_step_s'] * 1e3:.3f} ms, " \
         f"{proj['decode_tokens_per_s']:,.0f} tokens/s" in proc.stdout
  # one decode step: every weight once for each of the chip's 16 rows (2 flops a weight)
  weights = out["params"]
  assert proj["programs"]["decode"]["flops"] == pytest.approx(2 * weights * 16, rel=0.1)
  # prefill: the 16 rows' prompts through every weight but the tied lm_head (last token only)
  cfg, _ = presets.model_config("")
  body = weights - cfg.vocab_size * cfg.hidden_size
  tokens = 16 * out["shapes"]["prompt_len"]
  assert proj["programs"]["prefill"]["flops"] == pytest.approx(2 * body * tokens, rel=0.1)


@needs_libtpu
def test_a_partial_model_costs_less_per_layer(default_report, tmp_path):
  """--layers cuts the model; the per-device memory of every program shrinks and the report
  says the figures are partial."""
  _, full = default_report
  proc = run_compile("--config", "configs/math.py", "--topology", "v5e:2x2", "--layers=3",
                     json_path=str(tmp_path / "partial.json"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PARTIAL: first 3 of 30 decoder layers (--layers)" in proc.stdout
  with open(tmp_path / "partial.json") as f:
    part = json.load(f)
  assert part["layers"] == 3 and part["full_layers"] == full["layers"] == 30
  for p, q in zip(part["programs"], full["programs"]):
    assert 0 < p["argument"] < q["argument"], p["name"]
  assert part["resident_bytes"]["factors"] * 10 == full["resident_bytes"]["factors"]


@needs_libtpu
def test_two_cuts_extrapolate_to_the_whole_model(default_report, tmp_path):
  """--extrapolate 2,4 compiles two cuts and reports 30 layers from the per-layer cost. It is
  an estimate (XLA lays out a longer program differently): on this model each program's total
  lands within -20 % / +100 % of the whole compile's, resident bytes exactly."""
  _, full = default_report
  proc = run_compile("--config", "configs/math.py", "--topology", "v5e:2x2",
                     "--extrapolate=2,4", json_path=str(tmp_path / "ex.json"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "EXTRAPOLATED to 30 layers from compiles of the first 2 and 4" in proc.stdout
  with open(tmp_path / "ex.json") as f:
    ex = json.load(f)
  assert ex["layers"] == 30 and ex["extrapolated_from"] == [2, 4]
  assert ex["resident_bytes"] == full["resident_bytes"]
  assert abs(ex["params"] - full["params"]) <= 1
  for p, q in zip(ex["programs"], full["programs"]):
    assert 0.8 * q["total"] <= p["total"] <= 2.0 * q["total"], (p["name"], p["total"], q["total"])
    # params and factors grow by whole layers; stacked over layers (scan_layers, "auto" on a
    # TPU) their small [L, r] and [L] leaves are padded to the chip's tiles by L: within 0.1 %
    assert abs(p["argument"] - q["argument"]) <= 1e-3 * q["argument"], p["name"]


@needs_libtpu
def test_70b_on_four_v5e_chips_does_not_fit():
  proc = run_compile("--config", "configs/math.py", "--topology", "v5e:2x2",
                     "--config.model=llama3_70b", "--config.dtype=bfloat16",
                     "--config.mesh=fsdp:-1", "--prompt_len=128")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "does NOT fit on v5e:2x2" in proc.stdout
  assert "70.55B params" in proc.stdout
  # 141 GB of bf16 params over 4 chips, before any program runs
  assert "params, factors and train state alone take" in proc.stdout


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--topology", "v9z:2x2"], "topology 'v9z:2x2' is not one libtpu knows"),
    (["--topology", "v5e:2x2", "--config.model=llama9_1t"],
     "model 'llama9_1t' is neither a preset (llama3_8b, llama3_70b"),
    (["--topology", "v5e:2x2", "--config.mesh=data:3,fsdp:1"],
     "config.mesh='data:3,fsdp:1' does not fit topology v5e:2x2 (4 devices)"),
    (["--topology", "v5e:2x2", "--config.batch_size=6", "--config.mesh=fsdp:-1"],
     "config.batch_size=6 does not split over the 4 batch shards"),
    (["--topology", "v5e:2x2", "--layers=31"],
     "--layers=31: the model has 30 decoder layers; give 1..30"),
    (["--topology", "v5e:2x2", "--extrapolate=4,2"],
     "--extrapolate=4,2: give two cuts 0 < A < B"),
    (["--topology", "v5e:2x2", "--extrapolate=2,4", "--layers=3"],
     "give --layers or --extrapolate, not both"),
    (["--topology", "v5e:2x2", "--extrapolate=2,30"],
     "--extrapolate=2,30: the model has 30 decoder layers; B must be below that"),
    (["--topology", "v5e:2x2", "--rule=up_proj/ut$=fsdp,model"],
     "--rule 'up_proj/ut$=fsdp,model': ['model'] are not mesh axes"),
])
def test_usage_errors_exit_2(args, message):
  proc = run_compile("--config", "configs/math.py", *args)
  assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
  assert f"error: {message}" in proc.stderr


# --- no libtpu needed: the abstract trees are what the loaders build ------------------------


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("name", ["llama_bias", "llama_mha_tied", "qwen2"])
def test_abstract_params_and_factors_match_the_loaders(loaded, name):
  model, _ = loaded(name)
  params = abstract.abstract_params(model.config, jnp.float32)
  assert _shapes(params) == _shapes(model.params)
  targets = r"(self_attn|mlp)/.*_proj"
  for rank in (None, 3):
    dec = svf.decompose(model, targets, rank, cache=False, progress=False)
    assert (_shapes(abstract.abstract_factors(params, targets, rank))
            == _shapes(dec.factors))
  bf16 = abstract.abstract_params(model.config, jnp.bfloat16)
  assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_presets_are_the_published_sizes():
  billions = {name: presets.preset(name).num_params() / 1e9 for name in presets.PRESETS}
  assert billions == pytest.approx({"llama3_8b": 8.03, "llama3_70b": 70.55, "mistral_7b": 7.25,
                                    "qwen2_5_7b": 7.62}, abs=0.01)
  cfg, source = presets.model_config("")
  assert source == "smollm2-135m-instruct" and cfg.num_layers == 30
  assert cfg.num_params() == pytest.approx(134.5e6, rel=1e-3)


def test_parse_rule():
  P = jax.sharding.PartitionSpec
  assert cli.parse_rule("up_proj/ut$=fsdp,tensor") == ("up_proj/ut$", P("fsdp", "tensor"))
  assert cli.parse_rule("a=b=data+fsdp,-") == ("a=b", P(("data", "fsdp"), None))
  with pytest.raises(CompileUsageError, match="not 'REGEX=AXES'"):
    cli.parse_rule("fsdp,tensor")


class _Compiled:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    return self.analysis


def test_roofline_reads_both_cost_analysis_forms_and_projects():
  fields = {"flops": 3e12, "bytes accessed": 2e9, "optimal_seconds": 0.1}
  assert roofline.costs(_Compiled(fields)) == (3e12, 2e9, "")
  assert roofline.costs(_Compiled([fields])) == (3e12, 2e9, "")  # older jax: one per program
  flops, bytes_accessed, why = roofline.costs(_Compiled({"flops": 1.0}))
  assert (flops, bytes_accessed) == (0, 0) and "no 'bytes accessed'" in why
  # v6e: 918 TFLOP/s, 1638 GB/s. update: 9.18e12 flops = 10 ms of compute, 1.638e9 bytes = 1
  # ms of HBM → 10 ms, compute-bound; decode: 3.276e9 bytes = 2 ms → 2 ms, memory-bound, and
  # 32 rows / 2 ms = 16,000 tokens/s
  proj = roofline.project({"update": (9.18e12, 1.638e9), "decode": (1e9, 3.276e9)},
                          "TPU v6 lite", rows=32, source="test")
  assert proj["update_step_s"] == pytest.approx(0.010)
  assert proj["decode_step_s"] == pytest.approx(0.002)
  assert proj["programs"]["update"]["bound"] == "compute"
  assert proj["programs"]["decode"]["bound"] == "memory"
  assert proj["decode_tokens_per_s"] == pytest.approx(16_000)
  text = "\n".join(roofline.format_projection(proj))
  assert "PROJECTED update step 10.000 ms" in text
  assert "PROJECTED decode step 2.000 ms, 16,000 tokens/s" in text
  unknown = roofline.project({"update": (1.0, 1.0)}, "TPU v2", rows=1, source="test")
  assert "no bf16 peak and HBM bandwidth known for 'TPU v2'" in unknown["error"]
  assert roofline.format_projection(unknown)[0].startswith("PROJECTED: not available")


def test_a_program_left_out_of_the_projection_is_named_with_why():
  """A program whose layer cuts did not compile (the update's 1-layer cut out of HBM on 8B
  v5e-8) is listed with the reason, alone or beside the programs that were projected."""
  why = "its 1-layer cut (unrolled, one microbatch of 256 rows) did not compile: XLA: OOM"
  proj = roofline.project({"decode": (1e9, 3.276e9)}, "TPU v6 lite", rows=32, source="test",
                          skipped={"update": why})
  assert "update_step_s" not in proj and proj["skipped"] == {"update": why}
  text = roofline.format_projection(proj)
  assert text[-2] == f"update          not projected: {why}"
  assert text[-1].startswith("PROJECTED decode step 2.000 ms")
  none = roofline.project({}, "TPU v6 lite", rows=32, source="cuts", skipped={"update": why})
  assert none["error"] == f"no program has costs (cuts): update: {why}"
  assert roofline.format_projection(none) == [f"PROJECTED: not available: {none['error']}"]


_GATHERS = r"""
import json, re
from t2jax.compile import plan, topology
from t2jax.config_defaults import config_module
texts = {}
compile_program = plan.compile_program
def keep(name, what, program, other_live=0):
  rep, compiled = compile_program(name, what, program, other_live)
  texts[name] = compiled.as_text() if compiled is not None else ""
  return rep, compiled
plan.compile_program = keep
cfg = config_module("configs/math.py").get_config()
cfg.mesh, cfg.scan_layers, cfg.batch_size, cfg.microbatches = "fsdp:-1", "true", 16, 2
plan.plan(cfg, topology.describe("v5e:2x4"), 64, "all", 4)
print(json.dumps({name: re.findall(r"all-gather[.\d]* = \w+\[([\d,]+)\]", text)
                  for name, text in texts.items()}))
"""


@needs_libtpu
def test_scanned_layers_gather_one_layer_at_a_time():
  """Layers scanned, fsdp over 8 chips: each program gathers a layer's weights and factors
  inside the scan, one layer at a time. Building W' for the whole [L, n, m] stack at once made
  XLA gather every layer's factors together (8B on v5e-8: +0.5 GiB a layer, the update did
  not fit); no program may gather a stack of kernel-sized blocks."""
  proc = subprocess.run([sys.executable, "-c", _GATHERS], cwd=ROOT, capture_output=True,
                        text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu",
                             "JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  gathers = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(gathers) == ["decode", "materialise", "prefill", "update"]
  smallest_kernel = 576 * 192  # k_proj / v_proj of the default model
  shapes = {name: [tuple(int(d) for d in s.split(",")) for s in found]
            for name, found in gathers.items()}
  assert any(len(s) == 2 and s[0] * s[1] >= smallest_kernel for s in shapes["update"])
  whole = {name: [s for s in found if len(s) == 3 and s[0] == 4
                  and s[1] * s[2] >= smallest_kernel] for name, found in shapes.items()}
  assert whole == {name: [] for name in shapes}, whole
