"""`python -m t2jax.serve`: an OpenAI-compatible HTTP server over the slot engine (engine.py).

    python -m t2jax.serve --experts math=runs/math/expert,code=runs/code/expert \\
        --strategy prompt --slots 16 --port 8000

  POST /v1/chat/completions   messages, max_tokens, temperature, top_p, seed, stop, n=1,
                              stream (SSE); model: "auto" (two-pass adaptation with the
                              server's strategy), "base" or an expert label; expert_weights:
                              {label: weight} gives α directly (model "auto")
  POST /v1/completions        the same with a raw-text prompt (no chat template)
  GET  /v1/models  /health  /metrics (Prometheus text)

Every response carries `mixture` ({label: α}; {} = the base model). The engine steps on its own
thread; the event loop only parses requests and moves tokens out, so it stays responsive while
the model runs. SIGTERM: new requests get 503, waiting ones are cancelled, running ones have
--grace seconds to finish, then the process exits 0.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and their types are imported inside build_app (fastapi is an optional extra)
import argparse
import asyncio
import json
import math
import signal
import sys
import time
import uuid
from typing import Any

from t2jax import engine as engine_lib
from t2jax.engine import AUTO, Engine, Request, RequestError
from t2jax.two_pass_cli import add_two_pass_args, load_two_pass

MAX_STOP = 4  # OpenAI's limit on stop sequences
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
DEFAULT_MAX_TOKENS = {"chat": 256, "text": 16}  # OpenAI's completions default is 16


# ---------------------------------------------------------------------------------------------
# Request bodies → engine requests (every error names its field).


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False):
  x = body.get(name, default)
  if x is None:
    return default
  if isinstance(x, bool) or not isinstance(x, int if integer else (int, float)):
    kind = "an integer" if integer else "a number"
    raise RequestError(f"{name} must be {kind}; got {json.dumps(x)[:40]}.", name)
  if not (lo <= x <= hi) or (not integer and not math.isfinite(x)):
    raise RequestError(f"{name} must be in [{lo}, {hi}]; got {x}.", name)
  return x


def _text(content: Any, param: str) -> str:
  """A message's content: a string or a list of {"type": "text", "text": ...} parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise RequestError("content must be a string or a list of text parts.", param)


def _messages(body: dict) -> list[dict[str, str]]:
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise RequestError("messages must be a non-empty list of {role, content} objects.", "messages")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
      raise RequestError(f"messages[{i}] needs a role of system, user or assistant.",
                         f"messages[{i}]")
    out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
  if not any(m["role"] == "user" for m in out):
    raise RequestError("messages needs at least one user turn.", "messages")
  return out


def _stops(body: dict) -> list[str]:
  stop = body.get("stop")
  if stop is None:
    return []
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or len(stops) > MAX_STOP
      or not all(isinstance(s, str) and s for s in stops)):
    raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them.",
                       "stop")
  return stops


def _weights(body: dict) -> dict[str, float] | None:
  w = body.get("expert_weights")
  if w is None:
    return None
  if not isinstance(w, dict) or not w or not all(
      isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
      for k, v in w.items()):
    raise RequestError("expert_weights must map expert labels to numbers.", "expert_weights")
  return {k: float(v) for k, v in w.items()}


