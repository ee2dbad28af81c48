"""SVF expert for writing small Python functions (procedural problems, unit tests run in the
sandbox) on the embedded default model.

  python -m t2jax.train --config configs/code.py [--workdir runs/code] [--config.steps=40]
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.task = "code"
  c.task_args.max_level = 1  # one-liners (sums, maps, counts, clips): base model ~40 % greedy
  c.task_args.timeout_s = 5.0  # per program: the reference solutions run in well under 0.1 s
  c.task_args.unsafe_sandbox = False  # True runs model code without isolation (no bubblewrap)
  c.steps = 40
  c.batch_size = 16
  c.samples_per_prompt = 4
  c.max_new_tokens = 128  # a fenced one- to five-line function; raise it for max_level 2-3
  # the update's [rows, tokens, vocab] logits in 4 slices: at batch 16 in one slice the run
  # reached 23 GB host memory on a 24 GB machine; 4 slices at batch 8 stayed near 8 GB
  c.microbatches = 4
  c.temperature = 0.6
  c.kl = "exact"
  c.kl_coef = 0.01
  c.lr = 5e-3
  c.schedule = "cosine"
  c.eval_every = 10
  c.eval_size = 128
  c.test_size = 0  # all 200 test problems
  return c
