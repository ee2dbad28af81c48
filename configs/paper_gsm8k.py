"""The official Transformer² recipe on GSM8K: MLP targets, `paper` parametrisation, Adam lr
2e-3, grad-norm clip 1e-3, 256 prompts per step, one greedy sample, ±1 reward, no baseline,
KL off. Needs your GSM8K JSONL files and an HF model directory:

  python -m t2jax.train --config configs/paper_gsm8k.py --workdir runs/gsm8k \
      --config.model=/path/to/Meta-Llama-3-8B-Instruct \
      --config.task_args.train_path=/data/gsm8k/train.jsonl \
      --config.task_args.test_path=/data/gsm8k/test.jsonl
"""

from t2jax.config_defaults import base_config


def get_config():
  c = base_config()
  c.model = ""  # set to an HF directory (the paper: Llama-3-8B-Instruct)
  c.task = "gsm8k"
  c.task_args.train_path = ""
  c.task_args.test_path = ""
  c.task_args.val_pct = 10  # val carved out of train (the official code uses test; we don't)
  c.targets = r"mlp/(gate|up|down)_proj"
  c.parametrisation = "paper"
  c.max_mult = 2.0
  c.init_noise = 0.01  # the official init: 0.1 + 0.01·N(0, 1)
  c.optimizer = "adam"
  c.lr = 2e-3
  c.grad_clip = 1e-3
  c.batch_size = 256
  c.samples_per_prompt = 1
  c.temperature = 0.0  # one greedy sample per prompt
  c.baseline = "none"
  c.kl = "off"
  c.logprob_norm = "sum"
  c.max_new_tokens = 512
  c.steps = 200
  c.eval_every = 10
  c.eval_size = 0
  c.checkpoint_every = 10
  return c
