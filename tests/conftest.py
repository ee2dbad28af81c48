"""Shared fixtures: tiny random HF checkpoints (built once per session) and the default model.

Every tiny model is a transformers torch model whose parameters are all re-drawn at random
(norm weights and biases included, so a bug cannot hide behind HF's ones/zeros init), saved
with `save_pretrained(..., safe_serialization=True)` into a session tmp dir.
"""

from __future__ import annotations

import math
import os

# libtpu (the tpu extra, needed by the AOT compile tests) makes every jax start-up probe for a
# TPU; tests run on the CPU, subprocesses included.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one persistent compilation cache per test session, shared with the subprocesses: the suite
# builds the same tiny programs many times over (each programs.build or train() jits anew),
# and XLA's compile dominates a tiny model's test
_JAX_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"t2jax-test-jax-cache-{os.getpid()}")
if os.environ.get("T2JAX_TEST_JAX_CACHE", "1") == "1":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  import shutil  # pylint: disable=import-outside-toplevel

  shutil.rmtree(_JAX_CACHE, ignore_errors=True)

import pytest  # pylint: disable=wrong-import-position
import torch
import transformers

from ci_skips import pytest_runtest_makereport  # noqa: F401  (a hook: CI=true fails skips)

VOCAB = 320
EOS = VOCAB - 1  # a random model rarely picks one given id, so greedy runs rarely stop early

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name → (config class, model class, config overrides, save_pretrained kwargs)
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {}),
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_key_value_heads=4, tie_word_embeddings=True), {}),
    # head_dim 16 with theta 1e4: wavelengths 6..2e4 cover the high, smoothed (16..64) and
    # scaled (> 64) bands of llama3 scaling.
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(max_position_embeddings=512, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE),
               {}),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), {}),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM",
                   dict(attention_bias=True, mlp_bias=True), {}),
    # head_dim 32 != 64 / 4 heads
    "llama_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32), {}),
    "llama_3_layers": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_hidden_layers=3, num_key_value_heads=1), {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {}),  # sliding_window 4096
    "mistral_sw16": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16), {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {}),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(tie_word_embeddings=True, num_key_value_heads=4), {}),
    "sharded": ("LlamaConfig", "LlamaForCausalLM", {}, dict(max_shard_size="40KB")),
    "small_context": ("LlamaConfig", "LlamaForCausalLM", dict(max_position_embeddings=32), {}),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Re-draws every parameter: norms ~ 1 + 0.3 N, biases ~ 0.3 N, embeddings ~ N,
  projections ~ N / sqrt(fan_in) (lm_head x2 so logits spread over a few units)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied lm_head shares embed_tokens: listed once
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.3 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:
        scale = (2.0 if name.startswith("lm_head") else 1.0) / math.sqrt(p.shape[-1])
        p.copy_(noise * scale)
  return model.eval()


