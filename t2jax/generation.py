"""`t2jax.generate`: prompts (text or token ids) → generated text, tokens and log-probs."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import chex
import numpy as np

from t2jax import expert as expert_lib
from t2jax import sampling
from t2jax.model import Model
from t2jax.tokenizer import encode_prompts


@dataclasses.dataclass(frozen=True)
class Generation:
  texts: list[str]  # decoded generated tokens ("" when the model has no tokenizer)
  token_ids: list[list[int]]  # generated tokens only, up to and excluding EOS
  logprobs: list[list[float]]  # log p(token) under the model's unmodified distribution


def _token_prompts(model: Model, prompts, chat_template: bool) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError("prompts must be a list of strings or a list of token-id lists; "
                    f"got {type(prompts).__name__}.")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: pass at least one prompt.")
  if all(isinstance(p, str) for p in prompts):
    if any(not p for p in prompts):
      raise ValueError(f"prompt {[i for i, p in enumerate(prompts) if not p][0]} is an empty "
                       "string.")
    return encode_prompts(model.tokenizer, prompts, chat_template)
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      raise TypeError("prompts mixes strings and token-id lists; use one kind.")
    ids = [int(t) for t in p]
    if not ids:
      raise ValueError(f"prompt {i} has no tokens.")
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
      raise ValueError(f"prompt {i} holds token ids outside [0, {model.config.vocab_size}).")
    out.append(ids)
  return out


def generate(model: Model, prompts, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             chat_template: bool = True, experts=None, svf_mode: str = "auto") -> Generation:
  """One batch: prompts of different lengths are left-padded together. temperature 0 = greedy.

  experts: None (base model), one t2jax.Expert for the whole batch, or a list with one
  Expert-or-None per prompt (still one batch, one jitted call). svf_mode overrides the
  automatic SVF compute mode (see t2jax.svf.choose_mode)."""
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}.")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}]; got "
                     f"{min_new_tokens!r}.")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                     f"{top_p}, {top_k}.")
  token_prompts = _token_prompts(model, prompts, chat_template)
  limit = model.config.max_length
  for i, p in enumerate(token_prompts):
    if len(p) + max_new_tokens > limit:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                       f"that exceeds the model's context of {limit} tokens. Shorten the prompt "
                       "or lower max_new_tokens.")
  params, adapters, _ = expert_lib.bind(model, experts, len(token_prompts), svf_mode)
  sampler = sampling.Sampler(temperature=float(temperature), top_p=float(top_p),
                             top_k=int(top_k), eos_ids=model.eos_ids)
  tokens, logprobs = sampling.run(params, token_prompts, cfg=model.config, sampler=sampler,
                                  max_new=max_new_tokens, min_new=min_new_tokens, seed=seed,
                                  pad_id=model.pad_id, adapters=adapters)
  chex.assert_shape([tokens, logprobs], (len(token_prompts), max_new_tokens))
  chex.assert_type([tokens, logprobs], [np.int32, np.float32])
  ids = sampling.completion_ids(tokens, model.eos_ids)
  lps = [[float(x) for x in row_l[:len(row_ids)]] for row_ids, row_l in zip(ids, logprobs)]
  texts = ([model.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
           if model.tokenizer is not None else [""] * len(ids))
  return Generation(texts=texts, token_ids=ids, logprobs=lps)
