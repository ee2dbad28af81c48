"""The HTTP server (serve.py) driven by the real `openai` client against uvicorn on 127.0.0.1:
replies equal t2jax.generate with the same expert, concurrent requests equal each alone, every
bad input gets its status and an OpenAI-style error naming the field, and the server goes on."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import t2jax  # noqa: E402  pylint: disable=wrong-import-position
from t2jax import adapt, serve  # noqa: E402  pylint: disable=wrong-import-position
from t2jax.engine import Engine  # noqa: E402  pylint: disable=wrong-import-position


QUESTIONS = ["What is 3 + 4?",
             "Write a Python function that returns the sum of a list of integers, or 0.",
             "All birds fly?",
             "Name a prime number larger than twenty and explain why it is prime.",
             "What is 12 times 12?",
             "Sort the list [3, 1, 2] in Python."]
CONTEXT = 256


def _free_socket() -> socket.socket:
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  return sock


@pytest.fixture(scope="module")
def server(model, experts, tmp_path_factory):
  """(base URL, engine) of a server in a background thread: 3 slots, so 6 concurrent
  requests queue."""
  os.environ.setdefault("T2JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
  engine = Engine(model, experts, strategy="prompt", slots=3, max_len=CONTEXT)
  engine.start()
  srv = serve.make_server(engine, "127.0.0.1", 0, grace_s=1.0)
  sock = _free_socket()
  thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  for _ in range(200):
    if srv.started:
      break
    time.sleep(0.05)
  yield url, engine
  srv.should_exit = True
  thread.join(10)
  engine.close(grace_s=0.0)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(q):
  return [{"role": "user", "content": q}]


def _expected(model, experts, question, label, max_new):
  """t2jax.generate's greedy text for one chat prompt with one expert (factored, as served)."""
  e = experts.get(label)
  out = t2jax.generate(model, [question], max_new_tokens=max_new, experts=[e] if e else None,
                       svf_mode="factored" if e else "auto")
  return out.texts[0], out.token_ids[0]


def _mixture(resp):
  return resp.model_extra["mixture"]


def test_models_list_base_experts_and_auto(client):
  ids = [m.id for m in client.models.list().data]
  assert ids == ["auto", "base", "math", "code"]


def test_chat_equals_generate_with_the_expert(client, model, experts):
  resp = client.chat.completions.create(model="math", messages=_chat(QUESTIONS[0]),
                                        max_tokens=12, temperature=0)
  text, ids = _expected(model, experts, QUESTIONS[0], "math", 12)
  assert resp.choices[0].message.content == text
  assert resp.usage.completion_tokens == len(ids)
  assert resp.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
  assert _mixture(resp) == {"math": 1.0}


def test_streaming_joins_to_the_same_text(client, model, experts):
  chunks = list(client.chat.completions.create(model="code", messages=_chat(QUESTIONS[1]),
                                               max_tokens=16, temperature=0, stream=True))
  text, _ = _expected(model, experts, QUESTIONS[1], "code", 16)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  assert all(c.model_extra["mixture"] == {"code": 1.0} for c in chunks)


def test_auto_dispatches_as_two_pass_generate(client, model, experts):
  gen, weights, _ = adapt.two_pass_generate(model, [_chat(q) for q in QUESTIONS[:4]], experts,
                                            strategy="prompt", max_new_tokens=8)
  got = [client.chat.completions.create(model="auto", messages=_chat(q), max_tokens=8,
                                        temperature=0) for q in QUESTIONS[:4]]
  assert [_mixture(r) for r in got] == weights
  assert [r.choices[0].message.content for r in got] == gen.texts


def test_expert_weights_give_alpha(client):
  resp = client.chat.completions.create(model="auto", messages=_chat(QUESTIONS[2]), max_tokens=4,
                                        temperature=0,
                                        extra_body={"expert_weights": {"math": 1, "code": 3}})
  assert _mixture(resp) == pytest.approx({"math": 0.25, "code": 0.75})


