"""SVF expert for four-option reasoning questions on the embedded default model: unit
conversions, orderings from comparisons, syllogisms over nonsense words, days of the week, one
comparison read either way, the largest or smallest of four numbers, opposites. The eighth
family, odd_one_out, is held out of training (and of cls's prompts): it is the unseen reasoning
target of configs/adapt.py.

  python -m t2jax.train --config configs/reasoning.py [--workdir runs/reasoning] [--config.steps=32]

The reply writes its choice out ("The answer is 42."), options shown as a plain list. With
options labelled (A)-(D) and the letter asked for, this 135M model answered at chance on every
family, even "What is 12 + 7?" (15 % of 48) and "Which number is the smallest?" (25 %), while the
option text it would write is right more often (smallest 48 %, opposites 62 %): it cannot tie a
letter to the option it means, so a reward on letters had nothing to reinforce and the expert
drifted (val 28 → 12 % in 5 steps, and at best learnt to always say "C"). The reply is
prefilled with "The answer is" so that every rollout is short and names something.
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "reasoning"
  # odd_one_out is held out: the unseen reasoning target of configs/adapt.py
  c.task_args.kinds = "comparison,conversion,extremes,opposite,ordering,syllogism,weekday"
  c.task_args.answer_format = "text"
  c.task_args.answer_prefix = "The answer is"
  # short: the template's own system prompt is 20 tokens, and the longest prompt must stay
  # within 128 (one prompt bucket; rollouts prefill each prompt once per sample)
  c.task_args.system_prompt = "Answer the question."
  # a reply naming no option scores below a wrong one: 34 % of the base model's greedy test
  # replies named none (a day not listed, "The answer is" repeated), and a group whose samples
  # are all wrong or unreadable gave no gradient towards choosing among the options
  c.task_args.reward_no_choice = -1.0
  c.steps = 48
  c.batch_size = 16
  c.samples_per_prompt = 4
  # the longest option ("Some bloox are gruz.") and its full stop fit in 12 tokens
  c.max_new_tokens = 12
  # at T 1.0 the sampled reward (15-25 %) stayed far below greedy (30 %): most rollouts were
  # noise the greedy reply never produces
  c.temperature = 0.7
  c.kl = "exact"
  c.kl_coef = 0.05
  c.lr = 2e-3
  c.schedule = "cosine"
  c.eval_every = 8
  c.eval_size = 64
  c.test_size = 0  # all 200 test problems
  return c