def parse(engine: Engine, body: Any, kind: str) -> tuple[Request, dict]:
  """(the engine request, {model, stream, stops, prompt_param}) of a chat ("chat") or
  completions ("text") body; RequestError names the field at fault."""
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object.", None)
  model = body.get("model", AUTO)
  if not isinstance(model, str):
    raise RequestError("model must be a string.", "model")
  if model not in engine.models:
    raise RequestError(f"model {model!r} is unknown; use one of {engine.models}.", "model")
  if _number(body, "n", 1, 1, 1, integer=True) != 1:
    raise RequestError("n must be 1.", "n")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise RequestError("stream must be true or false.", "stream")
  tok = engine.model.tokenizer
  if kind == "chat":
    messages = _messages(body)
    try:
      req = engine.chat_request(messages, 1)
    except ValueError as e:  # no tokenizer or chat template
      raise RequestError(str(e), "messages") from e
    prompt_param = "messages"
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
      prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
      raise RequestError("prompt must be a non-empty string.", "prompt")
    req = Request(prompt=list(tok(prompt)["input_ids"]), max_new=1, question=prompt)
    prompt_param = "prompt"
  room = engine.s - len(req.prompt)
  if room < 1:
    raise RequestError(f"the prompt has {len(req.prompt)} tokens; this server's context is "
                       f"{engine.s} tokens.", prompt_param)
  name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  max_new = _number(body, name, min(DEFAULT_MAX_TOKENS[kind], room), -2 ** 31, 2 ** 31,
                    integer=True)
  req.max_new = max_new
  req.model = model
  req.temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
  req.top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
  seed = body.get("seed")
  req.seed = (_number(body, "seed", 0, -2 ** 63, 2 ** 63 - 1, integer=True) % 2 ** 32
              if seed is not None else uuid.uuid4().int % 2 ** 32)
  req.weights = _weights(body)
  stops = _stops(body)
  try:
    engine.check(req)
  except RequestError as e:
    param = {"prompt": prompt_param, "max_tokens": name}.get(e.param, e.param)
    raise RequestError(str(e), param) from e
  return req, {"model": model, "stream": stream, "stops": stops}


# ---------------------------------------------------------------------------------------------
# Text out: incremental detokenisation with stop sequences.


class TextStream:
  """The text of a growing token list, released as it becomes final: never half a UTF-8
  character, never a prefix of a stop sequence that may still complete."""

  def __init__(self, tokenizer, stops: list[str]):
    self.tok, self.stops = tokenizer, stops
    self.tokens: list[int] = []
    self.sent = ""
    self.stopped = False

  def push(self, tokens: list[int], final: bool) -> str:
    """Adds tokens; returns the newly final text. Sets `stopped` at a stop sequence."""
    self.tokens += tokens
    text = self.tok.decode(self.tokens, skip_special_tokens=True)
    for s in self.stops:
      at = text.find(s, max(0, len(self.sent) - len(s) + 1))
      if at >= 0:
        text, final, self.stopped = text[:at], True, True
    if not final:
      if text.endswith("\ufffd"):  # a character split across tokens
        text = text.rstrip("\ufffd")
      hold = max((len(s) - 1 for s in self.stops), default=0)
      text = text[:max(len(self.sent), len(text) - hold)]
    new, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
    return new


# ---------------------------------------------------------------------------------------------
# The app.