def test_concurrent_requests_equal_each_alone(client):
  jobs = [dict(model=m, messages=_chat(q), max_tokens=n, temperature=0) for q, m, n in
          zip(QUESTIONS, ["math", "code", "base", "auto", "math", "code"], [20, 9, 14, 20, 5, 17])]
  alone = [client.chat.completions.create(**j).choices[0].message.content for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    together = list(pool.map(lambda j: client.chat.completions.create(**j), jobs))
  assert [r.choices[0].message.content for r in together] == alone


def test_completions_and_stop_sequences(client, model):
  full = client.completions.create(model="base", prompt="Once upon a time", max_tokens=24,
                                   temperature=0)
  text = full.choices[0].text
  assert full.object == "text_completion" and len(text) > 6
  stop = text[3:6]
  cut = client.completions.create(model="base", prompt="Once upon a time", max_tokens=24,
                                  temperature=0, stop=[stop])
  assert cut.choices[0].text == text[:text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"


def _post(url, path, body, raw=False):
  data = body if raw else json.dumps(body)
  return httpx.post(url + path, content=data, headers={"content-type": "application/json"},
                    timeout=60)


BAD = [  # (body, param)
    ({"model": "poetry", "messages": _chat("hi")}, "model"),
    ({"model": "auto", "messages": _chat("hi"), "expert_weights": {"poetry": 1}},
     "expert_weights"),
    ({"model": "math", "messages": _chat("hi"), "expert_weights": {"math": 1}}, "expert_weights"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
    ({"messages": _chat("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": _chat("hi"), "max_tokens": "ten"}, "max_tokens"),
    ({"messages": _chat("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": _chat("hi"), "max_tokens": -3}, "max_tokens"),
    ({"messages": _chat("hi"), "max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": _chat("word " * CONTEXT)}, "messages"),
    ({"messages": _chat("hi"), "n": 2}, "n"),
    ({"messages": _chat("hi"), "stop": 3}, "stop"),
    ({"messages": _chat("hi"), "top_p": 2}, "top_p"),
    ({"messages": _chat("hi"), "stream": "yes"}, "stream"),
]


def test_every_bad_input_gets_400_naming_its_field_and_the_server_goes_on(server, client):
  url, _ = server
  r = _post(url, "/v1/chat/completions", "{not json", raw=True)
  assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
  r = _post(url, "/v1/chat/completions", [1, 2])
  assert r.status_code == 400
  for body, param in BAD:
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 400, (body, r.text)
    assert r.json()["error"]["param"] == param, (body, r.json())
  r = _post(url, "/v1/completions", {"prompt": "word " * CONTEXT})
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="nope", messages=_chat("hi"))
  assert e.value.status_code == 400 and e.value.body["param"] == "model"
  assert httpx.get(url + "/nowhere").status_code == 404
  resp = client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)
  assert resp.choices[0].finish_reason in ("stop", "length")
  assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_full_queue_gets_429(server, client):
  _, engine = server
  engine.max_queue = 0
  try:
    with pytest.raises(openai.RateLimitError) as e:
      client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)
    assert e.value.status_code == 429
  finally:
    engine.max_queue = 256
  client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)


def _wait(cond, timeout=60.0):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if cond():
      return True
    time.sleep(0.05)
  return False


def test_a_client_leaving_mid_stream_frees_its_slot(server):
  url, engine = server
  assert _wait(lambda: engine.busy_slots == 0)
  cancelled = engine.stats.finished.get("cancelled", 0)
  body = {"model": "base", "messages": _chat(QUESTIONS[3]), "max_tokens": CONTEXT - 80,
          "temperature": 0, "stream": True}
  with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data:"):
        break
  assert _wait(lambda: engine.busy_slots == 0)
  assert engine.stats.finished.get("cancelled", 0) == cancelled + 1


def test_metrics_and_health(server, client):
  url, _ = server
  client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)
  text = httpx.get(url + "/metrics").text
  for name in ("t2jax_requests_total", "t2jax_generated_tokens_total", "t2jax_queue_depth",
               "t2jax_busy_slots", "t2jax_admission_seconds_total",
               "t2jax_decode_seconds_total"):
    assert name in text


def test_sigterm_finishes_in_flight_requests_and_exits_0(random_chat_model_dir, tmp_path):
  sock = _free_socket()
  port = sock.getsockname()[1]
  sock.close()
  env = {**os.environ, "T2JAX_CACHE": str(tmp_path / "cache")}
  proc = subprocess.Popen([sys.executable, "-m", "t2jax.serve", "--model", random_chat_model_dir,
                           "--port", str(port), "--slots", "2", "--max-len", "256",
                           "--grace", "3", "--warmup"], env=env,
                          stderr=open(tmp_path / "stderr.txt", "w"))  # a pipe could fill
  url = f"http://127.0.0.1:{port}"
  try:
    up = _wait(lambda: proc.poll() is not None or _healthy(url), 300)
    log = (tmp_path / "stderr.txt").read_text()
    assert up and proc.poll() is None, f"the server did not come up:\n{log[-2000:]}"
    body = {"model": "base", "messages": _chat("hi"), "max_tokens": 200, "temperature": 0,
            "stream": True}
    got, streaming = [], threading.Event()

    def stream():
      with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
          got.append(line)
          streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 20
    reader.join(10)
    lines = [x for x in got if x]
    assert lines[-1] == "data: [DONE]"  # the request in flight was finished, not cut
  finally:
    if proc.poll() is None:
      proc.kill()


def _healthy(url) -> bool:
  try:
    return httpx.get(url + "/health", timeout=2).status_code == 200
  except httpx.HTTPError:
    return False


def test_a_failing_program_fails_its_request_and_the_server_goes_on(server, client, monkeypatch):
  from t2jax import engine as engine_lib  # pylint: disable=import-outside-toplevel

  real, calls = engine_lib.admit, []

  def broken_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("injected")
    return real(*args, **kwargs)

  monkeypatch.setattr(engine_lib, "admit", broken_once)
  with pytest.raises(openai.InternalServerError):
    client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)
  resp = client.chat.completions.create(model="base", messages=_chat("hi"), max_tokens=2)
  assert resp.choices[0].finish_reason in ("stop", "length") and len(calls) == 2


def test_the_cli_refuses_inconsistent_flags(random_chat_model_dir, capsys):
  assert serve.main(["--model", random_chat_model_dir, "--alpha", "0.5,0.5"]) == 2
  assert "--alpha needs --experts" in capsys.readouterr().err
