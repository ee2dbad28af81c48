"""Two-pass inference (paper §3.2): pass 1 decides which expert(s) fit a prompt, pass 2
generates with z' = Σ_k α_k z_k. Three strategies, as pure batched functions:

  prompt      the base model classifies the prompt (label_probs, expert=None) → dispatch
  cls_expert  the same prompt, scored with the classification expert z → dispatch
  few_shot    CEM searches α on a few train/val records of the target task (few_shot_cem);
              every prompt of that task then runs with the one mixture

Pass 1 never free-runs a generation: the classification prompt, with the assistant turn opened
by "\\boxed{", is scored once per prompt, every label's tokens + "}" riding in the same call
behind it under a tree mask. p(label) is the softmax over labels of those summed log-probs. The
chat header and the instruction, the same for every prompt, run once per (model, expert) and
their KV cache is kept: a row costs its question, the answer opening and L·(C−1) label tokens.

Defects of the official code avoided here: the "other" label runs the base model (not whatever
expert was loaded last); CEM shots never come from the test split; pass 2 is one batch with an
expert per row, not one weight reload per expert.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import atomic, sampling
from t2jax import expert as expert_lib
from t2jax.expert import Expert
from t2jax.generation import Generation, generate
from t2jax.models import llama
from t2jax.models.config import ModelConfig
from t2jax.tasks.base import TaskError
from t2jax.tasks.cls import OTHER, classification_messages, question_text
from t2jax.tokenizer import encode_chats, encode_prompts

ANSWER_SUFFIX = "}"  # scored after each label: "math" must not win for "mathematics"
STRATEGIES = ("prompt", "cls_expert", "few_shot")
OBJECTIVES = ("accuracy", "reward")  # scored on generated answers
# few-shot CEM may also rank by the mean log-likelihood of the shots' reference answers alone:
# no generation per candidate, and a signal where no candidate solves a shot (a small model)
CEM_OBJECTIVES = OBJECTIVES + ("loglik",)

# ---------------------------------------------------------------------------------------------
# Pass 1: p(label | prompt), one prefix-shared forward pass.


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefix_cache(params: dict, prefix_K: jnp.ndarray, *, cfg: ModelConfig) -> llama.KVCache:
  """The KV cache (batch 1, K slots) of the prefix every prompt starts with."""
  k = prefix_K.shape[0]
  cache = llama.KVCache.zeros(cfg, 1, k, params["embed_tokens"].dtype)
  _, cache = llama.forward(params, prefix_K[None], jnp.arange(k)[None], cache,
                           jnp.zeros((), jnp.int32), jnp.ones((1, k), bool), cfg=cfg)
  return cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _label_logprobs(params: dict, prefix: llama.KVCache, rest_BxR: jnp.ndarray,
                    rest_mask_BxR: jnp.ndarray, labels_LxC: jnp.ndarray,
                    label_mask_LxC: jnp.ndarray, *, cfg: ModelConfig) -> jnp.ndarray:
  """log p(label) [B, L], normalised over the L labels, of the prompts prefix + rest[b].

  One call after the shared prefix's cache (`_prefix_cache`, K slots): each row runs its rest
  (left-padded: the padding sits between prefix and rest, masked, and real tokens keep
  consecutive positions) followed by every label's first C−1 tokens side by side, label l's
  tokens seeing the prefix, the rest and label l's earlier tokens only (a tree mask).
  B·(R + A) tokens, A = L·(C−1), instead of B·L·(K + R + C), and no copy of the cache per
  label."""
  k, (b, r), (l, c) = prefix.slots, rest_BxR.shape, labels_LxC.shape
  a = l * (c - 1)
  s = k + r + a
  cache = prefix.grow(b, s)  # the prefix in every row, then room for the rest and the labels
  # slot layout after the prefix: rest [0, r), then label l's token t at r + l·(C−1) + t
  label_of_T = np.concatenate([np.full(r, -1), np.repeat(np.arange(l), c - 1)])  # -1: rest
  step_of_A = np.tile(np.arange(c - 1), l)  # a label token's index within its label
  label_of_S = np.concatenate([np.full(k, -1), label_of_T])
  causal_TxS = np.arange(s)[None] <= k + np.arange(r + a)[:, None]
  own_TxS = (label_of_S[None] == -1) | (label_of_S[None] == label_of_T[:, None])
  key_valid_BxS = jnp.concatenate(
      [jnp.ones((b, k), bool), rest_mask_BxR.astype(bool), jnp.ones((b, a), bool)], axis=1)
  visible_BxTxS = jnp.asarray(causal_TxS & own_TxS)[None]  # forward adds key_valid
  positions_BxR = k + llama.positions_from_mask(rest_mask_BxR)
  positions_BxT = jnp.concatenate(
      [positions_BxR, positions_BxR[:, -1:] + 1 + step_of_A], axis=1)
  tokens_BxT = jnp.concatenate(
      [rest_BxR, jnp.broadcast_to(labels_LxC[:, :-1].reshape(1, a), (b, a))], axis=1)
  hidden_BxTxD, _ = llama.forward(params, tokens_BxT, positions_BxT, cache,
                                  jnp.asarray(k, jnp.int32), key_valid_BxS, cfg=cfg,
                                  visible_BxTxS=visible_BxTxS)
  # logits only where they predict a label token: the rest's last position, then each label
  # token but its label's last; the predictor of label l's token t is P[l, t]
  logp_BxPxV = jax.nn.log_softmax(llama.lm_head(params, hidden_BxTxD[:, r - 1:]), axis=-1)
  pred_LxC = np.concatenate([np.zeros((l, 1), int),
                             1 + np.arange(a).reshape(l, c - 1)], axis=1)
  logp_BxLxC = logp_BxPxV[:, pred_LxC, jnp.maximum(labels_LxC, 0)]
  return jax.nn.log_softmax(jnp.sum(jnp.where(label_mask_LxC, logp_BxLxC, 0.0), axis=-1),
                            axis=-1)


def label_tokens(model, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Each label's tokens + "}" [L, C] (right-padded with 0) and their mask [L, C]."""
  if not labels or len(set(labels)) != len(labels):
    raise ValueError(f"labels must be distinct and non-empty; got {list(labels)}.")
  ids = [model.tokenizer(lab + ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
         for lab in labels]
  c = max(len(x) for x in ids)
  tokens, mask = np.zeros((len(ids), c), np.int32), np.zeros((len(ids), c), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  return tokens, mask


def classification_prompts(model, questions: Sequence[str], labels: Sequence[str],
                           prompt_style: str = "ours") -> list[list[int]]:
  """Token ids of pass 1's prompts: classification_messages in the chat template, ending in
  the assistant turn opened with "\\boxed{" (the cls task's prompts, token for token). The
  label is tokenised on its own and appended: the pre-tokenizer splits "{" from the word after
  it, so this is how "\\boxed{math}" reads."""
  return encode_chats(model.tokenizer, [classification_messages(q, labels, prompt_style)
                                        for q in questions])


def shared_prefix(model, prompts: Sequence[list[int]], labels: Sequence[str],
                  prompt_style: str = "ours") -> tuple[list[int], list[list[int]]]:
  """(the tokens every prompt starts with, each prompt's rest). The chat header and the
  classification instruction come before the question, so the prefix is the same for every
  question (probed with two questions that differ in their first character), which keeps its
  length, and so the compiled program, the same across tasks. Every rest keeps >= 1 token."""
  probe_a, probe_b = classification_prompts(model, ["A", "7"], labels, prompt_style)
  k = next((i for i, (x, y) in enumerate(zip(probe_a, probe_b)) if x != y), len(probe_a))
  k = min(k, min(len(p) for p in prompts) - 1)
  while any(p[:k] != probe_a[:k] for p in prompts):  # a question that merged into the prefix
    k -= 1
  return list(probe_a[:k]), [list(p[k:]) for p in prompts]


# Questions without content (Zhao et al. 2021, "Calibrate Before Use"): their p(label) is the
# model's bias towards each label name, whatever the question.
CONTENT_FREE = ("N/A", "", "[MASK]")


def calibrate(probs_BxL, content_free_NxL) -> np.ndarray:
  """p(label | question) divided by the geometric mean of p(label | content-free question),
  renormalised per row. The small default model puts ~0.2 % on "reasoning" for any question;
  without this, no question is ever sent to the reasoning expert."""
  prior_L = np.exp(np.log(np.asarray(content_free_NxL, np.float64)).mean(axis=0))
  q_BxL = np.asarray(probs_BxL, np.float64) / prior_L
  return q_BxL / q_BxL.sum(axis=1, keepdims=True)


# Results that do not depend on the questions, per (model, expert, key): the content-free
# rows' p(label) [N, L] (3 rows on top of a full batch of questions cost a whole second batch)
# and the shared prefix's KV cache. The most recent are kept, and only while their model and
# expert are alive: entries hold weak references, so dropping a model frees its caches too.
_MEMO: list[tuple] = []
_MEMO_KEPT = 8


def _alive(ref) -> bool:
  return ref is None or ref() is not None


def _prune(_=None) -> None:
  """Drops the entries whose model or expert is gone (called as each one dies)."""
  _MEMO[:] = [m for m in _MEMO if _alive(m[0]) and _alive(m[1])]


def _ref(obj):
  """A weak reference to obj that prunes the memo when obj dies; None (base) stays None."""
  return None if obj is None else weakref.ref(obj, _prune)


def _memo_get(model, expert, key):
  for m, e, k, value in _MEMO:
    if m() is model and (e() if e is not None else None) is expert and k == key:
      return value
  return None


def _memo_put(model, expert, key, value):
  _MEMO.append((_ref(model), _ref(expert), key, value))
  del _MEMO[:-_MEMO_KEPT]
  return value


def label_probs(model, questions: Sequence[str], labels: Sequence[str], *,
                expert: Expert | None = None, batch_size: int | None = None,
                calibrated: bool = False, prompt_style: str = "ours") -> np.ndarray:
  """p(label) [B, L] for each question. expert: None (strategy "prompt") or the classification
  expert (strategy "cls_expert"), materialised once for all rows. Batches of `batch_size`
  (None = all at once; the last one padded) share one padded length, so one compile serves a
  whole eval. The shared prefix (chat header + instruction) runs once per (model, expert) and
  its KV cache is remembered; per row, the question and answer opening run once and each
  label's tokens once, all in one call. calibrated: divide
  by the probabilities of CONTENT_FREE questions (see `calibrate`), scored once per (model,
  expert, labels) and remembered. prompt_style: "ours" or "official" (the official code's
  wording, tasks/cls.py: classification_messages)."""
  if not questions:
    raise ValueError("questions is empty.")
  if calibrated:
    memo_key = ("content_free", tuple(labels), prompt_style)
    content_free = _memo_get(model, expert, memo_key)
    if content_free is not None:
      return calibrate(label_probs(model, questions, labels, expert=expert,
                                   batch_size=batch_size, prompt_style=prompt_style),
                       content_free)
    # the first time, the content-free rows ride along in the same batches: no extra compile
    probs = label_probs(model, list(questions) + list(CONTENT_FREE), labels, expert=expert,
                        batch_size=batch_size, prompt_style=prompt_style)
    _memo_put(model, expert, memo_key, probs[len(questions):])
    return calibrate(probs[:len(questions)], probs[len(questions):])
  prompts = classification_prompts(model, questions, labels, prompt_style)
  labels_LxC, label_mask_LxC = label_tokens(model, labels)
  longest = max(len(p) for p in prompts)
  if longest + labels_LxC.shape[1] > model.config.max_length:
    raise ValueError(f"a classification prompt has {longest} tokens; with its label that "
                     f"exceeds the model's context of {model.config.max_length} tokens.")
  prefix_K, rests = shared_prefix(model, prompts, labels, prompt_style)
  # rests are short (a question and the answer opening): pad to 8s, not bucket_length's 16s
  rest_len = -(-max(len(x) for x in rests) // 8) * 8
  size = batch_size or len(rests)
  params, adapters, _ = expert_lib.bind(model, expert, size,
                                        "auto" if expert is None else "materialised")
  assert adapters is None
  key = ("prefix", tuple(prefix_K))
  prefix = _memo_get(model, expert, key)
  if prefix is None:
    prefix = _memo_put(model, expert, key, _prefix_cache(params, np.asarray(prefix_K, np.int32),
                                                         cfg=model.config))
  out = []
  for start in range(0, len(rests), size):
    chunk = rests[start:start + size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (size - real)
    rest_BxR, rest_mask_BxR = sampling.left_pad(chunk, model.pad_id, rest_len)
    logp_BxL = _label_logprobs(params, prefix, rest_BxR, rest_mask_BxR, labels_LxC,
                               label_mask_LxC, cfg=model.config)
    out.append(np.exp(np.asarray(logp_BxL, np.float64))[:real])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Dispatch: label probabilities → an expert (or the base model, or a mixture) per row.


def dispatch(probs_BxL, labels: Sequence[str], experts: dict[str, Expert], *,
             threshold: float) -> tuple[list[Expert | None], list[dict[str, float]]]:
  """Per row: the argmax label's expert; "other" → None (the base model); when max p is below
  `threshold`, the mixture of ALL experts weighted by their labels' p renormalised over the
  experts (the seed paper's fallback). Also returns each row's mixture weights ({} = base)."""
  probs_BxL = np.asarray(probs_BxL, np.float64)
  labels = list(labels)
  if probs_BxL.ndim != 2 or probs_BxL.shape[1] != len(labels):
    raise ValueError(f"probs has shape {probs_BxL.shape}; expected [batch, {len(labels)}].")
  named = [lab for lab in labels if lab != OTHER]
  if set(named) != set(experts):
    raise ValueError(f"every label but {OTHER!r} needs an expert and every expert a label; "
                     f"labels {labels}, experts {sorted(experts)}.")
  names = list(experts)
  columns = [labels.index(n) for n in names]
  mixtures_memo: dict[tuple, Expert] = {}
  rows, weights = [], []
  for p_L in probs_BxL:
    top = int(np.argmax(p_L))
    if p_L[top] >= threshold:
      if labels[top] == OTHER:
        rows.append(None)
        weights.append({})
      else:
        rows.append(experts[labels[top]])
        weights.append({labels[top]: 1.0})
      continue
    p_K = p_L[columns]
    w_K = p_K / p_K.sum() if p_K.sum() > 0 else np.full(len(names), 1.0 / len(names))
    key = tuple(np.round(w_K, 12))
    if key not in mixtures_memo:
      mixtures_memo[key] = Expert.mix([experts[n] for n in names], w_K.tolist())
    rows.append(mixtures_memo[key])
    weights.append({n: float(w) for n, w in zip(names, w_K)})
  return rows, weights


# ---------------------------------------------------------------------------------------------
# Few-shot: CEM over mixture coefficients α on a few records of the target task.
#
# Mixtures keep the model's scale: α is projected onto the simplex (per column when there is
# one α per expert per matrix) before any z is mixed, and z' = Σ_k α_k z_k is taken over raw z,
# before f, as the official code mixes. Why the simplex and not the official code's unnormalised
# α in [0, 1]^K (optionally followed by its sum-of-singular-values rescale):
#   scale  f(z) = z and there is no rescale at all: with experts near z = 1, Σα = 3 triples
#          every targeted weight and α = 0 zeroes it; only Σα = 1 keeps s·f(z') on the experts'
#          scale.
#   paper  the nuclear-norm rescale restores Σ s·f(z') but not f's shape: f(Σα p) with Σα = 2
#          is sigmoid(2p), a different spectrum from any expert's sigmoid(p).
# On the simplex, K identical experts mix to that expert exactly in both parametrisations
# (Σα z = z), which no rescale after an unnormalised mix gives. The simplex drops one
# direction of the official search space: the overall magnitude of α, i.e. exactly the
# direction that moves the model off its scale. Clamping first (as the official code does)
# keeps α ≥ 0; an all-zero column becomes uniform (the official rescale divides by zero there).


def simplex(alpha, axis: int = 0) -> np.ndarray:
  """α clamped to [0, 1], then divided by its sum over the experts (`axis`): every slice
  along `axis` sums to 1. Where every expert's weight clamps to 0, the weights are uniform."""
  a = np.clip(np.asarray(alpha, np.float64), 0.0, 1.0)
  total = a.sum(axis=axis, keepdims=True)
  return np.where(total > 0, a / np.where(total > 0, total, 1.0), 1.0 / a.shape[axis])


@dataclasses.dataclass(frozen=True)
class CEMResult:
  alpha: np.ndarray  # [K] or, per_matrix, [K, M] (M = sorted z keys), on the simplex: the best
  best_score: float  # its objective on the shots (in the last population, which re-scored it)
  history: list[dict[str, Any]]  # one dict per iteration; see few_shot_cem
  matrices: tuple[str, ...] = ()  # per_matrix: the z key of each column of alpha
  best_loglik: float | None = None  # its mean log p(reference | shot); None: no references
  candidates: np.ndarray | None = None  # [iterations, population, *alpha.shape]: every α scored


def few_shot_records(task, n: int, split: str = "val", *, seed: int = 0) -> list[dict]:
  """n records of the target task's train or val split for CEM, drawn with a fixed seed. The
  test split is refused: the official code drew its shots from test and picked its result on
  the rest of the test set."""
  if split not in ("train", "val"):
    raise TaskError(f"few-shot records must come from the target task's train or val split, "
                    f"not {split!r}: the test split only scores the result.")
  records = list(task.records(split))
  if n < 1 or n > len(records):
    raise TaskError(f"few-shot needs 1..{len(records)} records of {split}; asked for {n}.")
  keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
  return [records[i] for i in keep]


def _check_not_test(task, records: Sequence[dict]) -> None:
  try:
    test = {json.dumps(r, sort_keys=True, default=str) for r in task.records("test")}
  except TaskError:  # no test split to load (e.g. GSM8K without test_path): none to leak
    return
  leaked = [r for r in records if json.dumps(r, sort_keys=True, default=str) in test]
  if leaked:
    raise TaskError(f"{len(leaked)} few-shot record(s) belong to the task's test split; draw "
                    "shots from train or val (adapt.few_shot_records).")


def mix(experts: Sequence[Expert], alpha, matrices: Sequence[str] = (),
        name: str = "few_shot") -> Expert:
  """z = Σ_k α_k z_k over raw z, with α projected onto the simplex first (`simplex`; see the
  note above). α [K] (one weight per expert) or [K, M] (one per expert per matrix, columns
  named by `matrices`, each column projected on its own)."""
  alpha = simplex(alpha, axis=0)
  if alpha.ndim == 1:
    return Expert.mix(experts, alpha.tolist(), name=name)
  first = experts[0]
  for e in experts[1:]:
    first.check_same_space(e)
  if alpha.shape != (len(experts), len(matrices)) or set(matrices) != set(first.z):
    raise ValueError(f"per-matrix alpha needs shape [experts, matrices] = [{len(experts)}, "
                     f"{len(first.z)}] with one column per z key; got {alpha.shape}.")
  z = {k: sum(float(alpha[i, m]) * e.z[k] for i, e in enumerate(experts)).astype(np.float32)
       for m, k in enumerate(matrices)}
  return dataclasses.replace(first, z=z, name=name, metrics={"mixture": {
      e.name: alpha[i].tolist() for i, e in enumerate(experts)}})


def _unique_candidates(alpha_PxA: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(the distinct rows [U, ...] in first-seen order, each row's index among them [P])."""
  flat_PxF = alpha_PxA.reshape(len(alpha_PxA), -1)
  _, first_U, inverse_P = np.unique(flat_PxF, axis=0, return_index=True, return_inverse=True)
  order_U = np.argsort(first_U)  # np.unique sorts; keep the population's order
  rank_U = np.empty_like(order_U)
  rank_U[order_U] = np.arange(len(order_U))
  return alpha_PxA[first_U[order_U]], rank_U[np.ravel(inverse_P)]


def _token_prompts(model, prompts) -> list[list[int]]:
  if all(isinstance(p, str) for p in prompts):  # as t2jax.generate encodes strings
    return encode_prompts(model.tokenizer, list(prompts), True)
  return [[int(t) for t in p] for p in prompts]


def evaluate_population(model, experts: Sequence[Expert], alphas, prompts, records, task, *,
                        max_new_tokens: int, objective: str = "accuracy",
                        matrices: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
  """Scores every candidate α ([P, K] or [P, K, M], projected onto the simplex) on every shot
  in ONE greedy batch with an expert per row; candidates whose projected α are equal are
  generated once (CEM's mean and best rows, clamped draws, a collapsed std). Returns the
  objective per candidate [P] and per candidate and shot [P, S]."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r} is unknown; use one of {OBJECTIVES}.")
  unique, inverse_P = _unique_candidates(simplex(alphas, axis=1))
  candidates = [mix(experts, a, matrices, name=f"candidate{i}") for i, a in enumerate(unique)]
  s = len(records)
  rows = [c for c in candidates for _ in range(s)]
  gen = generate(model, [p for _ in candidates for p in prompts], max_new_tokens=max_new_tokens,
                 temperature=0.0, experts=rows)
  score = task.correct if objective == "accuracy" else task.reward
  per_UxS = np.array([[float(score(rec, gen.texts[i * s + j])) for j, rec in enumerate(records)]
                      for i in range(len(candidates))])
  per_PxS = per_UxS[inverse_P]
  return per_PxS.mean(axis=1), per_PxS


@functools.partial(jax.jit, static_argnames=("cfg", "tail"))
def _tail_logprobs(params, tokens_BxT, mask_BxT, adapters, *, cfg: ModelConfig,
                   tail: int) -> jnp.ndarray:
  """log p(token | the tokens before it) [B, tail] of each row's last `tail` tokens
  (rows left-padded)."""
  b, t = tokens_BxT.shape
  cache = llama.KVCache.zeros(cfg, b, t, params["embed_tokens"].dtype)
  hidden_BxTxD, _ = llama.forward(params, tokens_BxT, llama.positions_from_mask(mask_BxT), cache,
                                  jnp.zeros((), jnp.int32), mask_BxT.astype(bool), cfg=cfg,
                                  adapters=adapters)
  hidden_RxBxD = jnp.swapaxes(hidden_BxTxD[:, t - tail - 1:t - 1], 0, 1)
  target_RxB = tokens_BxT[:, t - tail:].T

  def one(args):  # one position at a time: [B, V] logits, never [B, tail, V]
    h_BxD, y_B = args
    logp_BxV = jax.nn.log_softmax(llama.lm_head(params, h_BxD[:, None])[:, 0], axis=-1)
    return jnp.take_along_axis(logp_BxV, y_B[:, None], axis=-1)[:, 0]

  return jax.lax.map(one, (hidden_RxBxD, target_RxB)).T


def reference_tokens(model, task, records) -> list[list[int] | None]:
  """Each record's reference completion (task.reference, the text of a correct answer)
  tokenised; None where the task gives none (or has no `reference` method)."""
  reference = getattr(task, "reference", None)
  out = []
  for rec in records:
    text = reference(rec) if reference is not None else None
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    out.append(list(ids) or None)
  return out


def reference_loglik(model, experts: Sequence[Expert], alphas, prompts, references, *,
                     matrices: Sequence[str] = (), batch_size: int | None = None) -> np.ndarray:
  """log p(reference_s | prompt_s) [P, S], summed over the reference's tokens (a sequence
  log-likelihood, as rl.py sums), under each candidate α's mixture: the whole population ×
  shots in ONE forward pass with an expert per row (factored SVF), candidates with equal
  projected α scored once. NaN where a shot has no reference. A reference longer than the
  context left after its prompt is cut to fit. batch_size: rows per call (None = all; the
  last call padded, so one compile serves them all), to bound memory."""
  alphas_P = simplex(alphas, axis=1)
  p, s = len(alphas_P), len(prompts)
  out_PxS = np.full((p, s), np.nan)
  prompts = _token_prompts(model, prompts)
  limit = model.config.max_length
  refs = [None if r is None else r[:limit - len(q)] for q, r in zip(prompts, references)]
  shots = [j for j, r in enumerate(refs) if r]
  if not shots:
    return out_PxS
  unique, inverse_P = _unique_candidates(alphas_P)
  candidates = [mix(experts, a, matrices, name=f"candidate{i}") for i, a in enumerate(unique)]
  seqs = [prompts[j] + refs[j] for j in shots]
  rows = [c for c in candidates for _ in shots]
  tail = -(-max(len(refs[j]) for j in shots) // 16) * 16  # bucketed: fewer compiles
  width = min(max(sampling.bucket_length(max(len(x) for x in seqs)),
                  max(len(x) for x in seqs) + 1), limit)
  tail = min(tail, width - 1)
  seqs_B = [x for _ in candidates for x in seqs]
  size = min(batch_size or len(rows), len(rows))
  chunks = []
  for start in range(0, len(rows), size):
    real = len(rows[start:start + size])
    pad = [len(rows) - 1] * (size - real)
    rows_b = rows[start:start + size] + [rows[i] for i in pad]
    tokens_BxT, mask_BxT = sampling.left_pad(seqs_B[start:start + size] + [seqs_B[i] for i in pad],
                                             model.pad_id, width)
    params, adapters, _ = expert_lib.bind(model, rows_b, size)
    chunks.append(np.asarray(_tail_logprobs(params, tokens_BxT, mask_BxT, adapters,
                                            cfg=model.config, tail=tail),
                             np.float64)[:real])
  logp_BxR = np.concatenate(chunks)
  n_J = np.array([len(refs[j]) for j in shots])
  own_JxR = np.arange(tail)[None] >= tail - n_J[:, None]  # the reference's own tokens
  logp_UxJxR = logp_BxR.reshape(len(candidates), len(shots), tail)
  out_PxS[:, shots] = np.where(own_JxR[None], logp_UxJxR, 0.0).sum(-1)[inverse_P]
  return out_PxS


def rank(score_P, loglik_P, tie_P=None) -> np.ndarray:
  """Candidates best first: higher objective, then (the paper's tie rule) higher mean
  log-likelihood of the reference answers (NaN = none, ranks as equal), then lower tie_P
  (default: the row)."""
  score_P = np.asarray(score_P, np.float64)
  ll_P = np.nan_to_num(np.asarray(loglik_P, np.float64), nan=-np.inf)
  tie_P = np.arange(len(score_P)) if tie_P is None else np.asarray(tie_P)
  return np.lexsort((tie_P, -ll_P, -score_P))


def _mean_over_refs(loglik_PxS: np.ndarray) -> np.ndarray:
  has_S = ~np.isnan(loglik_PxS[0])
  if not has_S.any():
    return np.full(len(loglik_PxS), np.nan)
  return loglik_PxS[:, has_S].mean(axis=1)


def _opt(x) -> float | None:
  return None if x is None or np.isnan(x) else float(x)


def few_shot_cem(model, experts: Sequence[Expert], shots_prompts, shots_records, task, *,
                 max_new_tokens: int, population: int = 32, elites: int = 6,
                 iterations: int = 10, init_std: float = 0.5, per_matrix: bool = False,
                 seed: int = 0, objective: str = "accuracy", tie_break: bool = True,
                 loglik_batch_size: int | None = None) -> CEMResult:
  """Cross-entropy method over α (official: population 32, 6 elites, mean 1/K, std 0.5, α
  clamped to [0, 1]; here every candidate is then projected onto the simplex, see `simplex`).

  Each iteration draws the population around the mean; row 0 is the mean itself and row 1 the
  best α so far, re-scored, so the best is never lost and the mean's score is tracked. The
  population × shots is generated in one greedy batch (an expert per row; equal α generated
  once) and, where the task has references (task.reference(record) → text of a correct
  completion, or None), log p(reference | shot) is scored in one forward pass. Candidates rank
  by the objective, ties by the mean log-likelihood (the paper's rule; tie_break=False: off),
  exact ties by row with the fresh draws first. objective "loglik" ranks by that
  log-likelihood alone: the population is not generated (only the mean and the best, for
  history's accuracy_at_mean / accuracy_best), for models too weak to solve the shots. The
  best is the population's top; mean and std are refit to the elites. loglik_batch_size: rows
  per log-likelihood call (None: all population × shots rows in one).

  Shots: token-id prompts (or strings) and their records, from the target task's train or val
  split (see few_shot_records); records of the test split are refused.

  history[i]: iteration; score_at_mean, score_best, score_population_mean,
  score_population_std; loglik_at_mean, loglik_best (None without references); alpha_mean,
  alpha_std (the distribution this population was drawn from), alpha_best; candidates (how
  many distinct α were generated)."""
  experts = list(experts)
  if not experts:
    raise ValueError("few_shot_cem needs at least one expert.")
  if not 1 <= elites <= population or iterations < 1 or init_std < 0:
    raise ValueError(f"need 1 <= elites <= population, iterations >= 1, init_std >= 0; got "
                     f"elites={elites}, population={population}, iterations={iterations}, "
                     f"init_std={init_std}.")
  if len(shots_prompts) != len(shots_records) or not shots_records:
    raise ValueError(f"{len(shots_prompts)} shot prompts for {len(shots_records)} records; "
                     "give one prompt per record, at least one.")
  if objective not in CEM_OBJECTIVES:
    raise ValueError(f"objective {objective!r} is unknown; use one of {CEM_OBJECTIVES}.")
  _check_not_test(task, shots_records)
  matrices = tuple(sorted(experts[0].z)) if per_matrix else ()
  shape = (len(experts), len(matrices)) if per_matrix else (len(experts),)
  by_loglik = objective == "loglik"
  references = (reference_tokens(model, task, shots_records) if tie_break or by_loglik
                else [])
  use_refs = any(r is not None for r in references)
  if by_loglik and not use_refs:
    raise ValueError(f"objective 'loglik' ranks by the log-likelihood of reference answers, "
                     f"and task {getattr(task, 'name', task)!r} has none for these shots; use "
                     f"'accuracy' or 'reward'.")
  rng = np.random.default_rng(seed)
  mean, std = np.full(shape, 1.0 / len(experts)), np.full(shape, float(init_std))
  best = mean
  history, populations = [], []
  for it in range(iterations):
    raw = rng.normal(mean, std, (population, *shape))
    raw[0] = mean
    if population > 1:
      raw[1] = best
    pop = simplex(raw, axis=1)  # every candidate's columns sum to 1: no rescaled model
    loglik_P = np.full(population, np.nan)
    if use_refs:
      loglik_P = _mean_over_refs(reference_loglik(model, experts, pop, shots_prompts,
                                                  references, matrices=matrices,
                                                  batch_size=loglik_batch_size))
    if by_loglik:
      scores_P = loglik_P
    else:
      scores_P, _ = evaluate_population(model, experts, pop, shots_prompts, shots_records,
                                        task, max_new_tokens=max_new_tokens,
                                        objective=objective, matrices=matrices)
    # exact ties left: fresh draws before the mean and the best so far, else a population
    # that ties everywhere (no shot solved, no references) refits onto the mean and stops
    order = rank(scores_P, loglik_P, tie_P=(np.arange(population) - 2) % population)
    top = order[0]
    best = pop[top]
    history.append({
        "iteration": it, "score_at_mean": float(scores_P[0]), "score_best": float(scores_P[top]),
        "score_population_mean": float(scores_P.mean()),
        "score_population_std": float(scores_P.std()),
        "loglik_at_mean": _opt(loglik_P[0]), "loglik_best": _opt(loglik_P[top]),
        "alpha_mean": mean.tolist(), "alpha_std": std.tolist(), "alpha_best": best.tolist(),
        "candidates": int(len(_unique_candidates(pop)[0]))})
    if by_loglik:  # what the ranking did to accuracy: the mean and the best, generated
      acc_2, _ = evaluate_population(model, experts, pop[[0, top]], shots_prompts,
                                     shots_records, task, max_new_tokens=max_new_tokens,
                                     matrices=matrices)
      history[-1].update(accuracy_at_mean=float(acc_2[0]), accuracy_best=float(acc_2[1]))
    populations.append(pop)
    elite = pop[order[:elites]]
    mean, std = elite.mean(axis=0), elite.std(axis=0)  # the elites' mean stays on the simplex
  last = history[-1]
  return CEMResult(alpha=np.asarray(best), best_score=last["score_best"], history=history,
                   matrices=matrices, best_loglik=last["loglik_best"],
                   candidates=np.stack(populations))


def save_alpha(path: str, result: CEMResult, expert_names: Sequence[str]) -> None:
  """The α found, with the experts it weights (in order) and the search history, as JSON."""
  atomic.write_text(path, json.dumps({
      "experts": list(expert_names), "alpha": np.asarray(result.alpha).tolist(),
      "matrices": list(result.matrices), "best_score": result.best_score,
      "best_loglik": result.best_loglik, "history": result.history}, indent=1))


def load_alpha(path: str) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
  """(alpha, expert names, matrices) as save_alpha wrote them."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return np.asarray(data["alpha"], np.float64), list(data["experts"]), tuple(data["matrices"])


def ranked_by_loglik(history: Sequence[dict[str, Any]]) -> bool:
  """Whether a few_shot_cem history ranked by objective "loglik": its score is then the mean
  log p(reference), and each iteration records the accuracy beside it."""
  return "accuracy_at_mean" in history[0]


def plot_history(path: str, history: Sequence[dict[str, Any]]) -> bool:
  """The CEM search as a PNG: per iteration the score at the mean, the best so far and the
  population's mean ± std (left axis), and on the right axis the best's mean log-likelihood
  of the references when there are references, or with objective "loglik" (the score is
  that log-likelihood) the accuracy at the mean and of the best. False (nothing written)
  without matplotlib."""
  try:
    # pylint: disable=import-outside-toplevel
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
  except ImportError:
    return False
  if not history:
    raise ValueError("history is empty: nothing to plot.")
  it = np.array([h["iteration"] for h in history]) + 1
  get = lambda k: np.array([np.nan if h.get(k) is None else h[k] for h in history], float)
  fig = Figure(figsize=(6, 3.6))
  FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
  ax = fig.add_subplot()
  pop_mean, pop_std = get("score_population_mean"), get("score_population_std")
  ax.fill_between(it, pop_mean - pop_std, pop_mean + pop_std, alpha=0.2, color="gray",
                  label="population mean ± std")
  ax.plot(it, pop_mean, color="gray", lw=1)
  ax.plot(it, get("score_at_mean"), "o-", label="at the mean")
  ax.plot(it, get("score_best"), "s-", label="best")
  ax.set_xlabel("CEM iteration")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  by_loglik = ranked_by_loglik(history)
  ax.set_ylabel("mean log p(reference)" if by_loglik else "score on the shots")
  handles, labels = ax.get_legend_handles_labels()
  loglik = get("loglik_best")
  if by_loglik or not np.all(np.isnan(loglik)):
    ax2 = ax.twinx()
    if by_loglik:
      ax2.plot(it, get("accuracy_at_mean"), "^--", color="tab:red", label="accuracy at the mean")
      ax2.plot(it, get("accuracy_best"), "v--", color="tab:purple", label="accuracy of the best")
      ax2.set_ylabel("accuracy on the shots")
    else:
      ax2.plot(it, loglik, "^--", color="tab:red", label="best: mean log p(reference)")
      ax2.set_ylabel("mean log p(reference)")
    h2, l2 = ax2.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  ax.legend(handles, labels, fontsize=8, loc="lower right")
  fig.tight_layout()
  atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  return True


# ---------------------------------------------------------------------------------------------
# Both passes.


def _as_chats(prompts) -> list[list[dict[str, str]]]:
  if isinstance(prompts, str) or not prompts:
    raise TypeError("prompts must be a non-empty list of strings or of chat-turn lists.")
  return [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]


def two_pass_generate(model, prompts, experts: dict[str, Expert], *, strategy: str,
                      max_new_tokens: int, threshold: float = 0.0,
                      cls_expert: Expert | None = None, alpha=None,
                      matrices: Sequence[str] = (), batch_size: int | None = None,
                      temperature: float = 0.0, seed: int = 0, calibrated: bool = True,
                      prompt_style: str = "ours", slots: int | None = None
                      ) -> tuple[Generation, list[dict[str, float]], dict[str, float]]:
  """Pass 1 picks each prompt's expert mixture, pass 2 generates all prompts in ONE
  t2jax.generate call with an expert per row, on the same loaded params.

  prompts: user texts, or chat-turn lists (a task's messages; pass 1 classifies the last user
  turn, pass 2 poses the whole chat). experts: label → Expert; the labels of pass 1 are these
  names plus "other". few_shot: `alpha` from few_shot_cem over the experts in dict order (pass
  1 is then only the mixing; the search is paid once per task). Returns the generation, each
  row's mixture weights ({} = base model) and the wall time of each pass; each timed pass ends
  on host data, so the figures include the device work (the first call also compiles).

  slots: run on the serving engine instead (t2jax.engine: continuous batching over `slots`
  decode slots, pass 1 inside each admission program); the timing is then {"wall_s"}."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy {strategy!r} is unknown; use one of {STRATEGIES}.")
  chats = _as_chats(prompts)
  if slots is not None:
    from t2jax.engine import Engine  # pylint: disable=import-outside-toplevel
    longest = max(len(x) for x in encode_chats(model.tokenizer, chats))
    engine = Engine(model, experts, strategy=strategy, cls_expert=cls_expert, alpha=alpha,
                    matrices=matrices, threshold=threshold, calibrated=calibrated,
                    prompt_style=prompt_style, slots=slots,
                    max_len=longest + max_new_tokens)
    return engine.two_pass(chats, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed)
  names = list(experts)
  t0 = time.perf_counter()
  if strategy == "few_shot":
    if alpha is None:
      raise ValueError("strategy 'few_shot' needs alpha (from few_shot_cem).")
    mixed = mix([experts[n] for n in names], alpha, matrices)
    rows = [mixed] * len(chats)
    a = simplex(alpha, axis=0)  # the weights the mixture was made with
    weights = [{n: (float(a[i]) if a.ndim == 1 else a[i].tolist())
                for i, n in enumerate(names)}] * len(chats)
  else:
    if strategy == "cls_expert" and cls_expert is None:
      raise ValueError("strategy 'cls_expert' needs cls_expert (the classification expert).")
    labels = names + [OTHER]
    probs = label_probs(model, [question_text(c) for c in chats], labels,
                        expert=cls_expert if strategy == "cls_expert" else None,
                        batch_size=batch_size, calibrated=calibrated,
                        prompt_style=prompt_style)
    rows, weights = dispatch(probs, labels, experts, threshold=threshold)
  t1 = time.perf_counter()
  tokens = encode_chats(model.tokenizer, chats)
  gen = generate(model, tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                 seed=seed, experts=rows)
  t2 = time.perf_counter()
  return gen, [dict(w) for w in weights], {"pass1_s": t1 - t0, "pass2_s": t2 - t1}
