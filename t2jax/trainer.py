"""The RL training state and its two phases: rollouts (sample, score) and the update (one jit).

    state = TrainState(step, z, opt_state, rng)
    rollouts = collect(params_z, prompts, records, task=task, ...)      # host: sampler + rewards
    state, metrics = update(state, rollouts, params, factors)          # device: one jit

`update` is `train_step` as t2jax.programs jits it, with its shardings, for a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t2jax import adapters, rl, sampling, svf
from t2jax.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # [] int32: updates applied so far
  z: list  # the only trainable pytree (config.adapter): SVF's z, per layer {block: {name: [r]}},
  # or LoRA's {"a": [n, r], "b": [r, m]} per matrix
  opt_state: Any
  rng: jnp.ndarray  # uint32 [2]: raw key data, so checkpoints hold a plain array


def make_optimizer(*, name: str, lr: float, schedule: str, warmup_steps: int, total_steps: int,
                   weight_decay: float, grad_clip: float, b1: float = 0.9,
                   b2: float = 0.999) -> optax.GradientTransformation:
  if schedule == "constant":
    lr_fn = optax.constant_schedule(lr)
  elif schedule in ("cosine", "linear"):
    decay = max(total_steps - warmup_steps, 1)
    lr_fn = (optax.cosine_decay_schedule(lr, decay) if schedule == "cosine"
             else optax.linear_schedule(lr, 0.0, decay))
  else:
    raise ValueError(f"schedule {schedule!r} is unknown; use constant, cosine or linear.")
  if warmup_steps > 0:
    lr_fn = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), lr_fn],
                                 [warmup_steps])
  if name == "adam":
    opt = optax.adam(lr_fn, b1=b1, b2=b2)
  elif name == "adamw":
    opt = optax.adamw(lr_fn, b1=b1, b2=b2, weight_decay=weight_decay)
  elif name == "sgd":  # z moves by -lr·gradient: what tests compare the gradient through
    opt = optax.sgd(lr_fn)
  else:
    raise ValueError(f"optimizer {name!r} is unknown; use adam, adamw or sgd.")
  return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def init_state(z_tree: list, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  z = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), z_tree)
  return TrainState(step=jnp.zeros((), jnp.int32), z=z, opt_state=optimizer.init(z),
                    rng=jax.random.PRNGKey(seed))


def microbatches(batch: rl.Rollouts, adv_N: jnp.ndarray,
                 k: int) -> tuple[rl.Rollouts, jnp.ndarray]:
  """The batch as k microbatches stacked on a new leading axis: microbatch j holds prompts
  j, j + k, j + 2k, ... with their G rows, so each keeps its share of every device's rows."""
  b = batch.prompt_BxP.shape[0]
  if b % k:
    raise ValueError(f"config.microbatches={k} does not divide the batch of {b} prompts.")

  def split(x):  # [B·R, ...] (R rows a prompt) → [k, B/k·R, ...]
    r = x.shape[0] // b
    x = x.reshape(b // k, k, r, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, (b // k) * r, *x.shape[3:])

  return jax.tree.map(split, batch), split(adv_N)


def _accumulated_grads(z, params: dict, factors, batch: rl.Rollouts, k: int, *,
                       cfg: ModelConfig, settings: rl.RLSettings,
                       mesh: jax.sharding.Mesh | None, key=None) -> tuple[list, dict]:
  """Gradient accumulation over k microbatches, the activations (the [rows, C, vocab] logits
  above all) of one at a time. Advantages and sft's token count are those of the whole batch.
  SVF: W'(z) is built once, the loop accumulates dL/dW' of the targeted kernels and one VJP
  through materialise turns the sum into dL/dz. LoRA: the loop accumulates dL/d(A, B) of the
  unmerged forward (dropout acts there), a key per microbatch."""
  adv_N = rl.batch_advantages(batch, settings.baseline)
  chunks = microbatches(batch, adv_N, k)
  token_count = jnp.maximum(jnp.sum(batch.completion_mask_NxC), 1).astype(jnp.float32) / k
  if settings.adapter == "svf":
    def targeted(z_tree):
      return svf.targeted_kernels(adapters.materialise(params, factors, z_tree, settings), factors)

    wrt, pullback = jax.vjp(targeted, z)
    loss = lambda ks, chunk, _: rl.policy_loss(
        svf.with_kernels(params, ks), params, chunk[0], cfg=cfg, settings=settings,
        adv_N=chunk[1], token_count=token_count, mesh=mesh)
  else:
    wrt, pullback = z, lambda g: (g,)
    loss = lambda ab, chunk, j: rl.loss_fn(
        ab, params, factors, chunk[0], cfg=cfg, settings=settings, mesh=mesh,
        key=None if key is None else jax.random.fold_in(key, j), adv_N=chunk[1],
        token_count=token_count)

  def one(chunk, j):
    g, m = jax.grad(loss, has_aux=True)(wrt, chunk, j)
    # per-token means are weighted by their microbatch's token count
    return g, {n: v * m["tokens"] if n in rl.PER_TOKEN_METRICS else v for n, v in m.items()}

  def accumulate(total, chunk_j):  # in float32 whatever the kernels' dtype
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, one(*chunk_j)), None

  like = jax.eval_shape(one, jax.tree.map(lambda x: x[0], chunks), 0)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), like)
  (g_sum, metrics), _ = jax.lax.scan(accumulate, zeros, (chunks, jnp.arange(k)))
  (grads,) = pullback(jax.tree.map(lambda g, w: (g / k).astype(w.dtype), g_sum, wrt))
  count = {"tokens": 1.0, **{n: metrics["tokens"] for n in rl.PER_TOKEN_METRICS}}
  return grads, {n: v / count.get(n, k) for n, v in metrics.items()}


