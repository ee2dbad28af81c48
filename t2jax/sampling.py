"""Jitted prefill + decode loop over a preallocated KV cache.

`prefill` runs the left-padded prompts once, fills the cache and picks the first token;
`decode` is one `lax.while_loop` that feeds the last token back until every row has emitted
EOS or reached its token limit. Prompt lengths are padded to buckets and the cache length is
rounded, so batches of similar shape reuse the compiled programs. Both are pure functions of
the model split outside (`nnx.split`: a static graphdef and the state of its variables, base
weights and any SVF z) and merged inside: weights are jit arguments, never constants folded
into the program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import flax.nnx as nnx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t2jax import sharding
from t2jax.models import llama
from t2jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Static (hashable) sampling settings; one compiled program per distinct value."""
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  eos_ids: tuple[int, ...] = ()

  def next_tokens(self, logits_BxV: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
    if self.temperature <= 0.0:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / self.temperature
    if 0 < self.top_k < logits.shape[-1]:  # HF's warper order: temperature, top-k, top-p
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if self.top_p < 1.0:
      logits = nucleus(logits, self.top_p)
    # Inverse-CDF draw: one uniform per row instead of categorical's Gumbel noise over the
    # whole vocabulary, which costs as much as a tenth of a decode step on CPU.
    probs_BxV = jax.nn.softmax(logits, axis=-1)
    return inverse_cdf(probs_BxV, jax.random.uniform(rng, probs_BxV.shape[:1]))


def nucleus(logits_BxV: jnp.ndarray, top_p) -> jnp.ndarray:
  """Top-p filter: logits outside each row's nucleus set to -inf. top_p: a float for every
  row (Sampler), or [B], one per row (the serving engine)."""
  top_p = top_p if isinstance(top_p, (int, float)) else top_p[:, None]
  sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # the smallest logit still inside the nucleus; the top token is always kept
  keep = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
  cutoff = jnp.min(keep, axis=-1, keepdims=True)
  return jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)


