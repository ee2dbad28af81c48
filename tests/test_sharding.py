"""The mesh string, the partition-rule table, and the update on a multi-device mesh."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import pytest

from jax.sharding import PartitionSpec as P

import sgd_step_child

from t2jax import sharding, svf
from t2jax.models import llama


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


def test_stacked_trees_keep_the_layer_axis_whole(loaded):
  """Params, factors and the KV cache stacked for scanned layers get the per-layer rule's
  spec behind an unsplit leading layer axis."""
  model, _ = loaded("llama_bias")
  mesh = sharding.make_mesh("data:-1")
  spec = lambda tree: jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh))
  behind = lambda per_layer: jax.tree.map(lambda s: P(None, *s), per_layer,
                                          is_leaf=lambda x: isinstance(x, P))
  params = spec(model.params)
  stacked = spec(llama.stack_layers(model.params))
  assert stacked["layers"] == behind(params["layers"][0])
  assert stacked["embed_tokens"] == params["embed_tokens"]
  dec = svf.decompose(model, r"(self_attn|mlp)/.*_proj", cache=False, progress=False)
  assert spec(svf.stack_layers(dec.factors)) == behind(spec(dec.factors)[0])
  cache = llama.KVCache.zeros(model.config, 2, 8, jax.numpy.float32)
  one = spec({"cache": cache})["cache"]
  both = spec({"cache": llama.KVCache.zeros(model.config, 2, 8, jax.numpy.float32,
                                            stacked=True)})["cache"]
  assert (both.k, both.v) == (P(None, *one.k[0]), P(None, *one.v[0]))


def test_unmatched_path_is_an_error():
  mesh = sharding.make_mesh("data:-1")
  with pytest.raises(sharding.MeshError, match="no partition rule matches parameter 'mystery'"):
    sharding.tree_shardings({"mystery": jax.numpy.zeros(3)}, mesh)


def _mesh(data=1, fsdp=1, tensor=1):  # spec_for reads only the axis sizes
  return jax.sharding.AbstractMesh((data, fsdp, tensor), sharding.AXES)


def test_an_axis_that_does_not_divide_its_dimension_is_an_error(caplog):
  """k_proj's kernel [64, 32] (2 kv heads of 16) on 3 tensor devices: no silent replication;
  the error names the parameter, its shape, the axis and what to do. A stacked tree counts
  its dimensions from the layer axis. Only the KV cache's kv heads may stay whole (GQA with
  fewer kv heads than tensor devices), and that is logged."""
  kernel = "layers/0/self_attn/k_proj/kernel"
  assert sharding.spec_for(kernel, (64, 32), _mesh(fsdp=2, tensor=4)) == P("fsdp", "tensor")
  with pytest.raises(sharding.MeshError, match=re.escape(
      f"parameter '{kernel}' of shape (64, 32): dimension 1 (32) does not split over mesh "
      f"axis 'tensor' of size 3 (rule '(q|k|v|gate|up)_proj/kernel$' → {P('fsdp', 'tensor')}). "
      "Choose a mesh whose 'tensor' size divides 32, or put a rule")):
    sharding.spec_for(kernel, (64, 32), _mesh(tensor=3))
  with pytest.raises(sharding.MeshError, match=r"of shape \(2, 64, 32\): dimension 1 \(64\) "
                                               r"does not split over mesh axis 'fsdp' of size 3"):
    sharding.spec_for("layers/self_attn/k_proj/kernel", (2, 64, 32), _mesh(fsdp=3))
  with pytest.raises(sharding.MeshError, match=r"dimension 0 \(6\) does not split over mesh "
                                               r"axis \('data', 'fsdp'\) of size 4"):
    sharding.spec_for("cache/k/0", (6, 2, 16, 8), _mesh(data=2, fsdp=2))  # rows never whole
  sharding._log_uneven.cache_clear()  # pylint: disable=protected-access  (logged once a process)
  with caplog.at_level(logging.WARNING, logger="t2jax.sharding"):
    assert (sharding.spec_for("cache/k/0", (4, 2, 16, 8), _mesh(data=2, tensor=4))
            == P(sharding.BATCH, None, None, None))
    assert (sharding.spec_for("cache/v", (3, 4, 2, 8, 16), _mesh(data=2, tensor=4))
            == P(None, sharding.BATCH, None, None, None))
  assert "a dimension of 2 does not split over mesh axis 'tensor' of size 4" in caplog.text


MESHES = ("data:1", "data:2,fsdp:2,tensor:2", "data:2,fsdp:2,tensor:2/2", "fsdp:8", "tensor:8")


def test_sgd_step_on_8_devices_equals_the_unsharded_gradient(checkpoint):
  """The update program on 1 device and on 8 split over data × fsdp × tensor (with and without
  microbatches), against jax.grad of rl.loss_fn on one device (tests/sgd_step_child.py)."""
  path, _ = checkpoint("llama")
  with open(sgd_step_child.__file__) as f:
    got = _run_on_8_devices(f.read(), path, *MESHES)
  for mesh in MESHES:
    sgd_step_child.assert_same_step(got[mesh], got["reference"])


def _run_on_8_devices(script: str, *args: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                       env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


_SAMPLER_SCRIPT = r"""
import json, sys
import jax, numpy as np
import t2jax
from t2jax import sampling, sharding
model = t2jax.load_model(sys.argv[1])
rng = np.random.default_rng(0)
prompts = [rng.integers(2, 300, n).tolist() for n in (5, 9, 3, 7)]
greedy = sampling.Sampler(temperature=0.0, eos_ids=model.eos_ids)
hot = sampling.Sampler(temperature=1.0, eos_ids=model.eos_ids)
out = {}
for spec in ("data:1", "data:2,fsdp:2,tensor:2", "data:1,fsdp:1,tensor:8"):
  mesh = sharding.make_mesh(spec, jax.devices()[:1] if spec == "data:1" else jax.devices())
  params = jax.device_put(model.params, sharding.tree_shardings(model.params, mesh))
  for name, sampler in (("greedy", greedy), ("sampled", hot)):
    tokens, _ = sampling.run(params, prompts, cfg=model.config, sampler=sampler, max_new=12,
                             seed=3, pad_id=0, mesh=mesh)
    out[f"{spec} {name}"] = tokens.tolist()
