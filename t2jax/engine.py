"""Continuous batching over a fixed set of decode slots, each with its own expert mixture.

    Engine(model, experts, strategy="prompt", slots=16)
      submit(Request) → Handle        any thread; the request waits for a free slot
      step()                          the engine's thread: admit what fits, one decode step
      run(requests) → [Handle]        offline: submit all, step until every one is done

A slot is one row of the KV cache [N, ..., S] and of every per-row input of the decode step.
A request's tokens sit at cache slots [0, length) of its row (no left padding): positions are
slot indices and each row writes its next token at its own slot (llama.forward with a [N]
write_index), so rows of any length share one decode step.

Two jitted programs, the host loop only moves requests in and tokens out:
  admit   for the A newly admitted requests, in one program: pass 1 (the classification
          prompt's label scores over the base model, or the classification expert) →
          α [A, K] → z_row = α·Z over the stacked experts → the pass-2 prefill with those z
          (factored) → the first token; the rows are written into their slots. No z crosses
          to the host; only α (for the response) comes back.
  decode  one token for every slot, each row with its own z (factored SVF).

A greedy request gives the same tokens and log-probs, bit for bit, alone or among any others
(tests/test_engine.py): every per-row computation has the same shapes whoever shares the
batch. That is why admission prefills one request per program by default (admit_rows; XLA's
CPU matmul rounds a row of [64, D]·W differently from the same row of [128, D]·W), and why
every query, in the prefill as in decode, attends over its row's whole S slots (max_len): a
sum over the live rows' longest length rounded up would be cheaper for short requests, but a
masked tail does not always round away (measured on a test model: the same keys in 128 and
256 slots gave equal sums, in 512 slots sums 6e-7 apart), so a row would depend on its
neighbours' lengths. max_len sets the attention cost of every decode step: choose it for the
requests served.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t2jax import adapt, sampling, svf
from t2jax import expert as expert_lib
from t2jax.expert import Expert
from t2jax.models import llama
from t2jax.models.config import ModelConfig
from t2jax.tasks.cls import OTHER, question_text
from t2jax.tokenizer import encode_chats

BASE = "base"  # model name: the base model, no expert
AUTO = "auto"  # model name: two-pass adaptation with the engine's strategy


class RequestError(ValueError):
  """A request the engine cannot run; `param` names the offending field."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


# ---------------------------------------------------------------------------------------------
# Device state and programs.


@flax.struct.dataclass
class Slots:
  """N slots, S cache slots per row. Rows not live keep their last values (finished rows
  compute on in the shared step, their outputs ignored, until a new request overwrites them)."""
  cache: llama.KVCache  # N rows, S slots
  z: list | None  # z_tree layout, [N, r] per matrix (None: no experts)
  on: jnp.ndarray  # [N] bool: the row runs its z (False: the base model)
  last_token: jnp.ndarray  # [N] int32: sampled last, fed next
  position: jnp.ndarray  # [N] int32: slot (= position) where last_token is fed
  generated: jnp.ndarray  # [N] int32: tokens sampled so far
  limit: jnp.ndarray  # [N] int32: max new tokens
  live: jnp.ndarray  # [N] bool
  temperature: jnp.ndarray  # [N] float32 (0 = greedy)
  top_p: jnp.ndarray  # [N] float32
  key: jnp.ndarray  # [N, W] uint32: each row's rng key data (its request's seed)


@flax.struct.dataclass
class Admission:
  """A newly admitted requests (a bucket; padding rows have slot = N and are dropped)."""
  slot: jnp.ndarray  # [A] int32
  tokens: jnp.ndarray  # [A, T] int32, right-padded
  length: jnp.ndarray  # [A] int32
  limit: jnp.ndarray  # [A] int32
  temperature: jnp.ndarray  # [A] float32
  top_p: jnp.ndarray  # [A] float32
  key: jnp.ndarray  # [A, W] uint32
  alpha: jnp.ndarray  # [A, K] float32: the mixture of rows not dispatched by pass 1
  on: jnp.ndarray  # [A] bool
  auto: jnp.ndarray  # [A] bool: pass 1 chooses α
  rest: jnp.ndarray  # [A, R] int32: the classification prompt after the shared prefix
  rest_mask: jnp.ndarray  # [A, R] bool


@flax.struct.dataclass
class Dispatcher:
  """Pass 1's constant inputs (adapt.label_probs, with its dispatch, as one device function)."""
  params: dict  # the base params, or the classification expert's materialised params
  prefix: llama.KVCache  # batch 1: the classification prompt's shared prefix
  labels: jnp.ndarray  # [L, C] label tokens + "}"
  label_mask: jnp.ndarray  # [L, C]
  log_prior: jnp.ndarray  # [L] calibration (adapt.calibrate): log p(label | content-free)
  expert_of_label: jnp.ndarray  # [L] int32: index into the stack, -1 for "other"
  threshold: jnp.ndarray  # [] float32: below it, the p-weighted mixture of all experts


@dataclasses.dataclass(frozen=True)
class Static:
  """The hashable settings of both programs."""
  cfg: ModelConfig
  eos_ids: tuple[int, ...]
  parametrisation: str = "scale"
  max_mult: float = 2.0


