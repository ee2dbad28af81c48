"""Decode throughput on the default model: t2jax (base / one shared expert / an expert per row)
next to HF transformers `generate` on the same prompts, in one run.

    python bench/generate_throughput.py                       # batch 8 and 32, all variants
    python bench/generate_throughput.py --batch 8 --variants base,hf --new-tokens 128
    python bench/generate_throughput.py --batch 8 --variants hf,base --rounds 3  # noisy machine
    python bench/generate_throughput.py --trees old=../t2jax-old,new=.  # two commits, one run

Every (variant, batch) runs in its own subprocess, one after another, so peak RSS is per
variant and the runs do not share the 2 cores. With --trees, each t2jax variant runs from
each source tree (e.g. a worktree of the commit before a change, and this one) in a worker
process per tree that loads and compiles once, then generates when asked; the workers take
turns call by call (A B B A ...), so a slow spell of this shared machine, which can last
minutes and cost 30 %, hits both trees alike. Each cell reports its best call and the
median over pairs of the later tree's time ratio. Sampling at temperature 0.7 with
min_new_tokens = max_new_tokens: every variant generates exactly batch × new_tokens tokens.
Prints one JSON object. The HF variant needs the test extra (torch, accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("hf", "base", "shared", "per_row")


def _prompts(n: int) -> list[str]:
  topics = ["the sea", "a robot", "prime numbers", "a city at night", "bread", "the moon",
            "a chess game", "rain"]
  return [f"Write a short story about {topics[i % len(topics)]} (version {i})." for i in range(n)]


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _t2jax_call(variant: str, batch: int, new_tokens: int):
  """Loads the default model with the t2jax on sys.path and returns (generate(seed) -> tokens
  generated, seconds spent preparing the experts)."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel

  import t2jax  # pylint: disable=import-outside-toplevel

  model = t2jax.load_model()
  experts, prep_s = None, 0.0
  if variant != "base":
    rng = np.random.default_rng(0)

    def expert(name):  # a trained-looking expert: z away from the identity
      e = t2jax.Expert.init(model, name=name)
      return dataclasses.replace(e, z={k: (v * (1 + 0.05 * rng.standard_normal(v.shape)))
                                       .astype(np.float32) for k, v in e.z.items()})

    t0 = time.perf_counter()
    if variant == "shared":
      experts = expert("a")
    else:  # three experts and base rows, interleaved
      pool = [expert("a"), expert("b"), expert("c"), None]
      experts = [pool[i % len(pool)] for i in range(batch)]
    prep_s = time.perf_counter() - t0
  prompts = _prompts(batch)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.7,
            experts=experts)

  def call(seed: int) -> int:
    out = t2jax.generate(model, prompts, seed=seed, **kw)
    return sum(len(t) for t in out.token_ids)

  return call, prep_s


def _timed(call, seed: int) -> tuple[int, float]:
  t0 = time.perf_counter()
  n = call(seed)
  return n, time.perf_counter() - t0


def run_t2jax(variant: str, batch: int, new_tokens: int, reps: int) -> dict:
  call, prep_s = _t2jax_call(variant, batch, new_tokens)
  _, first_s = _timed(call, 0)  # compiles (and materialises a shared expert)
  runs = [_timed(call, rep + 1) for rep in range(reps)]
  n, times = runs[0][0], [t for _, t in runs]
  result = {"tokens": n, "first_call_s": round(first_s, 2),
            "seconds": [round(t, 3) for t in times], "tokens_per_s": round(n / min(times), 1)}
  if variant != "base":
    result["expert_setup_s"] = round(prep_s, 2)
  return result


def worker(variant: str, batch: int, new_tokens: int) -> None:
  """--trees: compiles once, then times one generate per seed read from stdin, a JSON line
  each, until stdin closes."""
  call, _ = _t2jax_call(variant, batch, new_tokens)
  _, first_s = _timed(call, 0)
  print(json.dumps({"first_call_s": round(first_s, 2)}), flush=True)
  for line in sys.stdin:
    n, seconds = _timed(call, int(line))
    print(json.dumps({"tokens": n, "seconds": seconds, "peak_rss_mb": round(_peak_rss_mb())}),
          flush=True)


def run_hf(batch: int, new_tokens: int, reps: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from t2jax import weights  # pylint: disable=import-outside-toplevel

  path = weights.default_model_path()
  kw = dict(gguf_file=os.path.basename(path))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                            dtype=torch.float32, **kw).eval()
  tok.padding_side = "left"
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in _prompts(batch)]
  enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
  times = []
  with torch.no_grad():
    for rep in range(reps + 1):  # the first call warms up
      torch.manual_seed(rep)
      t0 = time.perf_counter()
      out = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=tok.pad_token_id)
      times.append(time.perf_counter() - t0)
  n = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
  return {"tokens": int(n), "seconds": [round(t, 3) for t in times[1:]],
          "tokens_per_s": round(n / min(times[1:]), 1), "torch_threads": torch.get_num_threads()}


def child(variant: str, batch: int, new_tokens: int, reps: int) -> None:
  if variant == "hf":
    result = run_hf(batch, new_tokens, reps)
  else:
    result = run_t2jax(variant, batch, new_tokens, reps)
  result["peak_rss_mb"] = round(_peak_rss_mb())
  print(json.dumps(result))


def _tok_s(row: dict, name: str) -> float | None:
  return row.get(name, {}).get("tokens_per_s")


