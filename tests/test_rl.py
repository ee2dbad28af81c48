"""rl.py against independent references: numpy baselines and KL, full-sequence logits without
prefix sharing, the sampler's own log-probs, and a finite-difference gradient."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import t2jax
from t2jax import config_defaults, programs, rl, run_setup, sampling, sharding, svf, trainer
from t2jax.models import llama


def test_advantages_match_numpy():
  r = np.array([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [-1.0, 0.5, 2.0, -3.0]], np.float32)
  np.testing.assert_allclose(rl.advantages(r, "none"), r)
  np.testing.assert_allclose(rl.advantages(r, "batch_mean"), r - r.mean(), rtol=1e-6)
  loo = np.stack([[r[b, g] - np.delete(r[b], g).mean() for g in range(4)] for b in range(3)])
  np.testing.assert_allclose(rl.advantages(r, "leave_one_out"), loo, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(rl.advantages(r, "leave_one_out"))[1] == 0)  # one reward: no signal
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    rl.advantages(r[:, :1], "leave_one_out")


def test_settings_refuse_unknown_names():
  with pytest.raises(ValueError, match="baseline 'mean'"):
    rl.RLSettings(baseline="mean")
  with pytest.raises(ValueError, match="kl 'reverse'"):
    rl.RLSettings(kl="reverse")


def _rollouts(rng, b=3, g=2, p=7, c=5, vocab=320):
  prompt = rng.integers(2, vocab - 2, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  for i, n in enumerate([p, p - 3, 2][:b]):  # left padding of different lengths
    mask[i, : p - n] = False
    prompt[i, : p - n] = 0
  completion = rng.integers(2, vocab - 2, (b * g, c)).astype(np.int32)
  cmask = np.ones((b * g, c), bool)
  cmask[1, 3:] = False  # a sample that ended early
  return rl.Rollouts(prompt_BxP=prompt, prompt_mask_BxP=mask, completion_NxC=completion,
                     completion_mask_NxC=cmask,
                     reward_N=rng.choice([-1.0, 1.0], b * g).astype(np.float32))


def test_prefix_shared_logits_equal_full_rows(loaded):
  model, _ = loaded("llama")
  batch = _rollouts(np.random.default_rng(0))
  got = np.asarray(rl.completion_logits(model.params, batch, cfg=model.config))
  g = batch.completion_NxC.shape[0] // batch.prompt_BxP.shape[0]
  rows = np.concatenate([np.repeat(batch.prompt_BxP, g, 0), batch.completion_NxC], 1)
  mask = np.concatenate([np.repeat(batch.prompt_mask_BxP, g, 0),
                         np.ones_like(batch.completion_mask_NxC)], 1)
  full = np.asarray(llama.full_logits(model.params, rows, mask, cfg=model.config))
  p = batch.prompt_BxP.shape[1]
  np.testing.assert_allclose(got, full[:, p - 1:-1], atol=1e-5, rtol=1e-5)


def test_logprobs_equal_the_samplers(loaded):
  """Rescoring sampled completions gives the log-probs the sampler recorded."""
  model, _ = loaded("llama")
  prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
  sampler = sampling.Sampler(temperature=1.0)
  tokens, logprobs = sampling.run(model.params, [p for p in prompts for _ in range(2)],
                                  cfg=model.config, sampler=sampler, max_new=6, seed=3)
  prompt, prompt_mask = sampling.left_pad(prompts, 0)
  batch = rl.Rollouts(prompt_BxP=prompt, prompt_mask_BxP=prompt_mask,
                      completion_NxC=np.maximum(tokens, 0), completion_mask_NxC=tokens >= 0,
                      reward_N=np.zeros(6, np.float32))
  lp = rl.token_logprobs(rl.completion_logits(model.params, batch, cfg=model.config),
                         batch.completion_NxC)
  np.testing.assert_allclose(np.where(tokens >= 0, lp, 0), logprobs, atol=2e-5)


@pytest.fixture(scope="module")
def tiny(loaded):
  model, _ = loaded("llama")
  dec = svf.decompose(model, cache=False, progress=False)
  return model, dec


def _z(model, rng, noise):
  z = t2jax.Expert.init(model).z_tree(model)
  return jax.tree.map(lambda x: jnp.asarray(x + noise * rng.standard_normal(x.shape),
                                            jnp.float32), z)


@pytest.mark.parametrize("kl", ["exact", "k3"])
def test_kl_terms_match_numpy(tiny, kl):
  model, dec = tiny
  rng = np.random.default_rng(1)
  batch = _rollouts(rng)
  z = _z(model, rng, 0.2)
  settings = rl.RLSettings(kl=kl, kl_coef=0.5, baseline="none", logprob_norm="mean")
  loss, metrics = rl.loss_fn(z, model.params, dec.factors, batch, cfg=model.config,
                             settings=settings)
  adapted = svf.materialise(model.params, dec.factors, z, parametrisation="scale", max_mult=2.0)
  lp = np.asarray(jax.nn.log_softmax(rl.completion_logits(adapted, batch, cfg=model.config)),
                  np.float64)
  lb = np.asarray(jax.nn.log_softmax(rl.completion_logits(model.params, batch,
                                                          cfg=model.config)), np.float64)
  y, m = batch.completion_NxC, batch.completion_mask_NxC
  lp_y = np.take_along_axis(lp, y[..., None], -1)[..., 0]
  if kl == "exact":
    kl_t = np.sum(np.exp(lp) * (lp - lb), -1)
  else:
    r = np.take_along_axis(lb, y[..., None], -1)[..., 0] - lp_y
    kl_t = np.exp(r) - 1 - r
  seq = lambda x: np.sum(np.where(m, x, 0), 1) / m.sum(1)
  want = -np.mean(batch.reward_N * seq(lp_y)) + 0.5 * np.mean(seq(kl_t))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["kl"]), np.sum(np.where(m, kl_t, 0)) / m.sum(),
                             rtol=1e-4)
  # not 0 against 0 (z ignored by materialise): z 20 % off the base gives ~0.1 a token
  assert float(metrics["kl"]) > 0.05


def test_kl_is_zero_at_the_base_model(tiny):
  model, dec = tiny
  batch = _rollouts(np.random.default_rng(2))
  z = _z(model, np.random.default_rng(2), 0.0)
  _, metrics = rl.loss_fn(z, model.params, dec.factors, batch, cfg=model.config,
                          settings=rl.RLSettings(kl="exact"))
  assert abs(float(metrics["kl"])) < 1e-5


def test_gradient_matches_finite_differences(tiny):
  model, dec = tiny
  rng = np.random.default_rng(3)
  batch = _rollouts(rng)
  z = _z(model, rng, 0.1)
  settings = rl.RLSettings(kl="exact", kl_coef=0.3, baseline="batch_mean")
  f = lambda z: rl.loss_fn(z, model.params, dec.factors, batch, cfg=model.config,
                           settings=settings)[0]
  grad = jax.grad(f)(z)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), z)
  eps = 1e-3
  shifted = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, z, direction)
  numeric = (float(f(shifted(1))) - float(f(shifted(-1)))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                        jax.tree.leaves(direction)))
  assert abs(analytic) > 1e-3
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def _programs(model, dec, batch: rl.Rollouts, **config) -> programs.Programs:
  """The factory's programs for the tiny model on one device, for steps shaped like `batch`,
  with `config` over the defaults."""
  cfg = config_defaults.base_config()
  cfg.update(config)
  (b, p), (n, c) = batch.prompt_BxP.shape, batch.completion_NxC.shape
  return programs.build(cfg, model.config, model.params, dec.factors,
                        mesh=sharding.make_mesh("data:-1"), eos_ids=model.eos_ids,
                        shapes=programs.Shapes(batch=b, samples=n // b, prompt_len=p, max_new=c))


def test_train_step_follows_the_schedule_by_the_gradient_and_counts(tiny):
  """SGD, one warmup step then cosine decay over 3: step 1 runs at lr 0 and leaves z as it
  was; step 2 at lr 0.5 moves z by −0.5 · jax.grad of rl.loss_fn, and reports that
  gradient's norm. (Adam would move every coordinate by ~lr whatever the gradient.)"""
  model, dec = tiny
  batch = _rollouts(np.random.default_rng(4))
  overrides = dict(optimizer="sgd", lr=0.5, schedule="cosine", warmup_steps=1, steps=4,
                   grad_clip=0.0, baseline="none")
  progs = _programs(model, dec, batch, **overrides)
  cfg = config_defaults.base_config()
  cfg.update(overrides)
  z0 = t2jax.Expert.init(model).z_tree(model)
  grads = jax.grad(lambda z: rl.loss_fn(z, model.params, dec.factors, batch, cfg=model.config,
                                        settings=run_setup.rl_settings(cfg))[0])(z0)
  state = progs.init_state(z0, seed=0)
  state, _ = progs.update(state, batch, model.params, dec.factors)
  chex.assert_trees_all_equal(state.z, z0)
  state, metrics = progs.update(state, batch, model.params, dec.factors)
  assert int(state.step) == 2
  want = jax.tree.map(lambda z, g: z - 0.5 * g, z0, grads)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # z moves
  chex.assert_trees_all_close(state.z, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                             rtol=1e-5)


