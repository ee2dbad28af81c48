"""Every key a training config has, with its default and meaning. Config files in configs/
start from `base_config()` and set what their recipe changes, so a key is defined once."""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections


def config_module(path: str) -> types.ModuleType:
  """A config file (configs/*.py) loaded by path, as config_flags loads it: the configs
  directory is not a package, and one config may build on another's get_config()."""
  name = "t2jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f"{path}: not a Python config file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # model
  c.model = ""  # "" = the embedded SmolLM2-135M-Instruct; or an HF directory / .gguf file
  c.dtype = "float32"
  # task
  c.task = "math"  # math | gsm8k | code | humaneval | mbpp | reasoning | arc | cls
  c.task_args = ml_collections.ConfigDict()  # keyword arguments of the task (see t2jax/tasks)
  # what is trained (t2jax/adapters.py) and on what objective
  c.adapter = "svf"  # svf (z rescales singular values) | lora (the paper's baseline)
  c.objective = "rl"  # rl (REINFORCE + KL, below) | sft (next-token NLL on the task's references)
  c.targets = ""  # regex over "layers/<block>/<name>"; "" = MLP gate/up/down (official)
  # SVF
  c.rank = 0  # 0 = full rank (the paper's SVF)
  c.parametrisation = "scale"  # scale (f(z) = z) | paper (sigmoid · max_mult, norm kept)
  c.max_mult = 2.0
  c.init_noise = 0.0
  # LoRA (adapter = "lora"): K + (alpha / rank)·A B, dropout on A's input while training
  c.lora_rank = 16
  c.lora_alpha = 32.0
  c.lora_dropout = 0.05
  # RL
  c.steps = 100
  c.batch_size = 16  # prompts per step (global, over all processes)
  c.samples_per_prompt = 4  # G
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.top_p = 1.0
  c.baseline = "leave_one_out"  # none | batch_mean | leave_one_out
  c.kl = "exact"  # off | exact (full-vocabulary KL(π_z‖π_base)) | k3
  c.kl_coef = 0.05
  c.microbatches = 1  # gradient accumulation: the update runs batch_size / this prompts at a time
  c.remat = False  # recompute each decoder layer in the update's backward pass (less memory)
  c.scan_layers = "auto"  # auto (scan on TPU/GPU, unroll on CPU) | True | False: llama.scan_enabled
  c.logprob_norm = "sum"  # sum | mean (length-normalised sequence log-prob)
  # optimizer
  c.optimizer = "adam"  # adam | adamw | sgd (plain: z -= lr · gradient)
  c.lr = 2e-3
  c.schedule = "constant"  # constant | cosine | linear
  c.warmup_steps = 0
  c.weight_decay = 0.0
  c.grad_clip = 1.0  # global-norm clip; 0 = off
  # evaluation, checkpoints, mesh
  c.eval_every = 10  # steps; 0 = never (the test split is still scored at the end)
  c.eval_size = 128  # val records per evaluation (0 = all)
  c.test_size = 0  # test records scored at the end (0 = all)
  c.eval_batch_size = 64
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.checkpoint_dir = ""  # "" = WORKDIR/checkpoints; a gs:// path on a pod (shared by workers)
  c.mesh = "data:-1,fsdp:1,tensor:1"
  c.seed = 0
  return c
