"""Command line: `python -m t2jax.generate --prompt "What is 7*8?" [--json]`.

Loads a model (default: the embedded SmolLM2-135M-Instruct), generates for every --prompt in
one batch and prints each completion (or one JSON object with texts, token ids and log-probs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m t2jax.generate", description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None,
                 help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct (default)")
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--min-new-tokens", type=int, default=0)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--no-chat-template", action="store_true",
                 help="feed prompts as raw text instead of a user chat turn")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import t2jax  # pylint: disable=import-outside-toplevel  (keeps --help fast)

  try:
    t0 = time.perf_counter()
    model = t2jax.load_model(args.model, dtype=args.dtype)
    t1 = time.perf_counter()
    out = t2jax.generate(model, args.prompt, max_new_tokens=args.max_new_tokens,
                         min_new_tokens=args.min_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                         chat_template=not args.no_chat_template)
    t2 = time.perf_counter()
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_tokens = sum(len(t) for t in out.token_ids)
  if args.json:
    print(json.dumps({"texts": out.texts, "token_ids": out.token_ids, "logprobs": out.logprobs,
                      "load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3)}))
  else:
    for prompt, text in zip(args.prompt, out.texts):
      print(f">>> {prompt}\n{text}\n")
    print(f"[{n_tokens} tokens in {t2 - t1:.1f}s incl. compile; load {t1 - t0:.1f}s]",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