def _check_rollouts(batch: rl.Rollouts) -> None:
  """B prompts [B, P], N = B·G completions [N, C], their masks alike, one reward per row."""
  chex.assert_rank([batch.prompt_BxP, batch.completion_NxC], 2)
  chex.assert_equal_shape([batch.prompt_BxP, batch.prompt_mask_BxP])
  chex.assert_equal_shape([batch.completion_NxC, batch.completion_mask_NxC])
  chex.assert_shape(batch.reward_N, batch.completion_NxC.shape[:1])
  chex.assert_is_divisible(batch.completion_NxC.shape[0], batch.prompt_BxP.shape[0])
  chex.assert_type([batch.prompt_BxP, batch.prompt_mask_BxP, batch.completion_NxC,
                    batch.completion_mask_NxC, batch.reward_N],
                   [jnp.int32, bool, jnp.int32, bool, jnp.float32])


def train_step(state: TrainState, batch: rl.Rollouts, params: dict, factors, *,
               cfg: ModelConfig, settings: rl.RLSettings,
               optimizer: optax.GradientTransformation, num_microbatches: int = 1,
               mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, dict]:
  """One update: loss, gradient in the trainable tree (SVF z or LoRA factors; `factors`: the
  SVD factors, None for LoRA), optimizer. With num_microbatches > 1 the gradient is
  accumulated over that many slices of the batch (the same update up to float rounding, for
  a fraction of the activation memory). `mesh`: the one the program is built for, whose batch
  axes the activations stay split over. Jitted, with its shardings, by t2jax.programs."""
  _check_rollouts(batch)
  chex.assert_type(jax.tree.leaves(state.z), jnp.float32)
  # LoRA dropout: a pure function of the run's key and the step, so a resumed run draws the
  # masks the uninterrupted one drew
  key = jax.random.fold_in(state.rng, state.step) if adapters.uses_dropout(settings) else None
  if num_microbatches == 1:
    grads, metrics = jax.grad(rl.loss_fn, has_aux=True)(state.z, params, factors, batch,
                                                        cfg=cfg, settings=settings, mesh=mesh,
                                                        key=key)
  else:
    grads, metrics = _accumulated_grads(state.z, params, factors, batch, num_microbatches,
                                        cfg=cfg, settings=settings, mesh=mesh, key=key)
  chex.assert_trees_all_equal_shapes(grads, state.z)  # a gradient for z and nothing else
  updates, opt_state = optimizer.update(grads, state.opt_state, state.z)
  z = optax.apply_updates(state.z, updates)
  chex.assert_trees_all_equal_shapes_and_dtypes(z, state.z)  # the layout checkpoints hold
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, z=z, opt_state=opt_state), metrics


