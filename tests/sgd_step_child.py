"""`python tests/sgd_step_child.py MODEL_DIR MESH[/K] ...`: one plain SGD update (lr 1, no
clipping) of the factory's program on a fixed batch, per mesh string (K microbatches, default
1), and the same step computed unsharded with jax.grad of rl.loss_fn as the reference.

Prints one JSON line (process 0): {"reference" | "MESH/K": {"loss", "grad_norm", "z"}}. With
lr 1, z = z0 − gradient: a gradient scaled by anything (the device or process count) shows in
z and grad_norm. Rewards differ within every group, so the advantages, and the gradient, are
not float noise. As one of several processes (launch/local_multiprocess.sh) each process
passes its own rows of the batch, as training does. `assert_same_step` is the tests'
comparison.
"""

from __future__ import annotations

import json
import math
import sys

import chex
import jax
import numpy as np
import optax

import t2jax
from t2jax import config_defaults, distributed, programs, rl, run_setup, sharding, svf


def rollouts(b: int = 8, g: int = 2, p: int = 6, c: int = 5) -> rl.Rollouts:
  rng = np.random.default_rng(0)
  prompt_mask = np.arange(p)[None] >= rng.integers(0, 3, (b, 1))  # left padding
  completion_mask = np.arange(c)[None] < rng.integers(2, c + 1, (b * g, 1))  # early stops
  return rl.Rollouts(
      prompt_BxP=np.where(prompt_mask, rng.integers(2, 300, (b, p)), 0).astype(np.int32),
      prompt_mask_BxP=prompt_mask,
      completion_NxC=np.where(completion_mask, rng.integers(2, 300, (b * g, c)), 0
                              ).astype(np.int32),
      completion_mask_NxC=completion_mask,
      reward_N=rng.normal(size=b * g).astype(np.float32))  # distinct within each group


def local_rows(batch: rl.Rollouts, mesh) -> rl.Rollouts:
  """This process's prompts and their G completions each."""
  b = batch.prompt_BxP.shape[0]
  index, count = sharding.process_rows(mesh, b)
  take = lambda x: x[index * len(x) // count:(index + 1) * len(x) // count]
  return jax.tree.map(take, batch)


def step(model, dec, cfg, batch: rl.Rollouts, spec: str, k: int) -> dict:
  sizes = [int(part.split(":")[1]) for part in spec.split(",")]
  devices = jax.devices()[:len(jax.devices()) if -1 in sizes else math.prod(sizes)]
  mesh = sharding.make_mesh(spec, devices)
  cfg.microbatches = k
  b, p = batch.prompt_BxP.shape
  n, c = batch.completion_NxC.shape
  progs = programs.build(cfg, model.config, model.params, dec.factors, mesh=mesh,
                         shapes=programs.Shapes(batch=b, samples=n // b, prompt_len=p,
                                                max_new=c),
                         eos_ids=model.eos_ids)
  _, _, params_sh, factors_sh = progs.update.in_shardings
  state = progs.init_state(t2jax.Expert.init(model).z_tree(model), 0)
  state, metrics = progs.update(state, sharding.global_batch(local_rows(batch, mesh), mesh),
                                jax.device_put(model.params, params_sh),
                                jax.device_put(dec.factors, factors_sh))
  return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
          "z": [np.asarray(x).tolist() for x in jax.tree.leaves(state.z)]}


def reference(model, dec, cfg, batch: rl.Rollouts) -> dict:
  z0 = t2jax.Expert.init(model).z_tree(model)
  (loss, _), grads = jax.value_and_grad(rl.loss_fn, has_aux=True)(
      z0, model.params, dec.factors, batch, cfg=model.config, settings=run_setup.rl_settings(cfg))
  z = jax.tree.map(lambda z, g: z - cfg.lr * g, z0, grads)
  return {"loss": float(loss), "grad_norm": float(optax.tree.norm(grads)),
          "z": [np.asarray(x).tolist() for x in jax.tree.leaves(z)]}


def assert_same_step(got: dict, want: dict) -> None:
  """Loss, gradient norm and z after one SGD step of lr 1 (z0 − gradient): tight enough that
  a gradient off by a factor (2, a device or process count) fails all three."""
  assert want["grad_norm"] > 0.05  # the gradient is not float noise: z moves by it
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  chex.assert_trees_all_close([np.asarray(a) for a in got["z"]],
                              [np.asarray(a) for a in want["z"]], rtol=0, atol=2e-6)


def main(model_dir: str, *meshes: str) -> None:
  distributed.initialize()
  model = t2jax.load_model(model_dir)
  dec = svf.decompose(model, cache=False, progress=False)
  cfg = config_defaults.base_config()
  cfg.update(dict(optimizer="sgd", lr=1.0, schedule="constant", warmup_steps=0, steps=1,
                  grad_clip=0.0, baseline="leave_one_out"))
  batch = rollouts()
  out = {"reference": reference(model, dec, cfg, batch)}
  for arg in meshes:
    spec, _, k = arg.partition("/")
    out[arg] = step(model, dec, cfg, batch, spec, int(k or 1))
  if jax.process_index() == 0:
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