def test_update_refuses_rollouts_of_the_wrong_shape_or_dtype(tiny):
  """chex at the update's boundary: a malformed batch fails while the program is traced,
  naming the check, instead of broadcasting into a wrong loss."""
  model, dec = tiny
  batch = _rollouts(np.random.default_rng(6))
  progs = _programs(model, dec, batch, baseline="none")
  state = progs.init_state(t2jax.Expert.init(model).z_tree(model), seed=0)
  for bad in (batch.replace(reward_N=batch.reward_N[:-1]),
              batch.replace(completion_mask_NxC=batch.completion_mask_NxC[:, :-1]),
              batch.replace(prompt_mask_BxP=batch.prompt_mask_BxP.astype(np.int32))):
    with pytest.raises(AssertionError, match=r"\[Chex\] Assertion assert_"):
      progs.update(state, bad, model.params, dec.factors)


@pytest.mark.parametrize("baseline", ["batch_mean", "leave_one_out"])
def test_microbatched_and_rematerialised_updates_equal_the_whole_batch(tiny, baseline):
  """Gradient accumulation over 2 and 4 microbatches (advantages still over the whole batch),
  and layers recomputed in the backward pass (remat), give the update of one plain pass."""
  model, dec = tiny
  rng = np.random.default_rng(5)
  batch = _rollouts(rng, b=4, g=2)
  batch = batch.replace(reward_N=rng.normal(size=8).astype(np.float32))
  z0 = jax.tree.map(np.asarray, _z(model, rng, 0.05))  # host copies: the update donates
  out = {}
  for k, remat in ((1, False), (2, False), (4, False), (1, True), (2, True)):
    progs = _programs(model, dec, batch, lr=1e-2, schedule="constant", steps=1,
                      grad_clip=0.0, baseline=baseline, kl="exact", kl_coef=0.1, remat=remat,
                      microbatches=k)
    state0 = progs.init_state(z0, seed=0)
    # remat must reach the program: one checkpoint per decoder layer and forward pass
    jaxpr = str(jax.make_jaxpr(progs.update)(state0, batch, model.params, dec.factors))
    assert bool(re.search(r"\b(remat2|checkpoint)\[", jaxpr)) == remat, (k, remat)
    state, metrics = progs.update(state0, batch, model.params, dec.factors)
    out[k, remat] = (jax.tree.leaves(state.z), metrics)
  names = ("loss", "kl", "logp_per_token", "tokens", "grad_norm")
  metrics = lambda key: {n: out[key][1][n] for n in names}
  for key in ((2, False), (4, False), (1, True), (2, True)):
    chex.assert_trees_all_close(out[key][0], out[1, False][0], rtol=1e-7, atol=1e-6)
    chex.assert_trees_all_close(metrics(key), metrics((1, False)), rtol=1e-5)
  with pytest.raises(ValueError, match="microbatches=3 does not divide the batch of 4"):
    trainer.microbatches(jax.tree.map(jnp.asarray, batch), jnp.zeros(8), 3)