def _adapters(static: Static, factors, z, on):
  if z is None:
    return None
  return svf.RowAdapters(factors=factors, z_rows=z, rows_on=on,
                         parametrisation=static.parametrisation, max_mult=static.max_mult)


def _pick(logits_NxV, temperature_N, top_p_N, key_Nx2, step_N):
  """Each row's next token (greedy where temperature is 0; otherwise temperature, nucleus and
  sampling.Sampler's inverse-CDF draw from the row's key folded with its step) and its
  log-probability under the unmodified distribution."""
  greedy_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  sampled_N = temperature_N > 0

  def draw(_):
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(
        key_Nx2, step_N)
    u_N = jax.vmap(jax.random.uniform)(keys)
    logits = logits_NxV / jnp.where(sampled_N, temperature_N, 1.0)[:, None]
    logits = jax.lax.cond(jnp.any(sampled_N & (top_p_N < 1)),
                          lambda x: sampling.nucleus(x, top_p_N), lambda x: x, logits)
    return sampling.inverse_cdf(jax.nn.softmax(logits, axis=-1), u_N)

  # the sampling math runs only when some row samples: greedy serving pays for argmax alone
  drawn_N = jax.lax.cond(jnp.any(sampled_N), draw, lambda _: greedy_N, None)
  token_N = jnp.where(sampled_N, drawn_N, greedy_N)
  logprob_N = (jnp.take_along_axis(logits_NxV, token_N[:, None], axis=-1)[:, 0]
               - jax.nn.logsumexp(logits_NxV, axis=-1))
  return token_N, logprob_N


def _dispatch(d: Dispatcher, rest_AxR, rest_mask_AxR, k: int, *, cfg: ModelConfig):
  """adapt.label_probs (calibrated) + adapt.dispatch on device: the argmax label's expert
  (one-hot α), "other" → the base model, max p below the threshold → every expert weighted by
  its label's p. Returns α [A, K], on [A] and p(label) [A, L]."""
  logp_AxL = adapt._label_logprobs(d.params, d.prefix, rest_AxR, rest_mask_AxR, d.labels,  # pylint: disable=protected-access
                                   d.label_mask, cfg=cfg)
  probs_AxL = jax.nn.softmax(logp_AxL - d.log_prior, axis=-1)  # adapt.calibrate, in log space
  expert_A = d.expert_of_label[jnp.argmax(probs_AxL, axis=-1)]
  one_hot_AxK = jax.nn.one_hot(expert_A, k, dtype=jnp.float32)  # -1 ("other") → all zeros
  named_L = d.expert_of_label >= 0
  p_AxK = jnp.zeros((probs_AxL.shape[0], k), jnp.float32).at[
      :, jnp.maximum(d.expert_of_label, 0)].add(jnp.where(named_L, probs_AxL, 0.0))
  total_A = jnp.sum(p_AxK, axis=-1, keepdims=True)
  mixed_AxK = jnp.where(total_A > 0, p_AxK / jnp.where(total_A > 0, total_A, 1.0), 1.0 / k)
  confident_A = jnp.max(probs_AxL, axis=-1) >= d.threshold
  alpha_AxK = jnp.where(confident_A[:, None], one_hot_AxK, mixed_AxK)
  on_A = jnp.where(confident_A, expert_A >= 0, True)
  return alpha_AxK, on_A, probs_AxL


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("slots",))
def admit(params, factors, z_stack, dispatcher: Dispatcher | None, slots: Slots,
          new: Admission, *, static: Static):
  """Pass 1 (when `dispatcher` is given) + α → z + prefill + first token for the admitted
  rows, written into their slots. Returns (slots, token [A], logprob [A], done [A],
  alpha [A, K], on [A], p(label) [A, L] or None)."""
  cfg = static.cfg
  alpha_AxK, on_A, probs = new.alpha, new.on, None
  if dispatcher is not None:
    auto_alpha, auto_on, probs = _dispatch(dispatcher, new.rest, new.rest_mask,
                                           alpha_AxK.shape[1], cfg=cfg)
    alpha_AxK = jnp.where(new.auto[:, None], auto_alpha, alpha_AxK)
    on_A = jnp.where(new.auto, auto_on, on_A)
  z_new = None
  if z_stack is not None:  # z_row = α·Z, per matrix: [A, K] · [K, r]
    z_new = jax.tree.map(lambda z_KxR: alpha_AxK @ z_KxR, z_stack)
  a, t = new.tokens.shape
  # whole rows of S slots: every query's attention sums over the same S keys, however long
  # the bucket T of the prompts admitted with it (a shorter sum rounds differently)
  cache = llama.KVCache.zeros(cfg, a, slots.cache.slots, params["embed_tokens"].dtype,
                              stacked=not isinstance(slots.cache.k, list))
  positions_AxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (a, t))
  hidden, cache = llama.forward(params, new.tokens, positions_AxT, cache, jnp.zeros((), jnp.int32),
                                jnp.ones((a, slots.cache.slots), bool), cfg=cfg,
                                adapters=_adapters(static, factors, z_new, on_A))
  last_AxD = jnp.take_along_axis(hidden, (new.length - 1)[:, None, None], axis=1)
  logits_AxV = llama.lm_head(params, last_AxD)[:, 0]
  token_A, logprob_A = _pick(logits_AxV, new.temperature, new.top_p, new.key,
                             jnp.zeros((a,), jnp.int32))
  done_A = jnp.isin(token_A, jnp.asarray(static.eos_ids or (-1,))) | (new.limit <= 1)
  set_rows = lambda full, rows: full.at[new.slot].set(rows, mode="drop")
  slots = slots.replace(
      cache=_insert(slots.cache, cache, new.slot),
      z=None if z_new is None else jax.tree.map(set_rows, slots.z, z_new),
      on=set_rows(slots.on, on_A), last_token=set_rows(slots.last_token, token_A),
      position=set_rows(slots.position, new.length),
      generated=set_rows(slots.generated, jnp.ones_like(new.length)),
      limit=set_rows(slots.limit, new.limit), live=set_rows(slots.live, ~done_A),
      temperature=set_rows(slots.temperature, new.temperature),
      top_p=set_rows(slots.top_p, new.top_p), key=set_rows(slots.key, new.key))
  return slots, token_A, logprob_A, done_A, alpha_AxK, on_A, probs