def reference_batch(prompts: Sequence[list[int]], references: Sequence[list[int]], *,
                    pad_id: int, prompt_len: int, max_new: int) -> rl.Rollouts:
  """The sft batch: each prompt (left-padded to prompt_len) with its reference completion
  (right-padded, or cut, to max_new tokens) as the one completion of its row; no rewards."""
  prompt, prompt_mask = sampling.left_pad(prompts, pad_id, prompt_len)
  completion = np.full((len(references), max_new), pad_id, np.int32)
  mask = np.zeros((len(references), max_new), bool)
  for i, ref in enumerate(references):
    ref = ref[:max_new]
    completion[i, :len(ref)], mask[i, :len(ref)] = ref, True
  return rl.Rollouts(prompt_BxP=prompt, prompt_mask_BxP=prompt_mask, completion_NxC=completion,
                     completion_mask_NxC=mask, reward_N=np.zeros(len(references), np.float32))


def rollout_seed(state_rng: np.ndarray, step: int) -> int:
  """An int seed for the sampler, a pure function of the run's key and the step."""
  key = jax.random.fold_in(jnp.asarray(state_rng, jnp.uint32), step)
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


@dataclasses.dataclass
class Collected:
  rollouts: rl.Rollouts  # host (numpy) arrays
  texts: list[str]  # N completions
  correct: np.ndarray  # [N] bool
  new_tokens: int


def collect(params_z: dict, prompts: Sequence[list[int]], records: Sequence[dict], *, task,
            tokenizer, cfg: ModelConfig, sampler: sampling.Sampler, samples: int, max_new: int,
            seed: int, pad_id: int, eos_ids: Sequence[int], mesh=None,
            prompt_len: int | None = None) -> Collected:
  """G = `samples` completions per prompt from the policy (params with z materialised), their
  rewards from the task, packed as rl.Rollouts. With a mesh, `prompts` are this process's
  share of the batch (see sampling.run) and so is everything returned."""
  rows = [p for p in prompts for _ in range(samples)]
  tokens_NxC, _ = sampling.run(params_z, rows, cfg=cfg, sampler=sampler, max_new=max_new,
                               seed=seed, pad_id=pad_id, mesh=mesh, prompt_len=prompt_len)
  mask = tokens_NxC >= 0
  texts = [tokenizer.decode(ids, skip_special_tokens=True)
           for ids in sampling.completion_ids(tokens_NxC, eos_ids)]
  recs = [records[i // samples] for i in range(len(texts))]
  rewards = [task.reward(rec, text) for rec, text in zip(recs, texts)]
  correct = [task.correct(rec, text) for rec, text in zip(recs, texts)]
  prompt, prompt_mask = sampling.left_pad(prompts, pad_id, prompt_len)
  batch = rl.Rollouts(prompt_BxP=prompt, prompt_mask_BxP=prompt_mask,
                      completion_NxC=np.where(mask, tokens_NxC, pad_id).astype(np.int32),
                      completion_mask_NxC=mask, reward_N=np.asarray(rewards, np.float32))
  return Collected(rollouts=batch, texts=texts, correct=np.asarray(correct),
                   new_tokens=int(mask.sum()))