class Metrics:
  def __init__(self):
    self.requests: dict[tuple[str, int], int] = {}

  def count(self, path: str, status: int) -> None:
    path = path if path in ROUTES else "other"  # a bounded set of label values
    self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

  def text(self, engine: Engine) -> str:
    st = engine.stats
    lines = ["# HELP t2jax_requests_total HTTP requests by path and status.",
             "# TYPE t2jax_requests_total counter"]
    lines += [f't2jax_requests_total{{path="{p}",status="{s}"}} {n}'
              for (p, s), n in sorted(self.requests.items())]
    lines += ["# HELP t2jax_finished_total Engine requests by finish reason.",
              "# TYPE t2jax_finished_total counter"]
    lines += [f't2jax_finished_total{{reason="{r}"}} {n}' for r, n in sorted(st.finished.items())]
    for name, kind, value, help_ in [
        ("prompt_tokens_total", "counter", st.prompt_tokens, "Prompt tokens admitted."),
        ("generated_tokens_total", "counter", st.generated_tokens, "Tokens generated."),
        ("queue_depth", "gauge", engine.queue_depth, "Requests waiting for a slot."),
        ("busy_slots", "gauge", engine.busy_slots, "Slots running a request."),
        ("slots", "gauge", engine.n, "Decode slots."),
        ("admissions_total", "counter", st.admissions, "Admission programs run."),
        ("admission_seconds_total", "counter", round(st.admission_s, 6),
         "Pass 1 + pass-2 prefill (one program per admission)."),
        ("decode_steps_total", "counter", st.decode_steps, "Decode steps run."),
        ("decode_seconds_total", "counter", round(st.decode_s, 6), "Time in decode steps.")]:
      lines += [f"# HELP t2jax_{name} {help_}", f"# TYPE t2jax_{name} {kind}",
                f"t2jax_{name} {value}"]
    return "\n".join(lines) + "\n"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def build_app(engine: Engine):
  """The FastAPI app over a started engine (its thread steps it)."""
  # pylint: disable=import-outside-toplevel
  from fastapi import FastAPI, Request as HTTPRequest
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from starlette.exceptions import HTTPException

  app = FastAPI(title="t2jax", docs_url=None, redoc_url=None)
  metrics = Metrics()
  created = int(time.time())

  def fail(path: str, status: int, message: str, kind: str, param=None, code=None):
    metrics.count(path, status)
    return JSONResponse(error_body(message, kind, param, code), status_code=status)

  @app.exception_handler(HTTPException)
  async def http_error(request: HTTPRequest, exc: HTTPException):
    return fail(request.url.path, exc.status_code, str(exc.detail), "invalid_request_error")

  @app.exception_handler(Exception)
  async def any_error(request: HTTPRequest, exc: Exception):  # no request crashes the server
    return fail(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}",
                "server_error")

  @app.get("/health")
  async def health():
    if engine.closed:
      return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ok", "slots": engine.n, "busy_slots": engine.busy_slots,
            "queue_depth": engine.queue_depth}

  @app.get("/metrics")
  async def prometheus():
    return PlainTextResponse(metrics.text(engine), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "t2jax"}
        for m in engine.models]}

  async def complete(request: HTTPRequest, kind: str):
    path = request.url.path
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return fail(path, 400, f"the body is not valid JSON: {e}", "invalid_request_error")
    try:
      req, opts = parse(engine, body, kind)
    except RequestError as e:
      return fail(path, 400, str(e), "invalid_request_error", e.param)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    on_event = lambda h, toks, fin: loop.call_soon_threadsafe(events.put_nowait, (toks, fin))
    try:
      handle = engine.submit(req, on_event)
    except engine_lib.QueueFull as e:
      return fail(path, 429, str(e), "rate_limit_error", code="rate_limit_exceeded")
    except engine_lib.ShuttingDown as e:
      return fail(path, 503, str(e), "server_error", code="shutting_down")
    except RequestError as e:
      return fail(path, 400, str(e), "invalid_request_error", e.param)
    metrics.count(path, 200)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    text = TextStream(engine.model.tokenizer, opts["stops"])
    shared = {"id": rid, "created": int(time.time()), "model": opts["model"]}

    def finish_reason():
      if text.stopped:
        return "stop"
      return {"stop": "stop", "length": "length"}.get(handle.finish_reason, handle.finish_reason)

    async def next_text(poll: bool):
      """(new text, finished), cancelling the request at a stop sequence."""
      while True:
        try:
          toks, fin = await asyncio.wait_for(events.get(), 1.0 if poll else None)
          break
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            raise ConnectionError from None
      new = text.push(toks, fin)
      if text.stopped and not fin:
        handle.cancel()  # the slot frees at the engine's next step
        fin = True
      return new, fin

    if opts["stream"]:
      async def sse():
        try:
          fin = False
          first = True
          while not fin:
            new, fin = await next_text(poll=False)
            if not new and not fin and not first:
              continue
            delta = {"role": "assistant", "content": new} if first else {"content": new}
            yield _chunk(kind, shared, handle, new, delta, None)
            first = False
          yield _chunk(kind, shared, handle, "", {}, finish_reason())
          yield "data: [DONE]\n\n"
        finally:
          handle.cancel()  # a no-op when finished; frees the slot when the client left
      return StreamingResponse(sse(), media_type="text/event-stream")
    out, fin = [], False
    try:
      while not fin:
        new, fin = await next_text(poll=True)
        out.append(new)
    except ConnectionError:  # the client left: free the slot; nobody reads this reply
      handle.cancel()
      return fail(path, 499, "the client closed the connection.", "invalid_request_error")
    except asyncio.CancelledError:
      handle.cancel()
      raise
    if handle.finish_reason == "error":  # the engine's program failed (it serves on)
      return fail(path, 500, "generation failed inside the engine; the request can be retried.",
                  "server_error")
    content = "".join(out)
    usage = {"prompt_tokens": len(req.prompt), "completion_tokens": len(handle.tokens),
             "total_tokens": len(req.prompt) + len(handle.tokens)}
    if kind == "chat":
      choice = {"index": 0, "message": {"role": "assistant", "content": content},
                "logprobs": None, "finish_reason": finish_reason()}
      obj = "chat.completion"
    else:
      choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason()}
      obj = "text_completion"
    return {**shared, "object": obj, "choices": [choice], "usage": usage,
            "mixture": handle.mixture}

  @app.post("/v1/chat/completions")
  async def chat(request: HTTPRequest):
    return await complete(request, "chat")

  @app.post("/v1/completions")
  async def completions(request: HTTPRequest):
    return await complete(request, "text")

  return app