def _insert(full: llama.KVCache, rows: llama.KVCache, slot_A) -> llama.KVCache:
  """rows written as rows slot_A of `full` (out-of-range ids dropped)."""
  if isinstance(full.k, list):
    put = lambda f, r: f.at[slot_A].set(r, mode="drop")
  else:  # stacked [L, N, ...]
    put = lambda f, r: f.at[:, slot_A].set(r, mode="drop")
  return jax.tree.map(put, full, rows)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("slots",))
def decode(params, factors, slots: Slots, *, static: Static):
  """One token for every slot, each attending over its whole row of S cache slots. Returns
  (slots, token [N], logprob [N], done [N])."""
  n, s = slots.position.shape[0], slots.cache.slots
  write_N = jnp.minimum(slots.position, s - 1)  # finished rows may have run to the end
  hidden, cache = llama.forward(params, slots.last_token[:, None], write_N[:, None], slots.cache,
                                write_N, jnp.ones((n, s), bool), cfg=static.cfg,
                                adapters=_adapters(static, factors, slots.z, slots.on))
  logits_NxV = llama.lm_head(params, hidden)[:, 0]
  token_N, logprob_N = _pick(logits_NxV, slots.temperature, slots.top_p, slots.key,
                             slots.generated)
  eos = jnp.asarray(static.eos_ids or (-1,))
  done_N = jnp.isin(token_N, eos) | (slots.generated + 1 >= slots.limit)
  live = slots.live
  slots = slots.replace(
      cache=cache,
      last_token=jnp.where(live, token_N, slots.last_token),
      position=jnp.where(live, slots.position + 1, slots.position),
      generated=jnp.where(live, slots.generated + 1, slots.generated),
      live=live & ~done_N)
  return slots, token_N, logprob_N, done_N


# ---------------------------------------------------------------------------------------------
# Host side: requests in, tokens out.


@functools.lru_cache(maxsize=4096)
def _key_data(seed: int) -> np.ndarray:
  """The raw data of jax.random.key(seed) ([2] uint32 for threefry)."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


def _bucket(n: int, lo: int, hi: int, factor: int = 2) -> int:
  """The first of lo, lo·factor, lo·factor², ... that is >= n, capped at hi."""
  b = lo
  while b < n:
    b *= factor
  return min(b, hi)


def admission_shape(batch: int, prompt_len: int, rest_len: int, rows: int,
                    max_len: int) -> tuple[int, int, int]:
  """(A, T, R) of the admission program for `batch` requests whose longest prompt has
  prompt_len tokens and longest pass-1 rest rest_len (at most `rows` per program): the one
  place that buckets them. Each distinct triple is a compile of the whole prefill: rows in
  powers of 4 (a lone request pays for 1 row, a burst for at most 4x its rows), prompts in
  the sampler's buckets (sampling.bucket_length: 16s up to 128, where a prefill is cheap to
  pad wrong), pass-1 rests (a question: cheap) in powers of 2."""
  return (_bucket(batch, 1, rows, 4), min(sampling.bucket_length(prompt_len), max_len),
          _bucket(rest_len, 16, 1 << 30))


@dataclasses.dataclass
class Request:
  prompt: list[int]  # token ids, chat template applied by the caller
  max_new: int
  model: str = AUTO  # AUTO, BASE or an expert label
  weights: dict[str, float] | None = None  # explicit α over expert labels (model AUTO)
  question: str | None = None  # what pass 1 classifies (AUTO with prompt / cls_expert)
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


@dataclasses.dataclass(eq=False)
class Handle:
  """A submitted request's progress. `on_event(handle, new_tokens, finished)` runs on the
  engine's thread after every change; keep it short (hand the data to another thread)."""
  request: Request
  on_event: Callable[["Handle", list[int], bool], None] | None = None
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  mixture: dict[str, float] | None = None  # the α used; {} = the base model
  finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled"
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  first_token: float | None = None
  finished: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  cancel_requested: bool = False

  def cancel(self) -> None:
    """Frees the request's slot at the engine's next step (a disconnect, a stop string)."""
    self.cancel_requested = True


