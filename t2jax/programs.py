"""The one program factory: the jitted programs of a training step, built for a config, a
model and an explicit mesh.

  update       trainer.train_step: loss, gradient in the trainable tree (SVF z or LoRA factors),
               optimizer (B·G rollouts, or B reference completions for sft); state donated
  materialise  adapters.materialise: the rollout params W' for the current trainable tree
  prefill      sampling.prefill of B·G rows into sampling.cache_length(P, C) cache slots
  decode       sampling.decode: the while loop over C new tokens

Each is a `Program`: the jitted function, its static arguments, and its abstract inputs
(ShapeDtypeStructs carrying the shardings it runs with). train.py calls them on arrays,
t2jax.compile lowers them on the abstract inputs for a TPU topology, bench/rl_step.py and the
tests run the same ones: the fit check measures the step training runs, and nothing else
wires the step by hand.

    progs = programs.build(cfg, model_cfg, params, factors, mesh=mesh, shapes=shapes,
                           eos_ids=eos_ids)
    state = progs.init_state(z_tree)
    state, metrics = progs.update(state, rollouts, params, factors)
    progs.update.lower().compile().memory_analysis()

params and factors may be arrays or ShapeDtypeStructs (t2jax.compile builds nothing), laid out
as the run's layers are (stacked over layers when config.scan_layers scans them); factors is
None for a LoRA run (config.adapter).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t2jax import adapters, rl, run_setup, sampling, sharding, trainer
from t2jax.models import llama
from t2jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The array sizes of one training step."""
  batch: int  # B prompts per step (global)
  samples: int  # G completions per prompt
  prompt_len: int  # P, prompts left-padded to it (a sampling.bucket_length in training)
  max_new: int  # C new tokens per completion

  @property
  def rows(self) -> int:
    return self.batch * self.samples

  @property
  def cache_len(self) -> int:
    return sampling.cache_length(self.prompt_len, self.max_new)

  @classmethod
  def from_config(cls, cfg, prompt_len: int) -> "Shapes":
    """sft scores one reference completion per prompt."""
    samples = 1 if cfg.get("objective", "rl") == "sft" else int(cfg.samples_per_prompt)
    return cls(batch=int(cfg.batch_size), samples=samples, prompt_len=int(prompt_len),
               max_new=int(cfg.max_new_tokens))


@dataclasses.dataclass(frozen=True)
class Program:
  jitted: Any  # a jax.jit-wrapped function
  args: tuple  # abstract inputs: ShapeDtypeStructs with the shardings the program runs with
  static: dict = dataclasses.field(default_factory=dict)  # keyword arguments fixed at build
  out_shardings: Any = None  # of the outputs, as the program pins them

  @property
  def in_shardings(self) -> tuple:
    return jax.tree.map(lambda x: x.sharding, self.args)

  def __call__(self, *args):
    return self.jitted(*args, **self.static)

  def lower(self, *args):
    """Lowered on `args`, by default the abstract inputs (nothing is allocated)."""
    return self.jitted.lower(*(args or self.args), **self.static)


@dataclasses.dataclass(frozen=True)
class Programs:
  update: Program  # (state, rollouts, params, factors) → (state, metrics)
  materialise: Program  # (params, factors, trainable) → params with W'
  prefill: Program  # (model state, tokens, mask, limit, min_new, rng) → DecodeState
  decode: Program  # (model state, DecodeState) → DecodeState
  optimizer: optax.GradientTransformation
  sampler: sampling.Sampler  # the rollouts'
  mesh: Mesh
  shapes: Shapes

  def init_state(self, z_tree, seed: int) -> trainer.TrainState:
    """A fresh TrainState for `z_tree`, placed as the update takes it (replicated): an
    uncommitted state would compile the update a second time."""
    return jax.device_put(trainer.init_state(z_tree, self.optimizer, seed),
                          sharding.replicated(self.mesh))


def optimizer(cfg) -> optax.GradientTransformation:
  return trainer.make_optimizer(
      name=cfg.optimizer, lr=cfg.lr, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
      total_steps=cfg.steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)


