"""Decode throughput of t2jax.generate vs HF transformers `generate`, same prompts, one run.

    python bench/generate_throughput.py --batch 8 --new-tokens 128 [--reps 2] [--skip-hf]

Prints one JSON object. Sampling (temperature 0.7) with min_new_tokens = max_new_tokens so
both generate exactly batch × new_tokens tokens. Needs the test extra (torch) for the HF side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _prompts(n: int) -> list[str]:
  topics = ["the sea", "a robot", "prime numbers", "a city at night", "bread", "the moon",
            "a chess game", "rain"]
  return [f"Write a short story about {topics[i % len(topics)]} (version {i})." for i in range(n)]


def bench_t2jax(prompts, new_tokens: int, reps: int, dtype: str) -> dict:
  import t2jax  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  model = t2jax.load_model(dtype=dtype)
  load_s = time.perf_counter() - t0
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.7)
  t0 = time.perf_counter()
  t2jax.generate(model, prompts, seed=0, **kw)  # compiles prefill + decode
  first_s = time.perf_counter() - t0
  times = []
  for rep in range(reps):
    t0 = time.perf_counter()
    out = t2jax.generate(model, prompts, seed=rep + 1, **kw)
    times.append(time.perf_counter() - t0)
  n = sum(len(t) for t in out.token_ids)
  return {"load_s": round(load_s, 2), "first_call_s": round(first_s, 2),
          "tokens": n, "seconds": [round(t, 3) for t in times],
          "tokens_per_s": round(n / min(times), 1)}


def bench_hf(prompts, new_tokens: int, reps: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from t2jax import weights  # pylint: disable=import-outside-toplevel

  path = weights.default_model_path()
  kw = dict(gguf_file=os.path.basename(path))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                            dtype=torch.float32, **kw)
  tok.padding_side = "left"
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in prompts]
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


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--skip-hf", action="store_true")
  args = p.parse_args()
  prompts = _prompts(args.batch)
  result = {"batch": args.batch, "new_tokens": args.new_tokens, "dtype": args.dtype,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
  result["t2jax"] = bench_t2jax(prompts, args.new_tokens, args.reps, args.dtype)
  if not args.skip_hf:
    result["hf"] = bench_hf(prompts, args.new_tokens, args.reps)
    result["speedup"] = round(result["t2jax"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
