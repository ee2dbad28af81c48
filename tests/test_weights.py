"""Loading checkpoints: f32 logits parity with transformers for every supported family, bf16,
sharded safetensors, GGUF, and clear errors for bad sources."""

from __future__ import annotations

import json
import math
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import t2jax
from t2jax.models import llama
from t2jax.weights import gguf_io, layout


def torch_logits(model: torch.nn.Module, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def random_ids(vocab: int, shape, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, shape)


def copy_checkpoint(src: str, dst) -> str:
  dst = str(dst)
  shutil.copytree(src, dst)
  return dst


def edit_config(path: str, edit) -> None:
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)


# ------------------------------------------------------------------ f32 parity per family

# (spec name, sequence length). llama3 runs past original_max_position_embeddings=64;
# mistral_sw16 runs exactly its sliding window.
PARITY = [
    ("llama", 40),
    ("llama_mha_tied", 40),
    ("llama3", 150),
    ("llama_linear_rope", 100),
    ("llama_bias", 40),
    ("llama_head_dim", 40),
    ("llama_3_layers", 40),
    ("mistral", 40),
    ("mistral_sw16", 16),
    ("qwen2", 40),
    ("qwen2_tied", 40),
    ("sharded", 40),
]


@pytest.mark.parametrize("name,length", PARITY, ids=[p[0] for p in PARITY])
def test_logits_match_transformers_f32(loaded, name, length):
  model, hf = loaded(name)
  ids = random_ids(model.config.vocab_size, (2, length), seed=length)
  got = np.asarray(model.logits(ids))
  want = torch_logits(hf, ids)
  assert got.dtype == np.float32 and got.shape == want.shape
  assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


CONFIG_FACTS = {
    "llama": dict(model_type="llama", num_heads=4, num_kv_heads=2, head_dim=16,
                  tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                  sliding_window=None, rope_scaling=(), eos_token_ids=(319,), bos_token_id=1),
    "llama_mha_tied": dict(num_kv_heads=4, tie_word_embeddings=True),
    "llama_bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "llama_head_dim": dict(head_dim=32, num_heads=4),
    "llama_3_layers": dict(num_layers=3, num_kv_heads=1),
    "mistral": dict(model_type="mistral", sliding_window=4096, max_length=256),
    "mistral_sw16": dict(sliding_window=16, max_length=16),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, o_bias=False, mlp_bias=False),
    "small_context": dict(max_position_embeddings=32, max_length=32),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FACTS))
def test_config_read_from_checkpoint(loaded, name):
  model, _ = loaded(name)
  for key, value in CONFIG_FACTS[name].items():
    assert getattr(model.config, key) == value, key
  params = model.params
  assert ("lm_head" in params) == (not model.config.tie_word_embeddings)
  attn = params["layers"][0]["self_attn"]
  assert ("bias" in attn["q_proj"]) == model.config.qkv_bias
  assert ("bias" in attn["o_proj"]) == model.config.o_bias
  assert ("bias" in params["layers"][0]["mlp"]["up_proj"]) == model.config.mlp_bias
  cfg = model.config
  assert len(params["layers"]) == cfg.num_layers
  assert attn["q_proj"]["kernel"].shape == (cfg.hidden_size, cfg.num_heads * cfg.head_dim)
  assert attn["k_proj"]["kernel"].shape == (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)


def test_llama3_rope_scaling_is_read(loaded):
  model, _ = loaded("llama3")
  scaling = model.config.rope_scaling_dict
  assert scaling["rope_type"] == "llama3"
  assert scaling["factor"] == 8.0 and scaling["original_max_position_embeddings"] == 64