def _ratios(row: dict, labels: list[str]) -> dict[str, float]:
  """Per tree: shared and per_row over its base, its base over HF; each later tree's cells
  over the first tree's (best call over best call, and the median paired ratio)."""
  out = {}
  hf = _tok_s(row, "hf")
  for label in labels:
    pre = f"{label}:" if label else ""
    base = _tok_s(row, pre + "base")
    for variant in ("shared", "per_row"):
      if base and _tok_s(row, pre + variant):
        out[f"{pre}{variant}_over_base"] = round(_tok_s(row, pre + variant) / base, 2)
    if base and hf:
      out[f"{pre}base_over_hf"] = round(base / hf, 2)
  for label in labels[1:]:
    for variant in ("base", "shared", "per_row"):
      new, old = _tok_s(row, f"{label}:{variant}"), _tok_s(row, f"{labels[0]}:{variant}")
      if new and old:
        out[f"{label}_over_{labels[0]}:{variant}"] = round(new / old, 3)
      paired = row.get(f"{label}:{variant}", {}).get(f"paired_median_over_{labels[0]}")
      if paired:
        out[f"{label}_over_{labels[0]}:{variant}:paired_median"] = paired
  return out


def _child_cell(variant: str, batch: int, args, tree: str) -> dict:
  """One variant in its own process, from `tree` (its t2jax on PYTHONPATH)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--batch", str(batch),
         "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
  env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_error(proc: subprocess.Popen) -> dict:
  proc.wait()
  return {"error": proc.stderr.read().strip().splitlines()[-1:], "returncode": proc.returncode}


def _paired_cells(variant: str, batch: int, args, trees: dict[str, str]) -> dict:
  """One t2jax variant from every tree: a worker per tree, calls alternating A B B A ...;
  returns {label: cell}, the later trees' cells with their median paired ratio to the first."""
  procs = {}
  for label, tree in trees.items():
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--batch", str(batch),
           "--new-tokens", str(args.new_tokens)]
    procs[label] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": os.path.abspath(tree)})
  cells: dict[str, dict] = {}
  try:
    for label, proc in procs.items():  # the workers compile one after the other
      line = proc.stdout.readline()
      if not line:
        return {label: _worker_error(proc)}
      cells[label] = {**json.loads(line), "seconds": []}
    labels = list(trees)
    for i in range(args.pairs):
      for label in labels if i % 2 == 0 else labels[::-1]:
        procs[label].stdin.write(f"{i + 1}\n")
        procs[label].stdin.flush()
        line = procs[label].stdout.readline()
        if not line:  # the worker died mid-run (e.g. out of memory)
          return {label: _worker_error(procs[label])}
        r = json.loads(line)
        cells[label]["seconds"].append(r["seconds"])
        cells[label]["tokens"], cells[label]["peak_rss_mb"] = r["tokens"], r["peak_rss_mb"]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.stdin.close()
        proc.wait()
  first = cells[labels[0]]["seconds"]
  for label in labels:
    c = cells[label]
    c["tokens_per_s"] = round(c["tokens"] / min(c["seconds"]), 1)
    if label != labels[0]:  # > 1: this tree is faster; pairs share the machine's state
      ratios = sorted(a / b for a, b in zip(first, c["seconds"]))
      c[f"paired_median_over_{labels[0]}"] = round(ratios[len(ratios) // 2], 3)
    c["seconds"] = [round(t, 3) for t in c["seconds"]]
  return cells


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", default="8,32", help="comma-separated batch sizes")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS}")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--rounds", type=int, default=1,
                 help="run every variant this many times, interleaved; report each one's best")
  p.add_argument("--trees", default="",
                 help="label=DIR,...: run the t2jax variants from each source tree (a checkout "
                      "with t2jax/), paired call by call; default: this one")
  p.add_argument("--pairs", type=int, default=6,
                 help="with --trees: timed calls per tree and variant")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args.child, int(args.batch), args.new_tokens, args.reps)
    return
  if args.worker:
    worker(args.worker, int(args.batch), args.new_tokens)
    return
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    sys.exit(f"unknown variants {unknown}; choose from {VARIANTS}")
  result = {"new_tokens": args.new_tokens, "temperature": 0.7, "dtype": "float32",
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "runs": {}}
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trees = dict(t.split("=", 1) for t in args.trees.split(",") if t)
  for label, tree in trees.items():
    if not os.path.isdir(os.path.join(tree, "t2jax")):
      sys.exit(f"--trees {label}={tree}: no t2jax package there")
  for batch in [int(b) for b in args.batch.split(",")]:
    row, seen = {}, {}
    for _ in range(1 if trees else args.rounds):  # interleaved: a slow spell hits all
      for variant in variants:
        if trees and variant != "hf":
          row.update({f"{label}:{variant}": cell for label, cell in
                      _paired_cells(variant, batch, args, trees).items()})
          continue
        r = _child_cell(variant, batch, args, here)
        if "error" in r:
          row[variant] = r
          continue
        seen.setdefault(variant, []).append(r["tokens_per_s"])
        if r["tokens_per_s"] >= row.get(variant, {}).get("tokens_per_s", 0.0):
          row[variant] = r
    for name, values in seen.items():
      if len(values) > 1 and "tokens_per_s" in row.get(name, {}):
        row[name]["tokens_per_s_each_round"] = values
    row["ratios"] = _ratios(row, list(trees) or [""])
    result["runs"][f"batch_{batch}"] = row
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