def build_torch_model(name: str, seed: int = 0) -> torch.nn.Module:
  config_cls, model_cls, overrides, _ = SPECS[name]
  config = getattr(transformers, config_cls)(**{**_BASE, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config)
  return randomize_(model, seed + 1)


class Checkpoints:
  """Lazily builds and caches (directory, torch model) per spec name."""

  def __init__(self, root):
    self.root = root
    self._cache: dict[str, tuple[str, torch.nn.Module]] = {}

  def __call__(self, name: str) -> tuple[str, torch.nn.Module]:
    if name not in self._cache:
      model = build_torch_model(name, seed=sorted(SPECS).index(name) * 10)
      path = os.path.join(self.root, name)
      model.save_pretrained(path, safe_serialization=True, **SPECS[name][3])
      self._cache[name] = (path, model)
    return self._cache[name]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """`checkpoint(name)` → (HF checkpoint dir, the torch model it holds); see SPECS."""
  return Checkpoints(str(tmp_path_factory.mktemp("checkpoints")))


@pytest.fixture(scope="session")
def loaded(checkpoint):
  """`loaded(name)` → (t2jax Model in float32, torch model), one load per name."""
  import t2jax  # pylint: disable=import-outside-toplevel

  cache = {}

  def get(name):
    if name not in cache:
      path, torch_model = checkpoint(name)
      cache[name] = (t2jax.load_model(path), torch_model)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def default_model():
  """The embedded SmolLM2-135M-Instruct GGUF, loaded once per session (~10 s)."""
  import t2jax  # pylint: disable=import-outside-toplevel

  return t2jax.load_model()


@pytest.fixture(scope="session")
def hf_default(default_model):
  """(HF torch model, HF tokenizer) read by transformers from the same GGUF file."""
  directory, file = os.path.split(default_model.source)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file,
                                                            dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file)
  return model, tok


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
  """A 2-layer random Llama with the default model's tokenizer and chat template."""
  from t2jax import tokenizer, weights  # pylint: disable=import-outside-toplevel

  tok = tokenizer.load_tokenizer(weights.default_model_path())
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg)
  path = str(tmp_path_factory.mktemp("chat_model"))
  model.save_pretrained(path, safe_serialization=True)
  tok.save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def random_chat_model_dir(chat_model_dir, tmp_path_factory):
  """chat_model_dir's shape and tokenizer with every weight re-drawn (randomize_, seed 7): its
  logits spread over several units, so greedy replies are far from ties and label
  probabilities far from uniform."""
  cfg = transformers.AutoConfig.from_pretrained(chat_model_dir)
  model = randomize_(transformers.LlamaForCausalLM(cfg), seed=7)
  path = str(tmp_path_factory.mktemp("random_chat_model"))
  model.save_pretrained(path, safe_serialization=True)
  transformers.AutoTokenizer.from_pretrained(chat_model_dir).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def random_chat_model(random_chat_model_dir):
  import t2jax  # pylint: disable=import-outside-toplevel

  return t2jax.load_model(random_chat_model_dir)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
  """T2JAX_CACHE in the test's own folder (modules opt in with pytestmark): nothing is read
  from or left in a shared compile cache."""
  monkeypatch.setenv("T2JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(random_chat_model_dir):
  """The seed-7 random chat model, loaded afresh for each module: its memo state is the module's
  own (random_chat_model is the session's shared one)."""
  import t2jax  # pylint: disable=import-outside-toplevel

  return t2jax.load_model(random_chat_model_dir)


@pytest.fixture(scope="module")
def experts(model):
  """Two experts far from the base model, so that dispatch and mixtures change the output."""
  return {"math": perturbed_expert(model, 0.8, 1, "math"),
          "code": perturbed_expert(model, 0.8, 2, "code")}


def perturbed_expert(model, scale: float, seed: int, name: str):
  """An SVF expert whose z is the identity's times (1 + scale·N(0, 1)): far enough from the base
  model that mixtures and dispatch change the output of a random test model."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel

  import t2jax  # pylint: disable=import-outside-toplevel

  base = t2jax.Expert.init(model, name=name)
  rng = np.random.default_rng(seed)
  z = {k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(np.float32)
       for k, v in base.z.items()}
  return dataclasses.replace(base, z=z)


def tiny_config(model_dir: str, **overrides):
  """A training config on `chat_model_dir` small enough for a test: 4 steps of 2 prompts."""
  from t2jax import config_defaults  # pylint: disable=import-outside-toplevel

  c = config_defaults.base_config()
  c.model = model_dir
  c.task = "math"
  c.task_args.level = 1
  c.task_args.system_prompt = "Add."
  c.update(steps=4, batch_size=2, samples_per_prompt=2, max_new_tokens=4, temperature=1.0,
           baseline="none", kl="exact", kl_coef=0.1, lr=1e-2, eval_every=0, eval_size=4,
           test_size=4, eval_batch_size=4, checkpoint_every=2)
  c.update(overrides)
  return c