def test_sharded_checkpoint_has_shards(checkpoint):
  path, _ = checkpoint("sharded")
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) > 1
  assert not os.path.exists(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("name,scaling", [
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ("llama_linear_rope", {"type": "linear", "factor": 2.0}),
], ids=["llama3", "linear"])
def test_legacy_rope_scaling_spelling(checkpoint, tmp_path, name, scaling):
  """Hub checkpoints written before transformers 5 spell RoPE as top-level rope_theta +
  rope_scaling (llama3 with rope_type, older linear ones with type)."""
  src, hf = checkpoint(name)
  path = copy_checkpoint(src, tmp_path / "legacy")

  def legacy(cfg):
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling

  edit_config(path, legacy)
  model = t2jax.load_model(path)
  ids = random_ids(model.config.vocab_size, (1, 120), seed=3)
  np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(hf, ids), rtol=0,
                             atol=1e-4)


def test_generation_config_adds_stop_tokens(checkpoint, tmp_path):
  """Llama 3 chat checkpoints list extra stop tokens in generation_config.json."""
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [7, 319]}, f)
  model = t2jax.load_model(path)
  assert model.config.eos_token_ids == (319, 7)
  assert model.eos_ids == (319, 7)


# ------------------------------------------------------------------ reduced precision

@pytest.mark.parametrize("dtype,jdtype", [("bfloat16", jnp.bfloat16), ("float16", jnp.float16)],
                         ids=["bfloat16", "float16"])
def test_half_precision_close_to_f32(loaded, checkpoint, dtype, jdtype):
  f32, _ = loaded("qwen2")
  path, _ = checkpoint("qwen2")
  half = t2jax.load_model(path, dtype=dtype)
  assert all(leaf.dtype == jdtype for leaf in jax.tree_util.tree_leaves(half.params))
  assert half.fingerprint == f32.fingerprint  # identifies the checkpoint, not the dtype
  ids = random_ids(f32.config.vocab_size, (2, 32), seed=7)
  want = np.asarray(f32.logits(ids))
  got = np.asarray(half.logits(ids))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 0.03 * scale  # measured ~1.2% (bf16), 0.2% (f16)
  # the top token agrees almost everywhere
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16],
                         ids=["bfloat16", "float16"])
def test_half_precision_checkpoint_on_disk(tmp_path, torch_dtype):
  """Hub checkpoints are mostly stored in bf16: read as such and upcast, they give the logits
  of HF loading the same files in float32."""
  import transformers  # pylint: disable=import-outside-toplevel

  config = transformers.Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, eos_token_id=199)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1]) + (p.dim() == 1))
  model.to(torch_dtype).save_pretrained(str(tmp_path), safe_serialization=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  ours = t2jax.load_model(str(tmp_path))
  assert ours.params["embed_tokens"].dtype == jnp.float32
  ids = random_ids(200, (2, 24), seed=4)
  np.testing.assert_allclose(np.asarray(ours.logits(ids)), torch_logits(hf.eval(), ids), rtol=0,
                             atol=1e-4)


# ------------------------------------------------------------------ GGUF

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf q/k row permutation."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _llama3_rope_factors(cfg) -> np.ndarray:
  """llama.cpp's rope_freqs for llama3 scaling (one divisor per frequency)."""
  rope = cfg.rope_parameters
  dim = cfg.head_dim
  base = rope["rope_theta"]
  factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old = rope["original_max_position_embeddings"]
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: str, hf: torch.nn.Module, *, tokenizer: bool) -> str:
  """Writes a torch Llama / Qwen2 model as an f32 GGUF file the way llama.cpp's converter does
  (q/k rows permuted for the llama architecture only)."""
  cfg = hf.config
  arch = cfg.model_type
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_id)
  if tokenizer:  # a minimal byte-level BPE vocabulary: 256 bytes, 2 merges, fillers, EOS
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[i] for i in range(256)] + ["Ġt", "he"]
    tokens += [f"<unused{i}>" for i in range(len(tokens), cfg.vocab_size - 1)] + ["<|end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (cfg.vocab_size - 1) + [3])
    w.add_token_merges(["Ġ t", "h e"])
  else:
    w.add_vocab_size(cfg.vocab_size)
  if cfg.rope_parameters.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
  elif cfg.rope_parameters.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
  for name, value in hf.state_dict().items():
    arr = value.detach().float().numpy()
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if name in _GGUF_GLOBAL:
      gguf_name = _GGUF_GLOBAL[name]
    else:
      parts = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
      module = ".".join(parts[3:-1])
      gguf_name = f"blk.{parts[2]}.{_GGUF_BLOCK[module]}.{parts[-1]}"
      if arch == "llama" and module == "self_attn.q_proj":
        arr = _permute(arr, heads)
      elif arch == "llama" and module == "self_attn.k_proj":
        arr = _permute(arr, kv_heads)
    w.add_tensor(gguf_name, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture
def tokenizer_cache(tmp_path, monkeypatch):
  """Keeps GGUF tokenizers built by these tests out of ~/.cache (see t2jax/cache.py)."""
  monkeypatch.setenv("T2JAX_CACHE", str(tmp_path / "t2jax-cache"))
  return tmp_path / "t2jax-cache"


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.RandomState(0).randn(4 * 16, 8).astype(np.float32)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(_permute(w, 4), 4), w)
  b = np.random.RandomState(1).randn(2 * 16).astype(np.float32)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(_permute(b, 2), 2), b)