def inverse_cdf(probs_BxV: jnp.ndarray, u_B: jnp.ndarray, block: int = 256) -> jnp.ndarray:
  """The token whose cumulative-probability interval holds u·total, found in two levels: the
  block of `block` tokens first, then the token inside it. A scan over the whole vocabulary
  cost 1.4 ms of a 55 ms decode step at batch 8 on CPU; the two short scans almost nothing."""
  b, v = probs_BxV.shape
  nb = -(-v // block)
  probs_BxNxK = jnp.pad(probs_BxV, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
  mass_BxN = jnp.sum(probs_BxNxK, axis=-1)
  cdf_BxN = jnp.cumsum(mass_BxN, axis=-1)
  target_B = u_B * cdf_BxN[:, -1]
  # the last block with mass: rounding can push target past every block boundary
  last_b = nb - 1 - jnp.argmax((mass_BxN > 0)[:, ::-1], axis=-1)
  blk_B = jnp.minimum(jnp.sum(cdf_BxN <= target_B[:, None], axis=-1), last_b)
  probs_BxK = jnp.take_along_axis(probs_BxNxK, blk_B[:, None, None], axis=1)[:, 0]
  before_B = jnp.take_along_axis(cdf_BxN - mass_BxN, blk_B[:, None], axis=1)[:, 0]
  inner_BxK = before_B[:, None] + jnp.cumsum(probs_BxK, axis=-1)
  last_k = block - 1 - jnp.argmax((probs_BxK > 0)[:, ::-1], axis=-1)  # never a 0-prob token
  k_B = jnp.minimum(jnp.sum(inner_BxK <= target_B[:, None], axis=-1), last_k)
  return (blk_B * block + k_B).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
  """B rows, S cache slots, N = max new tokens."""
  step: jnp.ndarray  # [] int32: tokens generated so far (the loop counter)
  cache: llama.KVCache  # L layers of B rows, S slots
  key_valid: jnp.ndarray  # [B, S] bool: slot holds a real token
  last_token: jnp.ndarray  # [B] int32: the token sampled last, fed in next
  position: jnp.ndarray  # [B] int32: position of last_token in its row
  tokens: jnp.ndarray  # [B, N] int32 generated tokens (EOS included, then -1)
  logprobs: jnp.ndarray  # [B, N] float32 log p(token) under the unmodified model
  done: jnp.ndarray  # [B] bool: row emitted EOS or hit its limit
  limit: jnp.ndarray  # [B] int32: max new tokens of each row
  min_new: jnp.ndarray  # [] int32: EOS is masked before this many tokens
  rng: jax.Array


def bucket_length(n: int) -> int:
  """Prompt-length bucket: multiples of 16 up to 128, of 128 up to 1024, then of 512.
  Fine steps where prefill is cheap to pad wrong (short chat prompts), coarse ones where a
  recompile costs more than the padding."""
  n = max(n, 1)
  step = 16 if n <= 128 else 128 if n <= 1024 else 512
  return -(-n // step) * step


def cache_length(prompt_len: int, max_new: int) -> int:
  """Cache slots for prompts padded to `prompt_len` and `max_new` new tokens: the new tokens
  rounded up to 64, so nearby max_new values share compiled programs."""
  return prompt_len + -(-max_new // 64) * 64


def static_args(graphdef: nnx.GraphDef, sampler: Sampler, prompt_len: int, max_new: int,
                mesh=None) -> tuple[dict, dict]:
  """prefill's and decode's static arguments for prompts padded to `prompt_len`: `run` and
  the program factory (t2jax.programs) both take them from here, so the programs the fit
  check compiles are the ones generation runs."""
  return (dict(graphdef=graphdef, sampler=sampler, cache_len=cache_length(prompt_len, max_new),
               max_new=max_new, mesh=mesh),
          dict(graphdef=graphdef, sampler=sampler, prompt_len=prompt_len))


def state_shardings(state: DecodeState, mesh) -> DecodeState:
  """Where a DecodeState lives on `mesh`: the cache by the partition rules, every [B, ...]
  leaf over the batch axes, the step counters and the key replicated. prefill leaves its
  state so, which is the placement the program factory gives decode's abstract input."""
  rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  split = lambda x: rows if x.ndim and x.shape[0] % sharding.batch_devices(mesh) == 0 else rep
  return state.replace(
      cache=sharding.tree_shardings({"cache": state.cache}, mesh)["cache"],
      **{f: split(getattr(state, f)) for f in ("key_valid", "last_token", "position", "tokens",
                                               "logprobs", "done", "limit")},
      step=rep, min_new=rep, rng=rep)


def _pick(sampler: Sampler, state: DecodeState, logits_BxV: jnp.ndarray) -> DecodeState:
  """Chooses the next token of every row from `logits_BxV` and records it."""
  rng, sub = jax.random.split(state.rng)
  eos = jnp.asarray(sampler.eos_ids or (-1,), jnp.int32)  # -1 matches no token
  eos_mask_V = jnp.isin(jnp.arange(logits_BxV.shape[-1]), eos)
  masked = jnp.where((state.step < state.min_new) & eos_mask_V, -jnp.inf, logits_BxV)
  token_B = sampler.next_tokens(masked, sub)
  logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None],
                                  axis=-1)[:, 0]
  live_B = ~state.done
  is_eos_B = jnp.isin(token_B, eos)
  col = state.step
  tokens = state.tokens.at[:, col].set(jnp.where(live_B, token_B, -1))
  logprobs = state.logprobs.at[:, col].set(jnp.where(live_B, logprob_B, 0.0))
  done = state.done | is_eos_B | (col + 1 >= state.limit)
  return state.replace(step=state.step + 1, last_token=token_B, tokens=tokens,
                       logprobs=logprobs, done=done, rng=rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "cache_len", "max_new",
                                             "mesh"))
def prefill(state: nnx.State, tokens_BxT, mask_BxT, limit_B, min_new, rng, *,
            graphdef: nnx.GraphDef, sampler: Sampler, cache_len: int, max_new: int,
            mesh=None) -> DecodeState:
  """Runs the prompts of the model nnx.merge(graphdef, state) and picks the first token."""
  model = nnx.merge(graphdef, state)
  b, t = tokens_BxT.shape
  chex.assert_equal_shape([tokens_BxT, mask_BxT])
  chex.assert_shape(limit_B, (b,))
  cache = model.empty_cache(b, cache_len)
  if mesh is not None:  # placed by the partition rules; decode's loop keeps the placement
    cache = jax.lax.with_sharding_constraint(
        cache, sharding.tree_shardings({"cache": cache}, mesh)["cache"])
  key_valid = jnp.zeros((b, cache_len), bool).at[:, :t].set(mask_BxT.astype(bool))
  positions = llama.positions_from_mask(mask_BxT)
  hidden, cache = model(tokens_BxT, positions, cache, jnp.zeros((), jnp.int32), key_valid,
                        mesh=mesh)
  logits_BxV = model.logits(hidden[:, -1:])[:, 0]
  state = DecodeState(
      step=jnp.zeros((), jnp.int32), cache=cache, key_valid=key_valid,
      last_token=jnp.zeros((b,), jnp.int32), position=positions[:, -1],
      tokens=jnp.full((b, max_new), -1, jnp.int32), logprobs=jnp.zeros((b, max_new), jnp.float32),
      done=jnp.zeros((b,), bool), limit=limit_B.astype(jnp.int32),
      min_new=jnp.asarray(min_new, jnp.int32), rng=rng)
  state = _pick(sampler, state, logits_BxV)
  if mesh is not None:
    state = jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))
  return state


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "prompt_len"),
                   donate_argnames=("state",))
