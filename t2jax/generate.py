"""Command line: `python -m t2jax.generate --prompt "What is 7*8?" [--json]`.

Loads a model (default: the embedded SmolLM2-135M-Instruct), generates for every --prompt in
one batch and prints each completion (or one JSON object with texts, token ids and log-probs).
With experts, two-pass generation (t2jax/adapt.py) that prints the mixture each prompt got:

  python -m t2jax.generate --experts math=runs/math/expert,code=runs/code/expert \
      --strategy prompt --prompt "What is 12 + 30?" --prompt "Write a function that ..."
  ... --strategy cls_expert --cls-expert runs/cls/expert
  ... --strategy few_shot --alpha W/few_shot_alpha_math.json   (or --alpha 0.7,0.3)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from t2jax.two_pass_cli import add_two_pass_args, load_two_pass, mixture_text


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
  two = add_two_pass_args(
      p.add_argument_group("two-pass adaptation (all prompts in one batch per pass)"))
  two.add_argument("--slots", type=int, default=None, help="run on the serving engine "
                   "(continuous batching over N decode slots; pass 1 inside admission)")
  return p.parse_args(argv)


def _two_pass_inputs(args) -> tuple[dict, dict]:
  """The experts and the strategy's inputs, every two-pass flag checked (before any loading
  of the model, so a bad flag fails fast)."""
  experts, kw = load_two_pass(args)
  if not experts and args.slots:
    raise ValueError("--slots needs --experts.")
  if experts and args.no_chat_template:
    raise ValueError("two-pass generation classifies chat prompts: drop --no-chat-template.")
  return experts, kw


def _two_pass(args, model, experts: dict, kw: dict):
  """(texts, mixtures, timing) of two-pass generation."""
  from t2jax import adapt  # pylint: disable=import-outside-toplevel
  return adapt.two_pass_generate(
      model, args.prompt, experts, strategy=args.strategy, max_new_tokens=args.max_new_tokens,
      threshold=args.threshold, temperature=args.temperature, seed=args.seed,
      slots=args.slots, **kw)


def main(argv=None) -> int:
  args = parse_args(argv)
  import t2jax  # pylint: disable=import-outside-toplevel  (keeps --help fast)
  # not t2jax.generate: importing this module in-process rebinds that name to the module
  from t2jax.generation import generate  # pylint: disable=import-outside-toplevel

  try:
    t0 = time.perf_counter()
    experts, kw = _two_pass_inputs(args)
    model = t2jax.load_model(args.model, dtype=args.dtype)
    t1 = time.perf_counter()
    if not experts:
      out, mixtures, timing = generate(
          model, args.prompt, max_new_tokens=args.max_new_tokens,
          min_new_tokens=args.min_new_tokens, temperature=args.temperature, top_p=args.top_p,
          top_k=args.top_k, seed=args.seed, chat_template=not args.no_chat_template), None, None
    else:
      out, mixtures, timing = _two_pass(args, model, experts, kw)
    t2 = time.perf_counter()
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_tokens = sum(len(t) for t in out.token_ids)
  if args.json:
    extra = {} if mixtures is None else {"mixtures": mixtures, "strategy": args.strategy,
                                         "timing": timing}
    print(json.dumps({"texts": out.texts, "token_ids": out.token_ids, "logprobs": out.logprobs,
                      "load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3), **extra}))
  else:
    for i, (prompt, text) in enumerate(zip(args.prompt, out.texts)):
      chosen = "" if mixtures is None else f"  [{args.strategy}: {mixture_text(mixtures[i])}]"
      print(f">>> {prompt}{chosen}\n{text}\n")
    if timing is not None and "pass1_s" in timing:
      print(f"[pass 1 {timing['pass1_s']:.2f}s, pass 2 {timing['pass2_s']:.2f}s]",
            file=sys.stderr)
    print(f"[{n_tokens} tokens in {t2 - t1:.1f}s incl. compile; load {t1 - t0:.1f}s]",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