@pytest.mark.parametrize("name,length", [("llama", 40), ("llama_mha_tied", 40),
                                         ("llama_head_dim", 40), ("llama3", 150),
                                         ("llama_linear_rope", 100), ("qwen2", 40)])
def test_gguf_logits_match_transformers(checkpoint, tmp_path, name, length):
  """GGUF read path (metadata → config, tensors un-permuted) without the tokenizer."""
  _, hf = checkpoint(name)
  path = write_gguf(str(tmp_path / f"{name}.gguf"), hf, tokenizer=False)
  cfg, tensors = gguf_io.load(path)
  assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads) == (
      hf.config.model_type, hf.config.num_attention_heads, hf.config.num_key_value_heads)
  assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim
  assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
  assert cfg.vocab_size == hf.config.vocab_size
  params, _ = layout.assemble(cfg, tensors, jnp.float32, path)
  ids = random_ids(cfg.vocab_size, (2, length), seed=11)
  got = np.asarray(llama.full_logits(params, ids, np.ones(ids.shape, bool), cfg=cfg))
  np.testing.assert_allclose(got, torch_logits(hf, ids), rtol=0, atol=1e-4)


def test_gguf_load_model_with_tokenizer(checkpoint, tmp_path, tokenizer_cache):
  _, hf = checkpoint("llama")
  path = write_gguf(str(tmp_path / "tiny.gguf"), hf, tokenizer=True)
  model = t2jax.load_model(path)
  assert model.tokenizer is not None
  assert os.listdir(tokenizer_cache / "tokenizers")  # converted once, kept for the next load
  assert model.config.eos_token_ids == (hf.config.eos_token_id,)
  assert hf.config.eos_token_id in model.eos_ids
  ids = random_ids(model.config.vocab_size, (2, 24), seed=5)
  np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(hf, ids), rtol=0,
                             atol=1e-4)
  # write_gguf's vocabulary: token i is byte i ("Ġ" is the space), then "Ġt" (256), "he" (257)
  ids = model.tokenizer("the cat", add_special_tokens=False)["input_ids"]
  assert ids == [ord("t"), 257, ord(" "), ord("c"), ord("a"), ord("t")]
  assert model.tokenizer.decode(ids) == "the cat"
  out = t2jax.generate(model, ["the cat"], max_new_tokens=4, chat_template=False)
  assert 1 <= len(out.token_ids[0]) <= 4
  assert out.texts[0] == model.tokenizer.decode(out.token_ids[0], skip_special_tokens=True)
  # a second load reuses the cached tokenizer
  again = t2jax.load_model(path)
  assert again.tokenizer("the cat")["input_ids"] == model.tokenizer("the cat")["input_ids"]


