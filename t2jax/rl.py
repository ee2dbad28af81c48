"""REINFORCE with a KL penalty for SVF and LoRA experts (or next-token SFT): advantages,
sequence log-probs, the loss.

The objective (paper, eq. 1): maximise E[log π_z(y|x)·r(x, y)] − λ·KL(π_z ‖ π_base).
Differences from the official code, each a config switch (see configs/paper_gsm8k.py for the
official settings): a baseline per prompt group (`leave_one_out`) or per batch, and KL in
the paper's direction, KL(π_z ‖ π_base) (the official code computes KL(π_base ‖ π_z)).

A step scores B prompts × G samples. The G samples of a prompt share its prefix: the prompt
runs once per prompt (B rows), its KV cache is repeated G times and only the completions run
per sample. That is exact (the same attention, the same positions) and cuts the update to
B·P + B·G·C tokens instead of B·G·(P + C).

Log-probs are those of π_z itself (temperature 1) even when rollouts are drawn at another
temperature, as in the official code: the sampling temperature only chooses which completions
are scored.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from t2jax import adapters as adapters_lib
from t2jax.models import llama
from t2jax.models.config import ModelConfig

BASELINES = ("none", "batch_mean", "leave_one_out")
KL_ESTIMATORS = ("off", "exact", "k3")
NORMALISATIONS = ("sum", "mean")
OBJECTIVES = ("rl", "sft")
# loss_fn metrics that are means over completion tokens (the rest are means over rows)
PER_TOKEN_METRICS = ("logp_per_token", "kl")


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """Static (hashable) loss settings."""
  baseline: str = "leave_one_out"
  kl: str = "exact"  # off | exact (full vocabulary) | k3 (sampled tokens; Schulman's k3)
  kl_coef: float = 0.05
  logprob_norm: str = "sum"  # sequence log-prob summed (official) or length-normalised
  parametrisation: str = "scale"
  max_mult: float = 2.0
  remat: bool = False  # recompute each decoder layer in the backward pass (llama.forward)
  adapter: str = "svf"  # svf | lora (t2jax/adapters.py)
  lora_scale: float = 2.0  # alpha / rank
  lora_dropout: float = 0.0
  objective: str = "rl"  # rl (REINFORCE + KL) | sft (next-token NLL on the task's references)

  def __post_init__(self):
    for value, allowed, what in ((self.baseline, BASELINES, "baseline"),
                                 (self.kl, KL_ESTIMATORS, "kl"),
                                 (self.logprob_norm, NORMALISATIONS, "logprob_norm"),
                                 (self.objective, OBJECTIVES, "objective"),
                                 (self.adapter, adapters_lib.ADAPTERS, "adapter")):
      if value not in allowed:
        raise ValueError(f"{what} {value!r} is unknown; use one of {allowed}.")


@flax.struct.dataclass
class Rollouts:
  """B prompts (left-padded to P), G samples each, completions right-padded to C."""
  prompt_BxP: jnp.ndarray  # int32
  prompt_mask_BxP: jnp.ndarray  # bool
  completion_NxC: jnp.ndarray  # int32, N = B·G, row b·G + g is sample g of prompt b
  completion_mask_NxC: jnp.ndarray  # bool: a generated token (EOS included)
  reward_N: jnp.ndarray  # float32


def advantages(reward_BxG: jnp.ndarray, baseline: str) -> jnp.ndarray:
  """Rewards minus the baseline. leave_one_out: the mean reward of the prompt's other samples
  (unbiased, and a whole group with one reward gets no gradient)."""
  if baseline == "none":
    return reward_BxG
  if baseline == "batch_mean":
    return reward_BxG - jnp.mean(reward_BxG)
  g = reward_BxG.shape[1]
  if g < 2:
    raise ValueError("baseline 'leave_one_out' needs samples_per_prompt >= 2.")
  others = (jnp.sum(reward_BxG, axis=1, keepdims=True) - reward_BxG) / (g - 1)
  return reward_BxG - others


def completion_logits(params: dict, batch: Rollouts, *, cfg: ModelConfig, remat: bool = False,
                      mesh: jax.sharding.Mesh | None = None, adapters=None) -> jnp.ndarray:
  """Float32 logits [N, C, V]: position t predicts completion token t. `mesh`: the one the
  calling program is built for (activations kept split over its batch axes); `adapters`:
  modules swapped into the projections (llama.forward)."""
  b, p = batch.prompt_BxP.shape
  n, c = batch.completion_NxC.shape
  g = n // b
  cache = llama.KVCache.zeros(cfg, b, p + c - 1, params["embed_tokens"].dtype,
                              stacked=llama.is_stacked(params["layers"]))
  key_valid = jnp.concatenate([batch.prompt_mask_BxP, jnp.ones((b, c - 1), bool)], axis=1)
  positions = llama.positions_from_mask(batch.prompt_mask_BxP)
  hidden_BxPxD, cache = llama.forward(params, batch.prompt_BxP, positions, cache,
                                      jnp.zeros((), jnp.int32), key_valid, cfg=cfg,
                                      adapters=adapters, remat=remat, mesh=mesh)
  rep = lambda x: jnp.repeat(x, g, axis=0)  # [B, ...] → [N, ...], prompt b's G rows together
  hidden_first_Nx1xD = rep(hidden_BxPxD[:, -1:])  # left padding: the prompt ends at slot P-1
  if c == 1:
    return llama.lm_head(params, hidden_first_Nx1xD)
  cache = jax.tree.map(lambda x: jnp.repeat(x, g, axis=x.ndim - 4), cache)  # [(L,) B, ...]
  # completion token t sits at position len(prompt) + t; the last token predicts nothing
  start_N = rep(positions[:, -1] + 1)
  inputs_NxC1 = batch.completion_NxC[:, :-1]
  hidden_rest, _ = llama.forward(params, inputs_NxC1, start_N[:, None] + jnp.arange(c - 1), cache,
                                 jnp.asarray(p, jnp.int32), rep(key_valid), cfg=cfg,
                                 adapters=adapters, remat=remat, mesh=mesh)
  return llama.lm_head(params, jnp.concatenate([hidden_first_Nx1xD, hidden_rest], axis=1))


def _reduce(x_NxC: jnp.ndarray, mask_NxC: jnp.ndarray, norm: str) -> jnp.ndarray:
  total = jnp.sum(jnp.where(mask_NxC, x_NxC, 0.0), axis=1)
  return total / jnp.maximum(jnp.sum(mask_NxC, axis=1), 1) if norm == "mean" else total


def token_logprobs(logits_NxCxV: jnp.ndarray, tokens_NxC: jnp.ndarray) -> jnp.ndarray:
  logp = jax.nn.log_softmax(logits_NxCxV, axis=-1)
  return jnp.take_along_axis(logp, jnp.maximum(tokens_NxC, 0)[..., None], axis=-1)[..., 0]


def batch_advantages(batch: Rollouts, baseline: str) -> jnp.ndarray:
  """[N] advantages of the batch's rollouts, grouped by prompt."""
  b = batch.prompt_BxP.shape[0]
  return advantages(batch.reward_N.reshape(b, -1), baseline).reshape(-1)