def _chunk(kind: str, shared: dict, handle, new: str, delta: dict, finish) -> str:
  if kind == "chat":
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": 0, "text": new, "logprobs": None, "finish_reason": finish}
    obj = "text_completion"
  return "data: " + json.dumps({**shared, "object": obj, "choices": [choice],
                                "mixture": handle.mixture}) + "\n\n"


# ---------------------------------------------------------------------------------------------
# Process: CLI, uvicorn, signals.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m t2jax.serve", description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None,
                 help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct (default)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  add_two_pass_args(p)
  p.add_argument("--slots", type=int, default=16, help="requests decoded together")
  p.add_argument("--max-len", type=int, default=1024, help="context per slot: prompt + new "
                 "tokens (capped by the model's)")
  p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
  p.add_argument("--admit-rows", type=int, default=1, help="requests prefilled together (1: a "
                 "request's output never depends on what is admitted with it; raise it on "
                 "accelerators)")
  p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to "
                 "finish after SIGTERM")
  p.add_argument("--warmup", action="store_true", help="compile the admission programs of "
                 "chat prompts up to ~150 tokens and the decode step before serving (a few "
                 "seconds each on the default model)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  return p.parse_args(argv)


def build_engine(args) -> Engine:
  """The engine the CLI flags describe (the model and experts loaded)."""
  # pylint: disable=import-outside-toplevel
  import t2jax

  experts, kw = load_two_pass(args)  # first: a bad flag fails before the model loads
  model = t2jax.load_model(args.model, dtype=args.dtype)
  return Engine(model, experts or None, strategy=args.strategy, threshold=args.threshold,
                slots=args.slots, max_len=args.max_len, max_queue=args.max_queue,
                admit_rows=args.admit_rows, **kw)


def warmup_requests(engine: Engine) -> list[Request]:
  """Chat requests whose prompts and pass-1 questions fall in the length buckets of short to
  medium chat prompts (what --warmup compiles)."""
  out = []
  for words in range(1, 121, 12):
    req = engine.chat_request([{"role": "user", "content": " ".join(["word"] * words)}], 1)
    if len(req.prompt) < engine.s:
      out.append(req)
  return out


def make_server(engine: Engine, host: str, port: int, grace_s: float):
  """A uvicorn Server over the app; SIGTERM/SIGINT stop the engine admitting at once."""
  import uvicorn  # pylint: disable=import-outside-toplevel

  config = uvicorn.Config(build_app(engine), host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=max(1, math.ceil(grace_s)))

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      engine.stop_admitting()
      super().handle_exit(sig, frame)

  return Server(config)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    engine = build_engine(args)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.warmup:
    t0 = time.perf_counter()
    n = engine.warmup(warmup_requests(engine))
    print(f"t2jax compiled {n} admission programs in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr, flush=True)
  engine.start()
  server = make_server(engine, args.host, args.port, args.grace)
  # uvicorn re-raises the signal it stopped on once it has shut down; after a clean shutdown
  # SIGTERM's default action would turn exit status 0 into a kill
  signal.signal(signal.SIGTERM, lambda *_: None)
  print(f"t2jax serving {engine.models} on http://{args.host}:{args.port} "
        f"({engine.n} slots, context {engine.s})", file=sys.stderr, flush=True)
  try:
    server.run()
  finally:
    engine.close(grace_s=args.grace)
  return 0


if __name__ == "__main__":
  sys.exit(main())