def test_gguf_without_tokenizer_loads_without_one(checkpoint, tmp_path, tokenizer_cache):
  """The weights load and the model runs on token ids; only text needs the tokenizer
  (t2jax.tokenizer: None for a GGUF without one)."""
  del tokenizer_cache
  _, hf = checkpoint("llama")
  path = write_gguf(str(tmp_path / "no_tok.gguf"), hf, tokenizer=False)
  model = t2jax.load_model(path)
  assert model.tokenizer is None
  ids = random_ids(model.config.vocab_size, (1, 8))
  np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(hf, ids), rtol=0,
                             atol=1e-4)


# ------------------------------------------------------------------ bad sources

def test_missing_path(tmp_path):
  missing = str(tmp_path / "no-such-model")
  with pytest.raises(FileNotFoundError, match="no-such-model"):
    t2jax.load_model(missing)


def test_file_that_is_not_gguf(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(b"\0" * 64)
  with pytest.raises(ValueError, match="gguf"):
    t2jax.load_model(str(path))


def test_corrupt_gguf(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(t2jax.WeightsError, match="junk.gguf"):
    t2jax.load_model(str(path))


def test_unsupported_dtype(checkpoint):
  path, _ = checkpoint("llama")
  with pytest.raises(ValueError, match="int8"):
    t2jax.load_model(path, dtype="int8")


def test_directory_without_config(tmp_path):
  with pytest.raises(t2jax.ConfigError, match="config.json"):
    t2jax.load_model(str(tmp_path))


def test_config_not_json(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(t2jax.ConfigError, match="JSON"):
    t2jax.load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100).save_pretrained(
      str(tmp_path))
  with pytest.raises(t2jax.ConfigError, match="gpt2"):
    t2jax.load_model(str(tmp_path))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(hidden_act="gelu"), "gelu"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                         "rope_theta": 10000.0}), "yarn"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
], ids=["gelu", "yarn", "kv_heads", "no_hidden_size"])
def test_unsupported_config_values(checkpoint, tmp_path, edit, match):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  edit_config(path, edit)
  with pytest.raises(t2jax.ConfigError, match=match):
    t2jax.load_model(path)


def test_qwen2_sliding_window_refused(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("qwen2")[0], tmp_path / "ckpt")
  edit_config(path, lambda c: c.update(use_sliding_window=True, sliding_window=8))
  with pytest.raises(t2jax.ConfigError, match="sliding"):
    t2jax.load_model(path)


def _rewrite_weights(path: str, edit) -> None:
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(t2jax.WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    t2jax.load_model(path)


def test_tensor_with_wrong_shape(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite_weights(path, lambda t: t.update({name: np.ascontiguousarray(t[name][:16])}))
  with pytest.raises(t2jax.WeightsError, match=r"k_proj\.weight.*shape"):
    t2jax.load_model(path)


def test_config_disagrees_with_weights(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  edit_config(path, lambda c: c.update(intermediate_size=128))
  with pytest.raises(t2jax.WeightsError, match="shape"):
    t2jax.load_model(path)


def test_tied_checkpoint_that_also_stores_lm_head(checkpoint, tmp_path):
  src, hf = checkpoint("llama_mha_tied")
  path = copy_checkpoint(src, tmp_path / "ckpt")
  _rewrite_weights(path, lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  model = t2jax.load_model(path)
  ids = random_ids(model.config.vocab_size, (1, 12))
  np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(hf, ids), rtol=0,
                             atol=1e-4)


def test_unexpected_tensor(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  _rewrite_weights(path, lambda t: t.update(
      {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
  with pytest.raises(t2jax.WeightsError, match="q_norm"):
    t2jax.load_model(path)


def test_directory_without_weights(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(t2jax.WeightsError, match="safetensors"):
    t2jax.load_model(path)


def test_corrupt_safetensors(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write((64).to_bytes(8, "little") + b"\xff" * 64)
  with pytest.raises(t2jax.WeightsError, match="model.safetensors"):
    t2jax.load_model(path)


def test_missing_shard(checkpoint, tmp_path):
  path = copy_checkpoint(checkpoint("sharded")[0], tmp_path / "ckpt")
  shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(t2jax.WeightsError, match=shard):
    t2jax.load_model(path)
