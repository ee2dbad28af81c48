"""SVF expert for four-option reasoning questions on the embedded default model: unit
conversions, orderings from comparisons, syllogisms over nonsense words, days of the week, one
comparison read either way, the largest or smallest of four numbers, opposites, and everyday
knowledge (what a tool is for, animal sounds and young, colours: tasks/reasoning_facts.py, the
stand-in for ARC-Easy's grade-school facts). The last family, odd_one_out, is held out of
training (and of cls's prompts): it is the unseen reasoning target of configs/adapt.py.

  python -m t2jax.train --config configs/reasoning.py [--workdir runs/reasoning] [--config.steps=64]

The reply writes its choice out ("The answer is 42."), options shown as a plain list. With
options labelled (A)-(D) and the letter asked for, this 135M model answered at chance on every
family, even "What is 12 + 7?" (15 % of 48) and "Which number is the smallest?" (25 %), while the
option text it would write is right more often (smallest 48 %, opposites 62 %): it cannot tie a
letter to the option it means, so a reward on letters had nothing to reinforce and the expert
drifted (val 28 → 12 % in 5 steps, and at best learnt to always say "C"). The reply is
prefilled with "The answer is" so that every rollout is short and names something.

Reward {0, 1}. A third level, −1 for naming no option (task_args.reward_no_choice), with
rollouts at T 0.7 taught the model to name an option, any option: after 16 steps it named one
in 97 % of test replies but chose at chance, and opposites fell from 35 to 18 of 50.

Measured (runs/paper, 256 test records, greedy): base 18.4 %, expert 28.9 % (+10.5; z of
step 32, the best of eight val checks). What held the earlier recipes back (7 procedural
families, 32 steps: 30.5 → 34.4 %) was that the model mostly could not do the procedures and
RL had little to reinforce. The base model names no option in 107 of 256 replies: it echoes
the prefix ('"The answer is "The answer is'), or names the object instead of its colour.
The expert names no option in 49, and nearly all of the gain is there, on the fact families
(what a tool is for 1 → 10 of 22, animal sounds 2 → 8 of 27). The procedural ones barely
moved (ordering 5 → 9 of 23, extremes 11 → 9 of 36). The fact families lower the base score
too: they are where it loops most. Val has 64 records and is noisy: it read 20.3 % at step 24,
when the z of step 20 scored 28.5 % on test.
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "reasoning"
  # odd_one_out is held out: the unseen reasoning target of configs/adapt.py
  c.task_args.kinds = ("colours,comparison,conversion,extremes,opposite,ordering,sounds,"
                       "syllogism,uses,weekday,young")
  c.task_args.answer_format = "text"
  c.task_args.answer_prefix = "The answer is"
  # short: the template's own system prompt is 20 tokens, and the longest prompt must stay
  # within 128 (one prompt bucket; rollouts prefill each prompt once per sample)
  c.task_args.system_prompt = "Answer the question."
  c.steps = 64
  c.batch_size = 16
  c.samples_per_prompt = 4
  # the longest option ("Some bloox are gruz.") and its full stop fit in 12 tokens
  c.max_new_tokens = 12
  c.temperature = 1.0
  c.kl = "exact"
  c.kl_coef = 0.05
  c.lr = 2e-3
  c.schedule = "cosine"
  c.eval_every = 8
  c.eval_size = 64
  c.test_size = 0  # all 200 test problems
  return c