try:
  sharding.process_rows(sharding.make_mesh("data:4,fsdp:2"), 6)
except sharding.MeshError as e:
  out["error"] = str(e)
print(json.dumps(out))
"""


def test_sampler_on_a_sharded_model_gives_the_same_tokens(checkpoint):
  path, _ = checkpoint("llama")
  got = _run_on_8_devices(_SAMPLER_SCRIPT, path)
  for name in ("greedy", "sampled"):
    one = got[f"data:1 {name}"]
    assert len(one) == 4 and len(one[0]) == 12
    assert got[f"data:2,fsdp:2,tensor:2 {name}"] == one, name
    assert got[f"data:1,fsdp:1,tensor:8 {name}"] == one, name
  assert got["data:1 greedy"] != got["data:1 sampled"]
  assert "a batch of 6 rows does not split over the 8 batch devices" in got["error"]


_RESTORE_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from t2jax import checkpoint, sharding
devices = jax.devices()
state = {"z": jnp.linspace(0.5, 1.5, 24).reshape(2, 12),  # replicated, like TrainState
         "w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8)}  # split 8 ways
mesh8 = sharding.make_mesh("data:-1", devices)
placed = {"z": jax.device_put(state["z"], sharding.replicated(mesh8)),
          "w": jax.device_put(state["w"], NamedSharding(mesh8, P("data")))}
ckpt = checkpoint.Checkpoints(sys.argv[1])
ckpt.save(1, placed, {"next": 1}, {"model": "m"}, "fp")
ckpt.wait()
out = {}
for n in (1, 4):
  mesh = sharding.make_mesh("data:-1", devices[:n])
  like = {"z": jax.device_put(jnp.zeros((2, 12)), sharding.replicated(mesh)),
          "w": jax.device_put(jnp.zeros((8, 8)), NamedSharding(mesh, P("data")))}
  got, data_state = checkpoint.Checkpoints(sys.argv[1]).restore(1, like)
  out[n] = {"equal": all(bool(np.array_equal(got[k], state[k])) for k in state),
            "devices": sorted({len(got[k].sharding.device_set) for k in got}),
            "w_shard_rows": got["w"].addressable_shards[0].data.shape[0], "data": data_state}
print(json.dumps(out))
"""


