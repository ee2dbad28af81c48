"""t2jax.export: experts merged into HF checkpoints, pinned against transformers loading them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import t2jax
from t2jax import adapt, export, lora, tokenizer
from t2jax.models.config import from_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_PROJ = r"(self_attn|mlp)/\w+_proj"


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:  # SVD factors land here, not in ~/.cache
    mp.setenv("T2JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def _perturbed(expert, seed: int, scale: float = 0.3):
  """z · (1 ± scale): far from the base model, so a wrong merge cannot pass."""
  rng = np.random.default_rng(seed)
  z = {k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(np.float32)
       for k, v in expert.z.items()}
  return dataclasses.replace(expert, z=z, name=f"perturbed{seed}")


def _ids(model, b: int = 3, t: int = 9, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, model.config.vocab_size, (b, t))


def _hf_logits(out: str, ids) -> np.ndarray:
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _run(capsys, *argv) -> tuple[int, str, str]:
  rc = export.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def _tree_digest(path: str) -> dict[str, str]:
  return {name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(path))}


# -------------------------------------------------------------- merged logits vs transformers


def test_svf_expert_export_matches_t2jax(loaded, checkpoint, tmp_path):
  model, _ = loaded("llama")
  path, _ = checkpoint("llama")
  # every projection, ranked: attention kernels are transposed differently from nothing else
  expert = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ, rank=6), seed=1)
  out = export.export(model, expert, str(tmp_path / "out"))
  ids = _ids(model)
  want = np.asarray(model.logits(ids, expert))
  assert _max_diff(want, model.logits(ids)) > 1e-2  # the expert matters
  assert _max_diff(_hf_logits(out, ids), want) <= 1e-4
  assert _max_diff(t2jax.load_model(out).logits(ids), want) <= 1e-4

  assert {"config.json", "generation_config.json", "model.safetensors",
          "t2jax_export.json"} <= set(os.listdir(out))
  merged, base = load_file(os.path.join(out, "model.safetensors")), load_file(
      os.path.join(path, "model.safetensors"))
  assert set(merged) == set(base)
  changed = {k for k in merged if not np.array_equal(merged[k], base[k])}
  assert changed == set(expert.z)  # only the targeted kernels move
  with open(os.path.join(out, "t2jax_export.json")) as f:
    meta = json.load(f)
  assert meta["source_fingerprint"] == model.fingerprint and meta["dtype"] == "float32"
  assert meta["expert"]["kind"] == "svf" and meta["expert"]["rank"] == 6
  assert meta["mixture"] is None and meta["tokenizer"] is False


def test_mixture_export_matches_t2jax(loaded, checkpoint, tmp_path, capsys):
  model, _ = loaded("llama")
  path, _ = checkpoint("llama")
  e1, e2 = (_perturbed(t2jax.Expert.init(model), seed=s) for s in (2, 3))
  e1.save(str(tmp_path / "e1"))
  e2.save(str(tmp_path / "e2"))
  experts = f"math={tmp_path / 'e1'},code={tmp_path / 'e2'}"
  out = tmp_path / "mix"
  rc, _, err = _run(capsys, "--experts", experts, "--alpha", "0.7,0.3", "--model", path,
                    "--out", out)
  assert rc == 0, err
  ids = _ids(model)
  want = np.asarray(model.logits(ids, t2jax.Expert.mix([e1, e2], [0.7, 0.3])))
  assert _max_diff(want, model.logits(ids, e1)) > 1e-3
  assert _max_diff(_hf_logits(str(out), ids), want) <= 1e-4
  with open(out / "t2jax_export.json") as f:
    meta = json.load(f)
  assert meta["mixture"] == {"math": 0.7, "code": 0.3}
  assert meta["expert"]["kind"] == "svf-mixture"

  # per-matrix α from the few-shot search's file: the weights adapt.mix builds, by label
  matrices = tuple(sorted(e1.z))
  alpha = np.random.default_rng(4).uniform(0, 1, (2, len(matrices)))
  adapt.save_alpha(str(tmp_path / "alpha.json"), adapt.CEMResult(
      alpha=alpha, best_score=0.0, history=[], matrices=matrices), ["math", "code"])
  out2 = tmp_path / "mix_per_matrix"
  rc, _, err = _run(capsys, "--experts", experts, "--alpha", tmp_path / "alpha.json",
                    "--model", path, "--out", out2)
  assert rc == 0 and "note: --alpha is not on the simplex" in err, err
  want = export.merged_state_dict(model, adapt.mix([e1, e2], alpha, matrices))
  got = load_file(str(out2 / "model.safetensors"))
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  with open(out2 / "t2jax_export.json") as f:
    meta = json.load(f)
  np.testing.assert_allclose(meta["mixture"]["math"], adapt.simplex(alpha)[0])
  assert meta["expert"]["metrics"]["mixture_matrices"] == list(matrices)


def test_default_model_export_matches_t2jax_and_tokenizer(default_model, tmp_path):
  model = default_model
  # q_proj only: 30 small SVDs instead of the MLP's 90 large ones, and q is the projection
  # llama.cpp permutes, so its way back to HF's layout is what this checks
  expert = _perturbed(t2jax.Expert.init(model, targets=r"self_attn/q_proj"), seed=5)
  out = export.export(model, expert, str(tmp_path / "smollm2"))
  try:
    chat = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    ids = np.asarray(tokenizer.encode_chats(model.tokenizer, [chat]))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    want = np.asarray(model.logits(ids, expert))
    assert _max_diff(want, model.logits(ids)) > 1e-2
    assert _max_diff(_hf_logits(out, ids), want) <= 1e-3
    with open(os.path.join(out, "generation_config.json")) as f:
      assert f"{json.load(f)['eos_token_id']}" in {str(i) for i in (model.eos_ids[0],
                                                                    list(model.eos_ids))}
    # a mixture and a LoRA expert (B drawn, so it is not the base model), each replacing it
    other = _perturbed(t2jax.Expert.init(model, targets=r"self_attn/q_proj"), seed=6)
    mix = export.mixture({"a": expert, "b": other}, [0.6, 0.4])
    fresh = t2jax.LoRAExpert.init(model, targets=r"self_attn/q_proj", rank=4)
    rng = np.random.default_rng(8)
    lora_expert = dataclasses.replace(fresh, factors={
        k: {"a": f["a"], "b": (0.05 * rng.standard_normal(f["b"].shape)).astype(np.float32)}
        for k, f in fresh.factors.items()})
    for e in (mix, lora_expert):
      export.export(model, e, out, force=True)
      want = np.asarray(model.logits(ids, e))
      assert _max_diff(want, model.logits(ids)) > 1e-2
      assert _max_diff(_hf_logits(out, ids), want) <= 1e-3
  finally:
    shutil.rmtree(out)  # ~0.5 GB of float32 weights


@pytest.mark.parametrize("name,shard_bytes", [
    ("llama_mha_tied", export.SHARD_BYTES), ("qwen2", 40_000), ("llama3", export.SHARD_BYTES),
    ("llama_bias", export.SHARD_BYTES), ("mistral_sw16", export.SHARD_BYTES),
])
def test_layouts_round_trip(loaded, checkpoint, tmp_path, name, shard_bytes):
  """Tied embeddings, q/k/v biases, llama3 rope scaling, all biases, a sliding window; and a
  sharded export: the config comes back equal, the logits agree."""
  model, _ = loaded(name)
  expert = _perturbed(t2jax.Expert.init(model, targets=ALL_PROJ), seed=6)
  out = export.export(model, expert, str(tmp_path / name), shard_bytes=shard_bytes)
  assert from_hf_dir(out) == from_hf_dir(checkpoint(name)[0]) == model.config
  if shard_bytes < export.SHARD_BYTES:
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
  ids = _ids(model)
  want = np.asarray(model.logits(ids, expert))
  assert _max_diff(_hf_logits(out, ids), want) <= 1e-4


def test_bfloat16_export_is_the_float32_merge_rounded(loaded, tmp_path):
  model, _ = loaded("llama")
  expert = _perturbed(t2jax.Expert.init(model), seed=7)
  out = export.export(model, expert, str(tmp_path / "bf16"), dtype="bfloat16")
  got = load_file(os.path.join(out, "model.safetensors"))
  want = export.merged_state_dict(model, expert)
  assert all(got[k].dtype == ml_dtypes.bfloat16 and
             np.array_equal(got[k], want[k].astype(ml_dtypes.bfloat16)) for k in want)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  hf = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert hf.dtype == torch.bfloat16


# ------------------------------------------------------------------------- refusals, safety


@pytest.fixture(scope="module")
def expert_dir(loaded, tmp_path_factory):
  model, _ = loaded("llama")
  path = str(tmp_path_factory.mktemp("experts") / "svf")
  _perturbed(t2jax.Expert.init(model), seed=8).save(path)
  return path


@pytest.fixture(scope="module")
def lora_dir(loaded, tmp_path_factory):
  """A LoRA expert on "llama" with non-zero B (a fresh one is the base model exactly)."""
  model, _ = loaded("llama")
  e = lora.LoRAExpert.init(model, targets=ALL_PROJ, rank=4, alpha=8.0, seed=1)
  rng = np.random.default_rng(9)
  factors = {k: {"a": f["a"], "b": (0.3 * rng.standard_normal(f["b"].shape)).astype(np.float32)}
             for k, f in e.factors.items()}
  path = str(tmp_path_factory.mktemp("experts") / "lora")
  dataclasses.replace(e, factors=factors, name="lora9").save(path)
  return path


def _damaged(expert_dir, tmp_path):
  bad = str(tmp_path / "damaged")
  shutil.copytree(expert_dir, bad)
  with open(os.path.join(bad, "z.safetensors"), "r+b") as f:
    f.truncate(40)
  return bad


@pytest.mark.parametrize("case,says", [
    ("not_empty", "exists and is not empty; pass --force"),
    ("other_model", "was made for model"),
    ("damaged", "the expert is damaged or incomplete"),
    ("lora_z_only", "is a LoRA expert: export it in full"),
    ("lora_mixture", "LoRA experts cannot be mixed"),
    ("alpha_without_mixture", "--alpha weights a mixture"),
])
def test_cli_refusals_are_one_error_line(checkpoint, expert_dir, lora_dir, tmp_path, capsys,
                                         case, says):
  path = checkpoint("llama")[0]
  out = tmp_path / "out"
  argv = ["--expert", expert_dir, "--model", path, "--out", out]
  if case == "not_empty":
    out.mkdir()
    (out / "keep.txt").write_text("mine")
  elif case == "other_model":
    argv[3] = checkpoint("qwen2")[0]
  elif case == "damaged":
    argv[1] = _damaged(expert_dir, tmp_path)
  elif case == "lora_z_only":
    argv = ["--expert", lora_dir, "--z-only", "--out", tmp_path / "z.safetensors"]
  elif case == "lora_mixture":
    argv[:2] = ["--experts", f"a={expert_dir},b={lora_dir}", "--alpha", "0.5,0.5"]
  else:
    argv += ["--alpha", "0.5"]
  rc, _, err = _run(capsys, *argv)
  errors = [line for line in err.splitlines() if "error:" in line]
  assert rc == 2 and len(errors) == 1 and says in errors[0], err
  if case == "not_empty":
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  else:
    assert not out.exists()


def test_cli_subprocess_refuses_without_traceback(expert_dir, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("")
  proc = subprocess.run([sys.executable, "-m", "t2jax.export", "--expert", expert_dir, "--out",
                         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_interrupted_force_export_keeps_the_old_one(loaded, tmp_path, monkeypatch):
  model, _ = loaded("llama")
  e1, e2 = (_perturbed(t2jax.Expert.init(model), seed=s) for s in (10, 11))
  out = export.export(model, e1, str(tmp_path / "out"))
  before = _tree_digest(out)
  write = export._write_safetensors  # pylint: disable=protected-access

  def fail_midway(path, shapes, dtype, get, metadata):
    first = dict(list(shapes.items())[:2])
    write(path, first, dtype, get, metadata)  # a partial file on disk, then the failure
    raise OSError("No space left on device")

  monkeypatch.setattr(export, "_write_safetensors", fail_midway)
  with pytest.raises(OSError, match="No space left"):
    export.export(model, e2, out, force=True)
  assert _tree_digest(out) == before
  assert os.listdir(tmp_path) == ["out"]  # no temp dir left beside it

  monkeypatch.setattr(export, "_write_safetensors", write)
  export.export(model, e2, out, force=True)
  with open(os.path.join(out, "t2jax_export.json")) as f:
    assert json.load(f)["expert"]["name"] == e2.name


def test_z_only_round_trip(loaded, checkpoint, expert_dir, tmp_path, capsys):
  file = tmp_path / "z.safetensors"
  rc, _, err = _run(capsys, "--expert", expert_dir, "--z-only", "--out", file, "--model",
                    checkpoint("llama")[0])
  assert rc == 0, err
  back, saved = export.load_z(str(file)), t2jax.Expert.load(expert_dir)
  assert set(back.z) == set(saved.z) and all(np.array_equal(back.z[k], saved.z[k])
                                             for k in saved.z)
  for field in ("fingerprint", "targets", "rank", "parametrisation", "max_mult", "name",
                "metrics"):
    assert getattr(back, field) == getattr(saved, field), field
  model, _ = loaded("llama")
  ids = _ids(model)
  assert _max_diff(model.logits(ids, back), model.logits(ids, saved)) == 0.0
  rc, _, err = _run(capsys, "--expert", expert_dir, "--z-only", "--out", file)
  assert rc == 2 and "--force" in err


# --------------------------------------------------------------------------------------- LoRA


def test_lora_export_matches_t2jax(loaded, checkpoint, lora_dir, tmp_path, capsys):
  model, _ = loaded("llama")
  out = tmp_path / "lora_out"
  rc, _, err = _run(capsys, "--expert", lora_dir, "--model", checkpoint("llama")[0], "--out",
                    out)
  assert rc == 0, err
  expert = lora.LoRAExpert.load(lora_dir)
  ids = _ids(model)
  want = np.asarray(model.logits(ids, expert))
  assert _max_diff(want, model.logits(ids)) > 1e-2
  assert _max_diff(_hf_logits(str(out), ids), want) <= 1e-4
  with open(out / "t2jax_export.json") as f:
    meta = json.load(f)
  assert meta["expert"]["kind"] == "lora" and meta["expert"]["alpha"] == 8.0
