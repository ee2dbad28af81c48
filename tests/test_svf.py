"""SVF algebra, compute modes and expert artefacts, pinned against numpy and HF torch."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import t2jax
from t2jax import expert as expert_lib
from t2jax import svf
from t2jax import targets as targets_lib
from t2jax.models import llama
from t2jax.svf import SVFError

ALL_PROJ = r"(self_attn|mlp)/\w+_proj"


pytestmark = pytest.mark.usefixtures("private_cache")


def _ids(model, b=3, t=11, seed=0):
  return np.random.default_rng(seed).integers(0, model.config.vocab_size, (b, t))


def _perturbed(expert, scale=0.3, seed=1):
  rng = np.random.default_rng(seed)
  if expert.parametrisation == "scale":
    z = {k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(np.float32)
         for k, v in expert.z.items()}
  else:
    z = {k: (v + 3 * scale * rng.standard_normal(v.shape)).astype(np.float32)
         for k, v in expert.z.items()}
  return dataclasses.replace(expert, z=z, name="perturbed")


def _numpy_adapted(weight_mxn: np.ndarray, z: np.ndarray, parametrisation: str,
                   max_mult: float, rank: int | None) -> np.ndarray:
  """Independent reference: W' from numpy's SVD of the HF weight."""
  u, s, vt = np.linalg.svd(weight_mxn.astype(np.float64), full_matrices=False)
  r = len(z)
  f = z.astype(np.float64) if parametrisation == "scale" else (
      max_mult / (1 + np.exp(-z.astype(np.float64))))
  s_new = s.copy()
  s_new[:r] = s[:r] * f
  w = (u * s_new) @ vt
  if parametrisation == "paper":
    w = w * (s.sum() / s_new.sum())
  return w


def _hf_with_expert(torch_model, expert):
  """A copy of the HF torch model whose targeted weights are numpy recompositions."""
  import copy  # pylint: disable=import-outside-toplevel

  m = copy.deepcopy(torch_model)
  state = m.state_dict()
  with torch.no_grad():
    for name, z in expert.z.items():
      w = state[name].numpy()
      state[name].copy_(torch.from_numpy(_numpy_adapted(w, z, expert.parametrisation,
                                                        expert.max_mult, expert.rank)))
  return m


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_bias"])
@pytest.mark.parametrize("mode", ["materialised", "factored"])
def test_scale_identity_is_base(loaded, name, mode):
  model, _ = loaded(name)
  ids = _ids(model)
  base = np.asarray(model.logits(ids))
  for targets in (targets_lib.DEFAULT_TARGETS, ALL_PROJ):
    e = t2jax.Expert.init(model, targets=targets)
    out = np.asarray(model.logits(ids, e, svf_mode=mode))
    assert np.abs(out - base).max() <= 1e-4, (targets, np.abs(out - base).max())


@pytest.mark.parametrize("mode", ["materialised", "factored"])
def test_paper_init_is_base(loaded, mode):
  model, _ = loaded("llama")
  ids = _ids(model)
  base = np.asarray(model.logits(ids))
  e = t2jax.Expert.init(model, parametrisation="paper")
  assert np.abs(np.asarray(model.logits(ids, e, svf_mode=mode)) - base).max() <= 1e-3
  # the official init (noise 0.01) moves the model: the knob reproduces it
  noisy = t2jax.Expert.init(model, parametrisation="paper", init_noise=0.01)
  assert np.abs(np.asarray(model.logits(ids, noisy, svf_mode=mode)) - base).max() > 1e-4


@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
@pytest.mark.parametrize("rank", [None, 5])
def test_materialised_kernel_equals_numpy(loaded, parametrisation, rank):
  model, torch_model = loaded("llama")
  e = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ, rank=rank,
                                   parametrisation=parametrisation))
  dec = svf.decompose(model, e.targets, e.rank)
  params = svf.materialise(model.params, dec.factors, e.z_tree(model),
                           parametrisation=parametrisation, max_mult=e.max_mult)
  state = torch_model.state_dict()
  for block, proj in targets_lib.target_modules(model.params, e.targets):
    for layer in range(model.config.num_layers):
      hf = targets_lib.hf_module_name(block, proj, layer)
      want = _numpy_adapted(state[hf].numpy(), e.z[hf], parametrisation, e.max_mult, rank)
      got = np.asarray(params["layers"][layer][block][proj]["kernel"]).T
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
def test_expert_logits_match_hf_with_recomposed_weights(loaded, name, parametrisation):
  model, torch_model = loaded(name)
  e = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ, parametrisation=parametrisation))
  ids = _ids(model)
  with torch.no_grad():
    want = _hf_with_expert(torch_model, e)(torch.from_numpy(ids)).logits.numpy()
  for mode in ("materialised", "factored"):
    got = np.asarray(model.logits(ids, e, svf_mode=mode))
    assert np.abs(got - want).max() <= 1e-4, (mode, np.abs(got - want).max())
  assert np.abs(want - np.asarray(model.logits(ids))).max() > 1e-2  # the expert does something


def test_low_rank_modes_agree(loaded):
  model, _ = loaded("llama_3_layers")
  ids = _ids(model)
  base = np.asarray(model.logits(ids))
  e = t2jax.Expert.init(model, rank=4)
  assert all(v.shape == (4,) for v in e.z.values())
  for mode in ("materialised", "factored"):
    assert np.abs(np.asarray(model.logits(ids, e, svf_mode=mode)) - base).max() <= 1e-4
  p = _perturbed(e)
  a = np.asarray(model.logits(ids, p, svf_mode="materialised"))
  b = np.asarray(model.logits(ids, p, svf_mode="factored"))
  assert np.abs(a - b).max() <= 1e-4 and np.abs(a - base).max() > 1e-3


def test_expert_per_row_equals_rows_alone(loaded):
  model, _ = loaded("llama")
  e1 = _perturbed(t2jax.Expert.init(model), seed=1)
  e2 = _perturbed(t2jax.Expert.init(model), seed=2)
  rows = [e1, None, e2, e1]
  ids = _ids(model, b=4)
  batch = np.asarray(model.logits(ids, rows))
  for i, e in enumerate(rows):
    alone = np.asarray(model.logits(ids[i:i + 1], e))  # materialised when e is given
    assert np.abs(batch[i] - alone[0]).max() <= 1e-4, i


def test_generate_expert_per_row_equals_rows_alone(loaded):
  model, _ = loaded("llama")
  e1 = _perturbed(t2jax.Expert.init(model), seed=3)
  e2 = _perturbed(t2jax.Expert.init(model), seed=4)
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(2, 300, n)) for n in (5, 9, 3)]
  rows = [e1, None, e2]
  batch = t2jax.generate(model, prompts, max_new_tokens=12, experts=rows)
  for i, e in enumerate(rows):
    alone = t2jax.generate(model, prompts[i:i + 1], max_new_tokens=12, experts=e)
    assert batch.token_ids[i] == alone.token_ids[0], i
  shared = t2jax.generate(model, prompts, max_new_tokens=12, experts=e1)
  assert shared.token_ids[0] == batch.token_ids[0]
  assert shared.token_ids != t2jax.generate(model, prompts, max_new_tokens=12).token_ids


@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
def test_gradient_wrt_z_matches_finite_differences(loaded, parametrisation):
  model, _ = loaded("llama")
  e = _perturbed(t2jax.Expert.init(model, parametrisation=parametrisation), scale=0.1)
  dec = svf.decompose(model, e.targets, e.rank)
  ids = jnp.asarray(_ids(model, b=2, t=6))
  weights = jnp.asarray(np.random.default_rng(0).standard_normal(
      (2, 6, model.config.vocab_size)), jnp.float32)

  def loss(z_tree, params):
    p = svf.materialise(params, dec.factors, z_tree, parametrisation=parametrisation,
                        max_mult=e.max_mult)
    logits = llama.full_logits(p, ids, jnp.ones(ids.shape, bool), cfg=model.config)
    return jnp.sum(logits * weights) / 100.0

  z = jax.tree.map(jnp.asarray, e.z_tree(model))
  grad_z, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(z, model.params)
  # targeted kernels sit behind stop_gradient: W, U, V are never differentiated
  assert float(jnp.abs(grad_params["layers"][0]["mlp"]["up_proj"]["kernel"]).max()) == 0.0
  loss_jit = jax.jit(loss)
  rng = np.random.default_rng(0)
  for block, proj in (("mlp", "gate_proj"), ("mlp", "down_proj")):
    for _ in range(2):
      layer, i = int(rng.integers(model.config.num_layers)), int(rng.integers(8))
      eps = 1e-2
      def bump(d, layer=layer, i=i, block=block, proj=proj):
        bumped = [dict(zl) for zl in z]
        bumped[layer][block] = {**z[layer][block],
                                proj: z[layer][block][proj].at[i].add(d)}
        return bumped
      fd = (float(loss_jit(bump(eps), model.params)) -
            float(loss_jit(bump(-eps), model.params))) / (2 * eps)
      g = float(grad_z[layer][block][proj][i])
      assert abs(fd - g) <= 2e-2 * max(1.0, abs(g)), (block, proj, layer, i, fd, g)


def test_decomposition_cache_is_hit(checkpoint, monkeypatch):
  path, _ = checkpoint("llama")
  first = svf.decompose(t2jax.load_model(path), progress=False)
  calls = []
  real = svf._compute_factors
  monkeypatch.setattr(svf, "_compute_factors",
                      lambda *a, **k: calls.append(a[2]) or real(*a, **k))
  again = svf.decompose(t2jax.load_model(path), progress=False)  # a new Model: no memo
  assert not calls
  assert first.modules() == again.modules() == [("mlp", "down_proj"), ("mlp", "gate_proj"),
                                                 ("mlp", "up_proj")]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               first.factors, again.factors)
  # another rank or other targets is another decomposition: computed, never the cached one
  low = svf.decompose(t2jax.load_model(path), rank=3, progress=False)
  attn = svf.decompose(t2jax.load_model(path), r"self_attn/q_proj", progress=False)
  assert calls == [3, None]
  assert low.factors[0]["mlp"]["up_proj"]["s"].shape == (3,)
  assert attn.modules() == [("self_attn", "q_proj")]


def test_save_load_roundtrip(loaded, tmp_path):
  model, _ = loaded("llama")
  e = _perturbed(t2jax.Expert.init(model, parametrisation="paper", rank=6))
  e = dataclasses.replace(e, name="math", metrics={"val_acc": 0.5})
  out = tmp_path / "experts"
  e.save(str(out / "x"))
  back = t2jax.Expert.load(str(out / "x"))
  assert (back.fingerprint, back.targets, back.rank, back.parametrisation, back.name,
          back.max_mult, back.metrics) == (e.fingerprint, e.targets, e.rank, e.parametrisation,
                                           e.name, e.max_mult, e.metrics)
  assert set(back.z) == set(e.z)
  for k in e.z:
    np.testing.assert_array_equal(back.z[k], e.z[k])
  ids = _ids(model)
  np.testing.assert_array_equal(np.asarray(model.logits(ids, back)),
                                np.asarray(model.logits(ids, e)))
  # saving over an existing expert replaces it whole
  e2 = dataclasses.replace(e, name="math2")
  e2.save(str(out / "x"))
  assert t2jax.Expert.load(str(out / "x")).name == "math2"
  assert sorted(os.listdir(out)) == ["x"]  # no temp dirs left behind


def test_mix_is_linear_in_z(loaded):
  model, _ = loaded("llama")
  a = _perturbed(t2jax.Expert.init(model), seed=1)
  b = _perturbed(t2jax.Expert.init(model), seed=2)
  m = t2jax.Expert.mix([a, b], [0.25, 0.75])
  for k in a.z:
    np.testing.assert_allclose(m.z[k], 0.25 * a.z[k] + 0.75 * b.z[k], rtol=1e-6)
  with pytest.raises(SVFError, match="one weight per expert"):
    t2jax.Expert.mix([a, b], [1.0])


def test_mismatched_expert_is_refused(loaded, tmp_path):
  model, _ = loaded("llama")
  other, _ = loaded("qwen2")
  ids = _ids(model)
  foreign = t2jax.Expert.init(other)
  with pytest.raises(SVFError, match="was made for model"):
    model.logits(ids, foreign)
  e = t2jax.Expert.init(model)
  bad_shape = dataclasses.replace(e, z={**e.z, next(iter(e.z)): np.ones(3, np.float32)})
  with pytest.raises(SVFError, match="has shape"):
    t2jax.generate(model, [[1, 2, 3]], max_new_tokens=2, experts=bad_shape)
  missing = dataclasses.replace(e, z=dict(list(e.z.items())[1:]))
  with pytest.raises(SVFError, match="does not cover"):
    model.logits(ids, missing)
  wrong_rank = dataclasses.replace(e, rank=4)
  with pytest.raises(SVFError, match="has shape"):
    model.logits(ids, wrong_rank)
  with pytest.raises(SVFError, match="different SVF spaces"):
    model.logits(ids[:2], [e, t2jax.Expert.init(model, rank=4)])
  with pytest.raises(SVFError, match="entries for"):
    model.logits(ids, [e])
  with pytest.raises(SVFError, match="match no projection"):
    t2jax.Expert.init(model, targets="nothing_here")
  with pytest.raises(FileNotFoundError, match="not an expert directory"):
    t2jax.Expert.load(str(tmp_path))
  with pytest.raises(SVFError, match="needs one expert for the whole batch"):
    model.logits(ids[:2], [e, None], svf_mode="materialised")


def test_materialised_expert_is_memoised(loaded):
  model, _ = loaded("llama_mha_tied")
  e = _perturbed(t2jax.Expert.init(model))
  first = expert_lib.bind(model, e, 2)[0]
  again = expert_lib.bind(model, dataclasses.replace(e), 2)[0]  # same z, new object
  assert first is again


def test_default_model_modes(default_model):
  ids = _ids(default_model, b=2, t=16)
  base = np.asarray(default_model.logits(ids))
  e = t2jax.Expert.init(default_model)
  assert len(e.z) == 90 and all(v.shape == (576,) for v in e.z.values())
  for mode in ("materialised", "factored"):
    assert np.abs(np.asarray(default_model.logits(ids, e, svf_mode=mode)) - base).max() <= 1e-3


# ------------------------------------------------------------------ SVF as a module transform

def _svf_module(model, expert, mode="materialised", z=None):
  dec = svf.decompose(model, expert.targets, expert.rank)
  m = llama.Llama.from_params(model.config, model.params)
  return svf.apply(m, factors=dec.factors, z=z if z is not None else expert.z_tree(model),
                   parametrisation=expert.parametrisation, max_mult=expert.max_mult, mode=mode)


@pytest.mark.parametrize("targets,rank", [(targets_lib.DEFAULT_TARGETS, None), (ALL_PROJ, 4)])
def test_apply_leaves_z_as_the_only_param(loaded, targets, rank):
  """nnx.state(model, nnx.Param) after svf.apply is exactly the expert's z: one leaf per
  targeted matrix, named by HF parameter name like Expert.z; everything else is Frozen."""
  model, _ = loaded("llama_bias")
  e = _perturbed(t2jax.Expert.init(model, targets=targets, rank=rank))
  m = _svf_module(model, e)
  z_state = nnx.state(m, nnx.Param)
  assert len(jax.tree.leaves(z_state)) == len(e.z)
  got = targets_lib.hf_from_state(z_state)
  assert set(got) == set(e.z)
  for k, v in e.z.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)
  rest = nnx.state(m, nnx.Not(nnx.Param))
  kinds = {type(v) for _, v in nnx.to_flat_state(rest)}
  assert kinds == {llama.Frozen}
  # a fresh apply (no z) starts at the parametrisation's identity
  fresh = svf.apply(llama.Llama.from_params(model.config, model.params), targets=targets,
                    rank=rank)
  fresh_z = targets_lib.hf_from_state(nnx.state(fresh, nnx.Param))
  assert all(np.all(np.asarray(v) == 1.0) for v in fresh_z.values())
  with pytest.raises(SVFError, match="not a plain Linear"):
    svf.apply(m, targets=targets, rank=rank)


@pytest.mark.parametrize("mode", ["materialised", "factored"])
@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
def test_split_program_matches_hf_and_its_gradient_the_functional_one(loaded, mode,
                                                                      parametrisation):
  """A jitted program of (graphdef, frozen state, z), merged inside, gives HF's logits with the
  numpy-recomposed weights, and its gradient in z equals the gradient through
  svf.materialise of the params dict."""
  model, torch_model = loaded("llama")
  e = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ, rank=5,
                                   parametrisation=parametrisation), scale=0.1)
  ids = _ids(model)
  mask = jnp.ones(ids.shape, bool)
  graphdef, frozen, z = nnx.split(_svf_module(model, e, mode), llama.Frozen, nnx.Param)

  @jax.jit
  def logits(frozen, z, ids):
    return llama.model_logits(nnx.merge(graphdef, frozen, z), ids, mask)

  with torch.no_grad():
    want = _hf_with_expert(torch_model, e)(torch.from_numpy(ids)).logits.numpy()
  assert np.abs(np.asarray(logits(frozen, z, ids)) - want).max() <= 1e-4
  weights = jnp.asarray(np.random.default_rng(0).standard_normal(want.shape), jnp.float32)
  grad_state = jax.jit(jax.grad(lambda z: jnp.sum(logits(frozen, z, ids) * weights)))(z)
  dec = svf.decompose(model, e.targets, e.rank)

  def tree_loss(z_tree):
    p = svf.materialise(model.params, dec.factors, z_tree, parametrisation=parametrisation,
                        max_mult=e.max_mult)
    return jnp.sum(llama.full_logits(p, ids, mask, cfg=model.config) * weights)

  grad_tree = jax.jit(jax.grad(tree_loss))(jax.tree.map(jnp.asarray, e.z_tree(model)))
  got = targets_lib.hf_from_state(grad_state)
  for layer, g_layer in enumerate(grad_tree):
    for block, names in g_layer.items():
      for name, g in names.items():
        np.testing.assert_allclose(got[targets_lib.hf_module_name(block, name, layer)], g,
                                   rtol=2e-3, atol=2e-3 * float(jnp.abs(g).max()))


def test_per_row_z_rows_equal_each_row_alone(loaded):
  """Factored mode with z [B, r]: each row gives the logits of its own expert alone (or the
  base model where rows_on is False)."""
  model, _ = loaded("llama")
  a = _perturbed(t2jax.Expert.init(model, rank=6), seed=1)
  b = _perturbed(t2jax.Expert.init(model, rank=6), seed=2)
  rows = [a, b, None]
  trees = [e.z_tree(model) if e is not None else a.z_tree(model) for e in rows]
  z_rows = jax.tree.map(lambda *r: jnp.asarray(np.stack(r)), *trees)
  dec = svf.decompose(model, a.targets, a.rank)
  m = llama.Llama.from_params(model.config, model.params)
  svf.apply(m, factors=dec.factors, z=z_rows, mode="factored",
            rows_on=jnp.asarray([e is not None for e in rows]))
  ids = _ids(model)
  got = np.asarray(jax.jit(llama.model_logits)(m, ids, jnp.ones(ids.shape, bool)))
  for i, e in enumerate(rows):
    alone = np.asarray(model.logits(ids[i:i + 1], e, svf_mode="materialised"))[0]
    assert np.abs(got[i] - alone).max() <= 1e-4, i


@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_z_gradients_equal_unrolled(loaded, parametrisation, remat):
  """The RL loss through W'(z) gives the same value and z gradient with layers stacked under
  lax.scan as unrolled, remat or not; factored rows on a scanned SVF module likewise."""
  from t2jax import rl  # pylint: disable=import-outside-toplevel

  model, _ = loaded("llama_3_layers")
  e = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ, rank=5,
                                   parametrisation=parametrisation), scale=0.1)
  dec = svf.decompose(model, e.targets, e.rank)
  rng = np.random.default_rng(0)
  b, g, p, c = 2, 2, 5, 4
  batch = rl.Rollouts(prompt_BxP=rng.integers(2, 200, (b, p)).astype(np.int32),
                      prompt_mask_BxP=np.ones((b, p), bool),
                      completion_NxC=rng.integers(2, 200, (b * g, c)).astype(np.int32),
                      completion_mask_NxC=np.ones((b * g, c), bool),
                      reward_N=np.asarray([1.0, -1.0, -1.0, 1.0], np.float32))
  settings = rl.RLSettings(parametrisation=parametrisation, max_mult=e.max_mult, remat=remat)
  grad = jax.jit(jax.grad(lambda z, params, factors: rl.loss_fn(
      z, params, factors, batch, cfg=model.config, settings=settings)[0]))
  z = jax.tree.map(jnp.asarray, e.z_tree(model))
  want = grad(z, model.params, dec.factors)
  got = grad(svf.stack_layers(z), llama.stack_layers(model.params),
             svf.stack_layers(dec.factors))
  for a, b_ in zip(jax.tree.leaves(svf.unstack_layers(got)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b_, rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(b_).max())))
  # factored rows on a scanned SVF module
  ids = _ids(model)
  rows = [e, None, e]
  z_rows = jax.tree.map(lambda *r: jnp.asarray(np.stack(r)), *[e.z_tree(model)] * 3)
  on = jnp.asarray([x is not None for x in rows])
  outs = []
  for stack in (False, True):
    m = llama.Llama.from_params(model.config, llama.stack_layers(model.params) if stack
                                else model.params)
    svf.apply(m, factors=svf.stack_layers(dec.factors) if stack else dec.factors,
              z=svf.stack_layers(z_rows) if stack else z_rows, rows_on=on, mode="factored",
              parametrisation=parametrisation, max_mult=e.max_mult)
    outs.append(np.asarray(jax.jit(llama.model_logits)(m, ids, jnp.ones(ids.shape, bool))))
    if stack:  # the Param state of a scanned model still names every matrix of every layer
      assert set(targets_lib.hf_from_state(nnx.state(m, nnx.Param))) == set(e.z)
  np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_an_expert_saved_before_the_nnx_model_loads_and_gives_its_logits(default_model):
  """tests/fixtures/pre_nnx_expert was saved by commit 48879df, before the Flax NNX model,
  beside that code's logits for it (tests/fixtures/make_pre_nnx_expert.py): q_proj at rank 4,
  `paper` z far from init (the logits move by up to 6.3 from base)."""
  with open(os.path.join(FIXTURES, "pre_nnx_logits.json")) as f:
    ref = json.load(f)
  expert = t2jax.Expert.load(os.path.join(FIXTURES, "pre_nnx_expert"))
  logits = np.asarray(default_model.logits([ref["tokens"]], expert))[0]
  np.testing.assert_allclose(logits[:, ref["ids"]], ref["logits"], atol=1e-3)
  assert logits.argmax(-1).tolist() == ref["argmax"]
