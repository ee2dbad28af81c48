"""The slot engine (engine.py) against t2jax.generate and adapt.two_pass_generate, and a row
against the same row run with other requests in other slots."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2jax
from t2jax import adapt, engine as engine_lib
from t2jax.engine import AUTO, BASE, Engine, Request, RequestError
from t2jax.models import llama
from t2jax.tokenizer import encode_chats


QUESTIONS = ["What is 3 + 4?",
             "Write a Python function that returns the sum of a list of integers, or 0.",
             "All birds fly?",
             "Name a prime number larger than twenty and explain why it is prime."]


pytestmark = pytest.mark.usefixtures("private_cache")


def _chat(q):
  return [{"role": "user", "content": q}]


def test_a_write_slot_per_row_equals_each_row_alone(loaded):
  model, _ = loaded("llama")
  cfg, params = model.config, model.params
  rng = np.random.default_rng(0)
  b, s = 3, 24
  lengths = np.array([5, 9, 2])
  tokens = rng.integers(0, cfg.vocab_size, (b, 12))
  # each row's prompt at slots [0, length), written row by row with the scalar path
  cache = llama.KVCache.zeros(cfg, b, s, jnp.float32)
  rows = []
  for i in range(b):
    one = llama.KVCache.zeros(cfg, 1, s, jnp.float32)
    n = int(lengths[i])
    _, one = llama.forward(params, tokens[i:i + 1, :n], jnp.arange(n)[None], one,
                           jnp.zeros((), jnp.int32), jnp.ones((1, s), bool), cfg=cfg)
    rows.append(one)
  cache = jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows)
  # one step of all rows, each at its own slot, vs each row alone (scalar slot)
  nxt = rng.integers(0, cfg.vocab_size, (b, 1))
  at = jnp.asarray(lengths, jnp.int32)
  hidden, cache_after = llama.forward(params, nxt, at[:, None], cache, at, jnp.ones((b, s), bool),
                                      cfg=cfg)
  for i in range(b):
    h1, c1 = llama.forward(params, nxt[i:i + 1], at[i:i + 1, None], rows[i], at[i],
                           jnp.ones((1, s), bool), cfg=cfg)
    np.testing.assert_allclose(hidden[i], h1[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(cache_after), jax.tree.leaves(c1)):
      np.testing.assert_allclose(got[i], want[0], rtol=1e-5, atol=1e-6)


def _generate_alone(model, prompt, expert, max_new):
  """t2jax.generate of one token-id prompt with one expert (None: base), factored as the
  engine runs it."""
  rows = [expert] if expert is not None else None
  out = t2jax.generate(model, [prompt], max_new_tokens=max_new, experts=rows,
                       svf_mode="factored" if rows else "auto")
  return out.token_ids[0]


def test_engine_greedy_equals_generate(model, experts):
  eng = Engine(model, experts, slots=3, max_len=128, admit_rows=3)  # rows prefilled together
  prompts = encode_chats(model.tokenizer, [_chat(q) for q in QUESTIONS])
  chosen = ["math", BASE, "code", "math"]
  handles = eng.run([Request(prompt=p, max_new=12, model=m) for p, m in zip(prompts, chosen)])
  for h, p, m in zip(handles, prompts, chosen):
    want = _generate_alone(model, p, experts.get(m), 12)
    assert h.tokens == want, m
    assert h.finish_reason in ("stop", "length")
    assert h.mixture == ({} if m == BASE else {m: 1.0})
  assert eng.idle() and eng.stats.requests == 4


def test_a_row_does_not_depend_on_its_neighbours(model, experts):
  """The same request alone and admitted at another time among other requests (other
  slots, admitted in the same step as another, other experts beside it): the same tokens and
  log-probs, bit for bit."""
  prompts = encode_chats(model.tokenizer, [_chat(q) for q in QUESTIONS])
  target = Request(prompt=prompts[1], max_new=20, model="code")
  alone = Engine(model, experts, slots=4, max_len=256).run([target])[0]
  eng = Engine(model, experts, slots=4, max_len=256)
  first = [eng.submit(Request(prompt=prompts[0] * 3, max_new=60, model="math")),
           eng.submit(Request(prompt=prompts[2], max_new=30, model=BASE))]
  for _ in range(5):
    eng.step()
  h = eng.submit(target)
  eng.submit(Request(prompt=prompts[3], max_new=40, model="code"))
  while not eng.idle():
    eng.step()
  assert all(x.done.is_set() for x in first)
  assert h.tokens == alone.tokens and len(h.tokens) == 20
  assert h.logprobs == alone.logprobs


def test_explicit_weights_mix_the_experts(model, experts):
  eng = Engine(model, experts, slots=2, max_len=128)
  (prompt,) = encode_chats(model.tokenizer, [_chat(QUESTIONS[0])])
  (h,) = eng.run([Request(prompt=prompt, max_new=8, weights={"math": 3.0, "code": 1.0})])
  assert h.mixture == pytest.approx({"math": 0.75, "code": 0.25})
  mixed = t2jax.Expert.mix([experts["math"], experts["code"]], [0.75, 0.25])
  assert h.tokens == _generate_alone(model, prompt, mixed, 8)


def test_auto_dispatch_equals_two_pass_generate(model, experts):
  chats = [_chat(q) for q in QUESTIONS]
  gen, weights, _ = adapt.two_pass_generate(model, chats, experts, strategy="prompt",
                                            max_new_tokens=10)
  eng = Engine(model, experts, strategy="prompt", slots=4, max_len=256)
  handles = eng.run([eng.chat_request(c, 10) for c in chats])
  assert [h.mixture for h in handles] == weights
  assert len({tuple(sorted(w)) for w in weights}) > 1  # the dispatch is not one label for all
  assert [h.tokens for h in handles] == gen.token_ids
  # the offline API on the engine: the same rows, 2 slots for 4 prompts
  on_engine, weights_e, _ = adapt.two_pass_generate(model, chats, experts, strategy="prompt",
                                                    max_new_tokens=10, slots=2)
  assert weights_e == weights and on_engine.token_ids == gen.token_ids
  assert on_engine.texts == gen.texts


def test_few_shot_runs_the_fixed_mixture(model, experts):
  chats = [_chat(q) for q in QUESTIONS[:2]]
  gen, weights, _ = adapt.two_pass_generate(model, chats, experts, strategy="few_shot",
                                            alpha=[0.3, 0.7], max_new_tokens=8)
  eng = Engine(model, experts, strategy="few_shot", alpha=[0.3, 0.7], slots=2, max_len=128)
  handles = eng.run([eng.chat_request(c, 8) for c in chats])
  assert [h.mixture for h in handles] == weights
  assert [h.tokens for h in handles] == gen.token_ids


def test_warmup_compiles_and_leaves_the_slots_as_they_were(model, experts):
  reqs = [Request(prompt=p, max_new=6, model=m) for p, m in zip(
      encode_chats(model.tokenizer, [_chat(q) for q in QUESTIONS[:2]]), ["math", BASE])]
  eng = Engine(model, experts, slots=2, max_len=128)
  assert eng.warmup(reqs) == 1  # one row per program, one length bucket, no pass 1
  want = Engine(model, experts, slots=2, max_len=128).run(reqs)
  assert [h.tokens for h in eng.run(reqs)] == [h.tokens for h in want]


def test_sampling_is_reproducible_per_seed(model, experts):
  (prompt,) = encode_chats(model.tokenizer, [_chat(QUESTIONS[2])])
  eng = Engine(model, experts, slots=3, max_len=128)
  req = lambda seed: Request(prompt=prompt, max_new=16, model="math", temperature=1.0,
                             top_p=0.9, seed=seed)
  a, b, c = eng.run([req(1), req(1), req(2)])
  assert a.tokens == b.tokens and a.tokens != c.tokens


def test_cancel_frees_the_slot(model):
  eng = Engine(model, None, slots=1, max_len=256)
  (prompt,) = encode_chats(model.tokenizer, [_chat(QUESTIONS[0])])
  first = eng.submit(Request(prompt=prompt, max_new=100, model=BASE))
  second = eng.submit(Request(prompt=prompt, max_new=3, model=BASE))
  eng.step()
  eng.step()
  first.cancel()
  while not second.done.is_set():
    eng.step()
  assert first.finish_reason == "cancelled" and len(first.tokens) < 100
  assert second.finish_reason in ("stop", "length")


def test_bad_requests_name_their_field(model, experts):
  eng = Engine(model, experts, slots=1, max_len=64, max_queue=1)
  ok = dict(prompt=[1, 2, 3], max_new=4)
  cases = {"model": dict(model="poetry"), "max_tokens": dict(max_new=0),
           "prompt": dict(prompt=list(range(64))), "temperature": dict(temperature=-1.0),
           "top_p": dict(top_p=0.0), "expert_weights": dict(weights={"poetry": 1.0})}
  for field, bad in cases.items():
    with pytest.raises(RequestError) as e:
      eng.submit(Request(**{**ok, **bad}))
    assert e.value.param == field
  with pytest.raises(RequestError, match="context") as e:
    eng.submit(Request(**{**ok, "max_new": 62}))
  assert e.value.param == "max_tokens"
  eng.submit(Request(**ok))
  with pytest.raises(engine_lib.QueueFull):
    eng.submit(Request(**ok))


def test_a_background_thread_serves_and_closes(model, experts):
  eng = Engine(model, experts, slots=2, max_len=256)
  eng.start()
  (prompt,) = encode_chats(model.tokenizer, [_chat(QUESTIONS[0])])
  h = eng.submit(Request(prompt=prompt, max_new=6, model=AUTO))
  assert h.done.wait(120) and h.finish_reason in ("stop", "length")
  long = eng.submit(Request(prompt=prompt, max_new=100, model=BASE))
  eng.close(grace_s=0.0)
  assert long.done.is_set() and long.finish_reason in ("cancelled", "stop", "length")
  with pytest.raises(engine_lib.ShuttingDown):
    eng.submit(Request(prompt=prompt, max_new=6))