def decode(model_state: nnx.State, state: DecodeState, *, graphdef: nnx.GraphDef,
           sampler: Sampler, prompt_len: int) -> DecodeState:
  """The decode loop of the model nnx.merge(graphdef, model_state) from prefill's state."""
  model = nnx.merge(graphdef, model_state)
  max_new = state.tokens.shape[1]

  def cond(s: DecodeState):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s: DecodeState):
    slot = prompt_len + s.step - 1  # the cache slot of last_token
    position = s.position + 1
    key_valid = jax.lax.dynamic_update_slice(
        s.key_valid, jnp.ones((s.key_valid.shape[0], 1), bool), (0, slot))
    hidden, cache = model(s.last_token[:, None], position[:, None], s.cache, slot, key_valid)
    logits_BxV = model.logits(hidden)[:, 0]
    s = s.replace(cache=cache, key_valid=key_valid, position=position)
    return _pick(sampler, s, logits_BxV)

  return jax.lax.while_loop(cond, body, state)


def left_pad(prompts: Sequence[list[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [B, P] and mask [B, P], left-padded so every row ends at slot P - 1; P is
  `length`, or the bucket_length of the longest prompt, so batches of similar prompts share
  compiled programs."""
  longest = max(len(x) for x in prompts)
  p = bucket_length(longest) if length is None else length
  if longest > p:
    raise ValueError(f"a prompt has {longest} tokens; the padded length is {p}.")
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    mask[i, p - len(x):] = True
  return tokens, mask


def completion_ids(tokens_NxC: np.ndarray, eos_ids: Sequence[int]) -> list[list[int]]:
  """Each row's generated tokens up to and excluding EOS (the sampler writes -1 after a row
  ends)."""
  eos = set(eos_ids)
  out = []
  for row in tokens_NxC:
    n = 0
    while n < len(row) and row[n] >= 0 and int(row[n]) not in eos:
      n += 1
    out.append([int(t) for t in row[:n]])
  return out


def run(params, prompts: list[list[int]], *, cfg: ModelConfig, sampler: Sampler, max_new: int,
        min_new: int = 0, seed: int = 0, pad_id: int = 0, adapters=None, mesh=None,
        prompt_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generates for token-id prompts (validated by the caller). Returns host arrays
  tokens [B, N] (-1 after the end) and logprobs [B, N].

  params: a params dict (with `adapters` swapped in, see llama.build) or an nnx Llama module.

  With a `mesh`, the batch is split over its batch axes (params placed by the partition
  rules): `prompts` are this process's rows of the global batch and so are the results; every
  process must pass the same `prompt_len` (the padded prompt length) and `seed`. A row draws
  the same tokens however the batch is split over devices and processes."""
  b = len(prompts)
  tokens, mask = left_pad(prompts, pad_id, prompt_len)
  t = tokens.shape[1]
  limit = np.full((b,), max_new, np.int32)
  if mesh is not None:
    tokens, mask, limit = sharding.global_batch((tokens, mask, limit), mesh)
  if isinstance(params, llama.Llama):
    graphdef, model_state = nnx.split(params)
  else:
    graphdef, model_state = llama.split_params(cfg, params, adapters)
  pre, dec = static_args(graphdef, sampler, t, max_new, mesh)
  state = prefill(model_state, tokens, mask, limit, min_new, jax.random.key(seed), **pre)
  state = decode(model_state, state, **dec)
  if mesh is not None:
    return sharding.local_rows(state.tokens, mesh), sharding.local_rows(state.logprobs, mesh)
  return np.asarray(state.tokens), np.asarray(state.logprobs)
