"""LoRA (t2jax/lora.py) pinned against PEFT on tiny HF models: logits, loss and gradients;
the artefact, its parameter count, init = base, and LoRA runs of the trainer (rl and sft)."""

from __future__ import annotations

import copy
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
from conftest import tiny_config
from t2jax import adapters, lora, rl, targets
from t2jax.models import llama
from t2jax.svf import SVFError
from t2jax.train import train

ALL_PROJ = r"(self_attn|mlp)/\w+_proj"


def _ids(model, b=3, t=9, seed=0):
  return np.random.default_rng(seed).integers(0, model.config.vocab_size, (b, t))


def _trained(expert: lora.LoRAExpert, seed: int = 1) -> lora.LoRAExpert:
  """The expert with B drawn too (B = 0 at init makes every LoRA the base model)."""
  rng = np.random.default_rng(seed)
  factors = {k: {"a": f["a"], "b": (0.5 * rng.standard_normal(f["b"].shape)).astype(np.float32)}
             for k, f in expert.factors.items()}
  return dataclasses.replace(expert, factors=factors, name="trained")


def _peft(torch_model, expert: lora.LoRAExpert, tmp_path):
  """A copy of the torch model (PEFT injects its modules in place; the fixture's model is
  shared) with `expert` loaded by PEFT from the directory t2jax saved, A and B trainable."""
  import peft  # pylint: disable=import-outside-toplevel

  path = str(tmp_path / "adapter")
  expert.save(path)
  return peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), path,
                                        is_trainable=True).eval()


def test_init_is_the_base_model_exactly(loaded):
  model, _ = loaded("llama")
  fresh = lora.LoRAExpert.init(model, targets=ALL_PROJ, rank=4, seed=3)
  ids = _ids(model)
  np.testing.assert_array_equal(np.asarray(model.logits(ids, fresh)), np.asarray(model.logits(ids)))
  # the unmerged modules too, dropout on: B = 0 leaves nothing for it to act on (another
  # program than the plain forward, so equal up to the order XLA sums in)
  tree = jax.tree.map(jnp.asarray, fresh.tree(model))
  ad = lora.Adapters(factors=tree, key=jax.random.key(0), scale=fresh.scale, dropout=0.5)
  got = llama.full_logits(model.params, jnp.asarray(ids), jnp.ones(ids.shape, bool),
                          cfg=model.config, adapters=ad)
  np.testing.assert_allclose(np.asarray(got), np.asarray(model.logits(ids)), atol=1e-5, rtol=0)


def test_parameter_count_is_rank_times_in_plus_out(loaded):
  model, _ = loaded("llama")
  cfg = model.config
  d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, \
      cfg.num_kv_heads * cfg.head_dim
  for regex, per_layer in ((None, (d + f) * 2 + (f + d)),  # gate, up: d→f; down: f→d
                           (r"self_attn/(q|v)_proj", (d + q) + (d + kv))):
    e = lora.LoRAExpert.init(model, targets=regex, rank=8)
    assert e.num_params == 8 * per_layer * cfg.num_layers
    a = e.factors["model.layers.1.mlp.down_proj.weight"]["a"] if regex is None else \
        e.factors["model.layers.1.self_attn.v_proj.weight"]["a"]
    assert a.shape[-1] == 8
    assert max(np.abs(x["b"]).max() for x in e.factors.values()) == 0.0
    # PEFT's kaiming-uniform bound for A: 1/sqrt(fan_in)
    assert 0.5 / np.sqrt(a.shape[0]) < np.abs(a).max() <= 1.0 / np.sqrt(a.shape[0])


@pytest.mark.parametrize("name", ["llama", "llama_bias"])
def test_logits_equal_peft_with_the_saved_adapter(loaded, name, tmp_path):
  model, torch_model = loaded(name)
  e = _trained(lora.LoRAExpert.init(model, targets=ALL_PROJ, rank=4, alpha=8.0))
  ids = _ids(model)
  with torch.no_grad():
    want = _peft(torch_model, e, tmp_path)(torch.tensor(ids)).logits.numpy()
  merged = np.asarray(model.logits(ids, e))
  np.testing.assert_allclose(merged, want, atol=1e-4, rtol=0)
  # the unmerged modules (the training forward, dropout off) give the same logits
  ad = lora.Adapters(factors=jax.tree.map(jnp.asarray, e.tree(model)), scale=e.scale)
  unmerged = llama.full_logits(model.params, jnp.asarray(ids), jnp.ones(ids.shape, bool),
                               cfg=model.config, adapters=ad)
  np.testing.assert_allclose(np.asarray(unmerged), want, atol=1e-4, rtol=0)
  assert np.abs(merged - np.asarray(model.logits(ids))).max() > 1e-2  # the adapter matters


