"""Cost of one RL step on the default model, split into rollout and update, next to one plain
forward pass of the base model over the same tokens (measured in the same run).

  python bench/rl_step.py [--prompts 16] [--samples 4] [--max-new 16] [--kl exact] [--repeats 3]

Prints JSON. The update = policy log-probs + reference log-probs + gradient w.r.t. z + optax
(rl.loss_fn under jax.grad, as in training); the plain forward = llama.full_logits over the
B·G rows of prompt + completion (what a trainer without prefix sharing would run once).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import t2jax
from t2jax import rl, sampling, sharding, svf, trainer
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
  dec = svf.decompose(model)
  expert = t2jax.Expert.init(model)
  settings = rl.RLSettings(kl=args.kl, baseline="leave_one_out" if args.samples > 1 else "none")
  optimizer = trainer.make_optimizer(name="adam", lr=1e-3, schedule="constant", warmup_steps=0,
                                     total_steps=10, weight_decay=0.0, grad_clip=1.0)
  mesh = sharding.make_mesh("data:-1")
  step_fn = trainer.make_step_fn(mesh, model.params, dec.factors, cfg=cfg, settings=settings,
                                 optimizer=optimizer)
  z_tree = expert.z_tree(model)
  params_z = svf.materialise_jit(model.params, dec.factors, z_tree, parametrisation="scale",
                                 max_mult=2.0)
  sampler = sampling.Sampler(temperature=1.0, eos_ids=model.eos_ids)
  collect = lambda: trainer.collect(
      params_z, prompts, records, task=task, tokenizer=model.tokenizer, cfg=cfg,
      sampler=sampler, samples=args.samples, max_new=args.max_new, seed=0,
      pad_id=model.pad_id, eos_ids=model.eos_ids)
  got = collect()
  t_rollout = _timed(lambda: collect().rollouts.reward_N, args.repeats)
  batch = got.rollouts
  # every completion padded to the full max_new tokens, so both sides see the same shapes
  batch = batch.replace(completion_mask_NxC=np.ones_like(batch.completion_mask_NxC))
  # placed as train.py places it: an uncommitted state would compile the update a second time
  state = jax.device_put(trainer.init_state(z_tree, optimizer, seed=0), sharding.replicated(mesh))

  def update():
    nonlocal state
    state, metrics = step_fn(state, batch, model.params, dec.factors)
    return metrics["loss"]

  t_update = _timed(update, args.repeats)
  rows = np.concatenate([np.repeat(batch.prompt_BxP, args.samples, 0), batch.completion_NxC], 1)
  mask = np.concatenate([np.repeat(batch.prompt_mask_BxP, args.samples, 0),
                         batch.completion_mask_NxC], 1)
  plain = jax.jit(lambda p, t, m: llama.full_logits(p, t, m, cfg=cfg))
  t_forward = _timed(lambda: plain(model.params, rows, mask), args.repeats)
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
