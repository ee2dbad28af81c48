"""Cost of one RL step on the default model, split into rollout and update, next to one plain
forward pass of the base model over the same tokens (measured in the same run).

  python bench/rl_step.py [--prompts 16] [--samples 4] [--max-new 16] [--kl exact] [--repeats 3]

Prints JSON. The update = policy log-probs + reference log-probs + gradient w.r.t. z + optax:
the program t2jax.programs builds for training, called as train.py calls it (the rollout too);
the plain forward = llama.full_logits over the B·G rows of prompt + completion (what a
trainer without prefix sharing would run once).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import t2jax
from t2jax import config_defaults, programs, run_setup, sampling, sharding, svf, trainer
from t2jax.models import llama
from t2jax.tasks.math import Arithmetic
from t2jax.tokenizer import encode_chats


def _timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--samples", type=int, default=4)
  ap.add_argument("--max-new", type=int, default=16)
  ap.add_argument("--kl", default="exact")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  model = t2jax.load_model()
  cfg = model.config
  task = Arithmetic(level=2)
  records = list(task.records("train"))[: args.prompts]
  prompts = encode_chats(model.tokenizer, [task.messages(r) for r in records])
  config = config_defaults.base_config()
  config.update(dict(kl=args.kl, baseline="leave_one_out" if args.samples > 1 else "none",
                     lr=1e-3, grad_clip=1.0, steps=10, temperature=1.0,
                     batch_size=args.prompts, samples_per_prompt=args.samples,
                     max_new_tokens=args.max_new))
  # the update training runs: the program factory's, on params laid out as train.py lays them
  setup = run_setup.Setup(cfg=config, model=model, task=task, dec=svf.decompose(model))
  mesh = sharding.make_mesh("data:-1")
  setup.place(mesh)
  params, factors = setup.params, setup.factors
  progs = programs.build(config, cfg, params, factors, mesh=mesh,
                         shapes=programs.Shapes.from_config(
                             config, sampling.bucket_length(max(map(len, prompts)))),
                         eos_ids=model.eos_ids)
  state = progs.init_state(setup.init_trainable(), seed=0)
  params_z = progs.materialise(params, factors, state.z)
  collect = lambda: trainer.collect(
      params_z, prompts, records, task=task, tokenizer=model.tokenizer, cfg=cfg,
      sampler=progs.sampler, samples=args.samples, max_new=args.max_new, seed=0,
      pad_id=model.pad_id, eos_ids=model.eos_ids, mesh=mesh,
      prompt_len=progs.shapes.prompt_len)
  got = collect()
  t_rollout = _timed(lambda: collect().rollouts.reward_N, args.repeats)
  batch = got.rollouts
  # every completion padded to the full max_new tokens, so both sides see the same shapes
  batch = batch.replace(completion_mask_NxC=np.ones_like(batch.completion_mask_NxC))

  def update():
    nonlocal state
    state, metrics = progs.update(state, batch, params, factors)
    return metrics["loss"]

  t_update = _timed(update, args.repeats)
  rows = np.concatenate([np.repeat(batch.prompt_BxP, args.samples, 0), batch.completion_NxC], 1)
  mask = np.concatenate([np.repeat(batch.prompt_mask_BxP, args.samples, 0),
                         batch.completion_mask_NxC], 1)
  plain = jax.jit(lambda p, t, m: llama.full_logits(p, t, m, cfg=cfg))
  t_forward = _timed(lambda: plain(params, rows, mask), args.repeats)
  print(json.dumps({
      "prompts": args.prompts, "samples_per_prompt": args.samples,
      "prompt_len_padded": int(batch.prompt_BxP.shape[1]), "new_tokens": args.max_new,
      "kl": args.kl, "rollout_s": round(t_rollout, 3), "update_s": round(t_update, 3),
      "plain_forward_s": round(t_forward, 3),
      "update_over_forward": round(t_update / t_forward, 2),
      "rollout_tokens_per_s": round(got.new_tokens / t_rollout, 1),
      "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