def abstract(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed by `shardings` (one
  sharding for every leaf, or a matching tree)."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings),
                      tree)


def rollouts_like(shapes: Shapes, mesh: Mesh) -> rl.Rollouts:
  """Abstract rollouts of a step, rows split over the batch axes as sharding.global_batch
  places them."""
  rows = sharding.batch_sharding(mesh)
  b, n, p, c = shapes.batch, shapes.rows, shapes.prompt_len, shapes.max_new
  spec = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  return rl.Rollouts(prompt_BxP=spec(jnp.int32, b, p), prompt_mask_BxP=spec(jnp.bool_, b, p),
                     completion_NxC=spec(jnp.int32, n, c),
                     completion_mask_NxC=spec(jnp.bool_, n, c), reward_N=spec(jnp.float32, n))


def build(cfg, model_cfg: ModelConfig, params, factors, *, mesh: Mesh, shapes: Shapes,
          eos_ids) -> Programs:
  """The update, materialise, prefill and decode programs of the training run `cfg` (a
  config of t2jax/config_defaults.py) for the model `model_cfg` over `params` and SVD
  `factors`, on `mesh`, for steps of `shapes`. `eos_ids`: where the rollouts stop."""
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params_sh = sharding.tree_shardings(params, mesh)
  factors_sh = sharding.tree_shardings(factors, mesh)
  params_a, factors_a = abstract(params, params_sh), abstract(factors, factors_sh)
  z_a = abstract(adapters.trainable_like(cfg, params, factors), rep)
  opt = optimizer(cfg)
  settings = run_setup.rl_settings(cfg)

  step = functools.partial(
      trainer.train_step, cfg=model_cfg, settings=settings, optimizer=opt,
      num_microbatches=int(cfg.microbatches), mesh=mesh)
  state_a = abstract(jax.eval_shape(lambda z: trainer.init_state(z, opt, cfg.seed), z_a), rep)
  # state and metrics replicated (tiny), rollouts split over the batch axes, params and
  # factors by the partition rules; the old state is donated
  update = Program(
      jax.jit(step, in_shardings=(rep, rows, params_sh, factors_sh), out_shardings=(rep, rep),
              donate_argnums=(0,)),
      (state_a, rollouts_like(shapes, mesh), params_a, factors_a), out_shardings=(rep, rep))

  # W' placed like the base weights it replaces, which is where the sampler reads them
  materialise = Program(
      jax.jit(functools.partial(adapters.materialise, settings=settings),
              in_shardings=(params_sh, factors_sh, rep), out_shardings=params_sh),
      (params_a, factors_a, z_a), out_shardings=params_sh)

  sampler = sampling.Sampler(temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                             eos_ids=tuple(eos_ids))
  graphdef, model_state_a = llama.split_params(model_cfg, params_a)
  pre_static, dec_static = sampling.static_args(graphdef, sampler, shapes.prompt_len,
                                                shapes.max_new, mesh)
  n, p = shapes.rows, shapes.prompt_len
  key = jax.eval_shape(lambda: jax.random.key(0))
  # as sampling.run passes them: rows by global_batch; min_new a Python int and the key
  # uncommitted, so left to the program
  pre_args = (model_state_a, jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=rows),
              jax.ShapeDtypeStruct((n, p), jnp.bool_, sharding=rows),
              jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows),
              jax.ShapeDtypeStruct((), jnp.int32, weak_type=True),
              jax.ShapeDtypeStruct(key.shape, key.dtype))
  decode_state = jax.eval_shape(functools.partial(sampling.prefill, **pre_static), *pre_args)
  state_sh = sampling.state_shardings(decode_state, mesh)  # prefill leaves its state so
  prefill = Program(sampling.prefill, pre_args, pre_static, state_sh)
  decode = Program(sampling.decode, (model_state_a, abstract(decode_state, state_sh)),
                   dec_static, state_sh)
  return Programs(update=update, materialise=materialise, prefill=prefill, decode=decode,
                  optimizer=opt, sampler=sampler, mesh=mesh, shapes=shapes)
