"""Load on `python -m t2jax.serve`: N chat requests from C concurrent clients against the
server, the same requests sent one at a time, and offline two-pass generation
(adapt.two_pass_generate: pass 1, then `t2jax.generate`) in batches of C. Throughput, time to
first token and p50/p99 latency; also admission's pass 1 next to a plain base-model prefill of
the same prompts. Prints one JSON object.

    python bench/serve_load.py                                   # 64 requests, 16 clients, 16 slots
    python bench/serve_load.py --requests 8 --concurrency 4 --slots 4 --new-tokens 8   # smoke
    python bench/serve_load.py --experts math=runs/math/expert,code=runs/code/expert

The server runs in this process (uvicorn on a thread, the engine on another); the clients are
threads with the real `openai` client, streaming, so each request's first token is timed.
Experts not given are drawn around the identity (math, code, reasoning). Greedy, `auto` with
the prompt strategy: all three ways generate the same tokens, and the report checks it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import sys
import threading
import time

import bench_experts  # beside this script

TOPICS = {
    "math": ["What is {a} + {b}?", "A box holds {a} apples and {b} pears. How many fruits?",
             "Compute {a} times {b}, then subtract {b}."],
    "code": ["Write a Python function that returns the {a}th Fibonacci number.",
             "Write a function that reverses a string of length {b}.",
             "Fix this code: def add(a, b): return a - b  # should add {a} and {b}"],
    "reasoning": ["All cats are animals and Tom is a cat. Is Tom an animal? Options: A) yes "
                  "B) no (case {a})",
                  "If it rains the grass is wet. The grass is dry. Did it rain? ({b})",
                  "Which is heavier, {a} kg of iron or {b} kg of feathers?"],
}


def prompts(n: int) -> list[str]:
  kinds = list(TOPICS)
  return [TOPICS[kinds[i % 3]][(i // 3) % 3].format(a=7 + i, b=3 + 2 * i) for i in range(n)]


def _log(what: str, **kw) -> None:
  """Progress on stderr (the JSON comes at the end): a long run shows where it is."""
  print(json.dumps({"phase": what, **kw}), file=sys.stderr, flush=True)


def _pct(xs, q):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return round(float(np.percentile(xs, q)), 4) if xs else None


def _summary(results, wall_s) -> dict:
  tokens = sum(r["tokens"] for r in results)
  lat = [r["latency_s"] for r in results]
  ttft = [r["ttft_s"] for r in results if r.get("ttft_s") is not None]
  return {"requests": len(results), "tokens": tokens, "wall_s": round(wall_s, 3),
          "tokens_per_s": round(tokens / wall_s, 2), "requests_per_s": round(len(results) / wall_s, 3),
          "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
          "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99)}


def _one(client, question: str, new_tokens: int) -> dict:
  t0 = time.perf_counter()
  ttft, text, usage = None, [], None
  stream = client.chat.completions.create(
      model="auto", messages=[{"role": "user", "content": question}], max_tokens=new_tokens,
      temperature=0, stream=True)
  for chunk in stream:
    piece = chunk.choices[0].delta.content if chunk.choices else None
    if piece and ttft is None:
      ttft = time.perf_counter() - t0
    text.append(piece or "")
    usage = chunk.model_extra.get("mixture")
  return {"text": "".join(text), "ttft_s": ttft, "latency_s": time.perf_counter() - t0,
          "mixture": usage}


def _load(client, questions, concurrency: int, new_tokens: int, tokenizer):
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    out = list(pool.map(lambda q: _one(client, q, new_tokens), questions))
  wall = time.perf_counter() - t0
  for r in out:  # completion tokens, counted the same way for every phase
    r["tokens"] = len(tokenizer(r["text"], add_special_tokens=False)["input_ids"])
  return out, wall


def _timed(fn, reps: int = 3) -> float:
  fn()  # compiles
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def pass1_vs_prefill(engine, questions) -> dict:
  """Pass 1 as admission runs it (the label scores and the dispatch) against a plain
  base-model prefill of the same chat prompts (the sampler's prefill: dense base weights, the
  first token), each over the requests as admission takes them (admit_rows at a time), each
  warm, best of 3, summed over the requests."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from t2jax import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from t2jax import sampling  # pylint: disable=import-outside-toplevel
  from t2jax.models import llama  # pylint: disable=import-outside-toplevel

  model, step = engine.model, engine.admit_rows
  graphdef, state = llama.split_params(model.config, model.params)
  sampler = sampling.Sampler(eos_ids=model.eos_ids)
  pass1_fn = jax.jit(engine_lib._dispatch, static_argnames=("k", "cfg"))  # pylint: disable=protected-access
  total_p1 = total_pf = 0.0
  for i in range(0, len(questions), step):
    reqs = [engine.chat_request([{"role": "user", "content": q}], 1)
            for q in questions[i:i + step]]
    new, _ = engine._rows([engine_lib.Handle(r) for r in reqs], list(range(len(reqs))))  # pylint: disable=protected-access
    tokens, mask = sampling.left_pad([r.prompt for r in reqs], model.pad_id)
    pre, _ = sampling.static_args(graphdef, sampler, tokens.shape[1], 1)
    limit = np.ones(len(reqs), np.int32)

    def pass1(new=new):
      jax.block_until_ready(pass1_fn(engine.dispatcher, new.rest, new.rest_mask,
                                     k=new.alpha.shape[1], cfg=engine.cfg))

    def prefill(tokens=tokens, mask=mask, pre=pre, limit=limit):
      out = sampling.prefill(state, tokens, mask, limit, 0, jax.random.key(0), **pre)
      jax.block_until_ready(out.tokens)

    total_p1 += _timed(pass1)
    total_pf += _timed(prefill)
  return {"requests": len(questions), "rows_per_program": step, "pass1_s": round(total_p1, 4),
          "base_prefill_s": round(total_pf, 4),
          "pass1_over_prefill": round(total_p1 / total_pf, 3)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default=None)
  p.add_argument("--experts", default="", help="label=DIR,...; math, code and reasoning not "
                 "given are drawn at random")
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--concurrency", type=int, default=16)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--admit-rows", type=int, default=1, help="requests prefilled together")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--max-len", type=int, default=256, help="the engine's context per slot: "
                 "every decode step attends over all of it")
  p.add_argument("--skip", default="", help="comma-separated phases to skip: sequential,offline,"
                 "pass1")
  args = p.parse_args()
  skip = set(filter(None, args.skip.split(",")))

  import openai  # pylint: disable=import-outside-toplevel

  import t2jax  # pylint: disable=import-outside-toplevel
  from t2jax import adapt, serve  # pylint: disable=import-outside-toplevel
  from t2jax.engine import Engine  # pylint: disable=import-outside-toplevel

  model = t2jax.load_model(args.model)
  experts, sources = bench_experts.load_or_draw(model, args.experts)
  questions = prompts(args.requests)
  t0 = time.perf_counter()
  engine = Engine(model, experts, strategy="prompt", slots=args.slots, max_len=args.max_len,
                  admit_rows=args.admit_rows)
  setup_s = time.perf_counter() - t0
  _log("engine", seconds=round(setup_s, 1))
  t0 = time.perf_counter()
  programs = engine.warmup([engine.chat_request([{"role": "user", "content": q}],
                                                args.new_tokens) for q in questions])
  warm_s = time.perf_counter() - t0
  _log("warmup", programs=programs, seconds=round(warm_s, 1))
  engine.start()
  srv = serve.make_server(engine, "127.0.0.1", 0, grace_s=1.0)
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
  while not srv.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                         api_key="unused", max_retries=0, timeout=3600)
  tok = model.tokenizer
  report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "experts": sources, "requests": args.requests, "concurrency": args.concurrency, "slots": args.slots,
            "new_tokens": args.new_tokens, "max_len": engine.s, "admit_rows": engine.admit_rows,
            "engine_setup_s": round(setup_s, 2), "warmup_programs": programs,
            "warmup_s": round(warm_s, 2)}
  _load(client, questions[:2], 2, 2, tok)  # the HTTP path once
  conc, wall = _load(client, questions, args.concurrency, args.new_tokens, tok)
  report["concurrent"] = _summary(conc, wall)
  _log("concurrent", **report["concurrent"])
  if "sequential" not in skip:
    seq, wall = _load(client, questions, 1, args.new_tokens, tok)
    report["sequential"] = _summary(seq, wall)
    _log("sequential", **report["sequential"])
    report["sequential_equals_concurrent"] = [r["text"] for r in seq] == [r["text"] for r in conc]
    report["concurrent_over_sequential"] = round(
        report["concurrent"]["tokens_per_s"] / report["sequential"]["tokens_per_s"], 3)
  srv.should_exit = True
  engine.close(grace_s=1.0)
  if "offline" not in skip:
    c = args.concurrency
    chats = [[{"role": "user", "content": q}] for q in questions]
    for i in range(0, len(chats), c):  # every batch's shapes compiled first
      adapt.two_pass_generate(model, chats[i:i + c], experts, strategy="prompt",
                              max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    texts, mixtures = [], []
    for i in range(0, len(chats), c):
      gen, w, _ = adapt.two_pass_generate(model, chats[i:i + c], experts, strategy="prompt",
                                          max_new_tokens=args.new_tokens)
      texts += gen.texts
      mixtures += w
    wall = time.perf_counter() - t0
    off = [{"tokens": len(tok(t, add_special_tokens=False)["input_ids"]), "latency_s": wall}
           for t in texts]
    report["offline"] = _summary(off, wall)
    _log("offline", **report["offline"])
    report["offline"].pop("ttft_p50_s"), report["offline"].pop("ttft_p99_s")
    report["offline_equals_concurrent"] = texts == [r["text"] for r in conc]
    report["mixtures_equal_offline"] = mixtures == [r["mixture"] for r in conc]
    report["concurrent_over_offline"] = round(
        report["concurrent"]["tokens_per_s"] / report["offline"]["tokens_per_s"], 3)
  if "pass1" not in skip:
    report["pass1"] = pass1_vs_prefill(engine, questions[:args.concurrency])
  st = engine.stats
  report["engine"] = {"admissions": st.admissions, "admission_s": round(st.admission_s, 3),
                      "decode_steps": st.decode_steps, "decode_s": round(st.decode_s, 3)}
  print(json.dumps(report, indent=1))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
