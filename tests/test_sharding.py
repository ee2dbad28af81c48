"""The mesh string, the partition-rule table, and the update on a multi-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from t2jax import sharding, svf


def test_parse_mesh():
  assert sharding.parse_mesh("data:-1", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.parse_mesh("data:2,fsdp:-1,tensor:2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(sharding.MeshError, match="needs 4 devices; there are 8"):
    sharding.parse_mesh("data:2,tensor:2", 8)
  with pytest.raises(sharding.MeshError, match="'model:2' is not 'axis:size'"):
    sharding.parse_mesh("model:2", 8)
  with pytest.raises(sharding.MeshError, match="at most one -1"):
    sharding.parse_mesh("data:-1,fsdp:-1", 8)


@pytest.mark.parametrize("name", ["llama", "llama_bias", "llama_mha_tied", "qwen2", "mistral"])
def test_every_param_and_factor_has_a_rule(loaded, name):
  model, _ = loaded(name)
  mesh = sharding.make_mesh("data:-1")
  sharding.tree_shardings(model.params, mesh)  # raises on an unmatched path
  dec = svf.decompose(model, r"(self_attn|mlp)/.*_proj", cache=False, progress=False)
  sharding.tree_shardings(dec.factors, mesh)


def test_unmatched_path_is_an_error():
  mesh = sharding.make_mesh("data:-1")
  with pytest.raises(sharding.MeshError, match="no partition rule matches parameter 'mystery'"):
    sharding.tree_shardings({"mystery": jax.numpy.zeros(3)}, mesh)


_SCRIPT = r"""
import json, sys
import jax, numpy as np
import t2jax
from t2jax import rl, sharding, svf, trainer
model = t2jax.load_model(sys.argv[1])
dec = svf.decompose(model, cache=False, progress=False)
rng = np.random.default_rng(0)
b, g, p, c = 4, 2, 6, 5
batch = rl.Rollouts(prompt_BxP=rng.integers(2, 300, (b, p)).astype(np.int32),
                    prompt_mask_BxP=np.ones((b, p), bool),
                    completion_NxC=rng.integers(2, 300, (b * g, c)).astype(np.int32),
                    completion_mask_NxC=np.ones((b * g, c), bool),
                    reward_N=rng.choice([-1.0, 1.0], b * g).astype(np.float32))
opt = trainer.make_optimizer(name="adam", lr=1e-2, schedule="constant", warmup_steps=0,
                             total_steps=2, weight_decay=0.0, grad_clip=1.0)
out = {}
for spec in ("data:1,fsdp:1,tensor:1", "data:2,fsdp:2,tensor:2"):
  devices = jax.devices()[: 1 if spec.startswith("data:1") else 8]
  mesh = sharding.make_mesh(spec, devices)
  params = jax.device_put(model.params, sharding.tree_shardings(model.params, mesh))
  factors = jax.device_put(dec.factors, sharding.tree_shardings(dec.factors, mesh))
  step = trainer.make_step_fn(mesh, params, factors, cfg=model.config,
                              settings=rl.RLSettings(baseline="leave_one_out"), optimizer=opt)
  state = jax.device_put(trainer.init_state(t2jax.Expert.init(model).z_tree(model), opt, 0),
                         sharding.replicated(mesh))
  for _ in range(2):
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)),
                          params, factors)
  out[spec] = [np.asarray(x).tolist() for x in jax.tree.leaves(state.z)]
print(json.dumps(out))
"""


def test_update_on_an_8_device_mesh_equals_one_device(checkpoint):
  path, _ = checkpoint("llama")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _SCRIPT, path], capture_output=True, text=True,
                       env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  import numpy as np  # pylint: disable=import-outside-toplevel

  one, eight = got["data:1,fsdp:1,tensor:1"], got["data:2,fsdp:2,tensor:2"]
  moved = max(np.abs(np.asarray(a) - 1).max() for a in one)
  assert moved > 1e-3
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a, b, atol=1e-5)
