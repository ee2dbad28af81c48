"""SVF expert for four-option reasoning questions on the embedded default model: unit
conversions, orderings from comparisons, syllogisms over nonsense words, days of the week.
The fifth family, odd_one_out, is held out of training (and of cls's prompts): it is the unseen
reasoning target of configs/adapt.py.

  python -m t2jax.train --config configs/reasoning.py [--workdir runs/reasoning] [--config.steps=16]

The reply is prefilled with "The answer is (" and a rollout is the one letter that follows:
free replies copied the format request's placeholder ("The answer is (X).", 62 of 64
conversion questions), and at 64 new tokens the summed log-probs of text after the letter
moved the policy as much as the letter did. The base model is at chance on every family
(greedy 22-25 %, each family answered with one letter), so there is no format to learn: only
the questions.
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "reasoning"
  # odd_one_out is held out: the unseen reasoning target of configs/adapt.py
  c.task_args.kinds = "conversion,ordering,syllogism,weekday"
  # the reply opens with "The answer is (": a rollout is the letter, and every reply names one
  c.task_args.answer_prefix = "The answer is ("
  # short: the template's own system prompt is 20 tokens, and the longest prompt must stay
  # within 128 (one prompt bucket; rollouts prefill each prompt once per sample)
  c.task_args.system_prompt = "Answer the question."
  c.steps = 16
  c.batch_size = 16
  c.samples_per_prompt = 4
  # the letter only: tokens after it ("). (B) is …") do not change the reward, but their
  # summed log-probs did move the policy (noise in the gradient, KL on text nobody reads)
  c.max_new_tokens = 1
  c.temperature = 1.0
  c.kl = "exact"
  c.kl_coef = 0.05
  c.lr = 2e-3
  c.schedule = "cosine"
  c.eval_every = 8
  c.eval_size = 64
  c.test_size = 0  # all 200 test problems
  return c
