"""Expert.from_official against files laid out as SakanaAI/self-adaptive-llms writes them."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import t2jax
from t2jax import svf
from t2jax.svf import SVFError
from t2jax.targets import DEFAULT_TARGETS


pytestmark = pytest.mark.usefixtures("private_cache")


class _Policy(torch.nn.Module):
  """The saved layout of the official policy/base.Policy: z as an nn.ParameterList."""

  def __init__(self, vectors):
    super().__init__()
    self.learnable_params_module_list = torch.nn.ParameterList(
        [torch.nn.Parameter(v) for v in vectors])


def _official_z(torch_model, seed=0) -> dict[str, torch.Tensor]:
  """z per matrix as the official code builds it: state_dict order, names containing "mlp",
  length min(W.shape), bf16; distinct random values so any misordering shows."""
  gen = torch.Generator().manual_seed(seed)
  return {k: torch.randn(min(v.shape), generator=gen).to(torch.bfloat16)
          for k, v in torch_model.state_dict().items() if "mlp" in k}


def _save_policy(path, vectors):
  torch.save(_Policy(list(vectors)).state_dict(), path)
  return str(path)


def _save_legacy(path, z):
  torch.save({k: torch.nn.Parameter(v) for k, v in z.items()}, path)
  return str(path)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_3_layers"])
def test_both_official_formats_give_the_same_expert(loaded, tmp_path, name):
  model, torch_model = loaded(name)
  z = _official_z(torch_model)
  # the order the official code numbers them in, written out by hand
  layers = model.config.num_layers
  assert list(z) == [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers)
                     for p in ("gate_proj", "up_proj", "down_proj")]
  want = t2jax.Expert(z={k: v.float().numpy() for k, v in z.items()},
                      fingerprint=model.fingerprint, targets=DEFAULT_TARGETS, rank=None,
                      parametrisation="paper")
  policy = t2jax.Expert.from_official(_save_policy(tmp_path / "policy_params.pt", z.values()),
                                      model)
  legacy = t2jax.Expert.from_official(_save_legacy(tmp_path / "learnable_params.pt", z), model)
  for got in (policy, legacy):
    assert (got.fingerprint, got.targets, got.rank, got.parametrisation) == (
        want.fingerprint, want.targets, want.rank, want.parametrisation)
    assert set(got.z) == set(want.z)
    for k in want.z:
      np.testing.assert_array_equal(got.z[k], want.z[k], err_msg=k)
  assert policy.name == "policy_params.pt" and legacy.name == "learnable_params.pt"


def test_imported_expert_gives_the_official_weights(loaded, tmp_path):
  """W' = U diag(S·m) Vᵀ · ΣS / Σ(S·m), m = sigmoid(z)·max_mult (the official
  utils.compose_new_params with policy/base.Policy.get_mask, max_mult 1 as in its
  cfgs/policy/default.yaml), in float64 torch."""
  model, torch_model = loaded("llama")
  z = _official_z(torch_model, seed=3)
  e = t2jax.Expert.from_official(_save_policy(tmp_path / "policy_params.pt", z.values()), model)
  dec = svf.decompose(model, e.targets, e.rank)
  params = svf.materialise(model.params, dec.factors, e.z_tree(model),
                           parametrisation=e.parametrisation, max_mult=e.max_mult)
  state = torch_model.state_dict()
  for k, zk in z.items():
    u, s, v = torch.svd(state[k].double())
    m = torch.sigmoid(zk.double()) * 1.0
    want = (u @ torch.diag(s * m) @ v.T) * (s.sum() / (s * m).sum())
    layer, proj = int(k.split(".")[2]), k.split(".")[4]
    got = np.asarray(params["layers"][layer]["mlp"][proj]["kernel"]).T
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=0, err_msg=k)


def test_bad_official_files_are_refused_naming_the_file(loaded, tmp_path, monkeypatch):
  model, torch_model = loaded("llama")
  z = _official_z(torch_model)
  vectors = list(z.values())
  few = _save_policy(tmp_path / "few.pt", vectors[:-1])
  with pytest.raises(SVFError, match=rf"{few} holds 5 z vectors.*has 6 MLP matrices"):
    t2jax.Expert.from_official(few, model)
  short = _save_policy(tmp_path / "short.pt", vectors[:2] + [vectors[2][:-1]] + vectors[3:])
  with pytest.raises(SVFError, match=rf"{short}: the z of model.layers.0.mlp.down_proj.weight "
                                     r"has shape \(63,\); .* needs \(64,\)"):
    t2jax.Expert.from_official(short, model)
  legacy_missing = _save_legacy(tmp_path / "legacy.pt", dict(list(z.items())[1:]))
  with pytest.raises(SVFError, match=rf"{legacy_missing} holds 5 z vectors.*missing "
                                     r"\['model.layers.0.mlp.gate_proj.weight'\]"):
    t2jax.Expert.from_official(legacy_missing, model)
  unknown = tmp_path / "unknown.pt"
  torch.save({"adaptive_weights": torch.ones(3, 1)}, unknown)
  with pytest.raises(SVFError, match=rf"{unknown}: keys \['adaptive_weights'\] are neither "
                                     "the official policy_params.pt"):
    t2jax.Expert.from_official(str(unknown), model)
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=rf"official expert {few} needs torch"):
    t2jax.Expert.from_official(few, model)