def test_a_checkpoint_saved_on_8_devices_restores_on_1_and_4(tmp_path):
  got = _run_on_8_devices(_RESTORE_SCRIPT, str(tmp_path / "run"))
  assert got["1"] == {"equal": True, "devices": [1], "w_shard_rows": 8, "data": {"next": 1}}
  assert got["4"] == {"equal": True, "devices": [4], "w_shard_rows": 2, "data": {"next": 1}}


_ROWS_SCRIPT = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from t2jax import sharding
mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
x = jax.device_put(jnp.ones((8, 3)), NamedSharding(mesh, P()))  # replicated rows

def inside(x):
  return sharding.constrain_rows(x * 2, mesh), sharding.constrain_rows(x[:3] * 2, mesh)

rows, odd = jax.jit(inside)(x)
plain = jax.jit(lambda x: sharding.constrain_rows(x * 2, None))(x)
print(json.dumps({"rows": str(rows.sharding.spec), "odd": str(odd.sharding.spec),
                  "plain": str(plain.sharding.spec),
                  "shard_rows": sorted({s.data.shape[0] for s in rows.addressable_shards})}))
"""


def test_activations_are_split_over_the_batch_axes_of_the_mesh_passed():
  got = _run_on_8_devices(_ROWS_SCRIPT)
  # 8 rows over data 2 × fsdp 2: 2 rows on each device (tensor holds copies)
  assert got["rows"] == str(P(("data", "fsdp"))) and got["shard_rows"] == [2]
  # 3 rows do not split 4 ways; without a mesh nothing is constrained
  assert got["odd"] == got["plain"] == str(P())


_FACTORY_SCRIPT = r"""
import json, sys
import jax, numpy as np
import t2jax
from t2jax import config_defaults, programs, sampling, sharding, svf
model = t2jax.load_model(sys.argv[1])
dec = svf.decompose(model, cache=False, progress=False)
mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
cfg = config_defaults.base_config()
cfg.update(dict(batch_size=4, samples_per_prompt=2, max_new_tokens=12, temperature=1.0))
progs = programs.build(cfg, model.config, model.params, dec.factors, mesh=mesh,
                       shapes=programs.Shapes.from_config(cfg, prompt_len=16),
                       eos_ids=model.eos_ids)
lowered = {}  # what sampling.run lowers and runs, as training's rollouts call it

def spy(name, real):
  def call(*args, **kwargs):
    lowered[name] = real.lower(*args, **kwargs).as_text()
    return real(*args, **kwargs)
  return call

sampling.prefill, sampling.decode = spy("prefill", sampling.prefill), spy("decode", sampling.decode)
params = jax.device_put(model.params, sharding.tree_shardings(model.params, mesh))
z = jax.device_put(t2jax.Expert.init(model).z_tree(model), sharding.replicated(mesh))
adapted = progs.materialise(params, jax.device_put(dec.factors, progs.update.in_shardings[3]), z)
rng = np.random.default_rng(0)
prompts = [rng.integers(2, 300, n).tolist() for n in (5, 9, 3, 7, 16, 2, 11, 4)]
sampling.run(adapted, prompts, cfg=model.config, sampler=progs.sampler, max_new=12, seed=1,
             mesh=mesh, prompt_len=16)
print(json.dumps({
    name: lowered[name] == getattr(progs, name).lower().as_text() for name in lowered}))
"""


def test_the_factory_sampler_programs_are_the_ones_rollouts_run(checkpoint):
  """The prefill and decode the program factory hands t2jax.compile lower, on its abstract
  inputs, to exactly the programs sampling.run lowers on a training step's arrays: the same
  static arguments, shapes, dtypes and shardings (decode's input is prefill's output)."""
  path, _ = checkpoint("llama")
  assert _run_on_8_devices(_FACTORY_SCRIPT, path) == {"prefill": True, "decode": True}