def test_sft_loss_and_gradient_equal_peft(loaded, tmp_path):
  """Next-token NLL of reference completions: t2jax's loss and d loss / d(A, B) against
  torch autograd through PEFT (dropout off in both)."""
  model, torch_model = loaded("llama")
  e = _trained(lora.LoRAExpert.init(model, rank=4, alpha=8.0))
  rng = np.random.default_rng(5)
  b, p, c = 2, 5, 4
  prompt = rng.integers(0, model.config.vocab_size, (b, p)).astype(np.int32)
  completion = rng.integers(0, model.config.vocab_size, (b, c)).astype(np.int32)
  mask = np.ones((b, c), bool)
  mask[1, 3:] = False
  batch = rl.Rollouts(prompt_BxP=prompt, prompt_mask_BxP=np.ones((b, p), bool),
                      completion_NxC=completion, completion_mask_NxC=mask,
                      reward_N=np.zeros(b, np.float32))
  settings = rl.RLSettings(adapter="lora", objective="sft", lora_scale=e.scale)
  tree = jax.tree.map(jnp.asarray, e.tree(model))
  (loss, _), grads = jax.value_and_grad(rl.loss_fn, has_aux=True)(
      tree, model.params, None, batch, cfg=model.config, settings=settings)

  peft_model = _peft(torch_model, e, tmp_path)
  seq = torch.tensor(np.concatenate([prompt, completion], 1), dtype=torch.long)
  logits = peft_model(seq).logits[:, p - 1:-1]  # position t predicts completion token t
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).long()[..., None])[..., 0]
  m = torch.tensor(mask)
  want = -(logp * m).sum() / m.sum()
  want.backward()
  np.testing.assert_allclose(float(loss), float(want.detach()), rtol=1e-5)
  named = dict(peft_model.named_parameters())
  for k in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
    layer, block, name = int(k.split(".")[2]), k.split(".")[3], k.split(".")[4]
    peft_key = f"base_model.model.{k.removesuffix('.weight')}"
    g_a = named[f"{peft_key}.lora_A.default.weight"].grad.numpy().T
    g_b = named[f"{peft_key}.lora_B.default.weight"].grad.numpy().T
    np.testing.assert_allclose(np.asarray(grads[layer][block][name]["a"]), g_a, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grads[layer][block][name]["b"]), g_b, atol=2e-5)
    assert np.abs(g_a).max() > 1e-4 and np.abs(g_b).max() > 1e-4


def test_dropout_draws_from_its_key_and_only_on_the_lora_input(loaded):
  model, _ = loaded("llama")
  e = _trained(lora.LoRAExpert.init(model, rank=4))
  ids = jnp.asarray(_ids(model))
  tree = jax.tree.map(jnp.asarray, e.tree(model))
  run = lambda key, rate: np.asarray(llama.full_logits(
      model.params, ids, jnp.ones(ids.shape, bool), cfg=model.config,
      adapters=lora.Adapters(factors=tree, key=key, scale=e.scale, dropout=rate)))
  k0, k1 = jax.random.key(0), jax.random.key(1)
  np.testing.assert_array_equal(run(k0, 0.3), run(k0, 0.3))
  assert np.abs(run(k0, 0.3) - run(k1, 0.3)).max() > 1e-3
  assert np.abs(run(k0, 0.3) - run(None, 0.3)).max() > 1e-3
  np.testing.assert_array_equal(run(None, 0.3), run(k0, 0.0))  # no key or rate 0: no dropout


def test_lora_modules_hold_a_and_b_as_the_only_params(loaded):
  model, _ = loaded("llama")
  e = lora.LoRAExpert.init(model, rank=4)
  m = lora.apply(llama.Llama.from_params(model.config, model.params),
                 jax.tree.map(jnp.asarray, e.tree(model)), scale=e.scale)
  flat = nnx.to_flat_state(nnx.state(m, nnx.Param))
  names = {targets.hf_module_name(p[2], p[3], int(p[1])) for p, _ in flat}
  assert names == set(e.factors) and {p[-1] for p, _ in flat} == {"a", "b"}
  with pytest.raises(SVFError, match="not a plain Linear"):
    lora.apply(m, jax.tree.map(jnp.asarray, e.tree(model)), scale=e.scale)


def test_save_load_round_trip_and_refusals(loaded, tmp_path):
  model, _ = loaded("llama")
  e = _trained(lora.LoRAExpert.init(model, rank=4, alpha=8.0, dropout=0.1))
  path = str(tmp_path / "lora")
  e.save(path)
  back = t2jax.load_expert(path)
  assert isinstance(back, lora.LoRAExpert)
  assert (back.rank, back.alpha, back.dropout, back.targets) == (4, 8.0, 0.1, e.targets)
  for k in e.factors:
    np.testing.assert_array_equal(back.factors[k]["a"], e.factors[k]["a"])
    np.testing.assert_array_equal(back.factors[k]["b"], e.factors[k]["b"])
  with open(os.path.join(path, "adapter_config.json")) as f:
    assert json.load(f)["r"] == 4
  with pytest.raises(SVFError, match="LoRA expert: load it with t2jax.load_expert"):
    t2jax.Expert.load(path)
  with pytest.raises(SVFError, match="was made for model"):
    dataclasses.replace(e, fingerprint="0" * 16).check(model)
  with pytest.raises(SVFError, match="LoRA rank must be >= 1"):
    lora.LoRAExpert.init(model, rank=0)
  with pytest.raises(SVFError, match="one for the whole batch"):
    model.logits(_ids(model, b=2), [e, None])
  with open(os.path.join(path, "adapter_model.safetensors"), "r+b") as f:
    f.truncate(40)
  with pytest.raises(SVFError, match="damaged or incomplete"):
    t2jax.load_expert(path)