def loss_fn(trainable, params: dict, frozen, batch: Rollouts, *, cfg: ModelConfig,
            settings: RLSettings, mesh: jax.sharding.Mesh | None = None, key=None,
            adv_N: jnp.ndarray | None = None, token_count: jnp.ndarray | None = None
            ) -> tuple[jnp.ndarray, dict]:
  """The loss of the trainable tree (SVF z or LoRA factors; `frozen`: SVD factors or None) on
  a batch, and its metrics. Differentiable in `trainable` only: params and factors are
  constants. key: LoRA dropout (None: none); adv_N, token_count: see policy_loss."""
  policy_params, adapters = adapters_lib.policy(params, frozen, trainable, settings, key)
  return policy_loss(policy_params, params, batch, cfg=cfg, settings=settings, adv_N=adv_N,
                     token_count=token_count, mesh=mesh, adapters=adapters)


def policy_loss(adapted: dict, params: dict, batch: Rollouts, *, cfg: ModelConfig,
                settings: RLSettings, adv_N: jnp.ndarray | None = None,
                token_count: jnp.ndarray | None = None, mesh: jax.sharding.Mesh | None = None,
                adapters=None) -> tuple[jnp.ndarray, dict]:
  """The loss given the policy's weights `adapted` (+ `adapters` modules) and the base
  `params` (the KL reference). `adv_N`, `token_count`: the advantages and the completion
  tokens (sft's denominator) of the larger batch this one is a microbatch of.

  objective rl: −mean(adv · log π(y|x)) + λ·KL; sft: the mean negative log-likelihood per
  reference token (completions are the task's references; no KL, rewards unused)."""
  logits = completion_logits(adapted, batch, cfg=cfg, remat=settings.remat, mesh=mesh,
                             adapters=adapters)
  mask = batch.completion_mask_NxC
  logp_NxC = token_logprobs(logits, batch.completion_NxC)
  tokens = jnp.maximum(jnp.sum(mask), 1)
  metrics = {"logp_per_token": jnp.sum(jnp.where(mask, logp_NxC, 0)) / tokens,
             "tokens": tokens.astype(jnp.float32)}
  if settings.objective == "sft":
    denominator = tokens if token_count is None else token_count
    loss = -jnp.sum(jnp.where(mask, logp_NxC, 0.0)) / denominator
    return loss, {**metrics, "loss": loss}
  if adv_N is None:
    adv_N = batch_advantages(batch, settings.baseline)
  adv_N = jax.lax.stop_gradient(adv_N)
  seq_logp_N = _reduce(logp_NxC, mask, settings.logprob_norm)
  pg_loss = -jnp.mean(adv_N * seq_logp_N)
  metrics["pg_loss"] = pg_loss
  loss = pg_loss
  if settings.kl != "off":
    ref_logits = jax.lax.stop_gradient(completion_logits(params, batch, cfg=cfg, mesh=mesh))
    if settings.kl == "exact":  # Σ_v π_z(v) (log π_z(v) − log π_base(v)) at every position
      logp_all = jax.nn.log_softmax(logits, axis=-1)
      kl_NxC = jnp.sum(jnp.exp(logp_all) * (logp_all - jax.nn.log_softmax(ref_logits, -1)), -1)
    else:  # k3 = e^r − 1 − r, r = log π_base(y) − log π_z(y): unbiased, always ≥ 0
      r = token_logprobs(ref_logits, batch.completion_NxC) - logp_NxC
      kl_NxC = jnp.exp(r) - 1.0 - r
    loss = loss + settings.kl_coef * jnp.mean(_reduce(kl_NxC, mask, settings.logprob_norm))
    metrics["kl"] = jnp.sum(jnp.where(mask, kl_NxC, 0.0)) / tokens
  metrics["loss"] = loss
  return loss, metrics