class Unavailable(RuntimeError):
  """The engine takes no request now."""


def _notify(h: Handle, tokens: list[int], finished: bool) -> None:
  """h.on_event; a failing callback (a listener gone with its event loop) cannot stop the
  engine."""
  if h.on_event is not None:
    try:
      h.on_event(h, tokens, finished)
    except Exception:  # pylint: disable=broad-except
      h.on_event = None


class QueueFull(Unavailable):
  """max_queue requests are waiting (HTTP 429)."""


class ShuttingDown(Unavailable):
  """close or stop_admitting was called (HTTP 503)."""


@dataclasses.dataclass
class Stats:
  requests: int = 0
  finished: dict[str, int] = dataclasses.field(default_factory=dict)  # by finish_reason
  prompt_tokens: int = 0
  generated_tokens: int = 0
  admissions: int = 0
  admission_s: float = 0.0  # pass 1 + pass-2 prefill (one program)
  decode_steps: int = 0
  decode_s: float = 0.0


class Engine:
  """Slots over one loaded model and its experts (see the module docstring).

  experts: label → Expert (one SVF space), or None for the base model only. strategy: how
  model AUTO picks a mixture: "prompt" (the base model classifies the prompt), "cls_expert"
  (the classification expert does), "few_shot" (the fixed mixture `alpha`, from
  adapt.few_shot_cem; per-matrix α with `matrices`). threshold, calibrated, prompt_style: as
  adapt.two_pass_generate. max_len: cache slots per row (prompt + new tokens), capped by the
  model's context. max_queue: waiting requests beyond it are refused (QueueFull).
  admit_rows: requests prefilled together in one admission program. 1 (the default) keeps a
  request's arithmetic its own: XLA's CPU matmul rounds a row differently with a different
  number of rows beside it ([64, D]·W vs [128, D]·W, measured), so with more rows a prompt's
  cache, and at a near-tie a greedy token, would depend on what was admitted with it. On the
  CPU a prefill is compute-bound, so one row per program costs little; on an accelerator,
  raise it."""

  def __init__(self, model, experts: dict[str, Expert] | None = None, *,
               strategy: str = "prompt", cls_expert: Expert | None = None, alpha=None,
               matrices: Sequence[str] = (), threshold: float = 0.0, calibrated: bool = True,
               prompt_style: str = "ours", slots: int = 16, max_len: int = 1024,
               max_queue: int = 256, admit_rows: int = 1):
    if strategy not in adapt.STRATEGIES:
      raise ValueError(f"strategy {strategy!r} is unknown; use one of {adapt.STRATEGIES}.")
    if slots < 1 or max_len < 2:
      raise ValueError(f"need slots >= 1 and max_len >= 2; got {slots}, {max_len}.")
    self.model, self.cfg = model, model.config
    self.experts = dict(experts or {})
    if OTHER in self.experts or BASE in self.experts or AUTO in self.experts:
      raise ValueError(f"expert labels {OTHER!r}, {BASE!r} and {AUTO!r} are reserved.")
    self.strategy = strategy
    self.n, self.s = slots, min(max_len, self.cfg.max_length)
    if not 1 <= admit_rows <= slots:
      raise ValueError(f"admit_rows must be in [1, slots={slots}]; got {admit_rows}.")
    self.admit_rows = admit_rows
    self.max_queue = max_queue
    self.names = list(self.experts)
    stack = [self.experts[k] for k in self.names]
    self._few_shot_weights = None
    if self.experts and strategy == "few_shot":
      if alpha is None:
        raise ValueError("strategy 'few_shot' needs alpha (from adapt.few_shot_cem).")
      stack.append(adapt.mix(stack, alpha, matrices))  # one more row of the stack
      a = adapt.simplex(alpha, axis=0)
      self._few_shot_weights = {k: (float(a[i]) if a.ndim == 1 else a[i].tolist())
                                for i, k in enumerate(self.names)}
    self.k = max(len(stack), 1)  # α's width: the stacked experts (1 without experts)
    self.factors = self.z_stack = None
    self.static = Static(self.cfg, tuple(model.eos_ids))
    z_init = None
    if stack:
      first = stack[0]
      _, adapters, _ = expert_lib.bind(model, stack + [None], len(stack) + 1, "factored")
      self.factors = adapters.factors
      # [K, r] per matrix: the experts' z side by side (bind's [B, r] rows, last one a spare)
      self.z_stack = jax.tree.map(lambda z: z[:len(stack)], adapters.z_rows)
      z_init = jax.tree.map(lambda z: jax.ShapeDtypeStruct((self.n, z.shape[1]), z.dtype),
                            self.z_stack)
      self.static = Static(self.cfg, tuple(model.eos_ids), first.parametrisation,
                           first.max_mult)
    self.dispatcher, self._threshold = None, threshold
    self._cls_expert = cls_expert if strategy == "cls_expert" else None
    self._prompt_style = prompt_style
    if self.experts and strategy in ("prompt", "cls_expert"):
      self.dispatcher, self._prefix = self._build_dispatcher(
          cls_expert, threshold, calibrated, prompt_style)
    self._z_shapes = z_init
    self.slots = self._empty_slots()
    self._busy: list[Handle | None] = [None] * self.n
    self._position = np.zeros(self.n, np.int64)  # host copy: where each live row feeds next
    self._waiting: queue.SimpleQueue[Handle] = queue.SimpleQueue()
    self._backlog: list[Handle] = []
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._closed = False
    self._thread: threading.Thread | None = None
    self.stats = Stats()
    self.last_error: Exception | None = None

  def _empty_slots(self) -> Slots:
    """Fresh buffers (the programs donate the slots they are given)."""
    z = (None if self._z_shapes is None else
         jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._z_shapes))
    return Slots(
        cache=llama.KVCache.zeros(self.cfg, self.n, self.s,
                                  self.model.params["embed_tokens"].dtype),
        z=z, on=jnp.zeros((self.n,), bool), last_token=jnp.zeros((self.n,), jnp.int32),
        position=jnp.zeros((self.n,), jnp.int32), generated=jnp.zeros((self.n,), jnp.int32),
        limit=jnp.ones((self.n,), jnp.int32), live=jnp.zeros((self.n,), bool),
        temperature=jnp.zeros((self.n,), jnp.float32), top_p=jnp.ones((self.n,), jnp.float32),
        key=jnp.zeros((self.n, *_key_data(0).shape), jnp.uint32))

  # -- setup ----------------------------------------------------------------------------------

  @property
  def labels(self) -> list[str]:
    """Pass 1's labels: the experts' plus "other"."""
    return self.names + [OTHER]

  def _build_dispatcher(self, cls_expert, threshold, calibrated, prompt_style):
    model, labels = self.model, self.labels
    if self.strategy == "cls_expert" and cls_expert is None:
      raise ValueError("strategy 'cls_expert' needs cls_expert (the classification expert).")
    expert = cls_expert if self.strategy == "cls_expert" else None
    params, _, _ = expert_lib.bind(model, expert, 1, "auto" if expert is None else
                                   "materialised")
    probe_a, probe_b = adapt.classification_prompts(model, ["A", "7"], labels, prompt_style)
    k = next(i for i, (x, y) in enumerate(zip(probe_a, probe_b)) if x != y)
    prefix = list(probe_a[:k])
    log_prior = np.zeros(len(labels))
    if calibrated:  # the content-free rows' p(label), as adapt.label_probs(calibrated=True)
      free = adapt.label_probs(model, list(adapt.CONTENT_FREE), labels, expert=expert,
                               prompt_style=prompt_style)
      log_prior = np.log(free).mean(axis=0)
    labels_LxC, mask_LxC = adapt.label_tokens(model, labels)
    d = Dispatcher(
        params=params,
        prefix=adapt._prefix_cache(params, np.asarray(prefix, np.int32), cfg=self.cfg),  # pylint: disable=protected-access
        labels=jnp.asarray(labels_LxC), label_mask=jnp.asarray(mask_LxC),
        log_prior=jnp.asarray(log_prior, jnp.float32),
        expert_of_label=jnp.asarray([self.names.index(x) if x in self.names else -1
                                     for x in labels], jnp.int32),
        threshold=jnp.asarray(threshold, jnp.float32))
    return d, prefix

  @property
  def models(self) -> list[str]:
    """The names a request's `model` may take."""
    return [AUTO, BASE] + self.names

  # -- requests -------------------------------------------------------------------------------

  def chat_request(self, messages: list[dict[str, str]], max_new: int, **kw) -> Request:
    """A Request for chat turns: the chat template's tokens, as t2jax.generate and
    adapt.two_pass_generate encode them; pass 1 classifies the last user turn."""
    (prompt,) = encode_chats(self.model.tokenizer, [messages])
    return Request(prompt=prompt, max_new=max_new, question=question_text(messages), **kw)

  def check(self, r: Request) -> None:
    """Raises RequestError (naming the field) for a request the engine cannot run."""
    if r.model not in self.models:
      raise RequestError(f"model {r.model!r} is unknown; use one of {self.models}.", "model")
    if not r.prompt:
      raise RequestError("the prompt is empty.", "prompt")
    if min(r.prompt) < 0 or max(r.prompt) >= self.cfg.vocab_size:
      raise RequestError(f"prompt token ids must lie in [0, {self.cfg.vocab_size}).", "prompt")
    if len(r.prompt) >= self.s:
      raise RequestError(f"the prompt has {len(r.prompt)} tokens; this server's context is "
                         f"{self.s} tokens (prompt + max_tokens).", "prompt")
    if not isinstance(r.max_new, int) or r.max_new < 1:
      raise RequestError(f"max_tokens must be an integer >= 1; got {r.max_new!r}.", "max_tokens")
    if len(r.prompt) + r.max_new > self.s:
      raise RequestError(f"the prompt's {len(r.prompt)} tokens + max_tokens={r.max_new} exceed "
                         f"this server's context of {self.s} tokens.", "max_tokens")
    if not 0 <= r.temperature <= 100:
      raise RequestError(f"temperature must be in [0, 100]; got {r.temperature}.", "temperature")
    if not 0 < r.top_p <= 1:
      raise RequestError(f"top_p must be in (0, 1]; got {r.top_p}.", "top_p")
    if not isinstance(r.seed, int) or not 0 <= r.seed < 2 ** 32:
      raise RequestError(f"seed must be an integer in [0, 2^32); got {r.seed!r}.", "seed")
    if r.weights is not None:
      if not self.names:
        raise RequestError("expert_weights needs experts; this server has none.",
                           "expert_weights")
      unknown = sorted(set(r.weights) - set(self.names))
      if unknown or r.model != AUTO:
        raise RequestError(f"expert_weights must map expert labels {self.names} to weights "
                           f"(with model {AUTO!r}); got labels {unknown or sorted(r.weights)} "
                           f"for model {r.model!r}.", "expert_weights")
      if (any(not np.isfinite(w) or w < 0 for w in r.weights.values())
          or sum(r.weights.values()) <= 0):
        raise RequestError("expert_weights must be finite, >= 0 and not all 0 (they are "
                           "divided by their sum).", "expert_weights")

  def submit(self, request: Request, on_event=None) -> Handle:
    """Queues a request (checked first: RequestError; QueueFull when max_queue wait)."""
    self.check(request)
    with self._lock:
      if self._closed:
        raise ShuttingDown("the server is shutting down.")
      if self.queue_depth >= self.max_queue:
        raise QueueFull(f"{self.queue_depth} requests are waiting; try again later.")
      handle = Handle(request, on_event)
      self._waiting.put(handle)
      self.stats.requests += 1
    self._wake.set()
    return handle

  @property
  def queue_depth(self) -> int:
    return self._waiting.qsize() + len(self._backlog)

  @property
  def busy_slots(self) -> int:
    return sum(h is not None for h in self._busy)

  def idle(self) -> bool:
    return self.busy_slots == 0 and self.queue_depth == 0

  # -- the loop -------------------------------------------------------------------------------

  def step(self) -> bool:
    """Frees cancelled slots, admits waiting requests into free slots, runs one decode step.
    Returns whether there was any work."""
    for i, h in enumerate(self._busy):
      if h is not None and h.cancel_requested:
        self._finish(i, "cancelled")
    admitted = self._admit()
    decoded = self._decode()
    return admitted or decoded

  def run(self, requests: Sequence[Request]) -> list[Handle]:
    """Offline: every request submitted, stepped until all are done (the caller's thread)."""
    for r in requests:
      self.check(r)
    pending, handles = list(requests)[::-1], []
    while pending or not all(h.done.is_set() for h in handles):
      while pending and self.queue_depth < self.max_queue:
        handles.append(self.submit(pending.pop()))
      self.step()
    return handles

  def warmup(self, requests: Sequence[Request]) -> int:
    """Compiles, before serving, every admission program `requests` can need however they
    are grouped (each row bucket at each of their prompt and rest length buckets) and the
    decode step. Returns how many admission programs; the slots stay as they were. Call it
    before `start`, while no request runs."""
    if not self.idle():
      raise RuntimeError("warmup runs the decode step: call it while no request runs.")
    singles = set()  # (T, R, pass 1) of each request alone
    for r in requests:
      self.check(r)
      _, _, auto, rest = self._mixture(r)
      _, t, rl = admission_shape(1, len(r.prompt), len(rest or [0]), self.admit_rows, self.s)
      singles.add((t, rl if auto else 16, auto))
    shapes = {(1, *x) for x in singles}
    if self.admit_rows > 1:  # grouped: any row bucket with any mix of their lengths
      rows = {admission_shape(b, 1, 1, self.admit_rows, self.s)[0]
              for b in range(1, self.admit_rows + 1)}
      ts, rls, kinds = ({x[i] for x in singles} for i in range(3))
      shapes = {(a, t, rl, p) for a in rows for t in ts for rl in rls for p in kinds}
    width = _key_data(0).shape
    for a, t, rl, pass1 in sorted(shapes):
      new = Admission(  # every row dropped (slot N): compiles, changes nothing
          slot=np.full(a, self.n, np.int32), tokens=np.zeros((a, t), np.int32),
          length=np.ones(a, np.int32), limit=np.ones(a, np.int32),
          temperature=np.zeros(a, np.float32), top_p=np.ones(a, np.float32),
          key=np.zeros((a, *width), np.uint32), alpha=np.zeros((a, self.k), np.float32),
          on=np.zeros(a, bool), auto=np.full(a, pass1),
          rest=np.zeros((a, rl), np.int32), rest_mask=np.ones((a, rl), bool))
      self.slots, *out = admit(self.model.params, self.factors, self.z_stack,
                               self.dispatcher if pass1 else None, self.slots, new,
                               static=self.static)
      jax.block_until_ready(out)
    count = len(shapes)
    self.slots, *out = decode(self.model.params, self.factors, self.slots, static=self.static)
    jax.block_until_ready(out)
    return count

  def two_pass(self, prompts, *, max_new_tokens: int, temperature: float = 0.0,
               seed: int = 0):
    """adapt.two_pass_generate on the engine: user texts or chat-turn lists, model AUTO with
    the engine's strategy, every row seeded with `seed`. Returns (Generation, each row's
    mixture, {"wall_s"}): pass 1 runs inside admission, so it has no time of its own."""
    from t2jax.generation import Generation  # pylint: disable=import-outside-toplevel

    chats = adapt._as_chats(prompts)  # pylint: disable=protected-access
    t0 = time.perf_counter()
    handles = self.run([self.chat_request(c, max_new_tokens, temperature=float(temperature),
                                          seed=int(seed)) for c in chats])
    tok = self.model.tokenizer
    gen = Generation(texts=[tok.decode(h.tokens, skip_special_tokens=True) for h in handles],
                     token_ids=[list(h.tokens) for h in handles],
                     logprobs=[list(h.logprobs) for h in handles])
    return gen, [dict(h.mixture) for h in handles], {"wall_s": time.perf_counter() - t0}

  def _take(self, n: int) -> list[Handle]:
    """Up to n waiting requests, oldest first; cancelled ones finish here."""
    with self._lock:
      while True:
        try:
          self._backlog.append(self._waiting.get_nowait())
        except queue.Empty:
          break
      out, keep, gone = [], [], []
      for h in self._backlog:
        if h.cancel_requested:
          gone.append(h)
        elif len(out) < n:
          out.append(h)
        else:
          keep.append(h)
      self._backlog = keep
    for h in gone:
      self._finish_unadmitted(h)
    return out

  def _rows(self, handles: list[Handle], free: list[int]):
    """The Admission arrays of `handles` (placed in slots `free`), bucketed."""
    mixtures = [self._mixture(h.request) for h in handles]
    rests = [m[3] or [self.model.pad_id] for m in mixtures]
    a, t, rest_len = admission_shape(len(handles), max(len(h.request.prompt) for h in handles),
                                     max(len(x) for x in rests), self.admit_rows, self.s)
    rests += [[self.model.pad_id]] * (a - len(handles))
    slot = np.full(a, self.n, np.int32)
    tokens = np.full((a, t), self.model.pad_id, np.int32)
    length, limit = np.ones(a, np.int32), np.ones(a, np.int32)
    temperature, top_p = np.zeros(a, np.float32), np.ones(a, np.float32)
    key = np.zeros((a, *_key_data(0).shape), np.uint32)
    alpha, on, auto = np.zeros((a, self.k), np.float32), np.zeros(a, bool), np.zeros(a, bool)
    for i, (h, j, m) in enumerate(zip(handles, free, mixtures)):
      r = h.request
      slot[i], length[i], limit[i] = j, len(r.prompt), r.max_new
      tokens[i, :len(r.prompt)] = r.prompt
      temperature[i], top_p[i] = r.temperature, r.top_p
      key[i] = _key_data(r.seed)
      alpha[i], on[i], auto[i], _ = m
    rest, rest_mask = sampling.left_pad(rests, self.model.pad_id, rest_len)
    new = Admission(slot=slot, tokens=tokens, length=length, limit=limit,
                    temperature=temperature, top_p=top_p, key=key, alpha=alpha, on=on,
                    auto=auto, rest=rest, rest_mask=rest_mask)
    return new, bool(auto.any())

  def _mixture(self, r: Request):
    """(α [K], on, pass 1 decides, the pass-1 rest tokens or None) of one request."""
    alpha = np.zeros(self.k, np.float32)
    if r.model == BASE or not self.names:
      return alpha, False, False, None
    if r.model != AUTO:
      alpha[self.names.index(r.model)] = 1.0
      return alpha, True, False, None
    if r.weights is not None:  # normalised, not adapt.simplex: it would clamp 3 to 1 first
      w = np.array([r.weights.get(n, 0.0) for n in self.names], np.float64)
      alpha[:len(w)] = w / w.sum()
      return alpha, True, False, None
    if self.strategy == "few_shot":
      alpha[-1] = 1.0  # the few-shot mixture: the stack's last row
      return alpha, True, False, None
    question = r.question if r.question is not None else ""
    (prompt,) = adapt.classification_prompts(self.model, [question], self.labels,
                                             self._prompt_style)
    k_prefix = len(self._prefix)
    if prompt[:k_prefix] != self._prefix or len(prompt) <= k_prefix:
      # the question's first token merged into the shared prefix: pass 1 on the host
      probs = adapt.label_probs(self.model, [question], self.labels, expert=self._cls_expert,
                                calibrated=True, prompt_style=self._prompt_style)
      _, weights = adapt.dispatch(probs, self.labels, self.experts, threshold=self._threshold)
      for n, w in weights[0].items():
        alpha[self.names.index(n)] = w
      return alpha, bool(weights[0]), False, None
    return alpha, False, True, prompt[k_prefix:]

  def _admit(self) -> bool:
    """Admits waiting requests into free slots, admit_rows per program."""
    admitted = False
    while self._admit_some():
      admitted = True
    return admitted

  def _admit_some(self) -> bool:
    free = [i for i, h in enumerate(self._busy) if h is None][:self.admit_rows]
    handles = self._take(len(free))
    if not handles:
      return False
    t0 = time.perf_counter()
    try:
      new, pass1 = self._rows(handles, free)
      self.slots, token_A, logprob_A, done_A, alpha_AxK, on_A, _ = admit(
          self.model.params, self.factors, self.z_stack, self.dispatcher if pass1 else None,
          self.slots, new, static=self.static)
      token_A, logprob_A, done_A, alpha_AxK, on_A = (np.asarray(x) for x in (
          token_A, logprob_A, done_A, alpha_AxK, on_A))
    except Exception:
      for h in handles:  # taken from the queue, in no slot yet: finished here
        self._finish_unadmitted(h, "error")
      raise
    now = time.perf_counter()
    self.stats.admissions += 1
    self.stats.admission_s += now - t0
    for i, (h, j) in enumerate(zip(handles, free)):
      h.mixture = self._mixture_dict(h.request, alpha_AxK[i], bool(on_A[i]))
      h.first_token = now
      self._busy[j] = h
      self._position[j] = len(h.request.prompt)
      self.stats.prompt_tokens += len(h.request.prompt)
      self._emit(j, int(token_A[i]), float(logprob_A[i]), bool(done_A[i]))
    return True

  def _mixture_dict(self, r: Request, alpha_K, on: bool) -> dict[str, float]:
    if not on:
      return {}
    if r.model == AUTO and r.weights is None and self.strategy == "few_shot":
      return dict(self._few_shot_weights)
    return {n: float(alpha_K[i]) for i, n in enumerate(self.names) if alpha_K[i] > 0}

  def _decode(self) -> bool:
    live = [i for i, h in enumerate(self._busy) if h is not None]
    if not live:
      return False
    t0 = time.perf_counter()
    self.slots, token_N, logprob_N, done_N = decode(
        self.model.params, self.factors, self.slots, static=self.static)
    token_N, logprob_N, done_N = np.asarray(token_N), np.asarray(logprob_N), np.asarray(done_N)
    self.stats.decode_steps += 1
    self.stats.decode_s += time.perf_counter() - t0
    for i in live:
      self._position[i] += 1
      self._emit(i, int(token_N[i]), float(logprob_N[i]), bool(done_N[i]))
    return True

  def _emit(self, slot: int, token: int, logprob: float, done: bool) -> None:
    h = self._busy[slot]
    self.stats.generated_tokens += 1
    if token in self.static.eos_ids:
      self._finish(slot, "stop")
      return
    h.tokens.append(token)
    h.logprobs.append(logprob)
    if done:
      self._finish(slot, "length", [token])
    else:
      _notify(h, [token], False)

  def _finish(self, slot: int, reason: str, new_tokens: list[int] | None = None) -> None:
    h = self._busy[slot]
    self._busy[slot] = None
    h.finish_reason, h.finished = reason, time.perf_counter()
    self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
    h.done.set()
    _notify(h, new_tokens or [], True)

  def _finish_unadmitted(self, h: Handle, reason: str = "cancelled") -> None:
    h.finish_reason, h.finished = reason, time.perf_counter()
    self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
    h.done.set()
    _notify(h, [], True)

  # -- a background thread (the server) -------------------------------------------------------

  def start(self) -> None:
    """Steps on a daemon thread until `close`."""
    self._thread = threading.Thread(target=self._loop, name="t2jax-engine", daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    while not (self._closed and self.idle()):
      try:
        worked = self.step()
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(e)  # no request may hang on a failed program
        worked = False
      if not worked:
        self._wake.wait(0.02)
        self._wake.clear()

  def _fail_all(self, error: Exception) -> None:
    """Every admitted request finished as "error"; the slots start afresh (a failed program
    may have consumed the donated state)."""
    self.last_error = error
    for i, h in enumerate(self._busy):
      if h is not None:
        self._finish(i, "error")
    self.slots = self._empty_slots()

  @property
  def closed(self) -> bool:
    return self._closed

  def stop_admitting(self) -> None:
    """New requests are refused (ShuttingDown: HTTP 503) and waiting ones cancelled; running
    ones go on."""
    with self._lock:
      self._closed = True
      while True:
        try:
          self._backlog.append(self._waiting.get_nowait())
        except queue.Empty:
          break
      for h in self._backlog:
        h.cancel()
    self._wake.set()

  def close(self, grace_s: float = 10.0) -> None:
    """stop_admitting, then running requests get `grace_s` to finish before they are
    cancelled; returns once the engine's thread has stopped."""
    self.stop_admitting()
    deadline = time.monotonic() + grace_s
    while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
      self._wake.set()
      self._thread.join(0.05)
    for h in self._busy:
      if h is not None:
        h.cancel()
    if self._thread is not None:
      self._wake.set()
      self._thread.join()
    else:  # no thread: cancel here
      self.step()