def _factors(workdir: str) -> dict:
  return t2jax.load_expert(os.path.join(workdir, "expert")).factors


def test_a_lora_run_resumes_bitwise_and_its_expert_scores(chat_model_dir, tmp_path):
  """rl with dropout on: the masks are a function of the run's key and the step."""
  kw = dict(adapter="lora", lora_rank=4, lora_dropout=0.1, lr=5e-2)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(tiny_config(chat_model_dir, **kw), straight, progress=False)
  train(tiny_config(chat_model_dir, steps=2, **kw), resumed, progress=False)
  train(tiny_config(chat_model_dir, **kw), resumed, progress=False)
  a, b = _factors(straight), _factors(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k]["a"], b[k]["a"])
    np.testing.assert_array_equal(a[k]["b"], b[k]["b"])
  assert max(np.abs(f["b"]).max() for f in a.values()) > 1e-4  # training moved B
  with pytest.raises(ValueError, match="lora_rank"):  # another rank cannot continue it
    train(tiny_config(chat_model_dir, **{**kw, "lora_rank": 8}), resumed, progress=False)


def test_sft_lowers_the_reference_nll_and_microbatches_give_the_same_update(chat_model_dir,
                                                                            tmp_path):
  from t2jax import reporting, run_setup, trainer  # pylint: disable=import-outside-toplevel

  kw = dict(adapter="lora", objective="sft", lora_rank=4, lora_dropout=0.0, lr=1e-1, steps=6,
            max_new_tokens=8, batch_size=4)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  train(tiny_config(chat_model_dir, **kw), one, progress=False)
  train(tiny_config(chat_model_dir, microbatches=2, **kw), two, progress=False)
  lines = reporting.read_metrics(os.path.join(one, "metrics.jsonl"))
  assert [d["step"] for d in lines if d["kind"] == "train"] == list(range(1, 7))
  # the NLL of a fixed batch of train references, before and after
  setup = run_setup.prepare(tiny_config(chat_model_dir, **kw))
  recs = setup.task.records("train")[:8]
  prompts, refs = setup.encode(recs), setup.references(recs)
  batch = trainer.reference_batch(prompts, refs, pad_id=setup.model.pad_id,
                                  prompt_len=max(map(len, prompts)), max_new=8)
  nll = lambda tree: float(rl.loss_fn(jax.tree.map(jnp.asarray, tree), setup.model.params, None,
                                      batch, cfg=setup.model.config,
                                      settings=run_setup.rl_settings(setup.cfg))[0])
  before = nll(setup.init_trainable())
  after = nll(setup.load_expert(os.path.join(one, "expert")))
  assert after < before - 0.2, (before, after)
  a, b = _factors(one), _factors(two)
  for k in a:
    np.testing.assert_allclose(a[k]["b"], b[k]["b"], atol=2e-5)


def test_sft_needs_references_and_svf_sft_trains_z(chat_model_dir, tmp_path, monkeypatch):
  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "svf_sft")
  train(tiny_config(chat_model_dir, objective="sft", steps=2, lr=5e-2), workdir, progress=False)
  z = t2jax.Expert.load(os.path.join(workdir, "expert")).z
  assert max(np.abs(v - 1.0).max() for v in z.values()) > 1e-4
  setup = run_setup.prepare(tiny_config(chat_model_dir, objective="sft"))
  records = setup.task.records("train")[:3]
  monkeypatch.setattr(type(setup.task), "reference",
                      lambda self, rec: None if rec is records[1] else "4")
  with pytest.raises(run_setup.ConfigValueError, match="1 of 3 math train records"):
    setup.references(records)
  with pytest.raises(run_setup.ConfigValueError, match="config.objective"):
    run_setup.check_config(tiny_config(chat_model_dir, objective="dpo"))
  with pytest.raises(run_setup.ConfigValueError, match="config.lora_"):
    run_setup.check_config(tiny_config(chat_model_dir, adapter="lora", lora_dropout=1.0))


def test_trainable_like_matches_the_trees_a_run_builds(loaded):
  model, _ = loaded("llama")
  cfg = tiny_config("unused", adapter="lora", lora_rank=4, targets=ALL_PROJ)
  like = adapters.trainable_like(cfg, model.params, None)
  real = lora.LoRAExpert.init(model, targets=ALL_PROJ, rank=4).tree(model)
  assert jax.tree.map(np.shape, like) == jax.tree.map(np.shape, real)
  stacked = adapters.trainable_like(cfg, llama.stack_layers(model.params), None)
  assert stacked["mlp"]["up_proj"]["a"].shape == (model.config.num_layers,
                                                  model.config.hidden_size, 4)
